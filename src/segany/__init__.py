"""segany: Segment Anything in PyTorch, and with ONNX Runtime alone.

>>> from segany import SamPredictor, sam_model_registry
>>> predictor = SamPredictor(sam_model_registry["default"]())

Names are imported on first use, so that ``import segany`` and
``segany.OnnxSamPredictor`` work where PyTorch is not installed (``pip install
segany[onnx]``); the PyTorch names need ``segany[torch]``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import SeganyError

if TYPE_CHECKING:
    from .automatic_mask_generator import SamAutomaticMaskGenerator
    from .build import MODEL_CONFIGS, SamConfig, build_sam, sam_model_registry
    from .loading import load_model
    from .onnx.predictor import OnnxSamPredictor
    from .predictor import SamPredictor
    from .sam2_automatic_mask_generator import Sam2AutomaticMaskGenerator
    from .sam2_predictor import Sam2ImagePredictor
    from .sam2_video_predictor import Sam2VideoPredictor
    from .zoom_predictor import ZoomPredictor

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_LAZY = {
    "MODEL_CONFIGS": ".build",
    "OnnxSamPredictor": ".onnx.predictor",
    "Sam2AutomaticMaskGenerator": ".sam2_automatic_mask_generator",
    "Sam2ImagePredictor": ".sam2_predictor",
    "Sam2VideoPredictor": ".sam2_video_predictor",
    "SamAutomaticMaskGenerator": ".automatic_mask_generator",
    "SamConfig": ".build",
    "SamPredictor": ".predictor",
    "ZoomPredictor": ".zoom_predictor",
    "build_sam": ".build",
    "load_model": ".loading",
    "sam_model_registry": ".build",
}

# Literal, so that linters and type checkers see the public names.
__all__ = [
    "MODEL_CONFIGS",
    "OnnxSamPredictor",
    "Sam2AutomaticMaskGenerator",
    "Sam2ImagePredictor",
    "Sam2VideoPredictor",
    "SamAutomaticMaskGenerator",
    "SamConfig",
    "SamPredictor",
    "SeganyError",
    "ZoomPredictor",
    "__version__",
    "build_sam",
    "load_model",
    "sam_model_registry",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
