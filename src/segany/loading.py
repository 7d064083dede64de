"""Loading and saving models for the tools: by registry name or from a weights file.

:func:`load_model` is what the command line, the data engine and the web app call.
Without a checkpoint, a registry model gets its official weights (Meta's SAM and SAM 2,
MobileSAM's: downloaded once into the cache, see :mod:`segany.weights`) or its bundled
ones (``default``); with one, the architecture is the one :func:`save_model` stored in it, or
is recognised from its tensors. The registry itself (configurations, builders) is
:mod:`segany.build`; reading and converting weight files is :mod:`segany.checkpoint`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from . import weights
from .build import (
    CONFIG_METADATA_KEY,
    MODEL_NAMES,
    SAM2_MODEL_CONFIGS,
    SamConfig,
    build_model_from_config,
    build_sam,
    canonical_model_name,
    config_from_dict,
    config_to_dict,
    is_sam2_name,
    registry_config,
    sam2_config_name,
)
from .checkpoint import (
    detect_model_type,
    is_sam2_state_dict,
    load_state_dict_into,
    read_metadata,
    read_state_dict,
    save_weights,
)
from .errors import SeganyError
from .modeling import Sam, Sam2
from .modeling.sam2 import Sam2Config

# A SAM 2 model's entry in CONFIG_METADATA_KEY: {"sam2_model": "sam2.1_t"} (its
# architecture is the official one of that name).
SAM2_METADATA_FIELD = "sam2_model"


def resolve_device(device: str | None) -> torch.device:
    """``None``/"auto" picks CUDA when available, else CPU; bad names are a SeganyError."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise SeganyError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SeganyError(
            f"device {device!r} requested but CUDA is not available; use --device cpu"
        )
    return resolved


def load_model(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = None,
) -> Sam | Sam2:
    """Model for the tools: by name (``default`` when None), from ``checkpoint`` if given.

    With a checkpoint and no name, the architecture is read from the checkpoint.
    Meta's (SAM and SAM 2) and MobileSAM's models without a checkpoint use their official
    weights, downloaded into the cache on first use (see ``segany weights``).
    """
    return load_model_and_config(name, checkpoint, device)[0]


def load_model_and_config(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = None,
) -> tuple[Sam | Sam2, SamConfig | Sam2Config]:
    """:func:`load_model` and the architecture it built (to save the model again)."""
    target = resolve_device(device)
    if name is not None:
        name = canonical_model_name(name)
    if checkpoint is None:
        name = name or "default"
        config = registry_config(name)
        official = official_weights_for(name)
        if official is None:
            return build_sam(name).to(target), config
        checkpoint = weights.download(official.name)
    state = read_state_dict(checkpoint)
    stored = read_metadata(checkpoint).get(CONFIG_METADATA_KEY)
    if name is None and stored is not None:
        config = _config_from_metadata(stored)
        model = build_model_from_config(config)
        load_state_dict_into(model, state, str(checkpoint), "the checkpoint's own config")
        return model.to(target), config
    if name is None:
        name = detect_model_type(state)
        if name is None:
            raise SeganyError(
                f"cannot tell which model {checkpoint} is for; name it with --model "
                f"({', '.join(MODEL_NAMES)})"
            )
    config = registry_config(name)
    model = build_model_from_config(config)
    load_state_dict_into(model, state, str(checkpoint), name)
    return model.to(target), config


def _config_to_metadata(config: SamConfig | Sam2Config) -> str:
    if isinstance(config, Sam2Config):
        return json.dumps({SAM2_METADATA_FIELD: sam2_config_name(config)})
    return json.dumps(config_to_dict(config))


def _config_from_metadata(text: str) -> SamConfig | Sam2Config:
    data = json.loads(text)
    if SAM2_METADATA_FIELD in data:
        name = data[SAM2_METADATA_FIELD]
        if name not in SAM2_MODEL_CONFIGS:
            raise SeganyError(f"the checkpoint names an unknown SAM 2 model {name!r}")
        return SAM2_MODEL_CONFIGS[name]
    return config_from_dict(data)


def model_family(name: str | None = None, checkpoint: str | Path | None = None) -> str:
    """ "sam2" or "sam": the family of the model :func:`load_model` would build from the same
    arguments (a checkpoint without a name is read to tell)."""
    if name is not None:
        return "sam2" if is_sam2_name(canonical_model_name(name)) else "sam"
    if checkpoint is None:
        return "sam"
    return "sam2" if is_sam2_state_dict(read_state_dict(checkpoint)) else "sam"


def official_weights_for(name: str) -> weights.WeightsInfo | None:
    """The downloadable official checkpoint of a registry model (any of its names), if it
    has one."""
    name = canonical_model_name(name)
    return next((w for w in weights.WEIGHTS.values() if w.model_type == name), None)


def save_model(
    model: Sam | Sam2,
    path: str | Path,
    config: SamConfig | Sam2Config,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save weights as safetensors with ``config`` inside, so every tool can load them.

    ``dtype`` stores the floating-point weights in another type (see :func:`save_weights`);
    ``metadata`` adds string entries (e.g. the training progress, see segany.train).
    """
    stored = {**(metadata or {}), CONFIG_METADATA_KEY: _config_to_metadata(config)}
    return save_weights(model, path, stored, dtype)
