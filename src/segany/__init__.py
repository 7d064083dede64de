"""segany: Segment Anything in PyTorch.

>>> from segany import SamPredictor, sam_model_registry
>>> predictor = SamPredictor(sam_model_registry["default"]())
"""

from .automatic_mask_generator import SamAutomaticMaskGenerator
from .build import MODEL_CONFIGS, SamConfig, build_sam, load_model, sam_model_registry
from .errors import SeganyError
from .predictor import SamPredictor

__version__ = "0.1.0"

__all__ = [
    "MODEL_CONFIGS",
    "SamAutomaticMaskGenerator",
    "SamConfig",
    "SamPredictor",
    "SeganyError",
    "__version__",
    "build_sam",
    "load_model",
    "sam_model_registry",
]
