"""Hugging Face transformers' SAM 2 parameter names -> Meta's, and which official model a
SAM 2 state dict is.

transformers' ``Sam2Model`` (image) and ``Sam2VideoModel`` (image + video memory) name
SAM 2's tensors their own way; their conversion from Meta's checkpoints renamed every
tensor, stacked the prompt encoder's four point embeddings into one table and stored the
random-Fourier matrix twice (once for the prompts, once for the image-wide positional
encoding). :func:`convert_hf_sam2_state_dict` undoes all of it, giving the keys and shapes
of Meta's checkpoint ``model`` dict, which
:meth:`segany.modeling.sam2.Sam2.load_official_state_dict` reads. Everything else has the
same shape in both (Hiera's fused qkv, the position embeddings, ``maskmem_tpos_enc``);
RoPE and sine tables are computed, not stored.

A ``Sam2Model`` dict has no video memory: its conversion lacks ``memory_attention.*``,
``memory_encoder.*`` and the other video-only tensors (:data:`HF_VIDEO_ONLY_PREFIXES`).

:func:`detect_sam2_model` works on Meta's names, so it serves official ``.pt`` files and
converted transformers files alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import Tensor

from .modeling.sam2 import SAM2_CONFIGS

# Keys that only transformers' SAM 2 has, all present in both its image and video models:
# the Hiera trunk's windowed position embedding, the decoder's high-resolution projection
# and the "no memory" embedding. SAM 1 in transformers' naming (``vision_encoder.layers.*``,
# no backbone), SAM 3's tracker (a ViT backbone, no ``pos_embed_window``) and EdgeTAM (a
# timm backbone) lack at least one of them.
_HF_SAM2_MARKERS = frozenset(
    {
        "vision_encoder.backbone.pos_embed_window",
        "mask_decoder.conv_s0.weight",
        "no_memory_embedding",
    }
)

# The tensors of transformers' Sam2VideoModel that its Sam2Model lacks (key prefixes).
HF_VIDEO_ONLY_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "object_pointer_proj.",
    "temporal_positional_encoding_projection_layer.",
    "no_memory_positional_encoding",
    "memory_temporal_positional_encoding",
    "no_object_pointer",
    "occlusion_spatial_embedding_parameter",
)

# transformers keeps the prompts' Fourier matrix in the prompt encoder and a copy, which
# its image-wide positional encoding reads, at the top level; Meta has one matrix for both.
_HF_PROMPT_FOURIER = "prompt_encoder.shared_embedding.positional_embedding"
_HF_IMAGE_FOURIER = "shared_image_embedding.positional_embedding"
_META_FOURIER = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
# transformers stacks Meta's four (1, C) point embeddings (negative click, positive click,
# box corner 1, box corner 2) into one (4, C) table; rows are label order in both.
_HF_POINT_TABLE = "prompt_encoder.point_embed.weight"
_META_POINT_EMBEDDING = "sam_prompt_encoder.point_embeddings.{}.weight"
# Meta's mask downsampler is one Sequential of (conv, LayerNorm2d, GELU) x 4 and a final
# 1x1 conv (kernel 3, stride 2, total stride 16 in every official config); transformers
# makes each triple a layer, so its layer i's conv is Meta's element 3i, its norm 3i + 1.
_MASK_DOWNSAMPLER_LAYERS = 4

# transformers' names -> Meta's, applied to every key in this order (each pattern once).
# Prefixes go first, so that the later patterns can rely on Meta's module names.
_HF_TO_META_RENAMES: tuple[tuple[str, str], ...] = (
    # The image encoder: transformers splits it into backbone (Meta's trunk) and neck.
    (r"^vision_encoder\.backbone\.", "image_encoder.trunk."),
    (r"^vision_encoder\.neck\.convs\.(\d+)\.", r"image_encoder.neck.convs.\1.conv."),
    (r"^image_encoder\.trunk\.patch_embed\.projection\.", "image_encoder.trunk.patch_embed.proj."),
    (r"^(image_encoder\.trunk\.blocks\.\d+\.)layer_norm(\d)\.", r"\1norm\2."),
    # Two-layer MLPs (Hiera blocks, the decoder transformer): proj_in/out are layers 0/1.
    (r"^(image_encoder\.trunk\.blocks\.\d+\.mlp\.)proj_in\.", r"\1layers.0."),
    (r"^(image_encoder\.trunk\.blocks\.\d+\.mlp\.)proj_out\.", r"\1layers.1."),
    # SAM 2 prefixes its heads with sam_.
    (r"^prompt_encoder\.", "sam_prompt_encoder."),
    (r"^mask_decoder\.", "sam_mask_decoder."),
    (r"^sam_prompt_encoder\.mask_embed\.conv1\.", "sam_prompt_encoder.mask_downscaling.0."),
    (r"^sam_prompt_encoder\.mask_embed\.layer_norm1\.", "sam_prompt_encoder.mask_downscaling.1."),
    (r"^sam_prompt_encoder\.mask_embed\.conv2\.", "sam_prompt_encoder.mask_downscaling.3."),
    (r"^sam_prompt_encoder\.mask_embed\.layer_norm2\.", "sam_prompt_encoder.mask_downscaling.4."),
    (r"^sam_prompt_encoder\.mask_embed\.conv3\.", "sam_prompt_encoder.mask_downscaling.6."),
    (r"^(sam_mask_decoder\.transformer\.layers\.\d+\.)layer_norm(\d)\.", r"\1norm\2."),
    (r"^(sam_mask_decoder\.transformer\.)layer_norm_final_attn\.", r"\1norm_final_attn."),
    (r"^(sam_mask_decoder\.transformer\.layers\.\d+\.mlp\.)proj_in\.", r"\1layers.0."),
    (r"^(sam_mask_decoder\.transformer\.layers\.\d+\.mlp\.)proj_out\.", r"\1layers.1."),
    (r"^sam_mask_decoder\.upscale_conv1\.", "sam_mask_decoder.output_upscaling.0."),
    (r"^sam_mask_decoder\.upscale_layer_norm\.", "sam_mask_decoder.output_upscaling.1."),
    (r"^sam_mask_decoder\.upscale_conv2\.", "sam_mask_decoder.output_upscaling.3."),
    # Attention output projections, in the decoder and the memory attention alike.
    (r"\.o_proj\.", ".out_proj."),
    # The video model's free-standing tensors and small layers.
    (r"^no_memory_embedding$", "no_mem_embed"),
    (r"^no_memory_positional_encoding$", "no_mem_pos_enc"),
    (r"^memory_temporal_positional_encoding$", "maskmem_tpos_enc"),
    (r"^no_object_pointer$", "no_obj_ptr"),
    (r"^occlusion_spatial_embedding_parameter$", "no_obj_embed_spatial"),
    (r"^temporal_positional_encoding_projection_layer\.", "obj_ptr_tpos_proj."),
    (r"^object_pointer_proj\.", "obj_ptr_proj."),
    # Three-layer MLPs: transformers names them proj_in, layers.0, proj_out. The middle
    # layer moves first, so that proj_in's new name (layers.0) is not moved again.
    (
        r"^((?:sam_mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head"
        r"|pred_obj_score_head))|obj_ptr_proj)\.layers\.0\.",
        r"\1.layers.1.",
    ),
    (
        r"^((?:sam_mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head"
        r"|pred_obj_score_head))|obj_ptr_proj)\.proj_in\.",
        r"\1.layers.0.",
    ),
    (
        r"^((?:sam_mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head"
        r"|pred_obj_score_head))|obj_ptr_proj)\.proj_out\.",
        r"\1.layers.2.",
    ),
    # The memory attention.
    (r"^(memory_attention\.layers\.\d+\.)layer_norm(\d)\.", r"\1norm\2."),
    (r"^memory_attention\.layer_norm\.", "memory_attention.norm."),
    # The memory encoder.
    (r"^memory_encoder\.feature_projection\.", "memory_encoder.pix_feat_proj."),
    (r"^memory_encoder\.projection\.", "memory_encoder.out_proj."),
    (r"^memory_encoder\.memory_fuser\.", "memory_encoder.fuser."),
    (r"^(memory_encoder\.fuser\.layers\.\d+\.)scale$", r"\1gamma"),
    (r"^(memory_encoder\.fuser\.layers\.\d+\.)depthwise_conv\.", r"\1dwconv."),
    (r"^(memory_encoder\.fuser\.layers\.\d+\.)pointwise_conv(\d)\.", r"\1pwconv\2."),
    (r"^(memory_encoder\.fuser\.layers\.\d+\.)layer_norm\.", r"\1norm."),
    *(
        pair
        for i in range(_MASK_DOWNSAMPLER_LAYERS)
        for pair in (
            (
                rf"^memory_encoder\.mask_downsampler\.layers\.{i}\.conv\.",
                f"memory_encoder.mask_downsampler.encoder.{3 * i}.",
            ),
            (
                rf"^memory_encoder\.mask_downsampler\.layers\.{i}\.layer_norm\.",
                f"memory_encoder.mask_downsampler.encoder.{3 * i + 1}.",
            ),
        )
    ),
    (
        r"^memory_encoder\.mask_downsampler\.final_conv\.",
        f"memory_encoder.mask_downsampler.encoder.{3 * _MASK_DOWNSAMPLER_LAYERS}.",
    ),
)
_COMPILED_RENAMES = tuple((re.compile(pattern), repl) for pattern, repl in _HF_TO_META_RENAMES)


def is_hf_sam2_state_dict(keys: Iterable[str]) -> bool:
    """Whether ``keys`` are those of a transformers ``Sam2Model`` or ``Sam2VideoModel``
    state dict (not SAM 1's transformers naming, nor Meta's names)."""
    missing = set(_HF_SAM2_MARKERS)
    for key in keys:
        missing.discard(key)
        if not missing:
            return True
    return False


def _meta_name(hf_name: str) -> str:
    for pattern, replacement in _COMPILED_RENAMES:
        hf_name = pattern.sub(replacement, hf_name)
    return hf_name


def convert_hf_sam2_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers ``Sam2Model``/``Sam2VideoModel`` state dict -> Meta's SAM 2 names
    and shapes (the keys of an official checkpoint's ``model`` dict; for ``Sam2Model``,
    those of its image path only). Tensors are not copied, except the four point
    embeddings cut from transformers' table.

    Raises:
        ValueError: ``state`` is not such a dict, or its two copies of the Fourier matrix
            differ (Meta's model has one).
    """
    if not is_hf_sam2_state_dict(state):
        raise ValueError("not a transformers SAM 2 state dict")
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in (_HF_PROMPT_FOURIER, _HF_IMAGE_FOURIER, _HF_POINT_TABLE):
            continue
        converted[_meta_name(key)] = value
    fourier = [state[key] for key in (_HF_PROMPT_FOURIER, _HF_IMAGE_FOURIER) if key in state]
    if not fourier:
        raise ValueError(f"the state dict has neither {_HF_PROMPT_FOURIER} nor {_HF_IMAGE_FOURIER}")
    if len(fourier) == 2 and not fourier[0].equal(fourier[1]):
        raise ValueError(
            f"{_HF_PROMPT_FOURIER} and {_HF_IMAGE_FOURIER} differ; SAM 2 has one matrix for both"
        )
    converted[_META_FOURIER] = fourier[0]
    if _HF_POINT_TABLE in state:
        table = state[_HF_POINT_TABLE]
        for label in range(table.shape[0]):
            # clone: a slice would share the table's storage, which safetensors refuses.
            converted[_META_POINT_EMBEDDING.format(label)] = table[label : label + 1].clone()
    return converted


def _sam2_signatures() -> dict[tuple[int, int, bool], str]:
    """(trunk embed dim, trunk blocks, is SAM 2.1) -> yaml name, for the official models."""
    return {
        (config.encoder.embed_dim, sum(config.encoder.stages), config.no_obj_embed_spatial): name
        for name, config in SAM2_CONFIGS.items()
    }


def detect_sam2_model(state: Mapping[str, Tensor]) -> str | None:
    """The official SAM 2 model (yaml name, e.g. ``"sam2.1_hiera_t"``) whose architecture
    a state dict with Meta's names has; None when it is no SAM 2 model.

    The size is told by the trunk's width (its patch embedding's output channels) and
    depth (its block count); SAM 2.1 by its extra video parameters ``no_obj_embed_spatial``
    and ``obj_ptr_tpos_proj``. A dict without the video parts (a transformers ``Sam2Model``
    converted) reads as SAM 2.0, whose image path is SAM 2.1's.
    """
    patch = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is None or not any(key.startswith("sam_mask_decoder.") for key in state):
        return None
    blocks = {
        int(match[1])
        for key in state
        if (match := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", key))
    }
    is_2_1 = "no_obj_embed_spatial" in state or "obj_ptr_tpos_proj.weight" in state
    return _sam2_signatures().get((int(patch.shape[0]), len(blocks), is_2_1))
