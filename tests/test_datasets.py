"""Data set readers: COCO, YOLO-seg, SA-1B and PNG-mask folders on tiny hand-made data with
known masks, format detection, splits, bad data, and counts on the real data in ../shared/data."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segany.data import DataWarning, SegmentationDataset, detect_format, load_dataset
from segany.errors import SeganyError

H, W = 20, 30


def rect(top: int, left: int, bottom: int, right: int, shape=(H, W)) -> np.ndarray:
    """Mask of rows top..bottom-1, columns left..right-1."""
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    return mask


def write_image(path: Path, shape=(H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def runs_column_major(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts, written out by hand: runs over the column-major
    pixels, starting with zeros."""
    flat = mask.T.ravel()
    counts, value, run = [], False, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return counts


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def by_name(sample) -> dict[str, np.ndarray]:
    return dict(zip(sample.object_names, sample.masks))


# --------------------------------------------------------------------------- COCO


@pytest.fixture
def coco_root(tmp_path) -> Path:
    root = tmp_path / "tinycoco"
    for name in ("a.png", "b.png"):
        write_image(root / "images" / name)
    rle_mask = rect(10, 20, 13, 22) | rect(15, 3, 16, 9)
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
            {"id": 3, "file_name": "missing.png", "height": H, "width": W},
        ],
        "categories": [{"id": 7, "name": "box"}],
        "annotations": [
            # polygon: x 2..6, y 1..4 covers columns 2..5, rows 1..3
            {"id": 10, "image_id": 1, "category_id": 7, "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]]},
            # two parts, one object
            {
                "id": 11,
                "image_id": 1,
                "category_id": 7,
                "segmentation": [[10, 5, 12, 5, 12, 7, 10, 7], [14, 5, 15, 5, 15, 6, 14, 6]],
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 7,
                "segmentation": {"size": [H, W], "counts": runs_column_major(rle_mask)},
            },
            {
                "id": 13,
                "image_id": 1,
                "category_id": 7,
                "segmentation": compressed_rle(rect(0, 25, 8, 30)),
            },
            {
                "id": 14,
                "image_id": 1,
                "category_id": 7,
                "iscrowd": 1,
                "segmentation": compressed_rle(rect(17, 0, 20, 30)),
            },
            {"id": 15, "image_id": 1, "category_id": 7, "segmentation": [[1, 2, 3]]},
            {"id": 16, "image_id": 2, "category_id": 7, "segmentation": None},
            {"id": 17, "image_id": 3, "category_id": 7, "segmentation": [[0, 0, 5, 0, 5, 5]]},
        ],
    }
    (root / "annotations.json").write_text(json.dumps(data))
    return root


def test_coco_polygons_rle_and_crowd(coco_root) -> None:
    with pytest.warns(DataWarning) as caught:
        dataset = load_dataset(coco_root)
    messages = " | ".join(str(w.message) for w in caught)
    assert "annotation 15" in messages and "annotation 16" in messages  # malformed, reported
    assert "missing.png" in messages
    assert "b.png" in messages  # its only annotation was malformed: no objects
    assert dataset.format == "coco" and dataset.image_ids == ["a"]
    assert dataset.num_objects == 4

    sample = dataset[0]
    assert sample.image.shape == (H, W, 3) and sample.image.dtype == np.uint8
    assert sample.masks.shape == (4, H, W) and sample.masks.dtype == bool
    masks = by_name(sample)
    np.testing.assert_array_equal(masks["box_10"], rect(1, 2, 4, 6))
    np.testing.assert_array_equal(masks["box_11"], rect(5, 10, 7, 12) | rect(5, 14, 6, 15))
    np.testing.assert_array_equal(masks["box_12"], rect(10, 20, 13, 22) | rect(15, 3, 16, 9))
    np.testing.assert_array_equal(masks["box_13"], rect(0, 25, 8, 30))
    np.testing.assert_array_equal(sample.ignore, rect(17, 0, 20, 30))


def test_coco_json_given_as_root_and_rle_size_mismatch(tmp_path) -> None:
    root = tmp_path / "set"
    write_image(root / "images" / "c.png")
    data = {
        "images": [{"id": 1, "file_name": "c.png"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": compressed_rle(rect(0, 0, 4, 4)),
            },
            # RLE for a different image size: skipped when decoded, reported once
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "segmentation": compressed_rle(np.ones((5, 5), bool)),
            },
        ],
    }
    annotations = root / "annotations" / "instances.json"
    annotations.parent.mkdir()
    annotations.write_text(json.dumps(data))
    assert detect_format(annotations) == "coco" and detect_format(root) == "coco"
    dataset = load_dataset(annotations)
    assert dataset.name == "set"
    with pytest.warns(DataWarning, match="RLE size 5x5"):
        sample = dataset[0]
    assert sample.object_names == ["1_1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # the same problem is not reported again
        dataset[0]


# --------------------------------------------------------------------------- YOLO


@pytest.fixture
def yolo_root(tmp_path) -> Path:
    root = tmp_path / "tinyyolo"
    write_image(root / "images" / "train" / "x.png", (20, 40))
    write_image(root / "images" / "train" / "empty.png", (20, 40))
    labels = root / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "x.txt").write_text(
        # x 4..20, y 2..12 in pixels: area 16 * 10
        "0 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6\n"
        "0 0.1 0.2\n"  # too few numbers
        "1 0.5 0.5 0.2 0.2\n"  # a detection box
        "\n"
        # x 30..40, y 10..20: area 10 * 10
        "1 0.75 0.5 1.0 0.5 1.0 1.0 0.75 1.0\n"
    )
    (labels / "empty.txt").write_text("")
    (root / "data.yaml").write_text("names:\n  - cat\n  - dog\n")
    return root


def test_yolo_polygons_known_areas(yolo_root) -> None:
    assert detect_format(yolo_root) == "yolo"
    with pytest.warns(DataWarning) as caught:
        dataset = load_dataset(yolo_root)
    messages = [str(w.message) for w in caught]
    malformed = [m for m in messages if "x.txt" in m]
    assert len(malformed) == 1 and "2 malformed" in malformed[0]  # one line per file
    assert any("empty.png" in m for m in messages)
    assert dataset.image_ids == ["x"] and dataset.num_objects == 2

    sample = dataset[0]
    assert sample.object_names == ["cat_0", "dog_1"]
    assert [int(m.sum()) for m in sample.masks] == [160, 100]
    np.testing.assert_array_equal(sample.masks[0], rect(2, 4, 12, 20, (20, 40)))
    np.testing.assert_array_equal(sample.masks[1], rect(10, 30, 20, 40, (20, 40)))
    assert sample.ignore is None


def test_yolo_class_names_from_classes_txt(yolo_root) -> None:
    (yolo_root / "data.yaml").unlink()
    (yolo_root / "classes.txt").write_text("person\nbike\n")
    with pytest.warns(DataWarning):
        sample = load_dataset(yolo_root, format="yolo")[0]
    assert sample.object_names == ["person_0", "bike_1"]


# --------------------------------------------------------------------------- SA-1B


def test_sa1b_json_and_malformed_file(tmp_path) -> None:
    root = tmp_path / "sa"
    write_image(root / "sa_1.jpg")
    write_image(root / "sa_2.jpg")
    annotations = [
        {"id": 5, "segmentation": compressed_rle(rect(2, 3, 9, 12)), "area": 63},
        {"id": 6, "segmentation": compressed_rle(rect(12, 0, 20, 30))},
        {"id": 7, "segmentation": {"size": [H, W]}},  # no counts: reported, skipped
    ]
    (root / "sa_1.json").write_text(json.dumps({"image": {}, "annotations": annotations}))
    (root / "sa_2.json").write_text("{ not json")
    assert detect_format(root) == "sa1b"
    dataset = load_dataset(root)
    assert dataset.image_ids == ["sa_1", "sa_2"] and dataset.num_objects is None

    with pytest.warns(DataWarning, match="object '7' of sa_1.json"):
        sample = dataset[0]
    assert sample.object_names == ["5", "6"]
    np.testing.assert_array_equal(sample.masks[0], rect(2, 3, 9, 12))
    np.testing.assert_array_equal(sample.masks[1], rect(12, 0, 20, 30))

    with pytest.raises(SeganyError, match=r"sa_2\.json"):
        dataset[1]
    with pytest.warns(DataWarning, match=r"sa_2\.json"):
        assert dataset.get(1) is None


# --------------------------------------------------------------------------- PNG masks


@pytest.fixture
def masks_root(tmp_path) -> Path:
    root = tmp_path / "tinymasks"
    write_image(root / "images" / "p.png")
    write_image(root / "images" / "q__r.png")  # stems may contain the separator
    write_mask(root / "masks" / "p__cat 1.png", rect(2, 2, 10, 10))
    write_mask(root / "masks" / "p__wall.png", ~rect(0, 0, 1, 10))  # 590 / 600 px: > 90 %
    write_mask(root / "masks" / "p__empty.png", np.zeros((H, W), bool))
    write_mask(root / "masks" / "p__big.png", ~rect(0, 0, 3, 30))  # 510 / 600 px: 85 %
    write_mask(root / "masks" / "q__r__dog.png", rect(5, 5, 6, 6))
    write_mask(root / "ignore" / "p__a.png", rect(0, 0, 2, 2))
    write_mask(root / "ignore" / "p__b.png", rect(18, 28, 20, 30))
    return root


def test_png_masks_with_ignore_and_size_filter(masks_root) -> None:
    write_mask(masks_root / "masks" / "zzz__orphan.png", rect(5, 5, 6, 6))
    assert detect_format(masks_root) == "masks"
    with pytest.warns(DataWarning, match="zzz__orphan.png"):
        dataset = load_dataset(masks_root)
    assert dataset.image_ids == ["p", "q__r"] and dataset.num_objects == 5

    sample = dataset[0]
    assert sample.object_names == ["big", "cat 1"]  # wall (> 90 %) and empty dropped
    np.testing.assert_array_equal(sample.masks[1], rect(2, 2, 10, 10))
    np.testing.assert_array_equal(sample.ignore, rect(0, 0, 2, 2) | rect(18, 28, 20, 30))
    assert dataset[1].object_names == ["dog"] and dataset[1].ignore is None

    with pytest.warns(DataWarning, match="orphan"):
        loose = load_dataset(masks_root, max_mask_fraction=0.99)
    assert loose[0].object_names == ["big", "cat 1", "wall"]


def test_mask_of_wrong_size_is_reported_and_skipped(masks_root) -> None:
    write_mask(masks_root / "masks" / "p__small.png", np.ones((5, 5), bool))
    dataset = load_dataset(masks_root)
    with pytest.warns(DataWarning, match="p__small.png is 5x5"):
        sample = dataset[0]
    assert "small" not in sample.object_names and len(sample.object_names) == 2


def test_unreadable_image_is_reported_once(masks_root) -> None:
    (masks_root / "images" / "bad.png").write_bytes(b"not a picture")
    write_mask(masks_root / "masks" / "bad__x.png", rect(0, 0, 5, 5))
    dataset = load_dataset(masks_root)
    index = dataset.image_ids.index("bad")
    with pytest.raises(SeganyError, match=r"bad\.png"):
        dataset[index]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dataset.get(index) is None
        assert dataset.get(index) is None
    assert len(caught) == 1 and "bad.png" in str(caught[0].message)
    assert dataset.get(dataset.image_ids.index("p")) is not None


# --------------------------------------------------------------------------- detection, splits


def test_format_detection_failures(tmp_path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SeganyError, match="cannot tell the format"):
        detect_format(tmp_path / "nothing")
    with pytest.raises(SeganyError, match="not found"):
        load_dataset(tmp_path / "absent")
    with pytest.raises(SeganyError, match="unknown data format 'voc'"):
        load_dataset(tmp_path / "nothing", format="voc")
    with pytest.raises(SeganyError, match="no annotated images"):
        (tmp_path / "nothing" / "images").mkdir()
        (tmp_path / "nothing" / "masks").mkdir()
        load_dataset(tmp_path / "nothing")


def test_splits(masks_root) -> None:
    splits = {"val": {"tinymasks": ["p", "not-there"]}, "note": "ignored"}
    (masks_root.parent / "splits.json").write_text(json.dumps(splits))
    with pytest.warns(DataWarning, match="not-there"):
        assert load_dataset(masks_root, split="val").image_ids == ["p"]
    assert load_dataset(masks_root, split="train").image_ids == ["q__r"]
    assert load_dataset(masks_root, split="all").image_ids == ["p", "q__r"]
    assert load_dataset(masks_root).image_ids == ["p", "q__r"]

    own = masks_root / "splits.json"
    own.write_text(json.dumps({"val": {"tinymasks": ["q__r"]}}))
    assert load_dataset(masks_root, split="val", splits_file=own).image_ids == ["q__r"]

    (masks_root.parent / "splits.json").write_text(json.dumps({"val": {"other": ["p"]}}))
    with pytest.raises(SeganyError, match="no 'val' split for data set 'tinymasks'"):
        load_dataset(masks_root, split="val")
    with pytest.raises(SeganyError, match="not found"):
        load_dataset(masks_root, split="val", splits_file=masks_root / "nope.json")


def test_dataset_is_torch_compatible(masks_root) -> None:
    import torch.utils.data

    dataset = load_dataset(masks_root)
    assert isinstance(dataset, torch.utils.data.Dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=lambda s: s)
    assert [s.image_id for s in loader] == ["p", "q__r"]
    assert isinstance(dataset.select([1]), SegmentationDataset)
    assert dataset.select([1]).image_ids == ["q__r"]


# --------------------------------------------------------------------------- real data


def _val_stems(shared_data: Path, name: str) -> list[str]:
    return json.loads((shared_data / "splits.json").read_text())["val"][name]


def _check_split_counts(shared_data: Path, name: str, images: int, objects: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        everything = load_dataset(shared_data / name)
        val = load_dataset(shared_data / name, split="val")
        train = load_dataset(shared_data / name, split="train")
    assert (len(everything), everything.num_objects) == (images, objects)
    assert sorted(val.image_ids) == sorted(_val_stems(shared_data, name))
    assert not set(val.image_ids) & set(train.image_ids)
    assert len(val) + len(train) == images
    assert val.num_objects + train.num_objects == objects
    sample = val[0]
    assert sample.image.dtype == np.uint8 and sample.image.shape[2] == 3
    assert sample.masks.shape[1:] == sample.image.shape[:2] and len(sample.masks) >= 1


def test_real_coco_mval(shared_data) -> None:
    # README: 722 images, 800 objects (one per mask file); 100 held out.
    _check_split_counts(shared_data, "coco-mval", 722, 800)
    sample = load_dataset(shared_data / "coco-mval", split="val")[0]
    for name, mask in by_name(sample).items():
        png = np.asarray(
            Image.open(shared_data / "coco-mval/masks" / f"{sample.image_id}__{name}.png")
        )
        np.testing.assert_array_equal(mask, png == 255)


def test_real_dsb2018(shared_data) -> None:
    # README: 664 images, 28,986 nuclei (COCO RLE); 64 held out.
    _check_split_counts(shared_data, "dsb2018", 664, 28986)


def test_real_coco128_seg(shared_data) -> None:
    # README: 128 images and 941 polygons. Two images have no label file and two label
    # files have no image; those files' lines are the polygons that cannot be used.
    root = shared_data / "coco128-seg"
    images = {p.stem for p in (root / "images/train2017").glob("*.jpg")}
    labels = {p.stem: p for p in (root / "labels/train2017").glob("*.txt")}
    assert len(images) == 128
    orphan_lines = sum(
        sum(1 for line in labels[s].read_text().splitlines() if line.strip())
        for s in set(labels) - images
    )
    _check_split_counts(
        shared_data, "coco128-seg", 128 - len(images - set(labels)), 941 - orphan_lines
    )


# --------------------------------------------------------------------------- hostile COCO


def test_coco_file_name_outside_the_data_folder_is_skipped(tmp_path) -> None:
    """Issue 20: absolute names and names climbing with '..' are never followed, even to
    files that exist, and are reported in one DataWarning."""
    outside = write_image(tmp_path / "secret.png")
    root = tmp_path / "data"
    write_image(root / "images" / "a.png")
    names = ["a.png", str(outside), "../../secret.png", "images/../../secret.png", "..\\secret.png"]
    images = [{"id": i, "file_name": name} for i, name in enumerate(names)]
    polygon = [[2, 1, 6, 1, 6, 4, 2, 4]]
    annotations = [{"id": i, "image_id": i, "segmentation": polygon} for i in range(len(names))]
    (root / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    with pytest.warns(DataWarning, match=r"skipped 4 images whose file_name leaves the data"):
        dataset = load_dataset(root, format="coco")
    assert [entry.path for entry in dataset.entries] == [root / "images" / "a.png"]


@pytest.mark.parametrize(
    ("segmentation", "problem"),
    [
        ([[0, 0, float("nan"), 0, 0, 5]], "polygon coordinates must be finite"),
        ([[0, 0, float("inf"), 0, 0, 5]], "polygon coordinates must be finite"),
        ([[0, 0, 1e9, 0, 0, 5]], "polygon coordinates must be finite"),
        ({"size": [H, W], "counts": [-5, H * W + 5]}, "non-negative"),
        (  # the string of a larger mask: its runs go past the image
            {"size": [H, W], "counts": compressed_rle(np.ones((H, W + 10), bool))["counts"]},
            "RLE counts add up to",
        ),
        ({"size": [H, W], "counts": "\x7f"}, "malformed"),
    ],
    ids=["nan", "inf", "1e9", "negative-run", "runs-too-long", "bad-string"],
)
def test_coco_segmentations_that_crash_pycocotools_are_skipped(
    tmp_path, segmentation, problem: str
) -> None:
    """pycocotools crashes the process on these (NaN/huge polygon coordinates, RLE runs
    past the image); they are skipped objects with a DataWarning naming the problem."""
    root = tmp_path / "data"
    write_image(root / "images" / "a.png")
    good = [[2, 1, 6, 1, 6, 4, 2, 4]]
    annotations = [
        {"id": 1, "image_id": 1, "segmentation": good},
        {"id": 2, "image_id": 1, "segmentation": segmentation},
    ]
    document = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": annotations}
    (root / "annotations.json").write_text(json.dumps(document))
    dataset = load_dataset(root, format="coco")
    with pytest.warns(DataWarning, match=problem):
        sample = dataset.get(0)
    assert sample is not None and len(sample.masks) == 1
    assert np.array_equal(sample.masks[0], rect(1, 2, 4, 6))
