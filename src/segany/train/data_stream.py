"""A deterministic, endless stream of training items.

Position p of the stream (counted over all steps, micro-batches and ranks) maps
to one sample of one epoch's permutation and to its own augmentation RNG, so an
item depends only on (seed, p): resumed and multi-process runs see the same data.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from ..data import SegmentationDataset, load_dataset
from ..data.synthetic import SyntheticShapes
from ..errors import SeganyError
from .augment import TrainItem, copy_paste, prepare_item
from .config import DataSource, TrainConfig

MAX_ATTEMPTS = 20


def _open_source(source: DataSource, seed: int) -> SegmentationDataset | SyntheticShapes:
    if source.synthetic is not None:
        return SyntheticShapes(source.images, seed=seed)
    assert source.root is not None  # checked with the config
    split = None if source.split == "all" else source.split
    return load_dataset(source.root, format=source.format, split=split)


class SampleStream:
    """Training items by stream position; bad samples are skipped deterministically."""

    def __init__(self, config: TrainConfig, img_size: int) -> None:
        self.config = config
        self.img_size = img_size
        self.datasets: list[SegmentationDataset | SyntheticShapes] = [
            _open_source(source, config.optim.seed) for source in config.data.train
        ]
        entries = []
        for index, (source, dataset) in enumerate(zip(config.data.train, self.datasets)):
            count = max(1, round(source.weight * len(dataset))) if len(dataset) else 0
            entries.extend((index, i % len(dataset)) for i in range(count))
        if not entries:
            raise SeganyError("the training data is empty; check data.train roots and splits")
        self.entries = entries
        self._pool = ThreadPoolExecutor(config.data.workers) if config.data.workers > 0 else None

    @lru_cache(maxsize=4)  # noqa: B019 - a stream lives as long as its run
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.optim.seed, epoch]).permutation(len(self.entries))

    def _entry(self, position: int, attempt: int) -> tuple[int, int]:
        epoch, offset = divmod(position, len(self.entries))
        if attempt:
            offset = int(np.random.default_rng([position, attempt]).integers(len(self.entries)))
        return self.entries[self._permutation(epoch)[offset]]

    def item(self, position: int) -> TrainItem:
        """The item at ``position``, with another position's objects pasted on at the
        configured copy-paste rate (the donor drawn from the position's own RNG)."""
        item = self._plain_item(position)
        data = self.config.data
        rng = np.random.default_rng([self.config.optim.seed, position, 2])
        if data.augment.copy_paste > 0 and rng.random() < data.augment.copy_paste:
            donor = self._plain_item(int(rng.integers(0, 2**62)))
            item = copy_paste(item, donor, data.masks_per_image, data.min_mask_area, rng)
        return item

    def _plain_item(self, position: int) -> TrainItem:
        data = self.config.data
        for attempt in range(MAX_ATTEMPTS):
            source, index = self._entry(position, attempt)
            sample = self.datasets[source].get(index)
            if sample is None:
                continue
            rng = np.random.default_rng([self.config.optim.seed, position, attempt, 1])
            item = prepare_item(
                sample.image,
                sample.masks,
                sample.image_id,
                self.img_size,
                data.masks_per_image,
                data.min_mask_area,
                data.augment,
                rng,
            )
            if item is not None:
                return item
        raise SeganyError(
            f"{MAX_ATTEMPTS} samples in a row were unusable (unreadable or without masks); "
            "check the data"
        )

    def items(self, positions: Iterable[int]) -> list[TrainItem]:
        if self._pool is None:
            return [self.item(p) for p in positions]
        return list(self._pool.map(self.item, positions))
