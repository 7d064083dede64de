"""Reading a video for SAM 2: a folder of JPEG frames, or a video file OpenCV decodes.

* A folder: Meta's rule. Its ``.jpg``/``.jpeg`` files (either case) are the frames, each
  named by its frame number (``0.jpg``, ``1.jpg``, ... or ``00000.jpg``, ...), in the
  order of those numbers; other files are ignored.
* A file (mp4, avi, mov, mkv, ...): its frames as OpenCV (``cv2.VideoCapture``) decodes
  them, in order.

:func:`read_frames` gives the frames as they are, (H, W, 3) uint8 RGB;
:func:`load_video_frames` gives them as SAM 2 takes them, N frames of (3, S, S) float32,
each prepared as Meta's ``load_video_frames`` prepares a JPEG folder's
(:func:`preprocess_frame`: Pillow's resize to S x S whatever the aspect ratio, / 255,
ImageNet mean and std), with the original height and width. They are kept as the resized
uint8 pixels and normalised when a frame is read (:class:`VideoFrames`): a quarter of the
memory of Meta's float32 frames (3 MB a frame at 1024 px instead of 12 MB, 0.6 GB instead
of 2.4 GB for 200 frames), for the same numbers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from .errors import SeganyError

PathLike = str | os.PathLike[str]

JPEG_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")
# ImageNet statistics on the 0-1 scale (Meta's defaults for video frames).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_jpeg_frames(folder: PathLike) -> list[Path]:
    """The JPEG frames of ``folder``, ordered by the frame number that names each."""
    folder = Path(folder)
    frames = [path for path in folder.iterdir() if path.suffix in JPEG_SUFFIXES]
    if not frames:
        raise SeganyError(
            f"no JPEG frames (.jpg or .jpeg files) in {folder}; give a folder of frames "
            "named 0.jpg, 1.jpg, ... or a video file"
        )
    for path in frames:
        if not _is_frame_number(path.stem):
            raise SeganyError(
                f"frame file {path.name!r} in {folder} is not named by its frame number; "
                "name the frames 0.jpg, 1.jpg, ... (or 00000.jpg, ...)"
            )
    return sorted(frames, key=lambda path: int(path.stem))


def _is_frame_number(stem: str) -> bool:
    try:
        int(stem)
    except ValueError:
        return False
    return True


def read_frames(video_path: PathLike) -> Iterator[np.ndarray]:
    """The frames of a JPEG folder or video file, in order, as (H, W, 3) uint8 RGB."""
    for frame in _frame_images(_existing(video_path)):
        yield np.asarray(frame)


def _existing(video_path: PathLike) -> Path:
    path = Path(video_path)
    if not path.exists():
        raise SeganyError(f"video not found: {path}; give a folder of JPEG frames or a video file")
    return path


def _frame_images(path: Path) -> Iterator[Image.Image]:
    """The frames of an existing folder or file as RGB Pillow images."""
    if path.is_dir():
        for frame in list_jpeg_frames(path):
            yield _open_jpeg(frame)
        return
    count = 0
    for frame in _decode_video(path):
        count += 1
        yield Image.fromarray(frame)
    if count == 0:
        raise SeganyError(f"OpenCV decoded no frames from {path}; is it a video file?")


def _open_jpeg(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise SeganyError(f"cannot read frame {path}: {error}") from None


def _decode_video(path: Path) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB frames of a video file, decoded by OpenCV."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SeganyError(
            f"OpenCV cannot open {path} as a video; give a video file (mp4, avi, mov, ...) "
            "or a folder of JPEG frames"
        )
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def preprocess_frame(frame: Image.Image, image_size: int) -> torch.Tensor:
    """An RGB frame -> the (3, S, S) float32 model input, S = ``image_size``, as Meta
    prepares video frames: Pillow's resize (its default filter, bicubic) to S x S, / 255
    (in float64, then float32), then ImageNet mean and std."""
    return normalise_pixels(resize_frame(frame, image_size))


def resize_frame(frame: Image.Image, image_size: int) -> torch.Tensor:
    """An RGB frame resized as :func:`preprocess_frame` does: (S, S, 3) uint8 pixels."""
    return torch.from_numpy(np.array(frame.resize((image_size, image_size))))


def normalise_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """(S, S, 3) uint8 pixels -> (3, S, S) float32 model input on their device: / 255 in
    float64 (as Meta, through NumPy), then ImageNet mean and std in float32."""
    scaled = (pixels.permute(2, 0, 1).double() / 255.0).float()
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=pixels.device)[:, None, None]
    return (scaled - mean) / std


class VideoFrames(Sequence[torch.Tensor]):
    """A video's frames as SAM 2 takes them: ``frames[i]`` is frame i's (3, S, S) float32
    input on ``device``, normalised from its resized uint8 pixels when read (see the module
    documentation); ``frames[i]`` of Meta's (N, 3, S, S) tensor, for a quarter of the
    memory.

    Args:
        pixels: each frame's (S, S, 3) uint8 pixels (:func:`resize_frame`), in order;
            None for a frame not read yet (:class:`AsyncVideoFrames`).
        device: where the pixels are kept and the frames made.
    """

    def __init__(self, pixels: list[torch.Tensor | None], device: torch.device) -> None:
        self.device = device
        self._pixels = [None if p is None else p.to(device) for p in pixels]

    def __len__(self) -> int:
        return len(self._pixels)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return normalise_pixels(self.pixels(index))

    def pixels(self, index: int) -> torch.Tensor:
        """Frame ``index`` as kept: (S, S, 3) uint8, resized, not normalised."""
        pixels = self._pixels[index]
        return self._read(index) if pixels is None else pixels

    def _read(self, index: int) -> torch.Tensor:
        raise IndexError(f"frame {index} was not read")


class AsyncVideoFrames(VideoFrames):
    """The frames of a JPEG folder, read by a background thread while tracking starts
    (``async_loading_frames``); a frame asked for before the thread reached it is read at
    once. Frame 0 is read on creation (for the video's size).

    Args:
        paths: the JPEG frames, in order.
        image_size: S.
        device: where the frames are kept.
    """

    def __init__(self, paths: list[Path], image_size: int, device: torch.device) -> None:
        super().__init__([None] * len(paths), device)
        self.paths = paths
        self.image_size = image_size
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        first = _open_jpeg(paths[0])
        self.video_width, self.video_height = first.size
        self._store(0, first)
        self.thread = threading.Thread(target=self._read_all, daemon=True)
        self.thread.start()

    def _read_all(self) -> None:
        try:
            for index in range(1, len(self.paths)):
                if self._pixels[index] is None:
                    self._read(index)
        except BaseException as error:  # raised again to the reader of any frame
            self._error = error

    def _store(self, index: int, image: Image.Image) -> torch.Tensor:
        _check_size(image, (self.video_width, self.video_height), self.paths[index].name)
        pixels = resize_frame(image, self.image_size).to(self.device)
        with self._lock:
            self._pixels[index] = pixels
        return pixels

    def _read(self, index: int) -> torch.Tensor:
        return self._store(index, _open_jpeg(self.paths[index]))

    def pixels(self, index: int) -> torch.Tensor:
        if self._error is not None:  # the background reader failed: raised to every reader
            raise SeganyError(f"reading the frames failed: {self._error}") from self._error
        return super().pixels(index)


def _check_size(image: Image.Image, size: tuple[int, int], name: str) -> None:
    if image.size != size:
        raise SeganyError(
            f"frame {name} is {image.size[0]}x{image.size[1]} but the first frame is "
            f"{size[0]}x{size[1]}; all frames of a video must have one size"
        )


def load_video_frames(
    video_path: PathLike,
    image_size: int,
    offload_video_to_cpu: bool = False,
    compute_device: torch.device | str = "cpu",
    async_loading_frames: bool = False,
) -> tuple[VideoFrames, int, int]:
    """A video's frames prepared for SAM 2, and its height and width.

    Args:
        video_path: a folder of JPEG frames or a video file (see the module docstring).
        image_size: S, the model's input side.
        offload_video_to_cpu: keep the frames in CPU memory (each is moved to
            ``compute_device`` when encoded); on a CPU nothing changes.
        compute_device: where the model runs.
        async_loading_frames: for a JPEG folder, read the frames in a background thread
            (:class:`AsyncVideoFrames`); a video file is always decoded at once.

    Returns:
        The N frames (:class:`VideoFrames`: ``frames[i]`` is (3, S, S) float32), the
        original height and width.
    """
    path = _existing(video_path)
    device = torch.device("cpu") if offload_video_to_cpu else torch.device(compute_device)
    if path.is_dir() and async_loading_frames:
        frames = AsyncVideoFrames(list_jpeg_frames(path), image_size, device)
        return frames, frames.video_height, frames.video_width
    pixels, size = [], None
    for index, image in enumerate(_frame_images(path)):
        size = size or image.size
        _check_size(image, size, f"{index}")
        pixels.append(resize_frame(image, image_size))
    width, height = size
    return VideoFrames(pixels, device), height, width
