"""The model side of the server: embeddings computed once per image, prompts decoded fast.

It serves either family of models, SAM (:class:`~segany.modeling.Sam`) or SAM 2
(:class:`~segany.modeling.Sam2`): :data:`FAMILIES` says which predictor and which
automatic mask generator each one runs; everything else is shared.

An image's embedding is keyed by the SHA-256 of its file and kept in an in-memory LRU; with
a cache folder it is also saved as ``<folder>/<model fingerprint>-<precision>/<sha256>.pt``,
so a restarted server does not compute it again (the fingerprint names the family, input
size and weights, so no other model's embeddings are ever read). SAM 2's embedding includes
the two high-resolution feature maps its decoder takes. A click then runs only the prompt
encoder and mask decoder.

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
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from ..amg_options import AMG_OPTIONS, AmgOptions
from ..atomic import atomic_path
from ..automatic_mask_generator import MaskCandidates, SamAutomaticMaskGenerator
from ..errors import SeganyError
from ..masks import generate_crop_boxes
from ..modeling import Sam, Sam2
from ..predictor import SamPredictor
from ..sam2_automatic_mask_generator import Sam2AutomaticMaskGenerator
from ..sam2_predictor import Sam2ImagePredictor
from ..zoom_predictor import ZoomPredictor

ImageLoader = Callable[[], np.ndarray]
EmbeddingSource = Literal["memory", "disk", "computed"]
# progress(steps done, steps in all), called between the steps of a long job; an exception
# it raises stops the job there.
Progress = Callable[[int, int], None]
# Prompts a background job decodes per hold of the model lock: a click waits for at most
# one such batch. The generator's own default (64) made clicks wait ~4x longer on a CPU,
# and smaller batches cost the job little (the decoder keeps its image side between them).
JOB_POINTS_PER_BATCH = 16


def model_family_of(model: Sam | Sam2) -> str:
    """``"sam2"`` or ``"sam"``: the model's family, as :data:`~segany.amg_options.AMG_OPTIONS`
    and :data:`FAMILIES` name it."""
    return "sam2" if isinstance(model, Sam2) else "sam"


def model_fingerprint(model: Sam | Sam2) -> str:
    """A short hash naming a model, so cached embeddings of another model are never used.
    Hashes the family and input size, the names and shapes of every tensor and the values
    of the image encoder's first and last ones: cheap even for ViT-H, and different for any
    two trained models (and for the same weights at another input size, whose embeddings
    have other shapes)."""
    digest = hashlib.sha256()
    digest.update(f"{model_family_of(model)}@{model.image_size};".encode())
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
    for a decoder that takes them (SAM 2's, SAM's high-resolution one) the image's
    high-resolution features (else None)."""

    features: torch.Tensor
    original_size: tuple[int, int]
    high_res_features: list[torch.Tensor] | None = None

    def detached(self) -> Embedding:
        """This embedding on the CPU, cut from autograd: what the caches keep."""
        high_res = self.high_res_features
        return Embedding(
            self.features.detach().cpu(),
            self.original_size,
            None if high_res is None else [f.detach().cpu() for f in high_res],
        )


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


# -- each family's predictor and generator, as the server runs them ---------------------


class _ServedSam(SamPredictor):
    """SAM's predictor, its embedding taken and given as an :class:`Embedding`."""

    def embedding(self) -> Embedding:
        """The embedding of the image set."""
        assert self.original_size is not None
        return Embedding(self.get_image_embedding(), self.original_size, self.high_res_features)

    def use(self, embedding: Embedding) -> None:
        """Take ``embedding`` as the image set, instead of encoding the image again."""
        self.set_image_embedding(
            embedding.features, embedding.original_size, embedding.high_res_features
        )


class _ServedSam2(Sam2ImagePredictor):
    """SAM 2's predictor, its embedding taken and given as an :class:`Embedding`."""

    def embedding(self) -> Embedding:
        """The embedding of the image set, with its high-resolution features."""
        image_embed = self.get_image_embedding()
        assert self._features is not None and self._orig_hw is not None
        return Embedding(image_embed, self._orig_hw[0], list(self._features["high_res_feats"]))

    def use(self, embedding: Embedding) -> None:
        """Take ``embedding`` as the image set, instead of encoding the image again."""
        assert embedding.high_res_features is not None  # SAM 2's decoder always takes them
        self.reset_predictor()
        # Meta's predictor has no setter for cached features: its users assign these three
        # attributes together, and Sam2ImagePredictor follows them.
        self._features = {
            "image_embed": embedding.features.to(self.device),
            "high_res_feats": [f.to(self.device) for f in embedding.high_res_features],
        }
        self._orig_hw = [embedding.original_size]
        self._is_image_set = True


class _Reusing:
    """A "segment everything" job's predictor (mixed into a family's served predictor):
    it takes the image's known embedding instead of encoding it again (the generator's
    full-image crop is the whole image), and holds the model lock for each crop's encoder
    pass."""

    def __init__(
        self,
        model: Sam | Sam2,
        image: np.ndarray,
        embedding: Embedding,
        lock: ModelLock,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        # Names of their own: the predictors' attributes must not be shadowed.
        self._job_image, self._job_embedding, self._job_lock = image, embedding, lock

    def set_image(self, image: np.ndarray, *args: Any, **kwargs: Any) -> None:
        with self._job_lock.step():
            # Crops are smaller than the image, so its shape tells the full-image crop; any
            # other call (an image format given, say) encodes as usual.
            if not args and not kwargs and image.shape == self._job_image.shape:
                self.use(self._job_embedding)
            else:
                super().set_image(image, *args, **kwargs)


class _ReusingSam(_Reusing, _ServedSam):
    """SAM's predictor for a job (see :class:`_Reusing`)."""


class _ReusingSam2(_Reusing, _ServedSam2):
    """SAM 2's predictor for a job (see :class:`_Reusing`)."""


class _Stepped:
    """A family's automatic mask generator run as a background job (mixed into it): it
    reports progress before each decoder batch (where the job may be cancelled), and holds
    the model lock only while the model decodes a batch, so clicks are served between
    batches and while the batch's masks are upscaled and encoded.

    The generators have no progress hook, so two of their steps are wrapped here rather
    than changing them. Its masks are the plain generator's: the smaller batches only split
    the same work differently.
    """

    # The family's options (see segany.amg_options), set by each generator below.
    option_class: ClassVar[type[AmgOptions]]

    def __init__(
        self, predictor: _Reusing, lock: ModelLock, progress: Progress, **options: Any
    ) -> None:
        # Set up as the generators' own constructors do, on the job's predictor (theirs
        # would make another predictor, to be thrown away).
        checked = self.option_class(
            output_mode="uncompressed_rle", points_per_batch=JOB_POINTS_PER_BATCH, **options
        )
        self._setup(predictor, checked)
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
        self, points: torch.Tensor, crop_box: list[int], image: np.ndarray
    ) -> MaskCandidates:
        self._progress(self._done, self._total)
        result = super()._process_batch(points, crop_box, image)
        self._done += 1
        return result

    def _decode(
        self, points: torch.Tensor, crop_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The predictor keeps state (the image side it prepared): one user at a time. With
        # SAM 2's use_m2m this step includes the batch's refinement.
        with self._lock.step():
            return super()._decode(points, crop_size)


class _SteppedSam(_Stepped, SamAutomaticMaskGenerator):
    """SAM's generator as a job (see :class:`_Stepped`)."""

    option_class = AMG_OPTIONS["sam"]


class _SteppedSam2(_Stepped, Sam2AutomaticMaskGenerator):
    """SAM 2's generator as a job (see :class:`_Stepped`)."""

    option_class = AMG_OPTIONS["sam2"]


@dataclass(frozen=True)
class Family:
    """What the server runs for one family of models.

    Attributes:
        predictor: the image predictor that answers clicks.
        job_predictor: the predictor of a "segment everything" job.
        generator: the automatic mask generator of a job.
    """

    predictor: type[_ServedSam] | type[_ServedSam2]
    job_predictor: type[_ReusingSam] | type[_ReusingSam2]
    generator: type[_SteppedSam] | type[_SteppedSam2]


# By model family, as AMG_OPTIONS names them (see model_family_of).
FAMILIES: dict[str, Family] = {
    "sam": Family(_ServedSam, _ReusingSam, _SteppedSam),
    "sam2": Family(_ServedSam2, _ReusingSam2, _SteppedSam2),
}


class Segmenter:
    """Embeds images (cached) and answers prompts with one model.

    Args:
        model: the SAM or SAM 2 model.
        cache_dir: folder for embeddings on disk, or None for memory only.
        capacity: embeddings kept in memory (4 MB each at SAM's 64 x 64 x 256, 16 MB with
            SAM 2's high-resolution features).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see
            :mod:`segany.inference.precision`); ``fp32`` gives the official numbers.
    """

    def __init__(
        self,
        model: Sam | Sam2,
        cache_dir: Path | None = None,
        capacity: int = 16,
        precision: str = "auto",
    ) -> None:
        self.model = model
        self.family = model_family_of(model)
        self._runs = FAMILIES[self.family]
        self.predictor = self._runs.predictor(model, precision=precision)
        self.precision = precision
        self.capacity = max(1, capacity)
        # Another precision computes (slightly) other embeddings: a cache of its own.
        folder = f"{model_fingerprint(model)}-{self.predictor.precision.name}"
        self.cache_dir = None if cache_dir is None else cache_dir / folder
        self._memory: OrderedDict[str, Embedding] = OrderedDict()
        self._current: str | None = None  # the key whose embedding the predictor holds
        # Small objects again on a crop (SAM's family): crops share the predictor's model.
        self._zoom = ZoomPredictor(self.predictor) if self.family == "sam" else None
        self._zoomed: str | None = None  # the key whose pixels the zoom predictor holds
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
        return self.predictor.embedding().detached()

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
            self.predictor.use(embedding)
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
        zoom: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, EmbeddingSource, float]:
        """Masks for one prompt set: the family's predictor's ``predict`` on the cached
        embedding.

        Args:
            points: (N, 2) pixel (x, y) of the original image, or None.
            labels: (N,) 1 = foreground, 0 = background.
            box: (4,) XYXY box in pixels, or None.
            zoom: predict a small object again on a crop around it
                (:class:`~segany.zoom_predictor.ZoomPredictor`; SAM's family).

        Returns:
            masks (C, H, W) bool, scores (C,), where the embedding came from, and the
            seconds the decoder (and with ``zoom``, the crop's encoder) took.
        """
        if zoom and self._zoom is None:
            raise SeganyError("zoom works with SAM-family models; leave it out for SAM 2")
        with self._lock.interactive():
            source = self._hold(key, load_image)
            predictor: Any = self.predictor
            if zoom:
                assert self._zoom is not None
                if self._zoomed != key:
                    self._zoomed = None  # in case the image cannot be read
                    self._zoom.attach_image(load_image())
                    self._zoomed = key
                predictor = self._zoom
            start = time.perf_counter()
            masks, scores, _ = predictor.predict(
                point_coords=points, point_labels=labels, box=box, multimask_output=multimask
            )
            # SAM 2's predictor gives float 0/1 masks, as Meta's does; SAM's are bool.
            return masks.astype(bool, copy=False), scores, source, time.perf_counter() - start

    def everything(
        self,
        key: str,
        load_image: ImageLoader,
        options: dict[str, Any],
        progress: Progress | None = None,
    ) -> list[dict[str, Any]]:
        """The family's automatic mask generator's records (uncompressed RLE masks) for
        image ``key`` with ``options`` (that family's), reusing its cached embedding for
        the full-image pass.

        Meant for a worker thread: the model is taken one step at a time (see
        :class:`ModelLock`), and ``progress(done, total)`` is called before each decoder
        batch and at the end; an exception it raises stops the work there.
        """
        image = load_image()
        with self._lock.step():
            embedding, _ = self._embedding(key, lambda: image)
        predictor = self._runs.job_predictor(
            self.model,
            image,
            embedding,
            self._lock,
            precision=self.precision,
        )
        generator = self._runs.generator(
            predictor, self._lock, progress or (lambda done, total: None), **options
        )
        return generator.generate(image)
