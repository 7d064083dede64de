"""SAM's components, one per module. Nothing here imports the tools built on top."""

from .efficient_encoder import EfficientEncoder
from .hybrid_encoder import HybridEncoder
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

__all__ = [
    "EfficientEncoder",
    "HybridEncoder",
    "ImageEncoderViT",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TinyViT",
    "TwoWayTransformer",
]
