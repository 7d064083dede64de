"""Training building blocks checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import TINY_CONFIG

from segany.build import MODEL_CONFIGS, build_sam_from_config
from segany.train.augment import TrainItem, copy_paste, prepare_item
from segany.train.config import AugmentSection, ModelSection, OptimSection
from segany.train.losses import dice_loss, focal_loss, mask_iou, sam_loss
from segany.train.prompts import (
    error_points,
    mask_boxes,
    noisy_boxes,
    random_pixels,
    round_schedule,
)
from segany.train.trainer import apply_freeze, encoder_layer_ids, learning_rate, parameter_groups


def test_focal_loss_by_hand() -> None:
    # p = 0.5, target 1: alpha 0.25 * ce ln 2 * (1 - 0.5)^2
    assert focal_loss(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)).item() == pytest.approx(
        0.25 * math.log(2) * 0.25
    )
    # confident and right: about zero; confident and wrong: large
    assert focal_loss(torch.full((1, 1, 1), 10.0), torch.ones(1, 1, 1)).item() < 1e-8
    assert focal_loss(torch.full((1, 1, 1), -10.0), torch.ones(1, 1, 1)).item() > 2.0


def test_dice_and_iou_by_hand() -> None:
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    logits = torch.tensor([[[20.0, -20.0], [-20.0, -20.0]]])  # predicts 1 of the 2 pixels
    # dice = 1 - (2 * 1 + 1) / (1 + 2 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - 3 / 4, abs=1e-6)
    assert mask_iou(logits, target).item() == pytest.approx(0.5)
    assert mask_iou(torch.full((1, 2, 2), -1.0), torch.zeros(1, 2, 2)).item() == 1.0


def test_sam_loss_trains_only_the_best_of_three() -> None:
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    perfect = torch.where(target > 0, 10.0, -10.0)
    logits = torch.stack([-perfect, perfect, torch.zeros_like(perfect)], dim=1)  # (2, 3, 8, 8)
    logits[1] = logits[1][[2, 0, 1]]  # object 1: the right mask is output 2
    logits.requires_grad_(True)
    iou_pred = torch.tensor([[0.0, 1.0, 0.5], [0.5, 0.0, 1.0]], requires_grad=True)
    loss, parts, best = sam_loss(logits, iou_pred, target)
    assert best.tolist() == [1, 2]
    assert parts["iou"].item() == pytest.approx(1.0)
    loss.backward()
    grads = logits.grad.abs().sum(dim=(2, 3))
    assert grads[0, 0] == 0 and grads[0, 2] == 0 and grads[1, 0] == 0 and grads[1, 1] == 0
    # The IoU head learns all three outputs: actual IoUs [0, 1, 0] and [0, 0, 1],
    # each object off by 0.5 on one output, so the MSE is 0.25 / 3.
    assert parts["iou_mse"].item() == pytest.approx(0.25 / 3, abs=1e-6)


def test_mask_boxes_and_random_pixels() -> None:
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 11] = True
    assert mask_boxes(masks).tolist() == [[3, 2, 8, 4], [11, 7, 11, 7]]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        coords, found = random_pixels(masks, generator)
        assert found.all()
        assert masks[0, int(coords[0, 1]), int(coords[0, 0])] and coords[1].tolist() == [11.0, 7.0]


def test_noisy_boxes_follow_the_paper() -> None:
    masks = torch.zeros(4000, 64, 64, dtype=torch.bool)
    masks[:, 20:40, 10:50] = True  # box x 10..49 (40 wide), y 20..39 (20 high)
    boxes = noisy_boxes(masks, torch.Generator().manual_seed(1))
    exact = torch.tensor([10.0, 20.0, 49.0, 39.0])
    noise = boxes - exact
    # std 10% of the side (4 px in x, 2 px in y), well inside the 20 px clip and the frame
    assert noise[:, 0].std().item() == pytest.approx(4.0, rel=0.1)
    assert noise[:, 1].std().item() == pytest.approx(2.0, rel=0.1)
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    large = torch.ones(500, 400, 400, dtype=torch.bool)
    clipped = noisy_boxes(large, torch.Generator().manual_seed(2))
    assert clipped.min() >= 0 and clipped.max() <= 399
    assert (clipped[:, 2] - 399).abs().max() <= 20


def test_error_points_label_and_position() -> None:
    target = torch.zeros(3, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    predicted = target.clone()
    predicted[0, 2:6, 2:4] = False  # misses the left half: false negatives
    predicted[1, 0, 0] = True  # one false positive at cell (0, 0)
    coords, labels = error_points(
        predicted, target, stride=4, generator=torch.Generator().manual_seed(0)
    )
    assert labels.tolist() == [1, 0, -1]
    assert 8 <= coords[0, 0] < 16 and 8 <= coords[0, 1] < 24  # cells x 2..3, y 2..5, stride 4
    assert 0 <= coords[1, 0] < 4 and 0 <= coords[1, 1] < 4


def test_round_schedule_has_two_rounds_without_clicks() -> None:
    for seed in range(10):
        schedule = round_schedule(11, torch.Generator().manual_seed(seed))
        assert len(schedule) == 10 and sum(schedule) == 8 and schedule[-1] is False
    assert round_schedule(1, torch.Generator()) == []
    assert round_schedule(3, torch.Generator(), without_click=0) == [True, True]
    assert round_schedule(4, torch.Generator(), without_click=1) == [True, True, False]


def test_learning_rate_schedule() -> None:
    optim = OptimSection(lr=1.0, warmup_steps=4, lr_decay_steps=(10, 20), lr_decay_factor=0.1)
    assert [learning_rate(optim, s) for s in (0, 3, 9, 10, 20)] == pytest.approx(
        [0.25, 1.0, 1.0, 0.1, 0.01]
    )


@pytest.mark.parametrize(("name", "blocks"), [("vit_b", 12), ("vit_t", 12)])
def test_layer_ids_freeze_and_decay(name: str, blocks: int) -> None:
    model = build_sam_from_config(MODEL_CONFIGS[name])
    ids, num_layers = encoder_layer_ids(model)
    assert num_layers == blocks + 1
    assert {ids[k] for k in ids if k.startswith("neck")} == {num_layers}
    assert ids["patch_embed.proj.weight" if name == "vit_b" else "patch_embed.seq.0.c.weight"] == 0
    apply_freeze(model, ModelSection(name=name, freeze="partial", trainable_blocks=2))
    trainable = {ids[k] for k, p in model.image_encoder.named_parameters() if p.requires_grad}
    assert trainable == {blocks - 1, blocks, num_layers}
    assert all(p.requires_grad for p in model.mask_decoder.parameters())
    groups = parameter_groups(model, OptimSection(lr=1.0, layer_lr_decay=0.5))
    assert sorted({g["lr_scale"] for g in groups}) == [0.25, 0.5, 1.0]
    apply_freeze(model, ModelSection(name=name, freeze="encoder"))
    assert not any(p.requires_grad for p in model.image_encoder.parameters())


def test_prepare_item_geometry() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 255
    masks = np.zeros((1, 100, 200), bool)
    masks[0, :, 100:] = True  # the right half
    augment = AugmentSection(scale_jitter=(1.0, 1.0), hflip=False, color=0.0)
    item = prepare_item(image, masks, "x", 64, 4, 1, augment, np.random.default_rng(0))
    assert item is not None
    assert tuple(item.image.shape) == (3, 32, 64) and tuple(item.masks.shape) == (1, 64, 64)
    assert (
        item.masks[0, :32, 32:].all()
        and not item.masks[0, :32, :32].any()
        and not item.masks[0, 32:].any()
    )
    assert (item.image[:, :, 32:] == 255).all()
    assert prepare_item(image, masks[:0], "x", 64, 4, 1, augment, np.random.default_rng(0)) is None


def test_copy_paste_by_hand() -> None:
    """Donor pixels replace the item's under the pasted object; the item's objects lose
    what is covered (and vanish below the minimum area); pasted masks come first."""
    image = torch.zeros(3, 4, 6, dtype=torch.uint8)  # 4 x 6 image in an 8 x 8 frame
    left, corner = torch.zeros(2, 8, 8, dtype=torch.bool)
    left[:4, :3] = True  # 12 pixels
    corner[2, 3] = True  # 1 pixel, to be covered whole
    item = TrainItem(image, torch.stack([left, corner]), "a")
    donor_image = torch.full((3, 8, 5), 200, dtype=torch.uint8)  # 8 x 5: wider reach down
    square = torch.zeros(8, 8, dtype=torch.bool)
    square[1:6, 1:7] = True  # beyond both images on the right, beyond the item's below
    donor = TrainItem(donor_image, square[None], "b")
    out = copy_paste(item, donor, masks_per_image=8, min_mask_area=1, rng=np.random.default_rng(0))
    pasted = torch.zeros(8, 8, dtype=torch.bool)
    pasted[1:4, 1:5] = True  # inside the item (rows < 4) and the donor (cols < 5)
    assert torch.equal(out.masks[0], pasted)
    assert torch.equal(out.masks[1], left & ~pasted)
    assert len(out.masks) == 2  # the covered 1-pixel object is gone
    assert (out.image[:, 1:4, 1:5] == 200).all() and out.image.sum() == 200 * 3 * 12
    assert out.image_id == "a+b"


def test_tiny_config_builds_for_training() -> None:
    model = build_sam_from_config(TINY_CONFIG)
    assert encoder_layer_ids(model)[1] == TINY_CONFIG.encoder.depth + 1


def test_synthetic_shapes_are_reproducible_disjoint_objects() -> None:
    from segany.data.synthetic import MIN_OBJECT_AREA, SyntheticShapes

    data = SyntheticShapes(8, seed=3)
    first, again = data.get(5), SyntheticShapes(8, seed=3).get(5)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.masks, again.masks)
    assert not np.array_equal(first.image, SyntheticShapes(8, seed=4).get(5).image)
    for index in range(len(data)):
        sample = data.get(index)
        height, width = sample.image.shape[:2]
        assert (
            sample.image.dtype == np.uint8
            and 256 <= min(height, width) <= max(height, width) <= 640
        )
        assert sample.masks.shape[1:] == (height, width) and len(sample.masks) >= 1
        # Later shapes occlude earlier ones: every pixel belongs to at most one object.
        assert sample.masks.sum(axis=0).max() == 1
        assert (sample.masks.sum(axis=(1, 2)) >= MIN_OBJECT_AREA).all()


def test_synthetic_source_in_a_config(tmp_path) -> None:
    from segany.errors import SeganyError
    from segany.train.config import parse_config
    from segany.train.data_stream import SampleStream

    raw = {
        "model": {"name": "vit_t"},
        "data": {"train": [{"synthetic": "shapes", "images": 4}], "masks_per_image": 3},
        "output": "out",
    }
    config = parse_config(raw, tmp_path)
    item = SampleStream(config, 128).item(2)
    assert item.image.shape[0] == 3 and max(item.image.shape[1:]) <= 128
    assert 1 <= len(item.masks) <= 3
    raw["data"]["train"] = [{"synthetic": "circles"}]
    with pytest.raises(SeganyError, match="unknown synthetic data 'circles'"):
        parse_config(raw, tmp_path)
    raw["data"]["train"] = [{"split": "train"}]
    with pytest.raises(SeganyError, match="needs a root folder"):
        parse_config(raw, tmp_path)


def test_embedding_scale_schedule_by_hand() -> None:
    from segany.train.warmup import embedding_scale

    optim = OptimSection(
        geometric_warmup_steps=10, embedding_scale_start=0.2, embedding_scale_ramp_steps=40
    )
    expected = {0: 0.2, 10: 0.2, 20: 0.4, 30: 0.6, 50: 1.0, 90: 1.0}
    for step, value in expected.items():
        assert math.isclose(embedding_scale(optim, step), value), step
    assert embedding_scale(OptimSection(), 0) == 1.0


def test_folded_embedding_scale_equals_scaling_the_output() -> None:
    from segany.train.warmup import fold_embedding_scale

    torch.manual_seed(0)
    model = build_sam_from_config(TINY_CONFIG).eval()
    for param in model.image_encoder.neck[-1].parameters():
        param.data.normal_()  # not the identity norm of a fresh model
    image = torch.randn(1, 3, TINY_CONFIG.img_size, TINY_CONFIG.img_size)
    with torch.no_grad():
        expected = model.image_encoder(image) * 0.3
        fold_embedding_scale(model, 0.3)
        torch.testing.assert_close(model.image_encoder(image), expected)


def test_decoder_lr_scale_applies_to_prompt_encoder_and_decoder_only() -> None:
    model = build_sam_from_config(TINY_CONFIG)
    groups = parameter_groups(model, OptimSection(lr=1e-3, decoder_lr_scale=0.25))
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    warmup_scale_of = {id(p): g["warmup_lr_scale"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        expected = 1.0 if name.startswith("image_encoder.") else 0.25
        assert scale_of[id(param)] == expected, name
        assert warmup_scale_of[id(param)] == 1.0, name  # the warm-up trains the decoder fully


def test_random_shape_masks_for_the_geometric_warm_up() -> None:
    from segany.train.warmup import random_shape_masks

    masks = random_shape_masks(5, 64, torch.Generator().manual_seed(0))
    again = random_shape_masks(5, 64, torch.Generator().manual_seed(0))
    assert masks.shape == (5, 64, 64) and masks.dtype == torch.bool
    assert torch.equal(masks, again) and (masks.flatten(1).sum(1) >= 40).all()


@pytest.mark.parametrize(("box_probability", "first_round"), [(0.0, [True]), (1.0, [False])])
def test_first_round_multimask_only_for_a_single_click(
    monkeypatch, box_probability, first_round
) -> None:
    """SAM's recipe: a lone click is ambiguous (three outputs, the best one trained); a box
    is answered with the single output, as ``predict(box=...)`` is at inference."""
    from segany.inference.mask_decoder import FastMaskDecoder
    from segany.train.trainer import InteractiveStep

    model = build_sam_from_config(TINY_CONFIG)
    calls: list[bool] = []
    decode = FastMaskDecoder.decode

    def spy(self, *args, **kwargs):
        calls.append(kwargs["multimask_output"])
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(FastMaskDecoder, "decode", spy)
    size = TINY_CONFIG.img_size
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, size // 8 : size // 2, size // 4 : size // 2] = True
    masks[1, size // 2 : size - 8, 8 : size // 3] = True
    optim = OptimSection(rounds=3, rounds_without_click=0, box_probability=box_probability)
    step = InteractiveStep(model, optim)
    embedding = torch.randn(1, 256, TINY_CONFIG.embedding_size, TINY_CONFIG.embedding_size)
    step._rounds(embedding, masks, torch.Generator().manual_seed(0))
    assert calls == [*first_round, False, False]


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_trains_in_bf16_only_where_it_is_native(
    monkeypatch, native: bool, expected: str
) -> None:
    from types import SimpleNamespace

    from segany.train import trainer

    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: native)
    config = SimpleNamespace(optim=OptimSection(precision="auto"))
    assert trainer.training_precision(config, torch.device("cpu")) == expected
    config = SimpleNamespace(optim=OptimSection(precision="bf16"))
    assert trainer.training_precision(config, torch.device("cpu")) == "bf16"


@pytest.mark.parametrize("multimask", [True, False])
def test_training_decoder_gradients_equal_the_models(multimask: bool) -> None:
    """The trainer decodes with the inference layer's fast forms: the same function as the
    model's plain decoder, so the same loss and the same gradients for every parameter."""
    from segany.inference.mask_decoder import FastMaskDecoder

    model = build_sam_from_config(TINY_CONFIG)
    decoder, prompt_encoder = model.mask_decoder, model.prompt_encoder
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 256, TINY_CONFIG.embedding_size, TINY_CONFIG.embedding_size)
    points = (torch.rand(6, 2, 2, generator=g) * TINY_CONFIG.img_size, torch.ones(6, 2))
    grads = []
    for fast in (False, True):
        model.zero_grad()
        sparse, dense = prompt_encoder(points=points, boxes=None, masks=None)
        pe = prompt_encoder.get_dense_pe()
        if fast:
            no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            masks, iou = FastMaskDecoder(decoder, pe, no_mask).decode(
                embedding, sparse, dense, multimask_output=multimask
            )
        else:
            masks, iou = decoder(embedding, pe, sparse, dense, multimask_output=multimask)
        (masks.sigmoid().mean() + iou.square().sum()).backward()
        # A mask token whose output is not returned gets no gradient: a zero one.
        grads.append(
            {
                n: torch.zeros_like(p) if p.grad is None else p.grad
                for n, p in model.named_parameters()
            }
        )
        model.zero_grad(set_to_none=True)
    assert sum(bool(g.any()) for g in grads[0].values()) > 20
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, atol=1e-5, rtol=1e-4, msg=name)
