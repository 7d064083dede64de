"""Property-based fuzzing (Hypothesis) of what segany reads from users: the command line's
arguments, the training config, image files and the four annotation formats.

The contract everywhere: a clean :class:`SeganyError` (on the command line: exit 2 and one
line on stderr) or a valid result; never another exception, a traceback, or a half-written
output. Commands run in-process with every step that would do real work (loading a model,
training, downloading, Ray) replaced by a stub that raises :class:`ReachedWork`, so an
argument list either fails validation cleanly or gets as far as that stub.

Bounded to about half a minute in all (``max_examples`` below, scaled by
``$SEGANY_FUZZ_SCALE``); every run draws new cases, and a failure prints the smallest
example that reproduces it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

import segany.commands.common
import segany.commands.engine
import segany.commands.export
import segany.commands.train
import segany.loading
import segany.weights
from segany.cli import build_parser, main
from segany.data import DataWarning, load_dataset
from segany.data.base import read_mask_png
from segany.errors import SeganyError
from segany.images import read_image
from segany.train.config import TrainConfig, load_config, parse_config

FUZZ = settings(
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def examples(count: int) -> settings:
    """The suite's settings with ``count`` examples (sized so the file takes ~30 s on two
    cores); ``SEGANY_FUZZ_SCALE=10`` runs ten times as many, for a longer search."""
    return settings(FUZZ, max_examples=count * int(os.environ.get("SEGANY_FUZZ_SCALE", "1")))


class ReachedWork(Exception):
    """Raised by the stubs: the arguments passed every check before the real work."""


def _reached(*args: Any, **kwargs: Any) -> Any:
    raise ReachedWork


# -------------------------------------------------------------------------------------
# Files the fuzzed inputs point at
# -------------------------------------------------------------------------------------

IMAGE_SIZE = (30, 40)  # (H, W)


def _png_bytes(shape: tuple[int, ...], dtype: type = np.uint8, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape).astype(dtype)).save(buffer, format="PNG")
    return buffer.getvalue()


def _seed_images() -> dict[str, bytes]:
    """Small valid files of each reader path: Pillow's formats and tifffile's TIFFs."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8)
    seeds = {".png": _png_bytes((*IMAGE_SIZE, 3))}
    for suffix, kind in ((".jpg", "JPEG"), (".bmp", "BMP"), (".webp", "WEBP")):
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format=kind)
        seeds[suffix] = buffer.getvalue()
    for name, data, options in (
        (".tif", rgb, {}),  # 8-bit RGB: Pillow
        (".tiff", (rgb.astype(np.uint16) * 257), {"compression": "zlib"}),  # 16-bit: tifffile
        (".16.tif", rgb[..., 0].astype(np.uint16), {"tile": (16, 16)}),  # tiled 16-bit gray
    ):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, data, **options)
        seeds[name] = buffer.getvalue()
    return seeds


SEEDS = _seed_images()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, unwritable_dir: Path) -> dict[str, str]:
    """Paths the command lines are built from (``{OUT}`` is a fresh folder per example)."""
    root = tmp_path_factory.mktemp("fuzz-files")
    image_dir = root / "photos"
    image_dir.mkdir()
    (image_dir / "a.png").write_bytes(SEEDS[".png"])
    (image_dir / "b.jpg").write_bytes(SEEDS[".jpg"])
    (root / "notes.txt").write_text("not an image\n")
    (root / "broken.png").write_bytes(SEEDS[".png"][:60])
    coco = root / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "images" / "a.png").write_bytes(SEEDS[".png"])
    polygon = [[2, 2, 30, 2, 30, 20, 2, 20]]
    (coco / "annotations.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": 30, "width": 40}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 1, "segmentation": polygon}
                ],
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    config = root / "train.yaml"
    config.write_text(
        yaml.safe_dump({"data": {"train": [{"synthetic": "shapes", "images": 4}]}, "output": "run"})
    )
    (root / "weights.pth").write_bytes(b"\0" * 64)
    with socket.socket() as probe:  # a port that is free now
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    return {
        "IMG": str(image_dir / "a.png"),
        "DIR": str(image_dir),
        "TEXT": str(root / "notes.txt"),
        "BROKEN": str(root / "broken.png"),
        "MISSING": str(root / "missing.png"),
        "COCO": str(coco / "annotations.json"),
        "COCODIR": str(coco),
        "CONFIG": str(config),
        "CKPT": str(root / "weights.pth"),
        "UNDERFILE": str(root / "notes.txt" / "out.png"),
        "UNWRITABLE": str(unwritable_dir / "out.png"),
        "PORT": str(free_port),
    }


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every step that would do real work raises ReachedWork; returns a scratch folder."""
    monkeypatch.setattr(segany.commands.common, "load_model", _reached)
    monkeypatch.setattr(segany.commands.export, "load_model", _reached)
    monkeypatch.setattr(segany.loading, "load_model_and_config", _reached)
    monkeypatch.setattr(segany.commands.train, "train", _reached)
    for name in ("run_auto", "propose", "retrain"):
        monkeypatch.setattr(segany.commands.engine, name, _reached)
    monkeypatch.setattr(segany.commands.engine, "resolve_ray", lambda settings: None)
    monkeypatch.setattr(segany.weights, "_request", _reached)
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SEGANY_MAX_IMAGE_PIXELS", raising=False)
    monkeypatch.delenv("SEGANY_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # serve's default project folder is ./.segany
    return tmp_path


# -------------------------------------------------------------------------------------
# The command line
# -------------------------------------------------------------------------------------

# Valid command lines to start from; the fuzzer replaces, inserts and deletes tokens
# after the command words (placeholders are filled from the `files` fixture).
TEMPLATES: dict[str, list[list[str]]] = {
    "segment": [
        ["segment", "{IMG}", "--point", "10,10", "-o", "{OUT}/m.png"],
        [
            "segment",
            "{IMG}",
            "--box",
            "2,2,30,20",
            "--multimask",
            "-o",
            "{OUT}/m.png",
            "--overlay",
            "{OUT}/o.png",
            "--device",
            "cpu",
        ],
    ],
    "everything": [
        ["everything", "{DIR}", "-o", "{OUT}/e", "--points-per-side", "4"],
        ["everything", "{IMG}", "-o", "{OUT}/e", "--format", "png", "--overlay"],
    ],
    "engine": [
        ["engine", "auto", "{DIR}", "-o", "{OUT}/a", "--in-process"],
        ["engine", "propose", "{COCO}", "-o", "{OUT}/p.json"],
        ["engine", "retrain", "{COCO}", "-o", "{OUT}/r", "--steps", "1"],
    ],
    "export": [["export", "-o", "{OUT}/x"]],
    "weights": [
        ["weights", "list"],
        ["weights", "path", "sam_vit_b"],
        ["weights", "download", "mobile_sam", "--quiet"],
        ["weights", "convert", "{CKPT}", "-o", "{OUT}/w.safetensors"],
    ],
    "eval": [["eval", "--data", "{COCODIR}", "--limit", "1", "--plot", "{OUT}/p.png"]],
    "train": [["train", "{CONFIG}"]],
    "serve": [["serve", "{DIR}", "--port", "{PORT}", "--project", "{OUT}/proj"]],
}

# How many leading tokens name the (sub)command and are never mutated.
PREFIX = {"engine": 2, "weights": 2}

PLACES = ["{IMG}", "{DIR}", "{TEXT}", "{BROKEN}", "{MISSING}", "{COCO}", "{COCODIR}",
          "{CONFIG}", "{CKPT}", "{UNDERFILE}", "{UNWRITABLE}", "{OUT}/m.png", "{OUT}/m.jpg",
          "{OUT}/sub/dir/m.png", "{OUT}/x.json", "{OUT}/w.safetensors", "{OUT}", "{OUT}/d",
          "{UNDERFILE}/deeper", "{PORT}"]  # fmt: skip
WORDS = ["cpu", "cuda", "auto", "fp32", "bf16", "fp16", "vit_t", "vit_b", "default", "sa1b",
         "coco", "png", "masks", "yolo", "clicks", "box", "point", "val", "all", "train",
         "grabcut", "mobile_sam", "sam_vit_h", "sam_vit_q", "127.0.0.1", "0.0.0.0", "::1",
         "[::1]", "localhost", "no-such-host.invalid", "256.1.1.1", "-", "--"]  # fmt: skip
NUMBERS = st.one_of(
    st.integers(-3, 70000).map(str),
    st.sampled_from(["0", "1", "-1", "nan", "inf", "-inf", "1e9", "1e400", "0.5", "3.0"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
COORDS = st.lists(NUMBERS, min_size=1, max_size=5).map(",".join)
# Real command lines cannot hold NUL (C strings) and decode to text without surrogates.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)
VALUES = st.one_of(st.sampled_from(PLACES), st.sampled_from(WORDS), NUMBERS, COORDS, TEXT)


def _options(command: list[str]) -> dict[str, bool]:
    """The options of the (sub)command ``command`` names, read from the parser: option
    string -> whether it takes a value (help and version left out: they only print)."""
    parser = build_parser()
    for word in command:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[word]
    return {
        option: action.nargs != 0
        for action in parser._actions
        for option in action.option_strings
        if option not in ("-h", "--help", "--version")
    }


# Mostly changes that keep the line's shape (new values, more options), so that cases get
# past argparse to segany's own checks; sometimes tokens are dropped or stray ones added.
MUTATIONS = ["value"] * 5 + ["option"] * 4 + ["delete", "insert"]


@st.composite
def command_lines(draw: st.DrawFn, name: str) -> list[str]:
    argv = list(draw(st.sampled_from(TEMPLATES[name])))
    keep = PREFIX.get(name, 1)
    options = _options(argv[:keep])
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(MUTATIONS))
        values = [i for i in range(keep, len(argv)) if not argv[i].startswith("-")]
        if action == "value" and values:
            argv[draw(st.sampled_from(values))] = draw(VALUES)
        elif action == "delete" and len(argv) > keep:
            del argv[draw(st.integers(keep, len(argv) - 1))]
        elif action == "insert":
            argv.insert(draw(st.integers(keep, len(argv))), draw(VALUES))
        elif options:
            option = draw(st.sampled_from(sorted(options)))
            argv += [option, draw(VALUES)] if options[option] else [option]
    return argv


def _fill(argv: list[str], files: dict[str, str], out: Path) -> list[str]:
    values = {**files, "OUT": str(out)}
    return [re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], token) for token in argv]


def run_cli(argv: list[str]) -> tuple[str, int | str | None, str]:
    """(how it ended, exit code, stderr): 'returned', 'argparse' (SystemExit) or 'work'."""
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code: int | str | None = main(argv)
            ending = "returned"
        except SystemExit as stop:
            code, ending = stop.code, "argparse"
        except ReachedWork:
            code, ending = None, "work"
    return ending, code, err.getvalue()


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()] if folder.exists() else []


def check_cli_contract(argv: list[str], out: Path) -> None:
    ending, code, stderr = run_cli(argv)
    # Lines as a terminal shows them; argparse quotes arguments as they are (\r and all).
    lines = [line for line in stderr.split("\n") if line.strip()]
    assert "Traceback" not in stderr, (argv, stderr)
    if ending == "argparse":  # usage, then one "segany ...: error: ..." line
        assert code in (0, 2), (argv, code)
        if code == 2:
            assert re.match(r"segany( [\w-]+)*: error: ", lines[-1]), (argv, stderr)
    elif ending == "returned":
        assert code in (0, 1, 2), (argv, code)
        assert all(line.startswith("segany") for line in lines), (argv, stderr)
        if code == 2:
            errors = [line for line in lines if ": error: " in line]
            assert errors == [lines[-1]], (argv, stderr)
    # Never a temporary or probe file left behind, and nothing written before the work.
    leftovers = [p for p in _files_under(out) if p.name.startswith(".")]
    assert not leftovers, (argv, leftovers)
    if ending == "work" or code == 2:
        assert not _files_under(out), (argv, _files_under(out))


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_fuzz_command_line(name: str, files: dict[str, str], stubbed: Path) -> None:
    """Random argument lists for each subcommand: exit 0/1/2 with one clean line, or the
    stubbed work; never a traceback or a partial output."""

    @examples(50)
    @given(argv=command_lines(name))
    def fuzz(argv: list[str]) -> None:
        out = Path(tempfile.mkdtemp(dir=stubbed))
        try:
            check_cli_contract(_fill(argv, files, out), out)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    fuzz()


# -------------------------------------------------------------------------------------
# The training config
# -------------------------------------------------------------------------------------

KEYS = ["model", "data", "optim", "output", "train", "val", "augment", "root", "split",
        "synthetic", "images", "steps", "lr", "name", "config", "checkpoint", "freeze",
        "scale_jitter", "betas", "precision", "batch_images", "log_every", "format",
        "encoder_init", "weight", "masks_per_image", "device", "unknown_key"]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["shapes", "imagenet", "vit_t", "partial", "bf16", "train", ".", "x/y"]),
    st.text(max_size=8),
)
YAMLISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.integers(0, 3)), inner, max_size=5),
    ),
    max_leaves=20,
)


@st.composite
def config_mappings(draw: st.DrawFn) -> Any:
    """Mostly well-formed configs with some values replaced by anything YAML holds."""
    source = {"synthetic": draw(st.one_of(st.just("shapes"), YAMLISH))}
    if draw(st.booleans()):
        source["images"] = draw(YAMLISH)
    config: dict[Any, Any] = {"data": {"train": [source]}, "output": "run"}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([None, "model", "data", "optim"]))
        target = config if section is None else config.setdefault(section, {})
        if not isinstance(target, dict):
            break
        target[draw(st.sampled_from(KEYS))] = draw(YAMLISH)
    return draw(YAMLISH) if draw(st.sampled_from(range(10))) == 9 else config


@examples(80)
@given(raw=config_mappings())
def test_fuzz_train_config(raw: Any) -> None:
    """Random YAML mappings through the config reader: a TrainConfig or a SeganyError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        try:
            config = load_config(path)
        except SeganyError as error:
            assert "\n" not in str(error)
        else:
            assert isinstance(config, TrainConfig)


@examples(30)
@given(data=st.one_of(st.binary(max_size=200), st.sampled_from(list(SEEDS.values()))))
def test_fuzz_train_config_bytes(data: bytes) -> None:
    """Any file as a config (binary, an image, UTF-16): a clean SeganyError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(data)
        with pytest.raises(SeganyError):
            load_config(path)


GOOD = {"data": {"train": [{"synthetic": "shapes"}]}, "output": "run"}


# Found by the fuzzer above: parse_config itself lets these through as TypeError,
# ValueError or OverflowError; load_config (what `segany train` calls) turns them into a
# one-line SeganyError. Strict: once parse_config names them itself, drop the mark.
@pytest.mark.parametrize(
    "raw",
    [
        {"data": 5, "output": "run"},
        {"data": "text", "output": "run"},
        {**GOOD, "optim": {"steps": float("nan")}},
        {**GOOD, "optim": {"steps": float("inf")}},
        {**GOOD, "output": 5},
        {**GOOD, "model": {"encoder_init": 5}},
        {"data": {"train": [{"root": 5}]}, "output": "run"},
        {**GOOD, "data": {**GOOD["data"], "augment": {"scale_jitter": [1, 2, 3]}}},
        {**GOOD, "data": {**GOOD["data"], "augment": {"scale_jitter": ["a", "b"]}}},
    ],
    ids=[
        "data-int",
        "data-text",
        "steps-nan",
        "steps-inf",
        "output-int",
        "encoder-init-int",
        "root-int",
        "jitter-3",
        "jitter-text",
    ],
)
def test_parse_config_names_wrong_types(raw: Any, tmp_path: Path) -> None:
    with pytest.raises(SeganyError):
        parse_config(raw, tmp_path)


# -------------------------------------------------------------------------------------
# Image readers
# -------------------------------------------------------------------------------------


@st.composite
def damaged_images(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, bytes): a valid seed truncated, with bytes overwritten (mostly in the
    header), spliced with random bytes, or random bytes altogether."""
    suffix = draw(st.sampled_from(list(SEEDS)))
    data = bytearray(SEEDS[suffix])
    how = draw(st.sampled_from(["truncate", "overwrite", "header", "splice", "random"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how in ("overwrite", "header"):
        end = min(len(data), 64) if how == "header" else len(data)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    else:
        data = bytearray(draw(st.binary(max_size=300)))
    return suffix, bytes(data)


@examples(200)
@given(case=damaged_images())
def test_fuzz_image_readers(case: tuple[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Damaged PNG/JPEG/BMP/WebP/TIFF files: an (H, W, 3) uint8 image or a SeganyError;
    a header claiming a huge size is refused (the limit is low here to keep it quick)."""
    monkeypatch.setenv("SEGANY_MAX_IMAGE_PIXELS", "250000")
    suffix, data = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"image{suffix}"
        path.write_bytes(data)
        try:
            image = read_image(path)
        except SeganyError as error:
            assert "\n" not in str(error)
        else:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert image.shape[0] * image.shape[1] <= 250000
        try:
            mask = read_mask_png(path, *IMAGE_SIZE)
        except ValueError:
            pass  # the mask reader's contract: ValueError naming the problem
        else:
            assert mask.dtype == bool and mask.shape == IMAGE_SIZE


# -------------------------------------------------------------------------------------
# Annotation loaders
# -------------------------------------------------------------------------------------

NUMBERS_JSON = st.one_of(
    st.integers(-50, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e9, -1e12, 1e18, 0.5]),
)
# Mostly polygons and RLEs of a usable shape with values anywhere, so that decoding is
# reached (pycocotools crashes on NaN, infinite or huge polygon coordinates, and writes past
# its buffer for RLE runs adding up to more than the image).
SHAPED_POLYGONS = st.lists(  # x, y pairs, at least three: what COCO allows
    st.lists(NUMBERS_JSON, min_size=6, max_size=10).map(lambda v: v[: len(v) // 2 * 2]),
    min_size=1,
    max_size=3,
)
POLYGONS = st.one_of(SHAPED_POLYGONS, st.lists(st.lists(NUMBERS_JSON, max_size=7), max_size=3))
# The compressed counts of a 30x50 mask: given as 30x40, its runs go past the image.
LONG_RUNS = mask_utils.encode(np.ones((30, 50), np.uint8, order="F"))["counts"].decode()
RLES = st.fixed_dictionaries(
    {
        "size": st.one_of(st.just([30, 40]), st.lists(st.integers(-2, 50), max_size=3)),
        "counts": st.one_of(
            st.text(st.characters(min_codepoint=40, max_codepoint=115), max_size=16),
            st.lists(st.integers(-20, 1300), max_size=8),
            st.just([600, 600]),  # the whole 30x40 image in two runs
            st.just([-5, 1205]),  # the right total, with a negative run
            st.just(LONG_RUNS),  # runs adding up to more than 30x40
        ),
    }
)
SEGMENTATIONS = st.one_of(SHAPED_POLYGONS, POLYGONS, RLES, YAMLISH)
FILE_NAMES = st.one_of(
    st.sampled_from(
        [
            "a.png",
            "../outside.png",
            "images/../a.png",
            "sub/../../outside.png",
            "",
            "missing.png",
            "x" * 300 + ".png",
            "{OUTSIDE}",
            "C:\\a.png",
        ]
    ),
    st.text(max_size=8),
)
ANNOTATIONS = st.one_of(
    st.fixed_dictionaries(
        {
            "id": st.integers(0, 5),
            "image_id": st.one_of(st.just(1), st.just(1), st.integers(0, 3), st.text(max_size=2)),
            "category_id": st.integers(0, 2),
            "segmentation": SEGMENTATIONS,
        },
        optional={"iscrowd": st.one_of(st.integers(0, 1), YAMLISH)},
    ),
    YAMLISH,
)
IMAGE_RECORDS = st.one_of(
    st.fixed_dictionaries(
        {"id": st.integers(0, 3), "file_name": FILE_NAMES},
        optional={"height": st.integers(-1, 50), "width": st.integers(-1, 50)},
    ),
    YAMLISH,
)


@st.composite
def coco_documents(draw: st.DrawFn) -> Any:
    """COCO documents around one good image record (id 1, a.png) that most annotations
    point at; now and then something that is not a COCO document at all."""
    images = [{"id": 1, "file_name": "a.png"}, *draw(st.lists(IMAGE_RECORDS, max_size=3))]
    annotations = draw(st.lists(ANNOTATIONS, max_size=5))
    document = {"images": images, "annotations": annotations, "categories": [{"id": 1}]}
    return draw(YAMLISH) if draw(st.sampled_from(range(10))) == 9 else document


def check_dataset(root: Path, format: str) -> None:
    """Load ``root``: SeganyError or a data set whose samples are valid (or None, reported),
    with only DataWarnings, and never an image from outside ``root``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = load_dataset(root, format=format)
        except SeganyError as error:
            dataset = None
            assert "\n" not in str(error)
        for index in range(len(dataset) if dataset is not None else 0):
            entry = dataset.entries[index]
            assert entry.path.resolve().is_relative_to(root.resolve()), entry.path
            sample = dataset.get(index)
            if sample is None:
                continue
            height, width = sample.image.shape[:2]
            assert sample.image.dtype == np.uint8 and sample.image.shape[2] == 3
            assert sample.masks.dtype == bool and sample.masks.shape[1:] == (height, width)
            assert len(sample.object_names) == len(sample.masks)
            assert sample.ignore is None or sample.ignore.shape == (height, width)
    assert not [str(w.message) for w in caught if not _expected_warning(w)]


def _expected_warning(caught: warnings.WarningMessage) -> bool:
    """segany's DataWarnings, and the decoders' own notes on damaged files (Pillow's
    "Corrupt EXIF data", pycocotools' NumPy deprecation); anything else (an unclosed file,
    say) is a finding."""
    if issubclass(caught.category, DataWarning | DeprecationWarning):
        return True
    decoder = re.search(r"[/\\](PIL|tifffile)[/\\]", caught.filename)
    return decoder is not None and issubclass(caught.category, UserWarning)


@pytest.fixture
def data_root(tmp_path: Path) -> Iterator[Path]:
    """An image outside the data folder that no annotation may reach."""
    (tmp_path / "outside.png").write_bytes(SEEDS[".png"])
    yield tmp_path


def _fresh(base: Path) -> Path:
    root = Path(tempfile.mkdtemp(dir=base))
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(SEEDS[".png"])
    return root


@examples(60)
@given(document=coco_documents(), raw=st.booleans())
def test_fuzz_coco_loader(document: Any, raw: bool, data_root: Path) -> None:
    root = _fresh(data_root)
    text = json.dumps(document).replace("{OUTSIDE}", str(data_root / "outside.png"))
    (root / "annotations.json").write_text(text[: len(text) // 2] if raw else text)
    check_dataset(root, "coco")


LABEL_LINES = st.one_of(
    st.lists(
        st.one_of(st.integers(-1, 3).map(str), NUMBERS.filter(lambda t: "e" not in t)), max_size=10
    ).map(" ".join),
    st.lists(st.floats(0, 1).map(str), min_size=6, max_size=10).map(lambda v: "0 " + " ".join(v)),
    TEXT,
)


@examples(40)
@given(lines=st.lists(LABEL_LINES, max_size=5), names=YAMLISH)
def test_fuzz_yolo_loader(lines: list[str], names: Any, data_root: Path) -> None:
    root = _fresh(data_root)
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("\n".join(lines))
    (root / "data.yaml").write_text(yaml.safe_dump({"names": names}))
    check_dataset(root, "yolo")


@examples(40)
@given(annotations=st.lists(st.builds(dict, segmentation=SEGMENTATIONS), max_size=3), junk=YAMLISH)
def test_fuzz_sa1b_loader(annotations: list[Any], junk: Any, data_root: Path) -> None:
    root = Path(tempfile.mkdtemp(dir=data_root))
    (root / "a.png").write_bytes(SEEDS[".png"])
    document = {"image": {"file_name": "a.png"}, "annotations": annotations or junk}
    (root / "a.json").write_text(json.dumps(document))
    check_dataset(root, "sa1b")


@examples(40)
@given(mask=damaged_images(), shape=st.sampled_from([IMAGE_SIZE, (30, 41), (1, 1)]))
def test_fuzz_png_mask_loader(
    mask: tuple[str, bytes], shape: tuple[int, int], data_root: Path
) -> None:
    root = _fresh(data_root)
    (root / "masks").mkdir()
    (root / "masks" / "a__one.png").write_bytes(mask[1])
    (root / "masks" / "a__two.png").write_bytes(_png_bytes(shape, seed=1))
    check_dataset(root, "masks")
