"""``segany track``: follow objects through a video with SAM 2, from clicks and boxes on
any frames."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from ..atomic import atomic_path, check_writable, write_text_atomic
from ..errors import SeganyError
from ..images import overlay_masks, write_mask_png
from ..inputs import check_boxes, check_points
from ..masks.formats import record_coco_rle
from ..modeling import Sam2
from ..sam2_video_predictor import Sam2VideoPredictor
from ..video_frames import read_frames
from .common import add_model_arguments, inference_options, model_from_args, parse_numbers

# With neither --model nor --checkpoint: the smallest SAM 2.1 (segany's own default model is
# an image model).
DEFAULT_MODEL = "sam2.1_t"
FORMATS = ("png", "coco")
DEFAULT_FPS = 24.0  # for a folder of frames, which has no frame rate


@dataclass
class ObjectPrompts:
    """One object's prompts on one frame: clicks in pixels of the frame, at most one box."""

    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: list[float] | None = None


class _PromptAction(argparse.Action):
    """Keeps --point, --box and --object in the order given: a prompt belongs to the
    object of the last --object before it (1 before any)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        value: Any,
        option_string: str | None = None,
    ) -> None:
        if self.dest == "object":
            namespace.object = value
            return
        prompts = list(getattr(namespace, "prompts", None) or [])
        prompts.append((self.dest, value, namespace.object))
        namespace.prompts = prompts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "track",
        help="track objects through a video (SAM 2) from clicks and boxes on any frames",
        description="Segment objects on the frames you prompt and follow them through the "
        "whole video, forward and back. FRAME counts from 0; coordinates are pixels of "
        "the video (x to the right, y down).",
    )
    parser.add_argument(
        "video", metavar="VIDEO", help="video file (mp4, avi, mov, ...) or folder of JPEG frames"
    )
    common = {"action": _PromptAction, "default": argparse.SUPPRESS}
    parser.add_argument(
        "--point",
        metavar="FRAME:X,Y[,LABEL]",
        help="a click on frame FRAME; LABEL 1 = foreground (default), 0 = background; repeat",
        **common,
    )
    parser.add_argument(
        "--box", metavar="FRAME:X0,Y0,X1,Y1", help="a box around the object on FRAME", **common
    )
    parser.add_argument(
        "--object",
        type=int,
        metavar="ID",
        help="the prompts after this belong to object ID (default 1); repeat for more objects",
        **common,
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT/", help="folder for the masks"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="png",
        help="png (default): OUT/<object>/<frame>.png, 0/255; coco: OUT/<frame>.json with "
        "each object's COCO RLE",
    )
    parser.add_argument(
        "--overlay", metavar="VIDEO.mp4", help="also write the masks over the video"
    )
    parser.add_argument(
        "--fps", type=float, help="frame rate of the overlay (default: the video's, else 24)"
    )
    add_model_arguments(parser, precision=True)
    parser.set_defaults(run=run, object=1, prompts=[])


def _parse_prompt(kind: str, text: str) -> tuple[int, list[float]]:
    form = "FRAME:X,Y[,LABEL]" if kind == "point" else "FRAME:X0,Y0,X1,Y1"
    frame_text, _, numbers = text.partition(":")
    try:
        frame = int(frame_text)
    except ValueError:
        raise SeganyError(f"--{kind} expects {form}, got {text!r}") from None
    counts = (2, 3) if kind == "point" else (4,)
    return frame, parse_numbers(numbers, f"--{kind}", counts, form)


def parse_prompts(prompts: list[tuple[str, str, int]]) -> dict[tuple[int, int], ObjectPrompts]:
    """(kind, text, object) triples -> the prompts of each (frame, object)."""
    if not prompts:
        raise SeganyError("give at least one --point FRAME:X,Y or --box FRAME:X0,Y0,X1,Y1")
    grouped: dict[tuple[int, int], ObjectPrompts] = defaultdict(ObjectPrompts)
    for kind, text, obj in prompts:
        frame, values = _parse_prompt(kind, text)
        target = grouped[frame, obj]
        if kind == "point":
            target.points.append(values[:2])
            target.labels.append(int(values[2]) if len(values) == 3 else 1)
        elif target.box is not None:
            raise SeganyError(f"object {obj} has two boxes on frame {frame}; give one")
        else:
            target.box = values
    return dict(grouped)


def _check_prompts(
    prompts: dict[tuple[int, int], ObjectPrompts], frames: int, size: tuple[int, int]
) -> None:
    for (frame, _), prompt in sorted(prompts.items()):
        if not 0 <= frame < frames:
            raise SeganyError(
                f"frame {frame} is out of range: the video has frames 0 to {frames - 1}"
            )
        if prompt.points:
            check_points(np.array(prompt.points), np.array(prompt.labels), size)
        if prompt.box is not None:
            check_boxes(np.array(prompt.box), size)


def _video_fps(video: Path) -> float:
    if video.is_dir():
        return DEFAULT_FPS
    capture = cv2.VideoCapture(str(video))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return fps if fps and np.isfinite(fps) and fps > 0 else DEFAULT_FPS


class MaskWriter:
    """Writes each tracked frame's masks as they come, every file atomically (a stopped run
    keeps the frames it finished)."""

    def __init__(self, folder: Path, form: str, obj_ids: list[int]) -> None:
        self.folder, self.form = folder, form
        if form == "png":
            for obj in obj_ids:
                (folder / str(obj)).mkdir(parents=True, exist_ok=True)
        else:
            folder.mkdir(parents=True, exist_ok=True)

    def write(self, frame: int, obj_ids: list[int], masks: np.ndarray) -> None:
        """``masks``: (objects, H, W) bool of frame ``frame``."""
        if self.form == "png":
            for obj, mask in zip(obj_ids, masks, strict=True):
                write_mask_png(self.folder / str(obj) / f"{frame:05d}.png", mask)
            return
        objects = []
        for obj, mask in zip(obj_ids, masks, strict=True):
            rle = record_coco_rle({"segmentation": mask})
            objects.append({"id": obj, "segmentation": rle, "area": int(mask.sum())})
        height, width = masks.shape[1:]
        record = {"frame": frame, "height": height, "width": width, "objects": objects}
        write_text_atomic(self.folder / f"{frame:05d}.json", json.dumps(record))


def _track(
    predictor: Sam2VideoPredictor, state: dict[str, Any], first: int, writer: MaskWriter
) -> dict[int, np.ndarray]:
    """Propagate from the first prompted frame ``first`` to the end, then back to frame 0;
    each frame's (objects, H, W) bool masks, written as they come."""
    frames = state["num_frames"]
    passes = [False] + ([True] if first > 0 else [])
    tracked: dict[int, np.ndarray] = {}
    with tqdm(total=frames, desc="track", unit="frame") as bar:
        for reverse in passes:
            for frame, obj_ids, logits in predictor.propagate_in_video(state, reverse=reverse):
                masks = (logits[:, 0] > 0).cpu().numpy()
                writer.write(frame, list(obj_ids), masks)
                if frame not in tracked:
                    bar.update()
                tracked[frame] = masks
    return tracked


def _write_overlay(path: Path, video: Path, tracked: dict[int, np.ndarray], fps: float) -> None:
    """The video with every object's mask over it (mp4v), written atomically."""
    with atomic_path(path) as temp:
        writer = None
        try:
            for index, frame in enumerate(read_frames(video)):
                picture = overlay_masks(frame, list(tracked[index])) if index in tracked else frame
                if writer is None:
                    height, width = picture.shape[:2]
                    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                    writer = cv2.VideoWriter(str(temp), fourcc, fps, (width, height))
                    if not writer.isOpened():
                        raise SeganyError(f"OpenCV cannot write the overlay video {path}")
                writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        finally:
            if writer is not None:
                writer.release()


def run(args: argparse.Namespace) -> int:
    prompts = parse_prompts(args.prompts)
    video = Path(args.video)
    if not video.exists():
        raise SeganyError(f"video not found: {video}; give a video file or a folder of JPEG frames")
    output = check_writable(args.output, "-o", folder=True)
    overlay = None if args.overlay is None else check_writable(args.overlay, "--overlay")
    options = inference_options(args)
    if args.model is None and args.checkpoint is None:
        args.model = DEFAULT_MODEL
    model = model_from_args(args)
    if not isinstance(model, Sam2):
        raise SeganyError("segany track needs a SAM 2 model: use --model sam2.1_t (or s, b+, l)")
    predictor = Sam2VideoPredictor(model, **options)
    state = predictor.init_state(video)
    size = (state["video_height"], state["video_width"])
    _check_prompts(prompts, state["num_frames"], size)
    for (frame, obj), prompt in sorted(prompts.items()):
        predictor.add_new_points_or_box(
            state,
            frame_idx=frame,
            obj_id=obj,
            points=np.array(prompt.points, np.float32) if prompt.points else None,
            labels=np.array(prompt.labels, np.int32) if prompt.points else None,
            box=None if prompt.box is None else np.array(prompt.box, np.float32),
        )
    obj_ids = sorted({obj for _, obj in prompts})
    first = min(frame for frame, _ in prompts)
    tracked = _track(predictor, state, first, MaskWriter(output, args.format, obj_ids))
    if overlay is not None:
        _write_overlay(overlay, video, tracked, args.fps or _video_fps(video))
    print(f"{len(tracked)} frames, {len(obj_ids)} object(s) -> {output}")
    return 0
