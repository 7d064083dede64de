"""Tests for segany.images and segany.atomic: real files written with Pillow/tifffile."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from segany.atomic import (
    atomic_path,
    atomic_paths,
    check_writable,
    write_bytes_atomic,
    write_text_atomic,
)
from segany.errors import SeganyError
from segany.images import (
    ImageTooLarge,
    mask_colors,
    open_image,
    overlay_masks,
    read_image,
    write_image,
    write_mask_png,
)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth(height: int, width: int) -> np.ndarray:
    """A gradient that survives JPEG compression with small errors."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], -1).astype(
        np.uint8
    )


# --------------------------------------------------------------------------- 8-bit formats


@pytest.mark.parametrize(
    ("suffix", "options"),
    [(".png", {}), (".bmp", {}), (".tif", {}), (".webp", {"lossless": True})],
)
def test_lossless_formats_round_trip_exactly(tmp_path: Path, suffix: str, options: dict) -> None:
    rgb = noise(17, 23)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(rgb).save(path, **options)
    out = read_image(path)
    assert out.dtype == np.uint8
    assert out.shape == (17, 23, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_reads_close_to_source(tmp_path: Path) -> None:
    rgb = smooth(32, 48)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    out = read_image(path)
    assert out.shape == (32, 48, 3)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 4


def test_grayscale_is_copied_to_three_channels(tmp_path: Path) -> None:
    gray = noise(9, 11)[..., 0]
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    out = read_image(path)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_one_bit_image_becomes_black_and_white(tmp_path: Path) -> None:
    bits = np.array([[True, False, True], [False, False, True]])
    path = tmp_path / "bits.png"
    Image.fromarray(bits).convert("1").save(path)
    out = read_image(path)
    np.testing.assert_array_equal(out, np.where(bits, 255, 0)[..., None].repeat(3, 2))


def test_palette_image_without_transparency(tmp_path: Path) -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([10, 20, 30, 200, 150, 100] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    palette_image.save(path)
    np.testing.assert_array_equal(read_image(path), [[[10, 20, 30], [200, 150, 100]]])


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    out = read_image(path)
    assert out.shape == (6, 8, 3)
    assert out[..., 0].min() > 230 and out[..., 1:].max() < 25


def test_multi_page_tiff_reads_first_page(tmp_path: Path) -> None:
    first, second = noise(6, 7, seed=1), noise(6, 7, seed=2)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(first, photometric="rgb")
        writer.write(second, photometric="rgb")
    np.testing.assert_array_equal(read_image(path), first)


# --------------------------------------------------------------------------- more than 8 bits

# lo = 1000, hi = 51000, so v -> (v - 1000) * 255 / 50000: every value lands on an integer.
RGB16 = np.array(
    [
        [[1000, 11000, 21000], [31000, 41000, 51000]],
        [[51000, 1000, 31000], [11000, 11000, 11000]],
    ],
    dtype=np.uint16,
)
RGB16_EXPECTED = np.array(
    [
        [[0, 51, 102], [153, 204, 255]],
        [[255, 0, 153], [51, 51, 51]],
    ],
    dtype=np.uint8,
)


def test_16bit_grayscale_png_is_rescaled_from_min_max(tmp_path: Path) -> None:
    # 1000 -> 0, 1500 -> 63.75 -> 64, 3000 -> 255, 2600 -> 204
    values = np.array([[1000, 1500], [3000, 2600]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored with 16 bits
    out = read_image(path)
    expected = np.array([[0, 64], [255, 204]], dtype=np.uint8)
    np.testing.assert_array_equal(out, expected[..., None].repeat(3, 2))


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_16bit_rgb_tiff_is_rescaled_over_all_channels(tmp_path: Path, planar: str) -> None:
    data = RGB16 if planar == "contig" else np.moveaxis(RGB16, 2, 0).copy()
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, data, photometric="rgb", planarconfig=planar)
    np.testing.assert_array_equal(read_image(path), RGB16_EXPECTED)


def test_float_rgb_tiff_is_rescaled(tmp_path: Path) -> None:
    path = tmp_path / "rgbf.tif"
    tifffile.imwrite(path, RGB16.astype(np.float32) / 7.0, photometric="rgb")
    np.testing.assert_array_equal(read_image(path), RGB16_EXPECTED)


def test_float_grayscale_tiff_with_nan(tmp_path: Path) -> None:
    # finite range 0..1: 0.2 -> 51, NaN -> 0
    values = np.array([[0.0, 0.2], [1.0, np.nan]], dtype=np.float32)
    path = tmp_path / "grayf.tif"
    tifffile.imwrite(path, values)
    expected = np.array([[0, 51], [255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(read_image(path), expected[..., None].repeat(3, 2))


def test_32bit_integer_grayscale_is_rescaled(tmp_path: Path) -> None:
    values = np.array([[-100000, 0], [100000, 300000]], dtype=np.int32)
    path = tmp_path / "gray32.tif"
    tifffile.imwrite(path, values)
    # range 400000: 0 -> 100000 * 255 / 400000 = 63.75 -> 64; 100000 -> 127.5 -> 128 (even)
    expected = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(read_image(path), expected[..., None].repeat(3, 2))


def test_constant_16bit_image_becomes_zeros(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((4, 5), 4321, np.uint16)).save(path)
    out = read_image(path)
    assert out.shape == (4, 5, 3)
    assert not out.any()


def test_16bit_rgba_tiff_alpha_is_composited_after_rescale(tmp_path: Path) -> None:
    alpha = np.array([[65535, 0], [65535, 65535]], dtype=np.uint16)
    path = tmp_path / "rgba16.tif"
    tifffile.imwrite(
        path, np.dstack([RGB16, alpha]), photometric="rgb", extrasamples=["unassalpha"]
    )
    expected = RGB16_EXPECTED.copy()
    expected[0, 1] = 255  # fully transparent pixel shows the white background
    np.testing.assert_array_equal(read_image(path), expected)


# --------------------------------------------------------------------------- transparency


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.array(
        [[[200, 100, 0, 128], [200, 100, 0, 0]], [[200, 100, 0, 255], [200, 1, 255, 200]]],
        dtype=np.uint8,
    )
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    # c * a/255 + 255 * (1 - a/255), rounded: 200*128/255 + 127 = 227.39 -> 227,
    # 200*200/255 + 55 = 211.86 -> 212, 1*200/255 + 55 = 55.78 -> 56
    expected = np.array(
        [[[227, 177, 127], [255, 255, 255]], [[200, 100, 0], [212, 56, 255]]], dtype=np.uint8
    )
    np.testing.assert_array_equal(read_image(path), expected)


def test_gray_alpha_is_composited_over_white(tmp_path: Path) -> None:
    la = np.array([[[100, 51], [0, 255]]], dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    # 100 * 0.2 + 255 * 0.8 = 224
    expected = np.array([[224, 0]], dtype=np.uint8)[..., None].repeat(3, 2)
    np.testing.assert_array_equal(read_image(path), expected)


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([10, 20, 30, 200, 150, 100] + [0] * 762)
    palette_image.putpixel((1, 0), 1)
    path = tmp_path / "palette_t.png"
    palette_image.save(path, transparency=0)
    np.testing.assert_array_equal(read_image(path), [[[255, 255, 255], [200, 150, 100]]])


# --------------------------------------------------------------------------- orientation


def marked(height: int, width: int) -> np.ndarray:
    """Blue image with a red 3x3 marker in the stored top-left corner."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 2] = 255
    rgb[:3, :3] = (255, 0, 0)
    return rgb


def save_with_orientation(path: Path, rgb: np.ndarray, orientation: int, **options) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, exif=exif, **options)


def test_exif_orientation_6_png_is_rotated_clockwise(tmp_path: Path) -> None:
    path = tmp_path / "rotated.png"
    save_with_orientation(path, marked(20, 30), 6)
    out = read_image(path)
    # stored 30 wide x 20 high, displayed turned 90 degrees clockwise: 20 wide x 30 high,
    # the stored top-left corner now at the top right
    assert out.shape == (30, 20, 3)
    np.testing.assert_array_equal(out[:3, -3:], np.full((3, 3, 3), (255, 0, 0)))
    np.testing.assert_array_equal(out[-1, 0], (0, 0, 255))
    np.testing.assert_array_equal(out[:3, :3], np.full((3, 3, 3), (0, 0, 255)))


def test_exif_orientation_6_jpeg(tmp_path: Path) -> None:
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:16, :16] = 255  # white block in the stored top-left
    path = tmp_path / "rotated.jpg"
    save_with_orientation(path, rgb, 6, quality=95)
    out = read_image(path)
    assert out.shape == (48, 32, 3)
    assert out[2:14, -14:-2].min() > 200  # now top right
    assert out[2:14, 2:14].max() < 50


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tifffile_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    """16-bit RGB TIFFs go through tifffile; their orientation tag must act like EXIF's."""
    rgb = noise(5, 7, seed=orientation)
    rgb[0, 0], rgb[1, 1] = 0, 255  # min and max present, so rescaling v*257 gives v back
    png = tmp_path / "reference.png"
    save_with_orientation(png, rgb, orientation)
    tif = tmp_path / "oriented.tif"
    tifffile.imwrite(
        tif,
        rgb.astype(np.uint16) * 257,
        photometric="rgb",
        extratags=[(274, "H", 1, orientation, True)],
    )
    np.testing.assert_array_equal(read_image(tif), read_image(png))


# --------------------------------------------------------------------------- bad input


def assert_one_line_error(path: Path, *fragments: str) -> None:
    with pytest.raises(SeganyError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(tmp_path / "nope.png", "image not found")


def test_directory(tmp_path: Path) -> None:
    assert_one_line_error(tmp_path, "directory")


def test_corrupt_png(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert_one_line_error(path, "cannot read image", "supported: JPEG, PNG, TIFF, WebP, BMP")


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray(noise(64, 64)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:400])
    assert_one_line_error(path, "cannot read image")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert_one_line_error(path, "cannot read image", "supported:")


def test_zero_size_tiff(tmp_path: Path) -> None:
    path = tmp_path / "empty.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns that the file is non-conformant
        tifffile.imwrite(path, np.zeros((0, 0), np.uint8))
    assert_one_line_error(path, "empty")


# --------------------------------------------------------------------------- writing


def test_write_mask_png_round_trip(tmp_path: Path) -> None:
    mask = np.random.default_rng(3).random((13, 21)) > 0.5
    path = write_mask_png(tmp_path / "sub" / "mask.png", mask)
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.mode == "L"
        pixels = np.asarray(saved)
    assert set(np.unique(pixels)) <= {0, 255}
    np.testing.assert_array_equal(pixels == 255, mask)
    assert sorted(p.name for p in path.parent.iterdir()) == ["mask.png"]


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), (1, 2, 3, 4)])
def test_write_mask_png_rejects_non_2d(tmp_path: Path, shape: tuple[int, ...]) -> None:
    with pytest.raises(SeganyError, match="2-D"):
        write_mask_png(tmp_path / "mask.png", np.zeros(shape, bool))
    assert not (tmp_path / "mask.png").exists()


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tiff", ".TIF"])
def test_write_image_lossless_round_trip(tmp_path: Path, suffix: str) -> None:
    rgb = noise(11, 9)
    path = write_image(tmp_path / f"out{suffix}", rgb)
    with Image.open(path) as saved:
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), rgb)


@pytest.mark.parametrize(("suffix", "pil_format"), [(".jpg", "JPEG"), (".webp", "WEBP")])
def test_write_image_lossy_picks_format_by_suffix(
    tmp_path: Path, suffix: str, pil_format: str
) -> None:
    rgb = smooth(24, 40)
    path = write_image(tmp_path / f"out{suffix}", rgb)
    with Image.open(path) as saved:
        assert saved.format == pil_format
        assert np.abs(np.asarray(saved.convert("RGB")).astype(int) - rgb).mean() < 4


def test_write_image_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(SeganyError, match=r"unknown file type '\.xyz'"):
        write_image(tmp_path / "out.xyz", noise(4, 4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3))]
)
def test_write_image_rejects_bad_arrays(tmp_path: Path, bad: np.ndarray) -> None:
    with pytest.raises(SeganyError):
        write_image(tmp_path / "out.png", bad)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomic


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "result.png"
    with atomic_path(target) as temp:
        assert temp.parent == target.parent
        assert temp.name.startswith(".")
        assert temp.suffix == ".png"
        assert not target.exists()
        Image.fromarray(noise(3, 3)).save(temp)  # Pillow picks PNG from the suffix
    assert Image.open(target).format == "PNG"
    assert [p.name for p in target.parent.iterdir()] == ["result.png"]


def test_atomic_path_cleans_up_when_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as temp:
        temp.write_text("half written")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_old_file_when_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as temp:
        temp.write_text("new but incomplete")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_atomic_path_writer_that_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "x.bin"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_write_text_and_bytes_atomic(tmp_path: Path) -> None:
    text_path = write_text_atomic(tmp_path / "a" / "note.json", '{"é": 1}')
    assert text_path.read_text(encoding="utf-8") == '{"é": 1}'
    bytes_path = write_bytes_atomic(tmp_path / "note.json", b"\x00\x01")
    assert bytes_path.read_bytes() == b"\x00\x01"
    write_bytes_atomic(bytes_path, b"replaced")
    assert bytes_path.read_bytes() == b"replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "note.json"]


# --------------------------------------------------------------------------- colours


def test_mask_colors_are_distinct_saturated_and_deterministic() -> None:
    colours = mask_colors(24)
    assert colours.shape == (24, 3)
    assert colours.dtype == np.uint8
    np.testing.assert_array_equal(colours, mask_colors(24))
    np.testing.assert_array_equal(colours[:5], mask_colors(5))
    spread = colours.max(axis=1).astype(int) - colours.min(axis=1)
    assert spread.min() > 100  # well saturated: never grey
    distances = np.linalg.norm(colours[:, None].astype(float) - colours[None], axis=2)
    first8 = distances[:8, :8][~np.eye(8, dtype=bool)]
    assert first8.min() > 60
    assert len({tuple(c) for c in colours}) == 24
    assert not np.array_equal(mask_colors(6, seed=1), mask_colors(6, seed=0))
    assert mask_colors(0).shape == (0, 3)


def test_mask_colors_rejects_negative() -> None:
    with pytest.raises(SeganyError):
        mask_colors(-1)


# --------------------------------------------------------------------------- overlay


def square_mask(size: tuple[int, int], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_overlay_tints_only_masked_pixels() -> None:
    image = np.full((40, 50, 3), 100, np.uint8)
    mask = square_mask((40, 50), 10, 5, 30, 25)
    before = image.copy()
    out = overlay_masks(image, [mask], alpha=0.25, colors=[(255, 0, 0)], contours=False)
    np.testing.assert_array_equal(image, before)
    # 0.75 * 100 + 0.25 * 255 = 138.75 -> 139; 0.75 * 100 + 0 = 75
    np.testing.assert_array_equal(out[mask], np.tile([139, 75, 75], (mask.sum(), 1)))
    np.testing.assert_array_equal(out[~mask], image[~mask])


def test_overlay_later_masks_are_on_top_and_stack_accepted() -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    masks = np.stack([square_mask((10, 10), 0, 0, 6, 6), square_mask((10, 10), 3, 3, 10, 10)])
    out = overlay_masks(image, masks, alpha=1.0, colors=[(255, 0, 0), (0, 0, 255)], contours=False)
    np.testing.assert_array_equal(out[1, 1], (255, 0, 0))
    np.testing.assert_array_equal(out[4, 4], (0, 0, 255))
    np.testing.assert_array_equal(out[0, 9], (0, 0, 0))


def test_overlay_contours_stay_near_the_mask_border() -> None:
    image = noise(300, 400)
    mask = square_mask((300, 400), 100, 80, 250, 200)
    before = image.copy()
    out = overlay_masks(image, mask, alpha=0.5, contours=True)
    np.testing.assert_array_equal(image, before)
    changed = np.any(out != image, axis=2)
    width = 1  # 300 / 300
    near = square_mask((300, 400), 100 - width, 80 - width, 250 + width, 200 + width)
    assert not changed[~near].any()
    # the border row of the mask has the opaque contour colour
    colour = mask_colors(1)[0]
    np.testing.assert_array_equal(out[80, 150], colour)
    np.testing.assert_array_equal(out[140, 100], colour)


def test_overlay_draws_points_and_boxes() -> None:
    image = np.full((200, 300, 3), 50, np.uint8)
    points = np.array([[60.0, 40.0], [240.0, 150.0]])
    out = overlay_masks(image, [], points=points, point_labels=[1, 0], boxes=[[20, 100, 120, 180]])
    np.testing.assert_array_equal(out[40, 60], (0, 200, 0))  # foreground: green
    np.testing.assert_array_equal(out[150, 240], (220, 0, 0))  # background: red
    radius = 3  # max(3, 200 / 100)
    ring_pixel = out[40, 60 + radius + 1]
    assert ring_pixel.min() > 150  # white ring around the dot
    np.testing.assert_array_equal(out[100, 70], (0, 255, 0))  # box top edge
    np.testing.assert_array_equal(out[140, 120], (0, 255, 0))  # box right edge
    np.testing.assert_array_equal(out[140, 70], (50, 50, 50))  # inside the box: untouched
    np.testing.assert_array_equal(out[5, 5], (50, 50, 50))


def test_overlay_points_default_to_foreground() -> None:
    out = overlay_masks(np.zeros((50, 50, 3), np.uint8), [], points=[[25, 25]])
    np.testing.assert_array_equal(out[25, 25], (0, 200, 0))


def test_overlay_rejects_mask_of_wrong_size() -> None:
    with pytest.raises(SeganyError, match="mask 0 is 9x10 pixels but the image is 10x10"):
        overlay_masks(np.zeros((10, 10, 3), np.uint8), [np.zeros((10, 9), bool)])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": 1.5},
        {"colors": [(1, 2, 3)], "masks": [np.ones((10, 10), bool)] * 2},
        {"points": [[1, 2, 3]]},
        {"points": [[1, 2]], "point_labels": [1, 0]},
        {"points": [[1, 2]], "point_labels": [2]},
        {"boxes": [[1, 2, 3]]},
    ],
)
def test_overlay_rejects_bad_arguments(kwargs: dict) -> None:
    masks = kwargs.pop("masks", [])
    with pytest.raises(SeganyError):
        overlay_masks(np.zeros((10, 10, 3), np.uint8), masks, **kwargs)


def test_overlay_rejects_non_rgb_image() -> None:
    with pytest.raises(SeganyError, match="HxWx3"):
        overlay_masks(np.zeros((10, 10), np.uint8), [])


def test_atomic_paths_write_all_or_nothing(tmp_path: Path) -> None:
    """Outputs that belong together: a writer failing on the second leaves neither."""
    first, second = tmp_path / "out" / "mask.png", tmp_path / "other" / "overlay.png"
    first.parent.mkdir()
    first.write_text("old mask")
    with pytest.raises(OSError, match="disk full"), atomic_paths([first, second]) as temps:
        temps[0].write_text("new mask")
        raise OSError("disk full")
    assert first.read_text() == "old mask" and not second.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["mask.png"]
    with atomic_paths([first, second]) as temps:
        for temp, text in zip(temps, ["new mask", "overlay"], strict=True):
            temp.write_text(text)
    assert (first.read_text(), second.read_text()) == ("new mask", "overlay")


def test_atomic_paths_refuses_the_same_output_twice(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="twice"), atomic_paths([tmp_path / "a", tmp_path / "a"]):
        pass


def test_check_writable(tmp_path: Path, unwritable_dir: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    # Missing folders are fine (and not created by the check); nothing is left behind.
    assert check_writable(tmp_path / "new" / "deeper" / "m.png", "-o") == (
        tmp_path / "new" / "deeper" / "m.png"
    )
    assert check_writable(tmp_path / "new" / "folder", "-o", folder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    cases = [
        (tmp_path / "file.txt" / "m.png", {}, "is a file, not a folder"),
        (tmp_path / "file.txt", {"folder": True}, "it is a file; give a folder"),
        (tmp_path, {}, "it is a folder; give a file name"),
        (unwritable_dir / "m.png", {}, "cannot create a file in folder"),
        (unwritable_dir / "sub" / "folder", {"folder": True}, "cannot create a file in folder"),
        (tmp_path / ("x" * 250 + ".png"), {}, "File name too long"),
    ]
    for path, options, message in cases:
        with pytest.raises(SeganyError, match=message) as error:
            check_writable(path, "--overlay", **options)
        assert str(error.value).startswith("cannot write --overlay ")
        assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- pixel limit


def write_tiled_tiff(path: Path, height: int, width: int, samples: int = 1) -> Path:
    """A zlib-compressed, tiled 16-bit TIFF of zeros, written tile by tile (no big array)."""
    tile_shape = (256, 256, samples) if samples > 1 else (256, 256)
    tile = np.zeros(tile_shape, np.uint16)
    count = -(-height // 256) * -(-width // 256)
    shape = (height, width, samples) if samples > 1 else (height, width)
    tifffile.imwrite(
        path, (tile for _ in range(count)), shape=shape, dtype="uint16", tile=(256, 256),
        compression="zlib", photometric="rgb" if samples == 3 else "minisblack",
    )  # fmt: skip
    return path


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding pixels (Pillow or tifffile) fails the test: the limit must come first."""
    from PIL import ImageFile

    def decoded(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", decoded)


def test_tiff_pixel_bomb_refused_before_decoding(tmp_path: Path, no_decoding: None) -> None:
    """Issue 20's bomb: 12000 x 12000 16-bit pixels in a TIFF of well under 1 MB."""
    bomb = write_tiled_tiff(tmp_path / "bomb.tif", 12000, 12000)
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ImageTooLarge) as error:
        read_image(bomb)
    message = str(error.value)
    assert "12000x12000 = 144,000,000 pixels, over the limit of 100,000,000" in message
    assert "SEGANY_MAX_IMAGE_PIXELS=144000000" in message


def test_tifffile_reader_checks_the_limit_too(
    tmp_path: Path, no_decoding: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16-bit RGB goes to tifffile, not Pillow; its header is checked the same way."""
    monkeypatch.setenv("SEGANY_MAX_IMAGE_PIXELS", "1000000")
    path = write_tiled_tiff(tmp_path / "rgb16.tif", 1200, 1000, samples=3)
    with pytest.raises(ImageTooLarge, match="1000x1200 = 1,200,000 pixels"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".webp", ".tif", ".tiff16"])
def test_pixel_limit_applies_to_every_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    path = tmp_path / f"image{suffix.replace('16', '')}"
    if suffix == ".tiff16":
        tifffile.imwrite(path, np.zeros((30, 40, 3), np.uint16))
    else:
        Image.fromarray(noise(30, 40)).save(path)
    monkeypatch.setenv("SEGANY_MAX_IMAGE_PIXELS", "1199")
    with pytest.raises(ImageTooLarge, match="40x30 = 1,200 pixels, over the limit of 1,199"):
        read_image(path)
    monkeypatch.setenv("SEGANY_MAX_IMAGE_PIXELS", "1200")
    assert read_image(path).shape == (30, 40, 3)


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5e8"])
def test_bad_pixel_limit_setting_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(noise(3, 3)).save(path)
    monkeypatch.setenv("SEGANY_MAX_IMAGE_PIXELS", value)
    with pytest.raises(SeganyError, match="SEGANY_MAX_IMAGE_PIXELS must be a whole number"):
        read_image(path)


def _png_header(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG of that size whose pixel data is missing: a header to open, never
    to decode."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def test_pixel_limit_can_be_raised_beyond_pillows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 megapixels: refused by default (Pillow alone would refuse it too); with the
    limit raised, Pillow opens the header as well."""
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(20000, 10000))
    with pytest.raises(ImageTooLarge, match="200,000,000 pixels, over the limit of 100,000,000"):
        open_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    monkeypatch.setenv("SEGANY_MAX_IMAGE_PIXELS", "250000000")
    with open_image(path) as opened:
        assert opened.size == (20000, 10000)


def test_pixel_limit_message_has_no_pillow_warning(tmp_path: Path) -> None:
    """Over the limit there is one error, not Pillow's decompression-bomb warning too."""
    path = tmp_path / "big.png"
    path.write_bytes(_png_header(12000, 12000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLarge, match="12000x12000"):
            read_image(path)
