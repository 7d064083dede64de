"""SAM's components, one per module. Nothing here imports the tools built on top."""

from .efficient_encoder import EfficientEncoder
from .hiera import Hiera
from .hybrid_encoder import HybridEncoder
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .memory_attention import MemoryAttention
from .memory_encoder import MemoryEncoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .sam2 import Sam2
from .sam2_image_encoder import Sam2ImageEncoder
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

__all__ = [
    "EfficientEncoder",
    "Hiera",
    "HybridEncoder",
    "ImageEncoderViT",
    "MaskDecoder",
    "MemoryAttention",
    "MemoryEncoder",
    "PromptEncoder",
    "Sam",
    "Sam2",
    "Sam2ImageEncoder",
    "TinyViT",
    "TwoWayTransformer",
]
