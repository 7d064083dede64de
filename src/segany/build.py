"""Model configurations, the registry, and builders.

``sam_model_registry[name](checkpoint=None)`` builds a model like the official
registry does; :func:`build_sam` accepts a registry name or a :class:`SamConfig`
for custom sizes. SAM 2 models have their own builder, :func:`build_sam2`, and short
names (:data:`SAM2_MODEL_CONFIGS`: ``sam2.1_t``, ``sam2.1_b+``, ...) that also answer to
Meta's config, checkpoint and Hugging Face names (:func:`sam2_model_name`).

Loading a model for the tools (official weights, checkpoints, the device) and saving one
is :mod:`segany.loading`; its names (:func:`load_model`, ...) are still found here for
code that imports them from ``segany.build``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .errors import SeganyError
from .modeling import (
    EfficientEncoder,
    HybridEncoder,
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TinyViT,
    TwoWayTransformer,
)
from .modeling.efficient_encoder import LITE0_STAGES
from .modeling.sam2 import SAM2_CONFIGS, Sam2, Sam2Config, short_name

BUNDLED_WEIGHTS_DIR = Path(__file__).parent / "pretrained"


@dataclass(frozen=True)
class ViTEncoderConfig:
    """SAM's ViT image encoder (see :class:`~segany.modeling.ImageEncoderViT`)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0

    def build(self, img_size: int, out_chans: int) -> nn.Module:
        return ImageEncoderViT(
            img_size=img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            out_chans=out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=self.window_size,
            global_attn_indexes=self.global_attn_indexes,
        )


@dataclass(frozen=True)
class TinyViTEncoderConfig:
    """TinyViT image encoder (see :class:`~segany.modeling.TinyViT`)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0

    def build(self, img_size: int, out_chans: int) -> nn.Module:
        return TinyViT(
            img_size=img_size,
            embed_dims=self.embed_dims,
            depths=self.depths,
            num_heads=self.num_heads,
            window_sizes=self.window_sizes,
            merge_strides=self.merge_strides,
            mlp_ratio=self.mlp_ratio,
            out_chans=out_chans,
        )


@dataclass(frozen=True)
class HybridEncoderConfig:
    """segany's CPU encoder (see :class:`~segany.modeling.HybridEncoder`)."""

    widths: tuple[int, int, int] = (64, 128, 256)
    depths: tuple[int, int, int] = (2, 2, 6)
    attention_blocks: int = 2
    num_heads: int = 8
    mlp_ratio: float = 2.0
    expand: float = 2.0

    def build(self, img_size: int, out_chans: int) -> nn.Module:
        return HybridEncoder(
            img_size=img_size,
            widths=self.widths,
            depths=self.depths,
            attention_blocks=self.attention_blocks,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            expand=self.expand,
            out_chans=out_chans,
        )


@dataclass(frozen=True)
class EfficientEncoderConfig:
    """EfficientNet-Lite backbone fused at 1/16 (see :class:`~segany.modeling.EfficientEncoder`).

    ``stages``: (expansion, kernel, stride, out channels, blocks) per stage.
    """

    stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES

    def build(self, img_size: int, out_chans: int) -> nn.Module:
        return EfficientEncoder(img_size=img_size, stages=self.stages, out_chans=out_chans)


EncoderConfig = (
    ViTEncoderConfig | TinyViTEncoderConfig | HybridEncoderConfig | EfficientEncoderConfig
)


@dataclass(frozen=True)
class SamConfig:
    """A whole SAM model: an image encoder plus SAM's prompt encoder and mask decoder.

    The image embedding is ``prompt_embed_dim`` x (img_size / 16) x (img_size / 16).
    """

    encoder: EncoderConfig
    img_size: int = 1024
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    # The decoder adds the encoder's 1/4 and 1/8 features into its upscaling (SAM 2's
    # high-resolution features); needs an encoder with forward_features.
    high_res_features: bool = False
    weights_file: str | None = field(default=None, compare=False)

    @property
    def embedding_size(self) -> int:
        return self.img_size // 16


_ENCODER_TYPES: dict[str, type] = {
    "vit": ViTEncoderConfig,
    "tiny_vit": TinyViTEncoderConfig,
    "hybrid": HybridEncoderConfig,
    "efficient": EfficientEncoderConfig,
}
CONFIG_METADATA_KEY = "segany_config"


def config_to_dict(config: SamConfig) -> dict[str, Any]:
    """A JSON-ready description of ``config`` (inverse of :func:`config_from_dict`)."""
    data = asdict(config)
    kind = next(k for k, v in _ENCODER_TYPES.items() if isinstance(config.encoder, v))
    data["encoder"] = {"type": kind, **data["encoder"]}
    data.pop("weights_file")
    return data


def _tuples(value: Any) -> Any:
    """JSON/YAML lists back into the (nested) tuples of the frozen configs."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def config_from_dict(data: Mapping[str, Any]) -> SamConfig:
    """Build a :class:`SamConfig` from a mapping such as a YAML ``model.config`` section."""
    try:
        fields = dict(data)
        encoder = dict(fields.pop("encoder"))
        encoder_type = _ENCODER_TYPES[encoder.pop("type")]
        encoder = {k: _tuples(v) for k, v in encoder.items()}
        return SamConfig(encoder=encoder_type(**encoder), **fields)
    except (KeyError, TypeError) as error:
        kinds = ", ".join(_ENCODER_TYPES)
        raise SeganyError(
            f"invalid model config ({error}); it needs encoder.type ({kinds}) and that "
            "encoder's sizes"
        ) from None


MODEL_CONFIGS: dict[str, SamConfig] = {
    "vit_h": SamConfig(ViTEncoderConfig(1280, 32, 16, (7, 15, 23, 31))),
    "vit_l": SamConfig(ViTEncoderConfig(1024, 24, 16, (5, 11, 17, 23))),
    "vit_b": SamConfig(ViTEncoderConfig(768, 12, 12, (2, 5, 8, 11))),
    "vit_t": SamConfig(TinyViTEncoderConfig()),
    # The project's own small model; weights ship in the package (segany/pretrained/).
    "default": SamConfig(
        EfficientEncoderConfig(), img_size=512, weights_file="default.safetensors"
    ),
}


def build_sam_from_config(config: SamConfig) -> Sam:
    """Build a randomly initialised model in eval mode."""
    grid = config.embedding_size
    dim = config.prompt_embed_dim
    encoder = config.encoder.build(config.img_size, dim)
    high_res_in_chans = None
    if config.high_res_features:
        if not hasattr(encoder, "forward_features"):
            raise SeganyError(
                f"high_res_features needs an encoder with 1/4 and 1/8 features "
                f"({type(encoder).__name__} has none); use encoder type efficient"
            )
        high_res_in_chans = encoder.high_res_channels
    model = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            high_res_in_chans=high_res_in_chans,
        ),
    )
    return model.eval()


# SAM 2 and 2.1, by segany's short names for Meta's official configs (sam2.1_t, sam2_l, ...).
SAM2_MODEL_CONFIGS: dict[str, Sam2Config] = {
    short_name(name): config for name, config in SAM2_CONFIGS.items()
}
# Every registry name, SAM's then SAM 2's (for help texts and error messages).
MODEL_NAMES: tuple[str, ...] = (*MODEL_CONFIGS, *SAM2_MODEL_CONFIGS)

# Meta's and Hugging Face's words for the sizes (checkpoint files, repo names).
_SAM2_SIZE_WORDS = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
_SAM2_NAME = re.compile(r"^(sam2(?:\.1)?)_(?:hiera_)?(t|s|b\+|l|tiny|small|base_plus|large)$")


def sam2_model_name(name: str) -> str | None:
    """segany's short name of a SAM 2 model named any way a user may know it, else None.

    ``sam2.1_t``, ``sam2.1_hiera_t`` (Meta's config), ``configs/sam2.1/sam2.1_hiera_t.yaml``,
    ``sam2.1_hiera_tiny`` / ``sam2.1_hiera_tiny.pt`` (Meta's checkpoint) and
    ``facebook/sam2.1-hiera-tiny`` (Hugging Face) all give ``sam2.1_t``.
    """
    stem = name.strip().lower().rsplit("/", 1)[-1].removesuffix(".yaml").removesuffix(".pt")
    match = _SAM2_NAME.match(stem.replace("-", "_"))
    if match is None:
        return None
    version, size = match.groups()
    return f"{version}_{_SAM2_SIZE_WORDS.get(size, size)}"


def is_sam2_name(name: str) -> bool:
    return sam2_model_name(name) is not None


def _unknown_model(name: str) -> SeganyError:
    return SeganyError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")


def _resolve(name_or_config: str | SamConfig) -> tuple[str, SamConfig]:
    if isinstance(name_or_config, SamConfig):
        return "custom", name_or_config
    if name_or_config in MODEL_CONFIGS:
        return name_or_config, MODEL_CONFIGS[name_or_config]
    if is_sam2_name(name_or_config):
        raise SeganyError(
            f"{name_or_config!r} is a SAM 2 model; build it with build_sam2 (or load_model)"
        )
    raise _unknown_model(name_or_config)


def sam2_registry_config(name: str) -> tuple[str, Sam2Config]:
    """(short name, config) of SAM 2 model ``name`` (any of :func:`sam2_model_name`'s
    forms); SeganyError naming the known models."""
    short = sam2_model_name(name)
    if short is None:
        raise _unknown_model(name)
    return short, SAM2_MODEL_CONFIGS[short]


def canonical_model_name(name: str) -> str:
    """``name`` as the registry spells it (SAM 2's other names -> ``sam2.1_t`` etc.);
    unknown names come back unchanged."""
    return name if name in MODEL_CONFIGS else sam2_model_name(name) or name


def registry_config(name: str) -> SamConfig | Sam2Config:
    """The registry's config of model ``name`` (SAM or SAM 2); SeganyError naming the
    known models."""
    if name not in MODEL_CONFIGS and is_sam2_name(name):
        return sam2_registry_config(name)[1]
    return _resolve(name)[1]


def sam2_config_name(config: Sam2Config) -> str:
    """The short name of an official SAM 2 config (SeganyError for a changed one)."""
    for name, known in SAM2_MODEL_CONFIGS.items():
        if known == config:
            return name
    raise SeganyError("only the official SAM 2 models can be saved with their architecture")


def build_model_from_config(config: SamConfig | Sam2Config) -> Sam | Sam2:
    """A randomly initialised SAM or SAM 2 model of ``config``, in eval mode."""
    if isinstance(config, Sam2Config):
        return Sam2.from_config(config).eval()
    return build_sam_from_config(config)


def build_sam(
    name_or_config: str | SamConfig = "default",
    checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None,
) -> Sam:
    """Build a model by registry name or config, optionally loading a checkpoint.

    Accepts official ``sam_vit_*.pth`` state dicts, MobileSAM's ``mobile_sam.pt``,
    Hugging Face ``facebook/sam-vit-*`` safetensors and segany safetensors.
    Without a checkpoint, a model with bundled weights (``default``) loads them.
    """
    name, config = _resolve(name_or_config)
    model = build_sam_from_config(config)
    if checkpoint is None and config.weights_file is not None:
        bundled = BUNDLED_WEIGHTS_DIR / config.weights_file
        if bundled.is_file():
            checkpoint = bundled
        else:
            warnings.warn(
                f"model {name!r} has no bundled weights in this install ({bundled}); "
                "it is randomly initialised",
                stacklevel=2,
            )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, model_name=name)
    return model.eval()


def _registry_entry(name: str) -> Callable[..., Sam]:
    def build(checkpoint: str | Path | None = None) -> Sam:
        return build_sam(name, checkpoint)

    build.__name__ = f"build_sam_{name}"
    build.__doc__ = f"Build the {name!r} model, optionally loading ``checkpoint``."
    return build


sam_model_registry: Mapping[str, Callable[..., Sam]] = {
    name: _registry_entry(name) for name in MODEL_CONFIGS
}


def build_sam2(
    name: str = "sam2.1_t",
    checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None,
) -> Sam2:
    """Build SAM 2 model ``name`` (``sam2.1_t``, ``sam2_b+``, Meta's config or checkpoint
    name, ...: see :func:`sam2_model_name`), optionally loading ``checkpoint``.

    Accepts Meta's ``sam2*_hiera_*.pt``, Hugging Face ``facebook/sam2*`` safetensors and
    segany safetensors. Without a checkpoint the weights are random; for the official
    weights (downloaded once) use :func:`segany.load_model`.
    """
    short, config = sam2_registry_config(name)
    model = Sam2.from_config(config)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, model_name=short)
    return model.eval()


# Moved to segany.loading: found there on first use, for code that imports them from here.
_MOVED_TO_LOADING = (
    "load_model",
    "load_model_and_config",
    "official_weights_for",
    "resolve_device",
    "save_model",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_LOADING:
        from . import loading  # a forward, not a dependency: see docs/ARCHITECTURE.md

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
