"""Training and fine-tuning with SAM's simulated interactive recipe (SAM paper, appendix A)."""

from .config import TrainConfig, load_config
from .trainer import train

__all__ = ["TrainConfig", "load_config", "train"]
