"""segany.masks against independent references: pycocotools, the official SAM utils, the
plain-Python NMS stand-in and hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from segment_anything.utils import amg as official
from torchvision.ops.boxes import batched_nms as reference_nms  # tests/standins

from segany import masks as m
from segany.masks import formats as mf


def _edge_case_masks() -> list[np.ndarray]:
    """Named edge cases, several shapes (H, W) bool."""
    cases = []
    for h, w in [(1, 1), (1, 9), (9, 1), (5, 8), (8, 5)]:
        cases.append(np.zeros((h, w), bool))
        cases.append(np.ones((h, w), bool))
    for h, w in [(5, 8), (7, 3)]:
        for y, x in [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)]:
            single = np.zeros((h, w), bool)
            single[y, x] = True
            cases.append(single)
        border = np.zeros((h, w), bool)
        border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
        cases.append(border)
        cases.append(~border)
    return cases


def _random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w) bool: blobby masks (runs of several lengths) plus salt noise."""
    coarse = rng.random((n, (h + 3) // 4, (w + 3) // 4)) > 0.5
    blobs = coarse.repeat(4, axis=1).repeat(4, axis=2)[:, :h, :w]
    noise = rng.random((n, h, w)) > 0.97
    return blobs ^ noise


def _all_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        _edge_case_masks()
        + list(_random_masks(rng, 6, 37, 53))
        + list(_random_masks(rng, 4, 64, 23))
    )


@pytest.mark.parametrize("mask", _all_masks(), ids=lambda a: f"{a.shape[0]}x{a.shape[1]}")
def test_rle_matches_pycocotools(mask: np.ndarray) -> None:
    (rle,) = m.masks_to_rle(torch.from_numpy(mask)[None])
    h, w = mask.shape
    assert rle["size"] == [h, w]
    assert sum(rle["counts"]) == h * w
    # pycocotools reads our uncompressed RLE and decodes it to exactly the mask.
    decoded = mask_utils.decode(mask_utils.frPyObjects(rle, h, w))
    np.testing.assert_array_equal(decoded.astype(bool), mask)
    # The compressed form is byte-identical to pycocotools' own encoding of the mask.
    expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    coco = m.rle_to_coco(rle)
    assert isinstance(coco["counts"], str)
    assert coco["counts"] == expected["counts"].decode()
    assert coco["size"] == [h, w]
    np.testing.assert_array_equal(m.coco_to_mask(coco), mask)
    assert m.rle_area(rle) == int(mask_utils.area(expected)) == int(mask.sum())
    assert m.coco_bbox(coco) == mask_utils.toBbox(expected).tolist()
    np.testing.assert_array_equal(m.rle_to_mask(rle), mask)


def test_rle_batch_matches_official_and_single() -> None:
    rng = np.random.default_rng(1)
    batch = np.concatenate(
        [
            _random_masks(rng, 5, 31, 17),
            np.zeros((1, 31, 17), bool),
            np.ones((1, 31, 17), bool),
        ]
    )
    batch = torch.from_numpy(batch[rng.permutation(len(batch))])
    ours = m.masks_to_rle(batch)
    assert ours == official.mask_to_rle_pytorch(batch)
    assert ours == [m.masks_to_rle(one[None])[0] for one in batch]


def test_rle_hand_computed() -> None:
    # Column-major: column 0 is (0, 1), column 1 is (1, 1), column 2 is (0, 0).
    mask = torch.tensor([[0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert m.masks_to_rle(mask[None]) == [{"size": [2, 3], "counts": [1, 3, 2]}]
    assert m.masks_to_rle(torch.ones(1, 2, 2, dtype=torch.bool))[0]["counts"] == [0, 4]
    assert m.masks_to_rle(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


def test_masks_to_boxes_matches_official() -> None:
    rng = np.random.default_rng(2)
    masks = _random_masks(rng, 12, 19, 26) & (rng.random((12, 1, 1)) > 0.3)
    masks[0] = False
    masks[1] = False
    masks[1, 18, 25] = True
    t = torch.from_numpy(masks).reshape(3, 4, 19, 26)
    np.testing.assert_array_equal(m.masks_to_boxes(t), official.batched_mask_to_box(t))
    single = torch.zeros(5, 7, dtype=torch.bool)
    single[2, 3] = True
    assert m.masks_to_boxes(single).tolist() == [3, 2, 3, 2]
    assert m.masks_to_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)


def test_box_xyxy_to_xywh() -> None:
    boxes = torch.tensor([[3, 2, 3, 2], [1, 2, 10, 5]])
    assert m.box_xyxy_to_xywh(boxes).tolist() == [[3, 2, 0, 0], [1, 2, 9, 3]]
    assert m.box_xyxy_to_xywh(np.array([1.0, 2, 4, 8])).tolist() == [1, 2, 3, 6]


@pytest.mark.parametrize("seed", range(6))
def test_batched_nms_matches_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 150
    xy = torch.randint(0, 60, (n, 2), generator=g)
    wh = torch.randint(0, 40, (n, 2), generator=g)  # includes zero-area boxes
    boxes = torch.cat([xy, xy + wh], dim=1).float()
    boxes[:10] = boxes[10:20]  # exact duplicates
    scores = torch.randint(0, 8, (n,), generator=g).float()  # many ties
    categories = torch.randint(0, 3, (n,), generator=g)
    for thresh in (0.0, 0.3, 0.7, 1.0):
        expected = reference_nms(boxes, scores, categories, thresh)
        assert m.batched_nms(boxes, scores, categories, thresh).tolist() == expected.tolist()


def test_batched_nms_hand_computed() -> None:
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float
    )
    scores = torch.tensor([0.5, 0.9, 0.8, 0.1])
    # IoU(0,1) = 90/110 > 0.7; box 2 has another category so it survives.
    kept = m.batched_nms(boxes, scores, torch.tensor([0, 0, 1, 0]), 0.7)
    assert kept.tolist() == [1, 2, 3]
    empty = m.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), 0.5)
    assert empty.tolist() == []


def test_count_true_edge_cases() -> None:
    g = torch.Generator().manual_seed(4)
    masks = torch.rand(3, 2, 9, 7, generator=g) > 0.5
    expected = [[int(x.sum()) for x in row] for row in masks]  # hand count, per mask
    assert m.count_true(masks).tolist() == expected
    assert m.count_true(masks.transpose(-1, -2)).tolist() == expected  # strided
    assert m.count_true(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0,)
    assert m.count_true(torch.zeros(2, 0, 5, dtype=torch.bool)).tolist() == [0, 0]
    assert m.masks_to_boxes(masks[0].to(torch.uint8) * 7).tolist() == (
        m.masks_to_boxes(masks[0]).tolist()
    )


def test_stability_score_matches_official() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 40, 33, generator=g) * 3
    logits[0, 0] = -10  # empty low-threshold mask -> NaN in both
    for thresh, offset in [(0.0, 1.0), (0.5, 0.25)]:
        ours = m.stability_score(logits, thresh, offset)
        ref = official.calculate_stability_score(logits, thresh, offset)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, equal_nan=True, rtol=0, atol=0)
    hand = torch.tensor([[[2.0, 0.5], [-0.5, -2.0]]])  # >1: 1 pixel, >-1: 3 pixels
    assert m.stability_score(hand, 0.0, 1.0).tolist() == pytest.approx([1 / 3])


@pytest.mark.parametrize("n,layers,factor", [(32, 0, 1), (16, 2, 2), (10, 3, 2), (7, 1, 1)])
def test_point_grids_match_official(n: int, layers: int, factor: int) -> None:
    ours = m.build_layer_point_grids(n, layers, factor)
    ref = official.build_all_layer_point_grids(n, layers, factor)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    expected_2x2 = [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    assert m.build_point_grid(2).tolist() == expected_2x2


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (333, 333), (1, 7), (1500, 2250)])
@pytest.mark.parametrize("layers,overlap", [(0, 512 / 1500), (1, 512 / 1500), (3, 0.2), (2, 0.0)])
def test_crop_boxes_match_official(size: tuple[int, int], layers: int, overlap: float) -> None:
    assert m.generate_crop_boxes(size, layers, overlap) == official.generate_crop_boxes(
        size, layers, overlap
    )


def test_crop_boxes_hand_computed() -> None:
    # 100x200 image, one layer, overlap int(0.2 * 100 * 1) = 20: crops are 110 wide, 60 high.
    boxes, layers = m.generate_crop_boxes((100, 200), 1, 0.2)
    assert boxes == [[0, 0, 200, 100], [0, 0, 110, 60], [0, 40, 110, 100], [90, 0, 200, 60],
                     [90, 40, 200, 100]]  # fmt: skip
    assert layers == [0, 1, 1, 1, 1]


def test_boxes_near_crop_edge_matches_official() -> None:
    g = torch.Generator().manual_seed(4)
    xy = torch.randint(0, 150, (200, 2), generator=g)
    boxes = torch.cat([xy, xy + torch.randint(0, 100, (200, 2), generator=g)], dim=1)
    for crop in ([0, 0, 300, 200], [100, 0, 300, 120], [50, 60, 250, 180]):
        ours = m.boxes_near_crop_edge(boxes, crop, [0, 0, 300, 200])
        ref = official.is_box_near_crop_edge(boxes, crop, [0, 0, 300, 200])
        assert ours.tolist() == ref.tolist()


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("seed", range(4))
def test_remove_small_regions_matches_official(mode: str, seed: int) -> None:
    mask = _random_masks(np.random.default_rng(seed), 1, 48, 41)[0]
    for area in (1, 5, 30, 10_000):
        ours, changed = m.remove_small_regions(mask, area, mode)  # type: ignore[arg-type]
        ref, ref_changed = official.remove_small_regions(mask, area, mode)
        assert changed == ref_changed
        np.testing.assert_array_equal(ours, ref)


def test_remove_small_regions_hand_computed() -> None:
    mask = np.zeros((8, 8), bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a 1-pixel hole
    mask[7, 7] = True  # a 1-pixel island (diagonal to nothing)
    filled, changed = m.remove_small_regions(mask, 2, "holes")
    assert changed and filled[3, 3] and filled.sum() == mask.sum() + 1
    cleaned, changed = m.remove_small_regions(mask, 2, "islands")
    assert changed and not cleaned[7, 7] and cleaned.sum() == mask.sum() - 1
    # All islands small: the largest survives.
    largest, changed = m.remove_small_regions(mask, 1000, "islands")
    assert changed and not largest[7, 7] and largest.sum() == mask.sum() - 1
    same, changed = m.remove_small_regions(np.zeros((4, 4), bool), 5, "islands")
    assert not changed and not same.any()
    with pytest.raises(ValueError):
        m.remove_small_regions(mask, 2, "both")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "crop",
    [
        (0, 0, 31, 17),
        (0, 0, 31, 9),
        (5, 0, 20, 17),
        (0, 4, 31, 12),
        (3, 2, 12, 15),
        (30, 16, 31, 17),
    ],
)
def test_rle_of_crop_matches_padded_mask(crop: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = crop
    rng = np.random.default_rng(x0 * 100 + y0)
    masks = _random_masks(rng, 4, y1 - y0, x1 - x0)
    masks[0] = True  # runs crossing column ends, which join when the crop is full height
    masks[1] = False
    full = np.zeros((len(masks), 17, 31), bool)
    full[:, y0:y1, x0:x1] = masks
    ours = m.masks_to_rle(torch.from_numpy(masks), image_size=(17, 31), offset=(x0, y0))
    assert ours == official.mask_to_rle_pytorch(torch.from_numpy(full))
    with pytest.raises(ValueError):
        m.masks_to_rle(torch.from_numpy(masks), image_size=(17, 31), offset=(32 - x1 + x0, y0))


# -------------------------------------------------------------------------------------
# Output files (segany.masks.formats)
# -------------------------------------------------------------------------------------


def _hand_records(mode: str) -> tuple[list[dict], list[np.ndarray]]:
    """Two records on a 6x9 image with known masks, segmentation in ``mode``."""
    a = np.zeros((6, 9), bool)
    a[1:4, 2:7] = True  # 3 rows x 5 columns
    b = np.zeros((6, 9), bool)
    b[5, 8] = True  # single pixel in the corner
    records = []
    for mask, iou, point in [(a, 0.91, [4.5, 2.25]), (b, 0.5, [8.0, 5.0])]:
        (rle,) = m.masks_to_rle(torch.from_numpy(mask)[None])
        segmentation = {"binary_mask": mask, "uncompressed_rle": rle}.get(mode)
        if mode == "coco_rle":
            segmentation = m.rle_to_coco(rle)
        ys, xs = np.nonzero(mask)
        records.append(
            {
                "segmentation": segmentation,
                "area": int(mask.sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()),
                         int(ys.max() - ys.min())],
                "predicted_iou": iou,
                "point_coords": [point],
                "stability_score": 0.96,
                "crop_box": [0, 0, 9, 6],
            }
        )  # fmt: skip
    return records, [a, b]


@pytest.mark.parametrize("mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_record_segmentation_any_mode(mode: str) -> None:
    records, masks = _hand_records(mode)
    for record, mask in zip(records, masks, strict=True):
        expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert mf.record_coco_rle(record) == {"size": [6, 9], "counts": expected["counts"].decode()}
        np.testing.assert_array_equal(mf.record_mask(record), mask)


def test_sa1b_document(tmp_path: Path) -> None:
    records, masks = _hand_records("binary_mask")
    path = mf.write_json(tmp_path / "a.json", mf.sa1b_document(records, 7, "a.jpg", 6, 9))
    doc = json.loads(path.read_text())
    assert doc["image"] == {"image_id": 7, "file_name": "a.jpg", "width": 9, "height": 6}
    assert [a["id"] for a in doc["annotations"]] == [1, 2]
    first = doc["annotations"][0]
    assert set(first) == {"id", "segmentation", "bbox", "area", "predicted_iou",
                          "stability_score", "crop_box", "point_coords"}  # fmt: skip
    assert first["bbox"] == [2, 1, 4, 2] and first["area"] == 15
    assert first["point_coords"] == [[4.5, 2.25]] and first["crop_box"] == [0, 0, 9, 6]
    for ann, mask in zip(doc["annotations"], masks, strict=True):
        rle = {
            "size": ann["segmentation"]["size"],
            "counts": ann["segmentation"]["counts"].encode(),
        }
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_coco_document_reads_with_pycocotools(tmp_path: Path) -> None:
    records, masks = _hand_records("coco_rle")
    docs = [
        mf.sa1b_document(records, 3, "x.jpg", 6, 9),
        mf.sa1b_document(records[:1], 9, "y.png", 6, 9),
    ]
    path = mf.write_json(tmp_path / "instances.json", mf.coco_document(docs))
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [3, 9]
    assert coco.loadCats(coco.getCatIds()) == [
        {"id": 1, "name": "object", "supercategory": "object"}
    ]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[3]))
    assert [a["id"] for a in anns] == [1, 2] and coco.getAnnIds(imgIds=[9]) == [3]
    for ann, mask in zip(anns, masks, strict=True):
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1
        assert ann["area"] == int(mask.sum())
        ys, xs = np.nonzero(mask)  # COCO box: width counts pixels
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert anns[0]["score"] == pytest.approx(0.91)


def test_amg_folder_matches_official_layout(tmp_path: Path) -> None:
    records, masks = _hand_records("binary_mask")
    folder = tmp_path / "img"
    folder.mkdir()
    (folder / "5.png").write_bytes(b"stale")
    mf.write_amg_folder(folder, records)
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "metadata.csv"]
    for i, mask in enumerate(masks):
        pixels = np.array(Image.open(folder / f"{i}.png"))
        np.testing.assert_array_equal(pixels, mask.astype(np.uint8) * 255)
    # The official script's rows: str() of each value, comma-joined, no final newline.
    assert (folder / "metadata.csv").read_text() == (
        "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
        "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h\n"
        "0,15,2,1,4,2,4.5,2.25,0.91,0.96,0,0,9,6\n"
        "1,1,8,5,0,0,8.0,5.0,0.5,0.96,0,0,9,6"
    )


def test_draw_masks(tmp_path: Path) -> None:
    records, masks = _hand_records("uncompressed_rle")
    image = np.full((6, 9, 3), 100, np.uint8)
    drawn = mf.draw_masks(image, records, alpha=0.5)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    outside = ~(masks[0] | masks[1])
    np.testing.assert_array_equal(drawn[outside], image[outside])
    assert (drawn[masks[0]] != 100).any(axis=-1).all()
    assert (image == 100).all()  # not modified
    path = mf.write_overlay(tmp_path / "o.png", image, records)
    np.testing.assert_array_equal(np.array(Image.open(path)), drawn)
    np.testing.assert_array_equal(mf.draw_masks(image, []), image)
