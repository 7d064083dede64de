"""SAM 2: Hiera image encoder + SAM's prompt encoder + SAM 2's mask decoder + video memory.

The image path of Meta's ``SAM2Base`` (``sam2`` 1.1.0) as used by its
``SAM2ImagePredictor`` (the video memory is not used there):

1. :meth:`Sam2.preprocess`: pixel values / 255, the image squashed to a square of
   ``image_size`` (no aspect ratio kept, no padding; bilinear, antialiased), ImageNet
   mean and std.
2. :meth:`Sam2.encode_image`: the encoder's three FPN levels; the two finest (1/4, 1/8)
   projected by the decoder's ``conv_s0``/``conv_s1``, the coarsest (1/16) plus
   ``no_mem_embed`` (the "no memory" embedding the video model adds to a frame with no
   past frames; the image model is a video model's first frame).
3. ``prompt_encoder`` and ``mask_decoder`` as in SAM, with SAM 2's decoder options
   (:class:`~.mask_decoder.MaskDecoder`). Points are in the ``image_size`` square's pixels;
   a box goes in as two points with labels 2 and 3, before the clicks (SAM 2's
   predictor never uses the prompt encoder's box path).

Parameter names are those of Meta's checkpoints (``image_encoder.*``,
``sam_prompt_encoder.*``, ``sam_mask_decoder.*``, ``no_mem_embed``) except in the decoder
transformer's MLPs, which keep SAM's names (:func:`convert_official_state_dict` renames
Meta's). The video model's parts are held too, as Meta defines them: its plain
parameters and small layers, and the memory attention (:mod:`.memory_attention`) and
memory encoder (:mod:`.memory_encoder`); so every tensor of an official checkpoint loads
with ``strict=True`` (:meth:`Sam2.load_official_state_dict`). The image path runs none of
them; the video predictor runs them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .mask_decoder import MLP, MaskDecoder
from .memory_attention import MemoryAttention, MemoryAttentionConfig
from .memory_encoder import MemoryEncoder, MemoryEncoderConfig
from .prompt_encoder import PromptEncoder
from .sam2_configs import SAM2_ENCODER_CONFIGS, Sam2EncoderConfig
from .sam2_image_encoder import Sam2ImageEncoder
from .transformer import TwoWayTransformer

# ImageNet statistics on the 0-1 scale, as SAM 2's transforms normalise.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Meta's SAM2Base initialises its free-standing embeddings with this truncated normal.
EMBEDDING_INIT_STD = 0.02

# The submodules only the video model runs (prefixes of their parameters' names).
VIDEO_MODULES = ("memory_attention.", "memory_encoder.")

# Meta's names -> segany's: SAM 2's decoder transformer names its MLPs' layers as its MLP
# class does (``layers.0/1``); segany keeps SAM's ``lin1/lin2`` there.
_OFFICIAL_RENAMES = (
    (re.compile(r"^(sam_mask_decoder\.transformer\.layers\.\d+\.mlp\.)layers\.0\."), r"\1lin1."),
    (re.compile(r"^(sam_mask_decoder\.transformer\.layers\.\d+\.mlp\.)layers\.1\."), r"\1lin2."),
)


@dataclass(frozen=True)
class Sam2Config:
    """One official SAM 2 model: its image path, its parameters and its video tracking.

    Sources, one per field: Meta's yaml configs (``configs/sam2/sam2_hiera_*.yaml``,
    ``configs/sam2.1/sam2.1_hiera_*.yaml``, key ``model``); where a yaml leaves a field
    out, ``SAM2Base``'s default (``backbone_stride``); the decoder sizes that
    ``SAM2Base._build_sam_heads`` writes in its code (SAM's decoder); the dynamic
    single-mask choice that ``build_sam2(apply_postprocessing=True)`` (its default, which
    both predictors use) adds. ``tests/test_sam2_image.py`` checks each against them
    (``tests/test_sam2_video.py`` the tracker's options, the fields from
    ``sigmoid_scale_for_mem_enc`` on).

    Attributes:
        encoder: the image encoder's size (:data:`~.sam2_configs.SAM2_ENCODER_CONFIGS`).
        image_size: side of the square model input (yaml ``image_size``).
        backbone_stride: stride of the embedding, 16: a 64 x 64 grid at 1024 px.
        use_high_res_features_in_sam: the decoder takes the 1/4 and 1/8 FPN levels.
        directly_add_no_mem_embed: ``no_mem_embed`` is added to a frame without memory
            (the image path); every official model does.
        iou_prediction_use_sigmoid: IoU predictions end in a sigmoid (in [0, 1]).
        pred_obj_scores, pred_obj_scores_mlp: the object-score token and its MLP head.
        use_multimask_token_for_obj_ptr: see :class:`~.mask_decoder.MaskDecoder`.
        dynamic_multimask_via_stability, dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh: the single-mask fallback (build-time).
        mask_in_chans, decoder_depth, decoder_mlp_dim, decoder_heads,
            num_multimask_outputs, iou_head_depth, iou_head_hidden_dim: SAM's prompt
            encoder and decoder sizes, hard-coded in ``SAM2Base``.
        num_maskmem: memory frames (shape of ``maskmem_tpos_enc``; video only).
        mem_dim: the memory encoder's output channels (yaml ``memory_encoder.out_dim``),
            which the memory attention's keys and values take (its ``kv_in_dim``).
        memory_attention: the memory attention's layers and options (yaml
            ``memory_attention``; its ``d_model`` is :attr:`embed_dim`, and its RoPE
            ``feat_sizes`` are the embedding grid, read from the input).
        memory_encoder: the memory encoder's sizes (yaml ``memory_encoder``; its
            ``in_dim`` is :attr:`embed_dim`, its mask's total stride ``backbone_stride``,
            its position encoding's width ``mem_dim``).
        use_obj_ptrs_in_encoder, use_mlp_for_obj_ptr_proj, proj_tpos_enc_in_obj_ptrs,
            no_obj_embed_spatial: which video-only parameters exist (see :class:`Sam2`);
            the last two are SAM 2.1's.
        sigmoid_scale_for_mem_enc, sigmoid_bias_for_mem_enc: a mask enters the memory
            encoder as ``sigmoid(logits) * scale + bias`` (20, -10: logits-like, +-10).
        binarize_mask_from_pts_for_mem_enc: on frames the user clicked, the mask enters it
            thresholded instead (``build_sam2_video_predictor`` sets it, as
            ``dynamic_multimask_via_stability``).
        use_mask_input_as_output_without_sam: a mask prompt is taken as the frame's mask
            (+-10 logits) without the decoder; the decoder only makes its object pointer.
        multimask_output_in_sam, multimask_output_for_tracking, multimask_min_pt_num,
            multimask_max_pt_num: three masks (the best kept) on first-click frames, and
            on tracked frames, for prompts of min to max points (a box is two).
        max_obj_ptrs_in_encoder: object pointers a frame attends to, at most (16).
        add_tpos_enc_to_obj_ptrs, use_signed_tpos_enc_to_obj_ptrs: pointers carry a sine
            encoding of their frame distance (SAM 2.1), signed by tracking direction.
        only_obj_ptrs_in_the_past_for_eval: prompted frames' pointers only from frames
            already passed in the tracking direction.
        fixed_no_obj_ptr, soft_no_obj_ptr: where no object is seen, the pointer is
            ``no_obj_ptr`` alone (fixed) rather than added to it; soft: mixed by the
            object score's sigmoid instead of its sign.

    The fields from ``sigmoid_scale_for_mem_enc`` on are the video tracker's
    (:mod:`.sam2_tracking`), under their yaml names.
    """

    encoder: Sam2EncoderConfig
    image_size: int = 1024
    backbone_stride: int = 16
    use_high_res_features_in_sam: bool = True
    directly_add_no_mem_embed: bool = True
    iou_prediction_use_sigmoid: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    use_multimask_token_for_obj_ptr: bool = True
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_maskmem: int = 7
    mem_dim: int = 64
    use_obj_ptrs_in_encoder: bool = True
    use_mlp_for_obj_ptr_proj: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = False
    no_obj_embed_spatial: bool = False
    memory_attention: MemoryAttentionConfig = field(default_factory=MemoryAttentionConfig)
    memory_encoder: MemoryEncoderConfig = field(default_factory=MemoryEncoderConfig)
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    binarize_mask_from_pts_for_mem_enc: bool = True
    use_mask_input_as_output_without_sam: bool = True
    multimask_output_in_sam: bool = True
    multimask_output_for_tracking: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    max_obj_ptrs_in_encoder: int = 16
    add_tpos_enc_to_obj_ptrs: bool = False
    use_signed_tpos_enc_to_obj_ptrs: bool = False
    only_obj_ptrs_in_the_past_for_eval: bool = True
    fixed_no_obj_ptr: bool = True
    soft_no_obj_ptr: bool = False

    @property
    def embed_dim(self) -> int:
        """Channels of the embedding, the prompt tokens and the decoder: the neck's."""
        return self.encoder.d_model

    @property
    def embedding_size(self) -> int:
        """Side of the (square) image embedding grid: 64 for 1024 px."""
        return self.image_size // self.backbone_stride


# SAM 2.1 added a learned "no object" embedding for memories and a (signed, projected)
# temporal encoding of the object pointers; the image path is the same in both versions.
_SAM2_1 = {
    "proj_tpos_enc_in_obj_ptrs": True,
    "no_obj_embed_spatial": True,
    "add_tpos_enc_to_obj_ptrs": True,
    "use_signed_tpos_enc_to_obj_ptrs": True,
}
_SIZES = {"t": "hiera_tiny", "s": "hiera_small", "b+": "hiera_base_plus", "l": "hiera_large"}


def short_name(config_name: str) -> str:
    """Meta's config name -> segany's registry name: ``sam2.1_hiera_b+`` -> ``sam2.1_b+``."""
    return config_name.replace("_hiera_", "_")


# The official models by the name of their yaml config (``sam2.1_hiera_b+`` etc.).
SAM2_CONFIGS: dict[str, Sam2Config] = {
    **{
        f"sam2_hiera_{suffix}": Sam2Config(SAM2_ENCODER_CONFIGS[size])
        for suffix, size in _SIZES.items()
    },
    **{
        f"sam2.1_hiera_{suffix}": Sam2Config(SAM2_ENCODER_CONFIGS[size], **_SAM2_1)
        for suffix, size in _SIZES.items()
    },
}


class Sam2ImageEmbedding(NamedTuple):
    """What the decoder needs of an image (Meta's predictor's ``_features``).

    Attributes:
        image_embed: (B, C, h, w), the 1/16 FPN level plus ``no_mem_embed`` (64 x 64 at
            1024 px).
        high_res_features: the 1/4 and 1/8 levels projected for the decoder:
            (B, C / 8, 4h, 4w) and (B, C / 4, 2h, 2w).
    """

    image_embed: torch.Tensor
    high_res_features: list[torch.Tensor]


def _trunc_normal_parameter(*shape: int) -> nn.Parameter:
    """A parameter drawn as Meta initialises SAM2Base's embeddings."""
    return nn.Parameter(nn.init.trunc_normal_(torch.zeros(shape), std=EMBEDDING_INIT_STD))


class Sam2(nn.Module):
    """SAM 2, with the image path's methods; see the module docstring for the path.

    The video-only parts held (unused by the image path; shapes from ``config``):
    ``memory_attention`` (:class:`~.memory_attention.MemoryAttention`),
    ``memory_encoder`` (:class:`~.memory_encoder.MemoryEncoder`), ``no_mem_pos_enc``
    (1, 1, C), ``maskmem_tpos_enc`` (num_maskmem, 1, 1, mem_dim), ``no_obj_ptr`` (1, C),
    ``no_obj_embed_spatial`` (1, mem_dim, SAM 2.1), ``mask_downsample`` (a 4x4 stride-4
    conv), ``obj_ptr_proj`` (a 3-layer MLP or a linear layer) and ``obj_ptr_tpos_proj``
    (linear C -> mem_dim, SAM 2.1).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: Sam2ImageEncoder,
        sam_prompt_encoder: PromptEncoder,
        sam_mask_decoder: MaskDecoder,
        config: Sam2Config,
    ) -> None:
        super().__init__()
        if not config.directly_add_no_mem_embed:
            raise ValueError("the image path needs directly_add_no_mem_embed (as every SAM 2)")
        if not sam_mask_decoder.use_high_res_features:
            raise ValueError("SAM 2's image path takes a decoder with high-resolution features")
        self.config = config
        self.image_encoder = image_encoder
        self.sam_prompt_encoder = sam_prompt_encoder
        self.sam_mask_decoder = sam_mask_decoder
        dim = config.embed_dim
        self.no_mem_embed = _trunc_normal_parameter(1, 1, dim)
        self._add_video_parameters(config)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(-1, 1, 1), False)

    def _add_video_parameters(self, config: Sam2Config) -> None:
        """The video model's parts, as Meta's SAM2Base makes them."""
        dim, mem_dim = config.embed_dim, config.mem_dim
        self.memory_attention = MemoryAttention(dim, mem_dim, config.memory_attention)
        self.memory_encoder = MemoryEncoder(
            dim, mem_dim, config.backbone_stride, config.memory_encoder
        )
        self.no_mem_pos_enc = _trunc_normal_parameter(1, 1, dim)
        self.maskmem_tpos_enc = _trunc_normal_parameter(config.num_maskmem, 1, 1, mem_dim)
        if config.pred_obj_scores and config.use_obj_ptrs_in_encoder:
            self.no_obj_ptr = _trunc_normal_parameter(1, dim)
        if config.no_obj_embed_spatial:
            self.no_obj_embed_spatial = _trunc_normal_parameter(1, mem_dim)
        if config.use_obj_ptrs_in_encoder:
            self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
            self.obj_ptr_proj = (
                MLP(dim, dim, dim, 3) if config.use_mlp_for_obj_ptr_proj else nn.Linear(dim, dim)
            )
        if config.proj_tpos_enc_in_obj_ptrs:
            self.obj_ptr_tpos_proj = nn.Linear(dim, mem_dim)

    @classmethod
    def from_config(cls, config: Sam2Config) -> Sam2:
        """A model of ``config`` (:data:`SAM2_CONFIGS`) with fresh weights."""
        dim, grid = config.embed_dim, config.embedding_size
        prompt_encoder = PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        )
        decoder = MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=dim,
                num_heads=config.decoder_heads,
                mlp_dim=config.decoder_mlp_dim,
            ),
            num_multimask_outputs=config.num_multimask_outputs,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
            # conv_s0/conv_s1 take the FPN levels, which have the neck's width.
            high_res_in_chans=(dim, dim) if config.use_high_res_features_in_sam else None,
            pred_obj_scores=config.pred_obj_scores,
            pred_obj_scores_mlp=config.pred_obj_scores_mlp,
            iou_prediction_use_sigmoid=config.iou_prediction_use_sigmoid,
            dynamic_multimask_via_stability=config.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=config.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=config.dynamic_multimask_stability_thresh,
            use_multimask_token_for_obj_ptr=config.use_multimask_token_for_obj_ptr,
        )
        return cls(Sam2ImageEncoder.from_config(config.encoder), prompt_encoder, decoder, config)

    # SAM's names for the two heads, so that code written for Sam finds them.
    @property
    def prompt_encoder(self) -> PromptEncoder:
        return self.sam_prompt_encoder

    @property
    def mask_decoder(self) -> MaskDecoder:
        return self.sam_mask_decoder

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels (1024)."""
        return self.config.image_size

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB pixel values in 0-255 (any dtype) -> (B, 3, S, S) model input,
        S = :attr:`image_size`.

        As SAM 2's transforms: to 0-1, resized to S x S whatever the aspect ratio
        (bilinear, ``align_corners=False``, antialiased, which matters only when a side
        shrinks), then normalised. Prompts follow the same squashing: x * S / W, y * S / H.
        """
        x = pixels.float() / 255.0
        size = (self.image_size, self.image_size)
        x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: torch.Tensor) -> Sam2ImageEmbedding:
        """Preprocessed (B, 3, S, S) images -> what the decoder takes of them."""
        fine, medium, coarse = self.image_encoder(images).backbone_fpn
        high_res = self.sam_mask_decoder.project_high_res([fine, medium])
        # no_mem_embed is (1, 1, C): one value per channel.
        image_embed = coarse + self.no_mem_embed.view(1, -1, 1, 1)
        return Sam2ImageEmbedding(image_embed, high_res)

    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the weights of an official checkpoint (its ``model`` dict, Meta's names)
        strictly: every parameter of this model from it, every tensor of it used."""
        self.load_state_dict(convert_official_state_dict(state_dict), strict=True)


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's parameter names -> segany's (only the decoder transformer's MLPs differ);
    the tensors are not copied."""
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OFFICIAL_RENAMES:
            key = pattern.sub(replacement, key)
        converted[key] = value
    return converted


def split_official_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An official SAM 2 state dict -> (all but the memory modules' tensors, the memory
    attention's and memory encoder's tensors (:data:`VIDEO_MODULES`)), both under segany's
    names. :class:`Sam2` holds both; the first also holds the video model's small
    parameters (``maskmem_tpos_enc``, ``obj_ptr_proj``, ...)."""
    converted = convert_official_state_dict(state_dict)
    video = {key: value for key, value in converted.items() if key.startswith(VIDEO_MODULES)}
    rest = {key: value for key, value in converted.items() if key not in video}
    return rest, video
