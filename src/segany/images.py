"""Reading and writing pictures, and drawing masks and prompts over them.

Conventions used throughout segany:

* an image is an ``(H, W, 3)`` ``uint8`` RGB array;
* a mask is an ``(H, W)`` ``bool`` array, ``True`` inside the object;
* coordinates are pixels of the original image, ``x`` (column) before ``y`` (row);
* boxes are ``(x0, y0, x1, y1)`` (XYXY).
"""

from __future__ import annotations

import colorsys
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segany.atomic import atomic_path
from segany.errors import SeganyError
from segany.inputs import check_image

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageTooLarge",
    "check_image_size",
    "mask_colors",
    "max_image_pixels",
    "open_image",
    "overlay_masks",
    "read_image",
    "write_image",
    "write_mask_png",
]

PathLike = str | os.PathLike[str]

# The largest image read, in pixels (width x height), checked from the file's header
# before any pixel is decoded, whatever the reader (Pillow or tifffile): a 12000 x 12000
# 16-bit TIFF compresses to under 1 MB and needs about 4.5 GB to decode and rescale.
# 100 megapixels (10000 x 10000) is above what most cameras take (61 MP full frame),
# keeps decoding under about 3 GB even for 16-bit files, and is far beyond what the
# models see (they resize to 1024 or 512 px). Raise it per process with
# $SEGANY_MAX_IMAGE_PIXELS, or from Python by setting this attribute.
MAX_IMAGE_PIXELS = 100_000_000
PIXELS_VARIABLE = "SEGANY_MAX_IMAGE_PIXELS"


class ImageTooLarge(SeganyError):
    """An image over the pixel limit (see :func:`check_image_size`)."""


SUPPORTED = "supported: JPEG, PNG, TIFF, WebP, BMP"

# Pillow formats for the suffixes write_image accepts.
WRITE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".bmp": "BMP",
}

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Pillow modes that hold more than 8 bits per pixel (all single-channel).
HIGH_BIT_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}

ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}

# numpy equivalents of the eight TIFF/EXIF orientations, for TIFFs read by tifffile.
ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: a.swapaxes(0, 1)[:, ::-1],
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: a.swapaxes(0, 1)[::-1],
}

FOREGROUND_RGB = (0, 200, 0)
BACKGROUND_RGB = (220, 0, 0)
BOX_RGB = (0, 255, 0)
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- reading


def read_image(path: PathLike) -> np.ndarray:
    """Read a picture file as an ``(H, W, 3)`` ``uint8`` RGB array.

    Reads JPEG, PNG, TIFF, WebP and BMP (anything Pillow opens), turned upright
    according to its EXIF orientation. Conversions:

    * grayscale (1-bit, 8-bit) is copied to the three channels;
    * images with more than 8 bits per sample (16-bit, 32-bit integer, float,
      as from microscopes and scientific cameras) are **rescaled linearly from the
      image's own minimum and maximum to 0..255**, over all colour channels
      together; a constant image becomes all zeros and NaN/inf pixels become 0;
    * transparency (RGBA, LA, palette or colour-key transparency) is composited
      over white;
    * CMYK, YCbCr and palette images are converted to RGB;
    * of a multi-page TIFF only the first page is read.

    TIFFs Pillow cannot decode faithfully (more than 8 bits per sample with
    several samples, float RGB, ...) are read with ``tifffile``.

    Images over :func:`max_image_pixels` (100 megapixels unless
    ``$SEGANY_MAX_IMAGE_PIXELS`` says otherwise) are refused from their header,
    before any pixel is decoded.

    Raises:
        SeganyError: the file is missing, is a directory, is not a readable
            image, has no pixels or too many.
    """
    file = _existing_file(Path(path))
    if _is_tiff(file) and _tiff_needs_tifffile(file):
        rgb = _read_tiff(file)
    else:
        rgb = _read_with_pillow(file)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise SeganyError(
            f"image {file} is empty ({rgb.shape[1]}x{rgb.shape[0]} pixels); "
            "pass an image with at least one pixel"
        )
    return rgb


def _existing_file(path: Path) -> Path:
    # os.path answers False for names the file system refuses (too long, NUL) instead of
    # raising, so those are "not found" too.
    if not os.path.exists(path):
        raise SeganyError(f"image not found: {path}")
    if os.path.isdir(path):
        raise SeganyError(f"cannot read image {path}: it is a directory; pass an image file")
    return path


def _unreadable(path: Path, reason: str) -> SeganyError:
    reason = " ".join(reason.split()) or "unknown error"
    return SeganyError(f"cannot read image {path}: {reason}; {SUPPORTED}")


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in TIFF_MAGIC
    except OSError:
        return False


def max_image_pixels() -> int:
    """The pixel limit in force: ``$SEGANY_MAX_IMAGE_PIXELS`` if set, else
    :data:`MAX_IMAGE_PIXELS`; SeganyError if the variable is not a positive whole number."""
    text = os.environ.get(PIXELS_VARIABLE, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SeganyError(
            f"${PIXELS_VARIABLE} must be a whole number of pixels such as 200000000, got {text!r}"
        )
    return value


def _too_large(source: PathLike, pixels: int, limit: int, size: str = "") -> ImageTooLarge:
    shape = f"is {size} = {pixels:,} pixels" if size else f"has {pixels:,} pixels"
    return ImageTooLarge(
        f"image {source} {shape}, over the limit of {limit:,}; if you trust the file, "
        f"raise the limit with {PIXELS_VARIABLE}={pixels}"
    )


def check_image_size(source: PathLike, width: int, height: int, planes: int = 1) -> None:
    """SeganyError (naming the size and how to raise the limit) if an image of ``width`` x
    ``height`` pixels (times ``planes``: TIFF depth or samples beyond RGBA, all decoded
    together) is over :func:`max_image_pixels`. Call it with the header's size, before
    decoding."""
    pixels = width * height * planes
    limit = max_image_pixels()
    if pixels > limit:
        size = f"{width}x{height}" + (f"x{planes} planes" if planes > 1 else "")
        raise _too_large(source, pixels, limit, size)


def open_image(path: PathLike) -> Image.Image:
    """Open a picture with Pillow (header only, nothing decoded yet) under segany's limit.

    :func:`check_image_size` replaces Pillow's own decompression-bomb warning (which
    would print a second line); a ``$SEGANY_MAX_IMAGE_PIXELS`` above twice Pillow's
    ``Image.MAX_IMAGE_PIXELS`` raises Pillow's to match, in this process. The caller
    closes the image (use it in a ``with`` block).
    """
    limit = max_image_pixels()
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is not None and 2 * pillow_limit < limit:
        Image.MAX_IMAGE_PIXELS = limit  # only ever raised, and only on request
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
    except Image.DecompressionBombError as error:  # over twice Pillow's limit, so over ours
        count = re.search(r"\((\d+) pixels\)", str(error))
        pixels = int(count.group(1)) if count else 2 * (Image.MAX_IMAGE_PIXELS or limit) + 1
        raise _too_large(path, pixels, limit) from None
    try:
        check_image_size(path, *opened.size)
    except ImageTooLarge:
        opened.close()
        raise
    return opened


def _read_with_pillow(path: Path) -> np.ndarray:
    try:
        with open_image(path) as opened:
            opened.load()  # decode now so truncated files fail here
            upright = ImageOps.exif_transpose(opened)
            return _pil_to_rgb(upright)
    except ImageTooLarge:
        raise  # no other reader may try it either
    except UnidentifiedImageError as err:
        failure: Exception = err
        reason = "not a recognised image file"
    # Decoders raise many types (OSError, SyntaxError, struct.error, ...) for bad
    # files; all of them mean "this input is unreadable" to the user.
    except Exception as err:
        failure, reason = err, str(err) or type(err).__name__
    if _is_tiff(path):
        try:
            return _read_tiff(path)
        except ImageTooLarge:
            raise  # the TIFF's own header is over the limit
        except Exception:
            pass  # report Pillow's reason below; it is usually the clearer one
    raise _unreadable(path, reason) from failure


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a Pillow image of any mode to ``(H, W, 3)`` ``uint8`` RGB."""
    if image.mode in HIGH_BIT_MODES:
        return _gray_to_rgb(_rescale_to_uint8(np.asarray(image)))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return _over_white(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB")).copy()


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _rescale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map ``values`` linearly from their finite [min, max] onto [0, 255].

    Any shape; returns ``uint8`` of the same shape. A constant array gives zeros,
    non-finite entries give 0.
    """
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = data[finite].min(), data[finite].max()
    if high == low:
        return np.zeros(values.shape, np.uint8)
    scaled = np.where(finite, (data - low) * (255.0 / (high - low)), 0.0)
    return np.rint(scaled).astype(np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite ``(H, W, 4)`` ``uint8`` RGBA over a white background."""
    return _composite(rgba[..., :3].astype(np.float64), rgba[..., 3] / 255.0)


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb`` (H, W, 3) in 0..255 over white with ``alpha`` (H, W) in 0..1."""
    alpha = np.clip(alpha, 0.0, 1.0)[..., None]
    return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


# --------------------------------------------------------------------------- TIFF


def _tiff_needs_tifffile(path: Path) -> bool:
    """True for TIFFs that Pillow reads lossily or wrongly (multi-sample, > 8 bits).

    Pillow keeps only the high byte of 16-bit RGB and garbles planar 16-bit
    data, which would defeat the min/max rescale.
    """
    try:
        import tifffile
    except ImportError:
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return page.dtype is not None and page.dtype.itemsize > 1 and page.samplesperpixel > 1
    except Exception:
        return False  # let Pillow try, and report its reason


def _check_tiff_page(page: Any, path: Path) -> None:
    """:func:`check_image_size` for a ``tifffile.TiffPage``, from its tags (nothing decoded)."""
    depth = max(1, int(page.imagedepth))
    samples = max(1, int(page.samplesperpixel))
    check_image_size(
        path, int(page.imagewidth), int(page.imagelength), depth * math.ceil(samples / 4)
    )


def _read_tiff(path: Path) -> np.ndarray:
    """Read the first page of a TIFF with tifffile as ``(H, W, 3)`` ``uint8`` RGB."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            _check_tiff_page(page, path)
            samples = _to_yxs(page.asarray().reshape(page.shape), page.axes)
            has_alpha = bool(page.extrasamples) and page.extrasamples[0] in (1, 2)
            minis_white = page.photometric == tifffile.PHOTOMETRIC.MINISWHITE
            orientation = int(page.tags.valueof(274, 1))
    except ImageTooLarge:
        raise
    except Exception as err:
        raise _unreadable(path, str(err) or type(err).__name__) from err
    rgb = _samples_to_rgb(samples, has_alpha, minis_white)
    return np.ascontiguousarray(ORIENT.get(orientation, ORIENT[1])(rgb))


def _to_yxs(array: np.ndarray, axes: str) -> np.ndarray:
    """Reorder a tifffile page array to ``(H, W, samples)``, first plane of other axes."""
    array = array[tuple(slice(None) if ax in "YXS" else 0 for ax in axes)]
    axes = "".join(ax for ax in axes if ax in "YXS")
    if "S" not in axes:
        array, axes = array[..., None], axes + "S"
    if sorted(axes) != ["S", "X", "Y"]:
        raise ValueError(f"unexpected TIFF layout {axes!r}")
    return np.moveaxis(array, [axes.index(ax) for ax in "YXS"], [0, 1, 2])


def _samples_to_rgb(samples: np.ndarray, has_alpha: bool, minis_white: bool) -> np.ndarray:
    """``(H, W, S)`` samples of any dtype -> RGB; colour rescaled, alpha over white."""
    colour_count = 3 if samples.shape[2] >= 3 else 1
    colour = samples[..., :colour_count]
    if colour.dtype == np.uint8:
        colour8 = colour
    elif colour.dtype == bool:
        colour8 = colour.astype(np.uint8) * 255
    else:
        colour8 = _rescale_to_uint8(colour)
    if minis_white:
        colour8 = 255 - colour8
    rgb = colour8 if colour_count == 3 else _gray_to_rgb(colour8[..., 0])
    if has_alpha and samples.shape[2] > colour_count:
        return _composite(rgb.astype(np.float64), _unit_alpha(samples[..., colour_count]))
    return rgb


def _unit_alpha(alpha: np.ndarray) -> np.ndarray:
    """Alpha samples in 0..1: integers relative to their type's maximum, floats as they are."""
    if np.issubdtype(alpha.dtype, np.integer):
        return alpha / float(np.iinfo(alpha.dtype).max)
    return alpha.astype(np.float64)


# --------------------------------------------------------------------------- writing


def _check_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    """Return ``mask`` as a 2-D ``bool`` array (non-zero is inside)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise SeganyError(f"{what} must be a 2-D HxW array, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def write_mask_png(path: PathLike, mask: np.ndarray) -> Path:
    """Write an ``(H, W)`` mask as an 8-bit grayscale PNG: 255 inside, 0 outside.

    Non-boolean masks count non-zero as inside. The file is always PNG, whatever
    the suffix, and is written atomically. Returns the path.
    """
    pixels = _check_mask(mask).astype(np.uint8) * 255
    with atomic_path(path) as temp:
        Image.fromarray(pixels).save(temp, format="PNG")
    return Path(path)


def write_image(path: PathLike, image: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` ``uint8`` RGB image; the format follows the suffix.

    Suffixes: .png, .jpg/.jpeg (quality 95), .tif/.tiff, .webp, .bmp. Written
    atomically. Returns the path.
    """
    target = Path(path)
    file_format = WRITE_FORMATS.get(target.suffix.lower())
    if file_format is None:
        known = ", ".join(WRITE_FORMATS)
        raise SeganyError(
            f"cannot write image {target}: unknown file type {target.suffix or '(none)'!r}; "
            f"use one of {known}"
        )
    check_image(image)
    options = {"quality": 95} if file_format in ("JPEG", "WEBP") else {}
    with atomic_path(target) as temp:
        Image.fromarray(image).save(temp, format=file_format, **options)
    return target


# --------------------------------------------------------------------------- drawing

GOLDEN_FRACTION = 0.618033988749895


def mask_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct, saturated colours as an ``(n, 3)`` ``uint8`` RGB array.

    Hues step around the colour wheel by the golden ratio (each new hue falls
    in the largest remaining gap); saturation and brightness alternate a little
    so neighbours differ in more than hue. The same ``(n, seed)`` always gives
    the same colours, and the first ``k`` colours do not depend on ``n``.
    """
    if n < 0:
        raise SeganyError(f"number of colours must be >= 0, got {n}")
    start = np.random.default_rng(seed).random()
    colours = np.empty((n, 3), np.uint8)
    for i in range(n):
        hue = (start + i * GOLDEN_FRACTION) % 1.0
        saturation = (0.95, 0.75)[i % 2]
        value = (0.95, 0.85, 1.0)[i % 3]
        colours[i] = np.rint(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    return colours


def _line_width(shape: tuple[int, ...]) -> int:
    """Line thickness in pixels: about 1/300 of the shorter side, at least 1."""
    return max(1, round(min(shape[:2]) / 300))


def _as_mask_stack(masks: np.ndarray | Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Masks as an ``(N, H, W)`` bool array; ``size`` is the image's ``(H, W)``."""
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = [masks]
    stack = [_check_mask(mask, f"mask {i}") for i, mask in enumerate(masks)]
    for i, mask in enumerate(stack):
        if mask.shape != size:
            raise SeganyError(
                f"mask {i} is {mask.shape[1]}x{mask.shape[0]} pixels but the image is "
                f"{size[1]}x{size[0]}; masks must have the image's size"
            )
    return np.stack(stack) if stack else np.zeros((0, *size), bool)


def _colour_rows(colors: np.ndarray | Sequence[Sequence[int]] | None, n: int) -> np.ndarray:
    if colors is None:
        return mask_colors(n)
    rows = np.asarray(colors)
    if rows.ndim != 2 or rows.shape[1] != 3 or len(rows) < n:
        raise SeganyError(f"colors must be an (N, 3) RGB array with N >= {n}, got {rows.shape}")
    return np.clip(rows, 0, 255).astype(np.uint8)


def _rgb(colour: Sequence[int] | np.ndarray) -> tuple[int, int, int]:
    """An RGB triple as plain ints, as OpenCV drawing functions want."""
    return (int(colour[0]), int(colour[1]), int(colour[2]))


def _draw_contour(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    # RETR_LIST so holes get an outline as well as the outer border.
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(canvas, contours, -1, colour, _line_width(canvas.shape))


def _check_points(
    points: np.ndarray | Sequence[Sequence[float]], labels: np.ndarray | Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate prompt points; returns ``(K, 2)`` float x, y and ``(K,)`` int labels."""
    coords = np.asarray(points, dtype=np.float64)
    coords = coords.reshape(-1, 2) if coords.size == 0 or coords.shape == (2,) else coords
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise SeganyError(f"points must be an (N, 2) array of x, y, got shape {coords.shape}")
    marks = np.ones(len(coords), int) if labels is None else np.asarray(labels).reshape(-1)
    if len(marks) != len(coords) or not np.isin(marks, (0, 1)).all():
        raise SeganyError(
            f"point_labels must hold one 0 (background) or 1 (foreground) per point; "
            f"got {len(marks)} labels for {len(coords)} points"
        )
    return coords, marks


def _draw_points(canvas: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> None:
    radius = max(3, round(min(canvas.shape[:2]) / 100))
    ring = max(1, radius // 3)
    for (x, y), label in zip(coords, labels, strict=True):
        centre = (round(x), round(y))
        fill = FOREGROUND_RGB if label == 1 else BACKGROUND_RGB
        cv2.circle(canvas, centre, radius + ring, WHITE, -1, cv2.LINE_AA)
        cv2.circle(canvas, centre, radius, fill, -1, cv2.LINE_AA)


def _draw_boxes(canvas: np.ndarray, boxes: np.ndarray | Sequence[Sequence[float]]) -> None:
    rows = np.asarray(boxes, dtype=np.float64)
    if rows.size and (rows.ndim not in (1, 2) or rows.shape[-1] != 4):
        raise SeganyError(f"boxes must be an (N, 4) array of x0, y0, x1, y1, got {rows.shape}")
    for x0, y0, x1, y1 in rows.reshape(-1, 4):
        corner0, corner1 = (round(x0), round(y0)), (round(x1), round(y1))
        cv2.rectangle(canvas, corner0, corner1, BOX_RGB, _line_width(canvas.shape))


def overlay_masks(
    image: np.ndarray,
    masks: np.ndarray | Sequence[np.ndarray],
    alpha: float = 0.5,
    colors: np.ndarray | Sequence[Sequence[int]] | None = None,
    contours: bool = True,
    points: np.ndarray | Sequence[Sequence[float]] | None = None,
    point_labels: np.ndarray | Sequence[int] | None = None,
    boxes: np.ndarray | Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """Draw masks and prompts over an image; returns a new ``(H, W, 3)`` ``uint8`` array.

    Args:
        image: ``(H, W, 3)`` ``uint8`` RGB; not modified.
        masks: ``(N, H, W)`` array, a sequence of ``(H, W)`` masks, or one ``(H, W)``
            mask. Each is tinted with its colour: ``(1 - alpha) * pixel + alpha * colour``,
            in order, so later masks are on top.
        alpha: opacity of the tint, 0..1.
        colors: ``(N, 3)`` RGB colours; defaults to :func:`mask_colors` ``(N)``.
        contours: also draw each mask's outline (outer border and holes) opaquely.
        points: ``(K, 2)`` prompt points, x then y, in image pixels.
        point_labels: ``(K,)`` 1 = foreground (green dot), 0 = background (red dot);
            all foreground when omitted. Dots have a white ring.
        boxes: ``(B, 4)`` or ``(4,)`` XYXY boxes drawn as green rectangles.

    Line widths and dot sizes grow with the image (about 1/300 and 1/100 of the
    shorter side).
    """
    check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise SeganyError(f"alpha must be between 0 and 1, got {alpha}")
    stack = _as_mask_stack(masks, image.shape[:2])
    palette = _colour_rows(colors, len(stack))
    canvas = image.astype(np.float32)
    for mask, colour in zip(stack, palette, strict=False):
        canvas[mask] = (1.0 - alpha) * canvas[mask] + alpha * colour.astype(np.float32)
    canvas = np.ascontiguousarray(np.rint(canvas).astype(np.uint8))
    if contours:
        for mask, colour in zip(stack, palette, strict=False):
            _draw_contour(canvas, mask, _rgb(colour))
    if boxes is not None:
        _draw_boxes(canvas, boxes)
    if points is not None:
        _draw_points(canvas, *_check_points(points, point_labels))
    return canvas
