"""Model in the loop: fine-tune on the annotations accepted so far, and measure the change.

Accepted annotations are those of the COCO file that are not unaccepted proposals (see
:func:`segany.engine.propose.is_proposal`). Validation is either a data set of its own
(``val``, any format segany.data reads) or a deterministic share of the annotated images
held out (chosen by a hash of the file stem and the seed, so the same file gives the same
split). Training is :func:`segany.train.train` with a
:class:`~segany.train.config.TrainConfig` built here (SAM's simulated interactive recipe,
encoder frozen by default); evaluation is :func:`segany.evaluate.evaluate` with box
prompts and simulated clicks, before and after.

Written in OUTDIR: ``data/train/annotations.json`` and ``data/val/annotations.json`` (the
subsets, image paths absolute), ``base.safetensors`` (the starting model, so training and
the "before" numbers start from the same weights), the trainer's files
(``model.safetensors``, ``checkpoint.pt``, ``metrics.jsonl``, ``curves.png``) and
``report.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..build import (
    CONFIG_METADATA_KEY,
    MODEL_CONFIGS,
    SamConfig,
    config_from_dict,
    config_to_dict,
)
from ..checkpoint import detect_model_type, read_metadata, read_state_dict
from ..data import SegmentationDataset, load_dataset
from ..data.coco import load_coco_json
from ..errors import SeganyError
from ..evaluate import CLICK_COUNTS, evaluate
from ..loading import load_model, resolve_device, save_model
from ..masks.formats import write_json
from ..modeling import Sam
from ..predictor import SamPredictor
from ..train import train
from ..train.config import (
    FREEZE_CHOICES,
    DataSection,
    DataSource,
    ModelSection,
    OptimSection,
    TrainConfig,
    check_config,
)
from .propose import is_proposal, locate_images, proposal_category_ids

REPORT_FILE = "report.json"
BASE_FILE = "base.safetensors"
PROMPTS = ("box", "clicks")


@dataclass(frozen=True)
class RetrainOptions:
    """Fine-tuning and evaluation settings (defaults: a short fine-tune of the decoder)."""

    steps: int = 300
    lr: float = 1e-4
    batch_images: int = 2
    masks_per_image: int = 16
    freeze: str = "encoder"
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 on CUDA, else fp32)
    val_fraction: float = 0.2
    eval_clicks: int = 9
    max_val_images: int | None = None
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        """SeganyError naming the first bad option."""
        if self.steps < 1 or self.batch_images < 1 or self.masks_per_image < 1:
            raise SeganyError("--steps, --batch-images and --masks-per-image must be at least 1")
        if not self.lr > 0:
            raise SeganyError(f"--lr must be positive, got {self.lr:g}")
        if self.freeze not in FREEZE_CHOICES:
            raise SeganyError(f"--freeze must be one of {', '.join(FREEZE_CHOICES)}")
        if not 0 < self.val_fraction < 1:
            raise SeganyError(f"--val-fraction must be between 0 and 1, got {self.val_fraction:g}")
        if self.eval_clicks < 1 or (self.max_val_images is not None and self.max_val_images < 1):
            raise SeganyError("--eval-clicks and --max-val-images must be at least 1")


# -------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------


def held_out(stems: list[str], fraction: float, seed: int) -> set[str]:
    """The stems held out for validation: ``fraction`` of them (at least one, never all),
    the first by SHA-256 of ``seed/stem``, so the choice depends on nothing else."""
    ranked = sorted(stems, key=lambda s: hashlib.sha256(f"{seed}/{s}".encode()).hexdigest())
    count = min(len(stems) - 1, max(1, round(fraction * len(stems))))
    return set(ranked[:count])


@dataclass
class AcceptedData:
    """The accepted annotations of a COCO file, by image."""

    data: dict[str, Any]
    images: list[tuple[dict[str, Any], Path]]  # images with an accepted object, and files
    annotations: dict[Any, list[dict[str, Any]]]
    proposals_left_out: int


def accepted_data(coco_path: Path, images_dir: Path | None) -> AcceptedData:
    """The COCO file's accepted annotations and the images that have any."""
    data = load_coco_json(coco_path)
    proposal_categories = proposal_category_ids(data)
    annotations: dict[Any, list[dict[str, Any]]] = {}
    left_out = 0
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            continue
        if is_proposal(ann, proposal_categories):
            left_out += 1
            continue
        annotations.setdefault(ann.get("image_id"), []).append(ann)
    located = locate_images(data, coco_path, images_dir)
    images = [
        (record, path)
        for record, path in located
        if any(not a.get("iscrowd") for a in annotations.get(record["id"], []))
    ]
    if not images:
        raise SeganyError(
            f"{coco_path} has no accepted annotations ({left_out} unaccepted proposals left "
            'out); accept proposals by setting "proposal" to false'
        )
    return AcceptedData(data, images, annotations, left_out)


def write_subset(accepted: AcceptedData, stems: set[str], folder: Path) -> Path:
    """``folder/annotations.json``: the accepted annotations of the images with ``stems``,
    the images linked into ``folder/images/`` (a COCO loader reads only names inside the
    data folder, see :func:`segany.data.coco.is_safe_file_name`)."""
    chosen = [(r, p) for r, p in accepted.images if p.stem in stems]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for _, path in chosen:
        _link_or_copy(path.resolve(), folder / "images" / path.name)
    document = {
        "images": [{**record, "file_name": path.name} for record, path in chosen],
        "annotations": [a for r, _ in chosen for a in accepted.annotations[r["id"]]],
        "categories": accepted.data.get("categories") or [],
    }
    write_json(folder / "annotations.json", document)
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` names ``source``'s file: a symbolic link, else a hard link, else a copy
    (file systems without links)."""
    if target.is_symlink() or target.exists():
        target.unlink()
    for link in (target.symlink_to, target.hardlink_to):
        try:
            link(source)
            return
        except OSError:
            continue
    shutil.copyfile(source, target)


def _limited(dataset: SegmentationDataset, limit: int | None) -> SegmentationDataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


# -------------------------------------------------------------------------------------
# Models and scores
# -------------------------------------------------------------------------------------


def base_config(name: str | None, checkpoint: str | None) -> SamConfig:
    """The architecture :func:`segany.build.load_model` builds for ``name``/``checkpoint``
    (which it has loaded already, so the checkpoint is known to be readable)."""
    if checkpoint is not None and name is None:
        stored = read_metadata(checkpoint).get(CONFIG_METADATA_KEY)
        if stored is not None:
            return config_from_dict(json.loads(stored))
        name = detect_model_type(read_state_dict(checkpoint))
    return MODEL_CONFIGS[name or "default"]


def scores(model: Sam, dataset: SegmentationDataset, clicks: int) -> dict[str, Any]:
    """Box mIoU and click mIoU / NoC of ``model`` on ``dataset`` (segany.evaluate)."""
    result = evaluate(SamPredictor(model), dataset, PROMPTS, max_clicks=clicks)
    return result.summary()


def metric_rows(summary: dict[str, Any], clicks: int) -> dict[str, float | None]:
    """The headline numbers of an evaluation summary, by name."""
    rows: dict[str, float | None] = {"box mIoU": summary["miou_box"]}
    for k in CLICK_COUNTS:
        if k <= clicks:
            rows[f"mIoU {k} click{'s' if k > 1 else ''}"] = summary["miou_clicks"][str(k)]
    rows[f"NoC@85 (max {clicks})"] = summary["noc85"]
    rows[f"NoC@90 (max {clicks})"] = summary["noc90"]
    return rows


def _change(before: dict[str, float | None], after: dict[str, float | None]) -> dict:
    return {
        key: None if before[key] is None or after[key] is None else after[key] - before[key]
        for key in before
    }


def format_report(report: dict[str, Any]) -> str:
    """The before/after table of a report."""
    val = report["validation"]
    lines = [
        f"validation: {val['images']} images, {val['objects']} objects ({val['source']})",
        f"{'':<22}{'before':>8}{'after':>8}{'change':>9}",
    ]
    for key, change in report["change"].items():
        before, after = report["before"][key], report["after"][key]
        if before is None or after is None or change is None:
            lines.append(f"{key:<22}{'-':>8}{'-':>8}{'-':>9}")
        else:
            lines.append(f"{key:<22}{before:>8.3f}{after:>8.3f}{change:>+9.3f}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------


def _train_config(
    outdir: Path, train_dir: Path, config: SamConfig, base: Path, options: RetrainOptions
) -> TrainConfig:
    """The fine-tuning run: SAM's recipe from ``base`` on the COCO subset in ``train_dir``,
    checked as a YAML config would be."""
    precision = options.precision
    if precision == "auto":
        precision = "bf16" if resolve_device(options.device).type == "cuda" else "fp32"
    train_config = TrainConfig(
        model=ModelSection(
            name=None,
            config=config_to_dict(config),
            checkpoint=base,
            freeze=options.freeze,
        ),
        data=DataSection(
            train=(DataSource(root=train_dir, format="coco", split="all"),),
            masks_per_image=options.masks_per_image,
        ),
        optim=OptimSection(
            steps=options.steps,
            batch_images=options.batch_images,
            lr=options.lr,
            warmup_steps=min(50, max(1, options.steps // 10)),
            precision=precision,
            seed=options.seed,
        ),
        output=outdir,
        device=options.device,
        log_every=min(10, options.steps),
    )
    check_config(train_config)  # the trainer's own checks of every value
    return train_config


def retrain(
    coco_path: Path,
    images_dir: Path | None,
    outdir: Path,
    model_name: str | None,
    checkpoint: str | None,
    options: RetrainOptions,
    val: Path | None = None,
    val_split: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune on the accepted annotations of ``coco_path``, evaluate before and after
    on the validation images, write OUTDIR (see the module docstring); returns the report.
    """
    options.check()
    start = time.perf_counter()
    accepted = accepted_data(coco_path, images_dir)
    stems = [path.stem for _, path in accepted.images]
    if val is None:
        if len(stems) < 2:
            raise SeganyError(
                f"{coco_path} has one annotated image; hold-out validation needs two or more "
                "(or give a validation set with --val)"
            )
        val_stems = held_out(stems, options.val_fraction, options.seed)
        val_set = load_dataset(write_subset(accepted, val_stems, outdir / "data" / "val"), "coco")
        source = f"{len(val_stems)} of {len(stems)} annotated images held out"
    else:
        val_set = load_dataset(val, split=val_split)
        val_stems = set(val_set.image_ids)
        source = f"{val} (split {val_split or 'all'})"
    train_stems = set(stems) - val_stems  # never train on a validation image
    if not train_stems:
        raise SeganyError("every annotated image is also a validation image; nothing to train on")
    val_set = _limited(val_set, options.max_val_images)
    train_dir = write_subset(accepted, train_stems, outdir / "data" / "train")

    base_model = load_model(model_name, checkpoint, options.device)
    config = base_config(model_name, checkpoint)
    base = save_model(base_model, outdir / BASE_FILE, config)
    before = metric_rows(scores(base_model, val_set, options.eval_clicks), options.eval_clicks)
    del base_model

    train_config = _train_config(outdir, train_dir, config, base, options)
    model_path = train(train_config, resume=resume)
    tuned = load_model(None, str(model_path), options.device)
    after = metric_rows(scores(tuned, val_set, options.eval_clicks), options.eval_clicks)

    report = {
        "annotations": str(coco_path),
        "base_model": model_name or checkpoint or "default",
        "model": str(model_path),
        "train": {
            "images": len(train_stems),
            "objects": sum(
                len(accepted.annotations[r["id"]])
                for r, p in accepted.images
                if p.stem in train_stems
            ),
            "proposals_left_out": accepted.proposals_left_out,
            **{k: v for k, v in asdict(options).items() if not k.startswith(("val", "eval"))},
        },
        "validation": {
            "source": source,
            "images": len(val_set),
            "objects": val_set.num_objects,
            "eval_clicks": options.eval_clicks,
        },
        "before": before,
        "after": after,
        "change": _change(before, after),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_text_atomic(outdir / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return report
