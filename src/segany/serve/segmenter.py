"""The model side of the server: embeddings computed once per image, prompts decoded fast.

An image's embedding is keyed by the SHA-256 of its file and kept in an in-memory LRU; with
a cache folder it is also saved as ``<folder>/<model fingerprint>/<sha256>.pt``, so a
restarted server does not compute it again. A click then runs only the prompt encoder and
mask decoder. One lock serialises the model: the predictor holds one image at a time.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..atomic import atomic_path
from ..automatic_mask_generator import SamAutomaticMaskGenerator
from ..modeling import Sam
from ..predictor import SamPredictor

ImageLoader = Callable[[], np.ndarray]
EmbeddingSource = Literal["memory", "disk", "computed"]


def model_fingerprint(model: Sam) -> str:
    """A short hash naming a model's weights, so cached embeddings of other weights are
    never used. Hashes the shapes of every tensor and the values of the image encoder's
    first and last ones: cheap even for ViT-H, and different for any two trained models."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name, tensor in state.items():
        digest.update(f"{name}{tuple(tensor.shape)};".encode())
    encoder = [name for name in state if name.startswith("image_encoder.")]
    for name in encoder[:1] + encoder[-1:]:
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Embedding:
    """An image embedding (1, C, h, w) and the (H, W) of the image it was computed from."""

    features: torch.Tensor
    original_size: tuple[int, int]


class _ReusingPredictor(SamPredictor):
    """A predictor that takes a known embedding instead of encoding the same image again
    (the automatic mask generator's full-image crop is the whole image)."""

    def __init__(self, model: Sam, image: np.ndarray, embedding: Embedding) -> None:
        super().__init__(model)
        self._image, self._embedding = image, embedding

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if image_format == "RGB" and image.shape == self._image.shape:
            self.set_image_embedding(self._embedding.features, self._embedding.original_size)
        else:
            super().set_image(image, image_format)


class Segmenter:
    """Embeds images (cached) and answers prompts with one model.

    Args:
        model: the SAM model.
        cache_dir: folder for embeddings on disk, or None for memory only.
        capacity: embeddings kept in memory (4 MB each at SAM's 64 x 64 x 256).
    """

    def __init__(self, model: Sam, cache_dir: Path | None = None, capacity: int = 16) -> None:
        self.model = model
        self.predictor = SamPredictor(model)
        self.capacity = max(1, capacity)
        self.cache_dir = None if cache_dir is None else cache_dir / model_fingerprint(model)
        self._memory: OrderedDict[str, Embedding] = OrderedDict()
        self._current: str | None = None  # the key whose embedding the predictor holds
        self._lock = threading.Lock()

    # -- embeddings ---------------------------------------------------------------------

    def embed(self, key: str, load_image: ImageLoader) -> EmbeddingSource:
        """Make sure the embedding of image ``key`` is cached; says where it came from."""
        with self._lock:
            return self._embedding(key, load_image)[1]

    def _embedding(self, key: str, load_image: ImageLoader) -> tuple[Embedding, EmbeddingSource]:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key], "memory"
        source: EmbeddingSource = "disk"
        embedding = self._load(key)
        if embedding is None:
            embedding, source = self._compute(load_image()), "computed"
            self._save(key, embedding)
        self._memory[key] = embedding
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)
        return embedding, source

    def _compute(self, image: np.ndarray) -> Embedding:
        self.predictor.set_image(image)
        self._current = None  # set below by whoever uses it under its key
        features = self.predictor.get_image_embedding().detach().cpu()
        return Embedding(features, (int(image.shape[0]), int(image.shape[1])))

    def _file(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.pt"

    def _load(self, key: str) -> Embedding | None:
        file = self._file(key)
        if file is None or not file.is_file():
            return None
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
            return Embedding(saved["features"], tuple(saved["original_size"]))
        except Exception:  # a damaged cache file is only a lost shortcut: compute again
            return None

    def _save(self, key: str, embedding: Embedding) -> None:
        file = self._file(key)
        if file is None:
            return
        with atomic_path(file) as temp:
            torch.save(
                {"features": embedding.features, "original_size": list(embedding.original_size)},
                temp,
            )

    def _hold(self, key: str, load_image: ImageLoader) -> EmbeddingSource:
        """Put image ``key``'s embedding into the predictor (call with the lock held)."""
        embedding, source = self._embedding(key, load_image)
        if self._current != key:
            self.predictor.set_image_embedding(embedding.features, embedding.original_size)
            self._current = key
        return source

    # -- prompts ------------------------------------------------------------------------

    def predict(
        self,
        key: str,
        load_image: ImageLoader,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        multimask: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, EmbeddingSource, float]:
        """Masks for one prompt set: :meth:`SamPredictor.predict` on the cached embedding.

        Args:
            points: (N, 2) pixel (x, y) of the original image, or None.
            labels: (N,) 1 = foreground, 0 = background.
            box: (4,) XYXY box in pixels, or None.

        Returns:
            masks (C, H, W) bool, scores (C,), where the embedding came from, and the
            seconds the decoder took.
        """
        with self._lock:
            source = self._hold(key, load_image)
            start = time.perf_counter()
            masks, scores, _ = self.predictor.predict(
                point_coords=points, point_labels=labels, box=box, multimask_output=multimask
            )
            return masks, scores, source, time.perf_counter() - start

    def everything(
        self, key: str, image: np.ndarray, options: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """:meth:`SamAutomaticMaskGenerator.generate` records (uncompressed RLE masks)
        for ``image``, reusing its cached embedding for the full-image pass."""
        generator = SamAutomaticMaskGenerator(self.model, output_mode="uncompressed_rle", **options)
        with self._lock:
            embedding, _ = self._embedding(key, lambda: image)
            generator.predictor = _ReusingPredictor(self.model, image, embedding)
            return generator.generate(image)
