"""The model side of the server: embeddings computed once per image, prompts decoded fast.

An image's embedding is keyed by the SHA-256 of its file and kept in an in-memory LRU; with
a cache folder it is also saved as ``<folder>/<model fingerprint>/<sha256>.pt``, so a
restarted server does not compute it again. A click then runs only the prompt encoder and
mask decoder.

One lock serialises the model (the predictor holds one image at a time, and the mask
decoder keeps the last image's prepared side). It is fair to clicks: "segment everything"
takes it one step at a time (one decoder batch of :data:`JOB_POINTS_PER_BATCH` prompts,
one crop's encoder pass) and lets every waiting click go first, so a click waits for one
step of a long job, never the whole job. The job's mask upscaling and encoding touch no
model state and run outside the lock: they share the CPU with clicks instead of blocking
them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..atomic import atomic_path
from ..automatic_mask_generator import MaskCandidates, SamAutomaticMaskGenerator
from ..masks import generate_crop_boxes
from ..modeling import Sam
from ..predictor import SamPredictor

ImageLoader = Callable[[], np.ndarray]
EmbeddingSource = Literal["memory", "disk", "computed"]
# progress(steps done, steps in all), called between the steps of a long job; an exception
# it raises stops the job there.
Progress = Callable[[int, int], None]
# Prompts a background job decodes per hold of the model lock: a click waits for at most
# one such batch. The generator's own default (64) made clicks wait ~4x longer on a CPU,
# and smaller batches cost the job little (the decoder keeps its image side between them).
JOB_POINTS_PER_BATCH = 16


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
    """An image embedding (1, C, h, w), the (H, W) of the image it was computed from, and
    for a decoder that takes them the image's high-resolution features (else None)."""

    features: torch.Tensor
    original_size: tuple[int, int]
    high_res_features: list[torch.Tensor] | None = None

    def set_into(self, predictor: SamPredictor) -> None:
        """Give ``predictor`` this embedding instead of encoding the image again."""
        predictor.set_image_embedding(self.features, self.original_size, self.high_res_features)


class ModelLock:
    """The model's lock, fair to interactive requests.

    :meth:`interactive` (a click, an embedding) waits only for whoever holds the model;
    :meth:`step` (one step of a long job) also lets every waiting interactive request go
    first. Not reentrant.
    """

    def __init__(self) -> None:
        self._state = threading.Condition()
        self._held = False
        self._interactive_waiting = 0

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        with self._state:
            self._interactive_waiting += 1
            try:
                self._state.wait_for(lambda: not self._held)
            finally:
                self._interactive_waiting -= 1
            self._held = True
        try:
            yield
        finally:
            self._release()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        with self._state:
            self._state.wait_for(lambda: not self._held and self._interactive_waiting == 0)
            self._held = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        with self._state:
            self._held = False
            self._state.notify_all()


class _ReusingPredictor(SamPredictor):
    """A predictor that takes a known embedding instead of encoding the same image again
    (the automatic mask generator's full-image crop is the whole image), and holds the
    model lock for each crop's encoder pass."""

    def __init__(self, model: Sam, image: np.ndarray, embedding: Embedding, lock: ModelLock):
        super().__init__(model)
        self._image, self._embedding, self._lock = image, embedding, lock

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        with self._lock.step():
            if image_format == "RGB" and image.shape == self._image.shape:
                self._embedding.set_into(self)
            else:
                super().set_image(image, image_format)


class _SteppedGenerator(SamAutomaticMaskGenerator):
    """The automatic mask generator run as a background job: it reports progress before
    each decoder batch (where the job may be cancelled), and holds the model lock only
    while the model decodes a batch, so clicks are served between batches and while the
    batch's masks are upscaled and encoded.

    The generator has no progress hook, so two of its steps are wrapped here rather than
    changing it. Its masks are the plain generator's: the smaller batches only split the
    same work differently.
    """

    def __init__(
        self, predictor: _ReusingPredictor, lock: ModelLock, progress: Progress, **options: Any
    ) -> None:
        super().__init__(
            predictor.model,
            output_mode="uncompressed_rle",
            points_per_batch=JOB_POINTS_PER_BATCH,
            **options,
        )
        self.predictor = predictor
        self._lock, self._progress = lock, progress
        self._done, self._total = 0, 0

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        # Progress counts decoder batches: each crop runs its layer's grid in batches.
        _, layers = generate_crop_boxes(
            (int(image.shape[0]), int(image.shape[1])), self.crop_n_layers, self.crop_overlap_ratio
        )
        self._total = sum(
            math.ceil(len(self.point_grids[layer]) / self.points_per_batch) for layer in layers
        )
        records = super().generate(image)
        self._progress(self._done, self._total)
        return records

    def _process_batch(
        self, points: np.ndarray, crop_box: list[int], image: np.ndarray
    ) -> MaskCandidates:
        self._progress(self._done, self._total)
        result = super()._process_batch(points, crop_box, image)
        self._done += 1
        return result

    def _decode(
        self, points: np.ndarray, crop_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The predictor keeps state (the image side it prepared): one user at a time.
        with self._lock.step():
            return super()._decode(points, crop_size)


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
        self._lock = ModelLock()

    # -- embeddings ---------------------------------------------------------------------

    def embed(self, key: str, load_image: ImageLoader) -> EmbeddingSource:
        """Make sure the embedding of image ``key`` is cached; says where it came from."""
        with self._lock.interactive():
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
        high_res = self.predictor.high_res_features
        if high_res is not None:
            high_res = [f.detach().cpu() for f in high_res]
        return Embedding(features, (int(image.shape[0]), int(image.shape[1])), high_res)

    def _file(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.pt"

    def _load(self, key: str) -> Embedding | None:
        file = self._file(key)
        if file is None or not file.is_file():
            return None
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
            return Embedding(
                saved["features"], tuple(saved["original_size"]), saved.get("high_res_features")
            )
        except Exception:  # a damaged cache file is only a lost shortcut: compute again
            return None

    def _save(self, key: str, embedding: Embedding) -> None:
        file = self._file(key)
        if file is None:
            return
        with atomic_path(file) as temp:
            torch.save(
                {
                    "features": embedding.features,
                    "original_size": list(embedding.original_size),
                    "high_res_features": embedding.high_res_features,
                },
                temp,
            )

    def _hold(self, key: str, load_image: ImageLoader) -> EmbeddingSource:
        """Put image ``key``'s embedding into the predictor (call with the lock held)."""
        embedding, source = self._embedding(key, load_image)
        if self._current != key:
            embedding.set_into(self.predictor)
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
        with self._lock.interactive():
            source = self._hold(key, load_image)
            start = time.perf_counter()
            masks, scores, _ = self.predictor.predict(
                point_coords=points, point_labels=labels, box=box, multimask_output=multimask
            )
            return masks, scores, source, time.perf_counter() - start

    def everything(
        self,
        key: str,
        load_image: ImageLoader,
        options: dict[str, Any],
        progress: Progress | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`SamAutomaticMaskGenerator.generate` records (uncompressed RLE masks)
        for image ``key``, reusing its cached embedding for the full-image pass.

        Meant for a worker thread: the model is taken one step at a time (see
        :class:`ModelLock`), and ``progress(done, total)`` is called before each decoder
        batch and at the end; an exception it raises stops the work there.
        """
        image = load_image()
        with self._lock.step():
            embedding, _ = self._embedding(key, lambda: image)
        predictor = _ReusingPredictor(self.model, image, embedding, self._lock)
        generator = _SteppedGenerator(
            predictor, self._lock, progress or (lambda done, total: None), **options
        )
        return generator.generate(image)
