"""Saving matplotlib figures (headless, atomically) for training and evaluation plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed: figures only go to files
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .atomic import atomic_path


def new_figure(columns: int = 1) -> tuple[Figure, list]:
    """A figure with ``columns`` axes side by side."""
    figure, axes = plt.subplots(1, columns, figsize=(5 * columns + 1, 4), squeeze=False)
    return figure, list(axes[0])


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG atomically and release it."""
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    return Path(path)
