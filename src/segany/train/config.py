"""Training configuration, read from YAML (see ``configs/example.yaml``).

Every key has a default except the data; unknown keys are errors so that typos
do not silently train something else. Paths are relative to the YAML file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import SeganyError

FREEZE_CHOICES = ("none", "encoder", "partial")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 where the CPU/GPU computes it natively
SYNTHETIC_KINDS = ("shapes",)


@dataclass(frozen=True)
class DataSource:
    """One dataset folder; ``split`` is train / val / all (see segany.data).

    ``synthetic: shapes`` instead of a root: ``images`` generated images of random
    shapes (see segany.data.synthetic), a curriculum for training from scratch.
    """

    root: Path | None = None
    format: str | None = None
    split: str = "train"
    weight: float = 1.0
    synthetic: str | None = None
    images: int = 10000


@dataclass(frozen=True)
class ModelSection:
    name: str | None = "vit_t"  # registry architecture, or None with ``config``
    config: dict[str, Any] | None = None  # a custom SamConfig (see segany.build.config_from_dict)
    checkpoint: Path | None = None  # start from these weights (fine-tuning)
    # The encoder's backbone from an ImageNet classifier: "imagenet" (EfficientNet-Lite0
    # from the segany[train] extra) or a classifier .pth; as SAM's ViT starts from MAE.
    encoder_init: str | None = None
    decoder_checkpoint: Path | None = None  # prompt encoder + mask decoder from this file
    # Training in chunks: when this safetensors file exists and records training progress
    # (written by an earlier chunk of the same run), start from its weights at its step
    # instead of the initialisation above (optimizer state starts afresh, re-warmed).
    continue_from: Path | None = None
    freeze: str = "none"  # none | encoder | partial
    trainable_blocks: int = 0  # with freeze=partial: how many last encoder blocks train
    drop_path: float = 0.0


@dataclass(frozen=True)
class AugmentSection:
    scale_jitter: tuple[float, float] = (0.75, 1.25)  # relative to fitting the long side
    hflip: bool = True
    vflip: bool = False
    color: float = 0.2  # strength of brightness/contrast/saturation jitter, 0 = off
    # Chance that objects of another training image are pasted onto an item (simple
    # copy-paste, Ghiasi et al. 2021): more objects, occlusions and backgrounds per image.
    copy_paste: float = 0.0


@dataclass(frozen=True)
class DataSection:
    train: tuple[DataSource, ...]
    val: tuple[DataSource, ...] = ()
    masks_per_image: int = 16
    min_mask_area: int = 16  # pixels after resizing; smaller objects are not trained on
    augment: AugmentSection = AugmentSection()
    workers: int = 0


@dataclass(frozen=True)
class OptimSection:
    steps: int = 1000
    batch_images: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    lr_decay_steps: tuple[int, ...] = ()
    lr_decay_factor: float = 0.1
    layer_lr_decay: float = 1.0
    grad_clip: float = 1.0
    rounds: int = 11  # simulated interactive rounds per mask (the paper's 11)
    rounds_without_click: int = 2  # of those, rounds refining only with the previous mask
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    box_probability: float = 0.5  # first prompt a noisy box (else a point)
    # Training from scratch (see segany.train.warmup): the first steps teach the decoder to
    # follow prompts on random shapes over random embeddings of this scale ...
    geometric_warmup_steps: int = 0
    geometric_embedding_scale: float = 0.1
    # ... then the image embedding is scaled from embedding_scale_start up to 1 over the
    # next embedding_scale_ramp_steps (folded into the encoder's last norm when saved).
    embedding_scale_start: float = 1.0
    embedding_scale_ramp_steps: int = 0
    decoder_lr_scale: float = 1.0  # their lr multiplier after the geometric warm-up
    precision: str = "bf16"
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    optim: OptimSection
    output: Path
    log_every: int = 10
    checkpoint_every: int = 100
    device: str = "auto"
    source: Path | None = field(default=None, compare=False)


def _build(cls: type, raw: Any, where: str, base: Path, **nested: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SeganyError(f"{where} must be a mapping in the config")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SeganyError(
            f"unknown key {where}.{unknown[0]} in the config; known: {', '.join(sorted(known))}"
        )
    values = {**raw, **nested}
    for f in fields(cls):
        if f.name in values and f.name not in nested:
            values[f.name] = _coerce(values[f.name], f.type, f"{where}.{f.name}", base)
    try:
        return cls(**values)
    except TypeError as error:
        raise SeganyError(f"{where}: {error}") from None


def _coerce(value: Any, annotation: str, where: str, base: Path) -> Any:
    """YAML scalars/lists to the annotated type; relative paths against the YAML's folder."""
    if value is None:
        return None
    if "Path" in annotation:
        if not isinstance(value, str) or not value:
            raise SeganyError(f"{where} must be a path in the config, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    if annotation.startswith("tuple"):
        if not isinstance(value, (list, tuple)):
            raise SeganyError(f"{where} must be a list in the config")
        items = annotation.removeprefix("tuple[").removesuffix("]").split(", ")
        if "..." in items:  # tuple[int, ...]: any length, one type
            return tuple(_coerce(v, items[0], where, base) for v in value)
        if len(value) != len(items):
            raise SeganyError(f"{where} must be a list of {len(items)} in the config")
        return tuple(_coerce(v, t, where, base) for v, t in zip(value, items, strict=True))
    if annotation in ("str", "str | None") and not isinstance(value, str):
        raise SeganyError(f"{where} must be text in the config, got {value!r}")
    if annotation in ("int", "float"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SeganyError(f"{where} must be a number in the config, got {value!r}") from None
        if not math.isfinite(number):
            raise SeganyError(f"{where} must be a finite number in the config, got {value!r}")
        if annotation == "int" and number != int(number):
            raise SeganyError(f"{where} must be a whole number in the config, got {value!r}")
        return int(number) if annotation == "int" else number
    return value


def _sources(raw: Any, where: str, base: Path) -> tuple[DataSource, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise SeganyError(
            f"{where} must be a non-empty list of {{root: DIR, split: train}} entries"
        )
    return tuple(_build(DataSource, item, f"{where}[{i}]", base) for i, item in enumerate(raw))


def _model_section(raw: Any, base: Path) -> ModelSection:
    section = _build(ModelSection, raw, "model", base)
    init = section.encoder_init
    if init is not None and init != "imagenet":  # a classifier file, relative to the YAML
        path = _coerce(init, "Path", "model.encoder_init", base)
        section = replace(section, encoder_init=str(path))
    return section


def parse_config(raw: Any, base: Path, source: Path | None = None) -> TrainConfig:
    """Validate a config mapping; every problem is a SeganyError naming the key."""
    if not isinstance(raw, dict):
        raise SeganyError("the config must be a YAML mapping with model, data, optim and output")
    raw = dict(raw)
    data_raw = raw.pop("data", None) or {}
    if not isinstance(data_raw, dict):
        raise SeganyError("data must be a mapping in the config, with a train list")
    data_raw = dict(data_raw)
    if "train" not in data_raw:
        raise SeganyError("data.train is required: a list of {root: DIR, split: train} entries")
    data = _build(
        DataSection,
        {k: v for k, v in data_raw.items() if k not in ("train", "val", "augment")},
        "data",
        base,
        train=_sources(data_raw.get("train"), "data.train", base),
        val=_sources(data_raw.get("val"), "data.val", base),
        augment=_build(AugmentSection, data_raw.get("augment"), "data.augment", base),
    )
    if "output" not in raw:
        raise SeganyError("output is required: the folder for checkpoints, logs and the model")
    config = _build(
        TrainConfig,
        {k: v for k, v in raw.items() if k not in ("model", "optim")},
        "",
        base,
        model=_model_section(raw.get("model"), base),
        data=data,
        optim=_build(OptimSection, raw.get("optim"), "optim", base),
        source=source,
    )
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    """The checks of every value that :func:`parse_config` runs, for a config built in
    Python (such as ``segany engine retrain``'s); SeganyError naming the first problem."""
    model, optim = config.model, config.optim
    if model.freeze not in FREEZE_CHOICES:
        raise SeganyError(
            f"model.freeze must be one of {', '.join(FREEZE_CHOICES)}, got {model.freeze!r}"
        )
    if (model.name is None) == (model.config is None):
        raise SeganyError("give exactly one of model.name (a registry model) and model.config")
    if optim.precision not in PRECISIONS:
        raise SeganyError(
            f"optim.precision must be one of {', '.join(PRECISIONS)}, got {optim.precision!r}"
        )
    for key in ("steps", "batch_images", "grad_accum", "rounds"):
        if getattr(optim, key) < 1:
            raise SeganyError(f"optim.{key} must be at least 1")
    if optim.geometric_warmup_steps < 0 or optim.embedding_scale_ramp_steps < 0:
        raise SeganyError(
            "optim.geometric_warmup_steps and embedding_scale_ramp_steps must be >= 0"
        )
    for key in ("geometric_embedding_scale", "embedding_scale_start", "decoder_lr_scale"):
        if getattr(optim, key) <= 0:
            raise SeganyError(f"optim.{key} must be positive")
    if config.data.masks_per_image < 1:
        raise SeganyError("data.masks_per_image must be at least 1")
    if not 0.0 <= config.data.augment.copy_paste <= 1.0:
        raise SeganyError("data.augment.copy_paste must be a probability between 0 and 1")
    low, high = config.data.augment.scale_jitter
    if not 0 < low <= high:
        raise SeganyError("data.augment.scale_jitter must be [low, high] with 0 < low <= high")
    for source in config.data.train + config.data.val:
        if source.synthetic is not None:
            if source.synthetic not in SYNTHETIC_KINDS:
                raise SeganyError(
                    f"unknown synthetic data {source.synthetic!r}; "
                    f"choose one of: {', '.join(SYNTHETIC_KINDS)}"
                )
            if source.images < 1:
                raise SeganyError("images of a synthetic data source must be at least 1")
        elif source.root is None:
            raise SeganyError("each data source needs a root folder (or synthetic: shapes)")
        elif not source.root.is_dir():
            raise SeganyError(f"data folder not found: {source.root}")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training config YAML file."""
    path = Path(path)
    if not path.is_file():
        raise SeganyError(f"config not found: {path}")
    try:
        # Bytes, not text: YAML then reads UTF-8 and (with a BOM) UTF-16/32, and anything
        # else (a binary file, another encoding) is a YAMLError naming the bad byte.
        raw = yaml.safe_load(path.read_bytes())
    except OSError as error:
        raise SeganyError(f"cannot read config {path}: {error.strerror or error}") from None
    except (yaml.YAMLError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SeganyError(
            f"cannot parse {path}: {reason}; the config must be a YAML text file (UTF-8)"
        ) from None
    try:
        return parse_config(raw, path.parent.resolve(), path)
    except SeganyError as error:
        raise SeganyError(f"invalid config {path}: {error}") from None
    except (TypeError, ValueError, OverflowError) as error:
        # parse_config names most problems itself; a value of a wholly wrong type (a number
        # where a mapping or path belongs, NaN for a count) can still end up here.
        reason = " ".join(str(error).split()) or type(error).__name__
        raise SeganyError(
            f"invalid config {path}: {reason}; compare its values with configs/example.yaml"
        ) from None
