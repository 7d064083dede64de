"""A picture of the training curves from ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from ..plots import new_figure, save_figure


def plot_training_curves(metrics: Path, output: Path) -> Path | None:
    """Loss and IoU (first and last round) against step; None when nothing is logged."""
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    if not records:
        return None
    steps = [r["step"] + 1 for r in records]
    figure, (loss_axis, iou_axis) = new_figure(2)
    loss_axis.plot(steps, [r["loss"] for r in records])
    loss_axis.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    for key, label in (("iou_first", "first prompt"), ("iou_last", "after all rounds")):
        iou_axis.plot(steps, [r[key] for r in records], label=label)
    iou_axis.set(xlabel="step", ylabel="IoU (low-res)", title="training IoU", ylim=(0, 1))
    iou_axis.legend()
    return save_figure(figure, output)
