"""Pairs of segany and reference models with identical random weights (tests and benchmarks).

The reference packages are the official ``segment-anything`` 1.0 (ViT models) and
``mobilesam-mirror`` (MobileSAM's TinyViT, ``vit_t``).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "standins"))

from segany.build import (
    MODEL_CONFIGS,
    SamConfig,
    ViTEncoderConfig,
    build_sam_from_config,
)
from segany.checkpoint import convert_state_dict
from segany.modeling import Sam

# A small ViT that runs in well under a second, still with windowed and global blocks,
# windows that need padding (64 % 14 != 0) and relative positions.
TINY_CONFIG = SamConfig(
    ViTEncoderConfig(embed_dim=64, depth=3, num_heads=2, global_attn_indexes=(1,))
)
CONFIGS: dict[str, SamConfig] = {"tiny": TINY_CONFIG, **MODEL_CONFIGS}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every tensor a random value, including those initialised to 0 or 1.

    Multi-dimensional weights keep PyTorch's (random) initialisation; biases, norms,
    position tables and batch-norm statistics are drawn here so that no code path
    is hidden behind a zero.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            elif name.endswith("weight") and tensor.ndim == 1:
                tensor.copy_(1.0 + 0.1 * noise)
            elif tensor.ndim == 1 or any(
                key in name for key in ("rel_pos", "pos_embed", "attention_biases", "running_mean")
            ):
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(tensor + 0.01 * noise)  # keep the init's scale
    return model


def build_official(
    config: SamConfig, image_encoder: torch.nn.Module | None = None
) -> torch.nn.Module:
    """The official package's model with the same architecture as ``config``.

    The official package has ViT encoders only; for another encoder pass the module to use
    (the official model just calls it and reads its ``img_size``).
    """
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        TwoWayTransformer,
    )
    from segment_anything.modeling import Sam as OfficialSam

    enc = config.encoder
    if image_encoder is None:
        assert isinstance(enc, ViTEncoderConfig)
        image_encoder = ImageEncoderViT(
            depth=enc.depth,
            embed_dim=enc.embed_dim,
            img_size=config.img_size,
            mlp_ratio=enc.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=enc.num_heads,
            patch_size=enc.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(enc.global_attn_indexes),
            window_size=enc.window_size,
            out_chans=config.prompt_embed_dim,
        )
    grid = config.embedding_size
    model = OfficialSam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    return model.eval()


def default_model_pair() -> tuple[Sam, torch.nn.Module]:
    """(segany's bundled default model, the official model running it): the official
    prompt encoder and mask decoder with the default model's trained weights, around
    (a copy of) its image encoder. Real weights, so real masks."""
    from copy import deepcopy

    from segany.build import MODEL_CONFIGS, build_sam

    ours = build_sam("default").eval()
    reference = build_official(MODEL_CONFIGS["default"], deepcopy(ours.image_encoder))
    reference.load_state_dict(ours.state_dict())
    return ours, reference.eval()


def build_mobile_sam() -> torch.nn.Module:
    """MobileSAM's own ``vit_t`` from mobilesam-mirror."""
    from mobile_sam import sam_model_registry as mobile_registry

    return mobile_registry["vit_t"]().eval()


def make_model_pair(name: str = "tiny", seed: int = 0) -> tuple[Sam, torch.nn.Module]:
    """(segany model, reference model) with identical random weights.

    For ``vit_t`` the reference is MobileSAM's model and its state dict (with the
    classification head SAM does not use) goes through segany's checkpoint conversion.
    """
    config = CONFIGS[name]
    torch.manual_seed(seed)
    ours = build_sam_from_config(config)
    if name == "vit_t":
        reference = randomize_(build_mobile_sam(), seed)
        ours.load_state_dict(convert_state_dict(reference.state_dict()))
    else:
        reference = build_official(config)
        randomize_(ours, seed)
        reference.load_state_dict(ours.state_dict())
    return ours.eval(), reference.eval()
