"""The automatic mask generators' options, defined once (NumPy only, no PyTorch).

:class:`AmgOptions` is the one source of SAM's generator's options: their names, types,
defaults (the official generator's), bounds and help texts; :class:`Sam2AmgOptions` adds
SAM 2's three (``mask_threshold``, ``use_m2m``, ``multimask_output``) and holds SAM 2's
defaults, written as changes to SAM's. :data:`AMG_OPTIONS` maps a model family to its
options (:data:`FAMILY_NAMES` to its name in messages). Everything that offers them is
made from them:

* :class:`~segany.automatic_mask_generator.SamAutomaticMaskGenerator` and
  :class:`~segany.sam2_automatic_mask_generator.Sam2AutomaticMaskGenerator` keep the
  official keyword signatures and validate their arguments by building their options;
* the command line's flags (``--points-per-side``, ...; see
  :func:`segany.commands.common.add_amg_arguments`) are made from :meth:`AmgOptions.specs`;
* the web app's request body (``EVERYTHING_IN`` in :mod:`segany.serve.app`) is a pydantic
  model made from the served model's family's specs, with the server's own limits
  (:mod:`segany.serve.limits`) added;
* the data engine's :class:`~segany.engine.annotate.ModelSpec` carries an ``AmgOptions``.

Every problem is a :class:`~segany.errors.SeganyError` naming the first bad option.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .errors import SeganyError

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass(frozen=True)
class OptionSpec:
    """How one option is offered and checked.

    Attributes:
        name: the keyword argument (``points_per_side``); flags and JSON keys derive from it.
        kind: ``int``, ``float``, ``bool`` or ``str`` (the value's type where it is not
            None), or None for ``point_grids`` (arrays, not a scalar).
        default: the official generator's default.
        help: one line for ``--help`` and the API schema.
        minimum: the smallest allowed value (inclusive), or None.
        maximum: the largest allowed value, or None; exclusive when ``below``.
        below: ``maximum`` itself is not allowed.
        choices: the allowed values of a text option.
        flag: offered on the command line (``point_grids`` and ``output_mode`` are not:
            arrays cannot be typed, and each command picks the mode its files need).
    """

    name: str
    kind: type | None
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    below: bool = False
    choices: tuple[str, ...] | None = None
    flag: bool = True

    def check(self, value: Any) -> None:
        """SeganyError unless ``value`` is of this option's kind and within its bounds."""
        if self.kind is int:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            ok = ok and (self.minimum is None or value >= self.minimum)
            if not ok:
                raise SeganyError(
                    f"{self.name} must be an integer >= {self.minimum:g}, got {value!r}"
                )
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not math.isnan(value)
            ok = ok and (self.minimum is None or value >= self.minimum)
            if self.maximum is not None:
                ok = ok and (value < self.maximum if self.below else value <= self.maximum)
            if not ok:
                raise SeganyError(f"{self.name} must be {self._range()}, got {value!r}")
        elif self.kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise SeganyError(f"{self.name} must be True or False, got {value!r}")
        elif self.choices is not None and value not in self.choices:
            raise SeganyError(
                f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
            )

    def _range(self) -> str:
        if self.minimum is None:
            return "a number"
        if self.maximum is None:
            return f"a number >= {self.minimum:g}"
        if self.below:
            return f">= {self.minimum:g} and < {self.maximum:g}"
        return f"a number between {self.minimum:g} and {self.maximum:g}"


def _option(
    default: Any, kind: type | None, help: str, after: str | None = None, **spec: Any
) -> Any:
    """A dataclass field whose metadata holds its :class:`OptionSpec` (less the name);
    ``after``: the option it follows in the signature, for one a subclass adds."""
    metadata = {"spec": {"kind": kind, "help": help, **spec}, "after": after}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class AmgOptions:
    """Options of the automatic mask generator, checked when made (SeganyError).

    Defaults are the official generator's (they suit SAM ViT-H); see
    :class:`~segany.automatic_mask_generator.SamAutomaticMaskGenerator` for what each one
    does. ``point_grids`` is kept as float64 (N, 2) arrays; give it with
    ``points_per_side=None``.
    """

    points_per_side: int | None = _option(
        32, int, "grid points along each side of the image", minimum=1
    )
    points_per_batch: int = _option(
        64, int, "points run through the model together (memory vs speed)", minimum=1
    )
    pred_iou_thresh: float = _option(
        0.88,
        float,
        "keep masks whose predicted IoU is above this (0 disables)",
        minimum=0.0,
        maximum=1.0,
    )
    stability_score_thresh: float = _option(
        0.95, float, "keep masks at least this stable (0 disables)", minimum=0.0, maximum=1.0
    )
    stability_score_offset: float = _option(
        1.0, float, "logit shift used to measure stability", minimum=0.0
    )
    box_nms_thresh: float = _option(
        0.7,
        float,
        "box IoU above which duplicate masks are removed",
        minimum=0.0,
        maximum=1.0,
    )
    crop_n_layers: int = _option(
        0, int, "extra layers of image crops (layer i has 4**i crops)", minimum=0
    )
    crop_nms_thresh: float = _option(
        0.7,
        float,
        "box IoU above which duplicates across crops are removed",
        minimum=0.0,
        maximum=1.0,
    )
    crop_overlap_ratio: float = _option(
        512 / 1500,
        float,
        "overlap of first-layer crops, fraction of the short side",
        minimum=0.0,
        maximum=1.0,
        below=True,
    )
    crop_n_points_downscale_factor: int = _option(
        1, int, "points per side shrink by this per crop layer", minimum=1
    )
    point_grids: Sequence[np.ndarray] | None = _option(
        None,
        None,
        "explicit (N, 2) grids of normalised (x, y) points, one per crop layer",
        flag=False,
    )
    min_mask_region_area: int = _option(
        0, int, "fill holes and drop islands smaller than this (pixels)", minimum=0
    )
    output_mode: str = _option(
        "binary_mask",
        str,
        "binary_mask, uncompressed_rle or coco_rle",
        choices=OUTPUT_MODES,
        flag=False,
    )

    def __post_init__(self) -> None:
        if (self.points_per_side is None) == (self.point_grids is None):
            raise SeganyError(
                "give exactly one of points_per_side and point_grids "
                "(set points_per_side=None to use point_grids)"
            )
        for spec in self.specs():
            value = getattr(self, spec.name)
            if value is not None or spec.name != "points_per_side":
                spec.check(value)
        if self.point_grids is not None:
            object.__setattr__(self, "point_grids", self._checked_point_grids())
            return
        assert self.points_per_side is not None
        deepest = int(
            self.points_per_side / self.crop_n_points_downscale_factor**self.crop_n_layers
        )
        if deepest < 1:
            raise SeganyError(
                f"points_per_side={self.points_per_side} leaves no points in crop layer "
                f"{self.crop_n_layers} after downscaling by "
                f"{self.crop_n_points_downscale_factor} per layer; use more points, fewer "
                "crop layers or a smaller crop_n_points_downscale_factor"
            )

    def _checked_point_grids(self) -> tuple[np.ndarray, ...]:
        """User grids as float64 (N, 2) arrays in [0, 1], one per crop layer at least."""
        grids = self.point_grids
        assert grids is not None
        n_layers = self.crop_n_layers
        if len(grids) < n_layers + 1:
            raise SeganyError(
                f"point_grids has {len(grids)} grid(s) but crop_n_layers={n_layers} needs "
                f"{n_layers + 1}, one per layer"
            )
        checked = []
        for i, grid in enumerate(grids):
            array = np.asarray(grid, dtype=np.float64)
            if not (array.ndim == 2 and array.shape[1] == 2 and len(array) > 0):
                raise SeganyError(
                    f"point_grids[{i}] must be a non-empty (N, 2) array of x, y, got shape "
                    f"{array.shape}"
                )
            if not bool(((array >= 0) & (array <= 1)).all()):
                raise SeganyError(f"point_grids[{i}] must hold coordinates normalised to [0, 1]")
            checked.append(array)
        return tuple(checked)

    @classmethod
    def specs(cls) -> tuple[OptionSpec, ...]:
        """Every option's :class:`OptionSpec`, in the generator's argument order."""
        ordered: list[Field[Any]] = []
        for f in fields(cls):
            after = f.metadata["after"]
            at = len(ordered) if after is None else [g.name for g in ordered].index(after) + 1
            ordered.insert(at, f)
        return tuple(
            OptionSpec(name=f.name, default=f.default, **f.metadata["spec"]) for f in ordered
        )

    @classmethod
    def spec(cls, name: str) -> OptionSpec:
        """The :class:`OptionSpec` of option ``name``."""
        return next(spec for spec in cls.specs() if spec.name == name)

    def layer_point_grids(self) -> list[np.ndarray]:
        """One (N_i, 2) float64 grid of normalised (x, y) points per crop layer."""
        if self.point_grids is not None:
            return list(self.point_grids)
        from .masks import build_layer_point_grids  # PyTorch's side: only the generator

        assert self.points_per_side is not None
        return build_layer_point_grids(
            self.points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor
        )

    def to_dict(self) -> dict[str, Any]:
        """The options as the generator's keyword arguments."""
        return asdict(self)


def _changed(name: str, default: Any, help: str | None = None) -> Any:
    """:class:`AmgOptions`' option ``name`` with another default (and help text), for a
    family whose generator differs there; bounds and kind stay SAM's."""
    spec = AmgOptions.__dataclass_fields__[name].metadata["spec"]
    metadata = {"spec": {**spec, "help": help or spec["help"]}, "after": None}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Sam2AmgOptions(AmgOptions):
    """Options of SAM 2's automatic mask generator: SAM's (:class:`AmgOptions`) with
    Meta's SAM 2 defaults, plus ``mask_threshold``, ``use_m2m`` and ``multimask_output``;
    see :class:`~segany.sam2_automatic_mask_generator.Sam2AutomaticMaskGenerator`."""

    pred_iou_thresh: float = _changed("pred_iou_thresh", 0.8)
    min_mask_region_area: int = _changed(
        "min_mask_region_area",
        0,
        "fill holes and drop specks of at most this many low-res mask pixels (256 x 256 "
        "for the whole model input)",
    )
    mask_threshold: float = _option(
        0.0, float, "mask logit above which a pixel is in a mask", after="stability_score_offset"
    )
    use_m2m: bool = _option(
        False, bool, "refine each mask once, fed back as a mask prompt with its point"
    )
    multimask_output: bool = _option(
        True, bool, "three masks per point (False: one, the model's choice)"
    )


# A model family's generator options: "sam" (SAM, MobileSAM, segany's models) or "sam2".
AMG_OPTIONS: dict[str, type[AmgOptions]] = {"sam": AmgOptions, "sam2": Sam2AmgOptions}
# How each family's name reads in messages and help texts.
FAMILY_NAMES: dict[str, str] = {"sam": "SAM", "sam2": "SAM 2"}
