"""Getting SAM's mask decoder to follow prompts when training from scratch.

Measured on this project's data: trained from random weights, the decoder first learns
the average answer and, in doing so, silences its prompt (the logits for two far-apart
boxes become identical within ~50 steps); with image features as large as SAM's neck
makes them, it does not recover. Two training-time measures, both leaving the
architecture unchanged:

* a geometric warm-up: the first steps train the prompt encoder and decoder on random
  shapes over random image embeddings of small scale, where the prompt is the only
  information, so the decoder learns to place masks at clicks and inside boxes;
* an embedding-scale ramp: afterwards the real image embedding is multiplied by a factor
  rising to 1, so the learnt prompt path is not drowned by image features at once. A
  factor below 1 at the end of training is folded into the encoder's last norm.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.synthetic import MIN_OBJECT_AREA, shape_mask
from ..modeling import Sam
from .config import OptimSection


def embedding_scale(optim: OptimSection, step: int) -> float:
    """Factor on the image embedding at ``step`` (after the geometric warm-up: ramp to 1)."""
    ramp = optim.embedding_scale_ramp_steps
    if ramp == 0:
        return 1.0
    progress = min(max(step - optim.geometric_warmup_steps, 0) / ramp, 1.0)
    start = optim.embedding_scale_start
    return start + (1.0 - start) * progress


def random_shape_masks(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, size, size) bool masks of random shapes, each of at least a few pixels."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    masks: list[np.ndarray] = []
    while len(masks) < count:
        mask = shape_mask(rng, size, size)
        if mask.sum() >= MIN_OBJECT_AREA:
            masks.append(mask)
    return torch.from_numpy(np.stack(masks))


def random_embedding(sam: Sam, scale: float, generator: torch.Generator) -> torch.Tensor:
    """(1, C, h, w) Gaussian stand-in for an image embedding, of standard deviation ``scale``."""
    channels = sam.prompt_encoder.embed_dim
    height, width = sam.prompt_encoder.image_embedding_size
    noise = torch.randn(1, channels, height, width, generator=generator)
    return (noise * scale).to(sam.device)


@torch.no_grad()
def fold_embedding_scale(sam: Sam, scale: float) -> None:
    """Multiply the encoder's output by ``scale`` for good: its last norm's weight and bias."""
    if scale == 1.0:
        return
    norm = sam.image_encoder.neck[-1]
    norm.weight.mul_(scale)
    norm.bias.mul_(scale)
