"""segany's ``Sam2VideoPredictor`` against Meta's ``SAM2VideoPredictor`` (``sam2`` 1.1.0).

Meta's predictor is built by ``build_sam2_video_predictor`` (no checkpoint, on the CPU),
given random weights (mask logits sharpened as in tests/sam2_reference.py, object scores
spread so that objects are judged present on some frames and absent on others), and its
state dict loaded into segany's model. Both then run the same session on a synthetic
video (JPEG frames written here) with the same calls, and every mask either returns
(``video_res_masks`` of ``add_new_points_or_box``, ``add_new_mask``,
``clear_all_prompts_in_frame``, ``remove_object`` and each frame of
``propagate_in_video``) must agree to 1e-4 in fp32, with the same frame order, object
ids, shapes and dtypes.

A whole session at the real input size (1024) would take minutes on a CPU, so sessions
run the models at a 128 px input (``image_size``, which Meta's config takes as a hydra
override; the memory attention's rotary encoding follows the 8 x 8 grid), and one
tracking step is checked at the real size on given features
(:func:`test_tracking_step_at_full_size`). Meta's hole filling needs its CUDA extension;
here a SciPy stand-in for its connected-components kernel lets it run.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import sam2
import scipy.ndimage
import torch
import yaml
from PIL import Image
from reference import randomize_  # puts tests/standins (torchvision for sam2) on sys.path
from sam2.build_sam import build_sam2_video_predictor
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_video_predictor import SAM2VideoPredictor
from sam2.utils import misc as meta_misc
from sam2_reference import LOGIT_SCALE, yaml_path

from segany import SeganyError
from segany.modeling import sam2_tracking as tracking
from segany.modeling.sam2 import SAM2_CONFIGS, Sam2
from segany.sam2_video_predictor import (
    Sam2VideoPredictor,
    VideoStateError,
    fill_holes_in_mask_scores,
)
from segany.video_frames import load_video_frames, preprocess_frame, read_frames

TOLERANCE = 1e-4
SESSION_SIZE = 128  # model input side of the sessions (the real models take 1024)
FRAME_SIZE = (96, 160)  # (H, W) of the synthetic video: not square, smaller than S
FRAME_COUNT = 10
# Frame i is written as f"{5 * i}.jpg": sorted as text, "10.jpg" would come before "5.jpg".
FRAME_NAME_STEP = 5
# Object-score head of the random models: weights scaled, bias set, so that scores are
# far from 0 (no sign decided by a rounding) and both signs occur in the sessions.
OBJECT_SCORE = {"sam2.1_hiera_t": (300.0, -30.0), "sam2_hiera_t": (300.0, 0.0)}
TEMPORAL_SCALE = 50.0


# -- the models and the video ----------------------------------------------------------


def meta_video_predictor(name: str, image_size: int | None = None) -> SAM2VideoPredictor:
    """Meta's video predictor of config ``name``, random weights, on the CPU."""
    overrides = [] if image_size is None else [f"++model.image_size={image_size}"]
    torch.manual_seed(0)
    meta = build_sam2_video_predictor(
        yaml_path(name), ckpt_path=None, device="cpu", hydra_overrides_extra=overrides
    )
    randomize_(meta, seed=0)
    scale, bias = OBJECT_SCORE[name]
    with torch.no_grad():
        for mlp in meta.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_SCALE)
            mlp.layers[-1].bias.mul_(LOGIT_SCALE)
        head = meta.sam_mask_decoder.pred_obj_score_head.layers[-1]
        head.weight.mul_(scale)
        head.bias.fill_(bias)
        # Random, the memories' and pointers' temporal encodings would be small beside the
        # position encodings (of size 1) and barely tell memory frames apart.
        meta.maskmem_tpos_enc.mul_(TEMPORAL_SCALE)
        if isinstance(meta.obj_ptr_tpos_proj, torch.nn.Linear):  # SAM 2.1
            meta.obj_ptr_tpos_proj.weight.mul_(TEMPORAL_SCALE / 5)
    return meta.eval()


def segany_model(meta: SAM2Base, name: str) -> Sam2:
    """segany's model of config ``name`` at Meta's input size, with Meta's weights."""
    config = dataclasses.replace(SAM2_CONFIGS[name], image_size=meta.image_size)
    model = Sam2.from_config(config).eval()
    model.load_official_state_dict(meta.state_dict())
    return model


def synthetic_frames(count: int = FRAME_COUNT, seed: int = 0) -> list[np.ndarray]:
    """(H, W, 3) uint8 RGB frames: a red disc moving right and a blue square moving left
    over a blocky textured background, with noise."""
    rng = np.random.default_rng(seed)
    height, width = FRAME_SIZE
    ys, xs = np.mgrid[:height, :width]
    blocks = rng.uniform(0, 255, (height // 8 + 1, width // 8 + 1, 3))
    background = np.kron(blocks, np.ones((8, 8, 1)))[:height, :width]
    frames = []
    for i in range(count):
        frame = background.copy()
        frame[(xs - 30 - 8 * i) ** 2 + (ys - 40 - 2 * i) ** 2 < 15**2] = (230, 40, 40)
        left = 120 - 6 * i
        frame[20:50, left : left + 25] = (40, 40, 230)
        frame += rng.normal(0, 5, frame.shape)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of the synthetic frames as JPEG files, and a file that is not a frame."""
    folder = tmp_path_factory.mktemp("video")
    for i, frame in enumerate(synthetic_frames()):
        Image.fromarray(frame).save(folder / f"{FRAME_NAME_STEP * i}.jpg", quality=90)
    (folder / "notes.txt").write_text("not a frame")
    return folder


def scipy_connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's CUDA kernel ``get_connected_componnets``: (N, 1, H, W) 0/1 -> each
    foreground pixel's 8-connected component label and the component's area (0 on the
    background), computed with SciPy."""
    labels = np.zeros(mask.shape, np.int32)
    areas = np.zeros(mask.shape, np.int32)
    eight_connected = np.ones((3, 3), bool)
    for index, plane in enumerate(mask.cpu().numpy()[:, 0]):
        components, _ = scipy.ndimage.label(plane, structure=eight_connected)
        sizes = np.bincount(components.ravel())
        labels[index, 0] = components
        areas[index, 0] = np.where(components > 0, sizes[components], 0)
    return torch.from_numpy(labels), torch.from_numpy(areas)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The sessions' tensors are small (an 8 x 8 grid): a second thread's synchronisation
    costs more than it saves, and 10x more on a CPU shared with other work (measured:
    the SAM 2.1 session 14 s on one thread, 138 s on two beside a training job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def meta_hole_filling() -> Iterator[None]:
    """Meta's hole filling with the SciPy stand-in for its CUDA extension."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(meta_misc, "get_connected_components", scipy_connected_components)
        yield


# -- a session run on both predictors --------------------------------------------------


class Session:
    """One video session run call by call on Meta's predictor and segany's; every mask
    returned is compared, the largest difference kept in :attr:`worst`."""

    def __init__(self, meta: SAM2VideoPredictor, ours: Sam2VideoPredictor) -> None:
        self.meta, self.ours = meta, ours
        self.worst = 0.0
        self.compared = 0

    def start(self, video: Path, **options: Any) -> None:
        self.meta_state = self.meta.init_state(str(video), **options)
        self.state = self.ours.init_state(video, **options)
        # (Meta's background reader normalises in float64, then encodes in float32.)
        expected = self.meta_state["images"][0].float()
        assert float((self.state["images"][0] - expected).abs().max()) <= 1e-6

    def set_option(self, name: str, value: Any) -> None:
        setattr(self.meta, name, value)
        setattr(self.ours, name, value)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        expected = getattr(self.meta, method)(self.meta_state, *args, **kwargs)
        got = getattr(self.ours, method)(self.state, *args, **kwargs)
        if method == "remove_object":
            self.compare_removal(got, expected)
        elif method != "reset_state":
            self.compare(got, expected, method)
        return got

    def propagate(self, **kwargs: Any) -> list[int]:
        expected = list(self.meta.propagate_in_video(self.meta_state, **kwargs))
        got = list(self.ours.propagate_in_video(self.state, **kwargs))
        assert [r[0] for r in got] == [r[0] for r in expected]
        for mine, theirs in zip(got, expected, strict=True):
            self.compare(mine, theirs, f"propagate {kwargs} frame {theirs[0]}")
        return [r[0] for r in got]

    def compare(self, got: tuple, expected: tuple, what: str) -> None:
        frame_idx, obj_ids, masks = got
        assert frame_idx == expected[0], what
        assert list(obj_ids) == list(expected[1]), what
        self.compare_masks(masks, expected[2], what)

    def compare_removal(self, got: tuple, expected: tuple) -> None:
        assert list(got[0]) == list(expected[0])
        assert [f for f, _ in got[1]] == [f for f, _ in expected[1]]
        for (frame_idx, mine), (_, theirs) in zip(got[1], expected[1], strict=True):
            self.compare_masks(mine, theirs, f"remove_object frame {frame_idx}")

    def compare_masks(self, got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        assert got.shape == expected.shape, f"{what}: {got.shape} != {expected.shape}"
        assert got.dtype == expected.dtype and got.device == expected.device, what
        difference = float((got - expected).abs().max())
        assert difference <= TOLERANCE, f"{what}: max |difference| {difference:.2e}"
        self.worst = max(self.worst, difference)
        self.compared += 1


def object_scores(state: dict) -> list[float]:
    """The object scores of every output kept in an inference state."""
    return [
        float(output["object_score_logits"])
        for outputs in state["output_dict_per_obj"].values()
        for by_frame in outputs.values()
        for output in by_frame.values()
    ]


def test_session_matches_meta_sam2_1(video: Path) -> None:
    """SAM 2.1: clicks (a first click: three masks), a box, an added click (fed back with
    the earlier logits), forward and reverse tracking, a correction click and a mask on
    tracked frames, tracking again, a partial reverse run; small holes filled (8 px)."""
    meta = meta_video_predictor("sam2.1_hiera_t", SESSION_SIZE)
    ours = Sam2VideoPredictor(segany_model(meta, "sam2.1_hiera_t"), precision="fp32")
    assert ours.fill_hole_area == meta.fill_hole_area == 8
    session = Session(meta, ours)
    session.start(video)
    session.call("add_new_points_or_box", 2, 1, points=[[50, 44]], labels=[1])
    session.call("add_new_points_or_box", 2, 2, box=[105, 18, 135, 52])
    session.call(
        "add_new_points_or_box", 2, 1, points=[[90, 20]], labels=[0], clear_old_points=False
    )
    assert session.propagate() == list(range(2, FRAME_COUNT))
    assert session.propagate(reverse=True) == [2, 1, 0]
    session.call("add_new_points_or_box", 6, 1, points=np.array([[78.0, 52.0]]), labels=[1])
    mask = np.zeros(FRAME_SIZE, bool)
    mask[20:50, 70:100] = True
    session.call("add_new_mask", 8, 2, mask)
    session.propagate()
    session.propagate(start_frame_idx=7, max_frame_num_to_track=3, reverse=True)
    scores = object_scores(session.state)
    assert min(scores) < -1 and max(scores) > 1 and min(map(abs, scores)) > 0.1
    assert session.compared == 28
    print(f"SAM 2.1 session: {session.compared} masks, max |difference| {session.worst:.1e}")


def test_session_matches_meta_sam2_0_with_options(video: Path) -> None:
    """SAM 2.0 with every option of the predictor on: a mask as the first prompt, clicks
    in fractions of the frame, masks kept from overlapping, removing an object, clearing
    a prompt, corrections made conditioning frames (clearing the memories around them);
    frames read in the background, video and state kept in CPU memory; then reset."""
    options = {"clear_non_cond_mem_around_input": True, "add_all_frames_to_correct_as_cond": True}
    meta = meta_video_predictor("sam2_hiera_t", SESSION_SIZE)
    for name, value in options.items():
        setattr(meta, name, value)
    # Meta's 1.1.0 calls this method without defining it; the definition of Meta's later
    # releases (clear the object's tracked memories within num_maskmem frames):
    meta._clear_obj_non_cond_mem_around_input = types.MethodType(_meta_clear_around, meta)
    ours = Sam2VideoPredictor(segany_model(meta, "sam2_hiera_t"), precision="fp32", **options)
    session = Session(meta, ours)
    session.start(
        video, offload_video_to_cpu=True, offload_state_to_cpu=True, async_loading_frames=True
    )
    # Masks kept from overlapping on prompted frames, where the objects' logits differ: on
    # tracked frames the random models' objects agree to 1e-6, and which wins a pixel
    # would be a rounding.
    session.set_option("non_overlap_masks", True)
    disc = np.zeros(FRAME_SIZE, np.uint8)
    cv2.circle(disc, (30, 40), 15, 1, -1)
    session.call("add_new_mask", 0, "disc", disc)
    session.call(
        "add_new_points_or_box",
        0,
        "square",
        points=[[0.75, 0.4]],
        labels=[1],
        normalize_coords=False,
    )
    session.call("add_new_points_or_box", 5, "gone", points=[[10, 10]], labels=[1])
    session.call("remove_object", "gone")
    session.set_option("non_overlap_masks", False)
    assert session.propagate() == list(range(FRAME_COUNT))
    session.call("add_new_points_or_box", 4, "disc", points=[[62, 48], [20, 80]], labels=[1, 0])
    session.call("add_new_points_or_box", 7, "square", box=[75, 18, 105, 52])
    session.propagate()
    session.call("clear_all_prompts_in_frame", 4, "disc")
    assert session.propagate(start_frame_idx=3, max_frame_num_to_track=4) == [3, 4, 5, 6, 7]
    scores = object_scores(session.state)
    assert min(scores) < -1 and max(scores) > 1 and min(map(abs, scores)) > 0.1
    assert session.state["storage_device"] == torch.device("cpu")

    session.call("reset_state")
    assert session.state["obj_ids"] == [] and not session.state["output_dict_per_obj"]
    with pytest.raises(VideoStateError, match="no object has a prompt"):
        next(session.ours.propagate_in_video(session.state))
    session.call("add_new_points_or_box", 1, 9, box=[20, 25, 50, 60])
    assert session.propagate(reverse=True) == [1, 0]
    print(f"SAM 2.0 session: {session.compared} masks, max |difference| {session.worst:.1e}")


def _meta_clear_around(self: SAM2VideoPredictor, state: dict, frame_idx: int, obj_idx: int):
    reach = self.memory_temporal_stride_for_eval * self.num_maskmem
    tracked = state["output_dict_per_obj"][obj_idx]["non_cond_frame_outputs"]
    for t in range(frame_idx - reach, frame_idx + reach + 1):
        tracked.pop(t, None)


# -- one tracking step at the real size ------------------------------------------------


def test_tracking_step_at_full_size() -> None:
    """SAM 2.1 at 1024 px on given features (the encoder is tested elsewhere): a first
    click's frame with its memory, a mask prompt's frame, and a tracked frame with a
    prompted frame's memory and two pointers, against Meta's ``track_step``."""
    meta = meta_video_predictor("sam2.1_hiera_t")
    model = segany_model(meta, "sam2.1_hiera_t")
    generator = torch.Generator().manual_seed(3)
    grid = model.config.embedding_size
    features = torch.randn(1, 256, grid, grid, generator=generator)
    high_res = [
        torch.randn(1, 32, 4 * grid, 4 * grid, generator=generator),
        torch.randn(1, 64, 2 * grid, 2 * grid, generator=generator),
    ]
    frame = tracking.frame_features(features, high_res)
    meta_frame = _meta_features(meta, features, high_res)
    size = model.image_size
    click = {
        "point_coords": torch.tensor([[[400.0, 300.0]]]),
        "point_labels": torch.tensor([[1]], dtype=torch.int32),
    }
    mask = torch.zeros(1, 1, size, size)
    mask[..., 200:600, 300:700] = 1

    with torch.inference_mode():
        first = meta.track_step(0, True, *meta_frame, click, None, {}, 20, run_mem_encoder=True)
        heads = tracking.track_frame(
            model, frame, True, points=(click["point_coords"], click["point_labels"])
        )
        memory = tracking.encode_memory(
            model, features, heads.high_res_masks, heads.object_score_logits, prompted=True
        )
        _assert_step(heads, memory.features, first, "first click")

        masked = meta.track_step(7, True, *meta_frame, None, mask, {}, 20, run_mem_encoder=False)
        _assert_step(
            tracking.track_frame(model, frame, True, mask_inputs=mask), None, masked, "mask"
        )

        # Frame 9 tracked forward, frame 0 prompted, frame 2 tracked: too far back for its
        # memory (6 frames), not for its pointer (15). (The sessions check the memory
        # bank's other cases at 128 px; each memory frame here costs seconds.)
        meta_bank = {
            "cond_frame_outputs": {0: first},
            "non_cond_frame_outputs": {2: _random_output(generator, grid)},
        }
        tracked = meta.track_step(9, False, *meta_frame, None, None, meta_bank, 20)
        cond = meta_bank["cond_frame_outputs"]
        recent = meta_bank["non_cond_frame_outputs"]
        memories = [
            tracking.MemoryFrame(out["maskmem_features"], out["maskmem_pos_enc"][-1], t_pos)
            for t_pos, out in tracking.select_memory_frames(9, cond, recent, 7)
        ]
        pointers = [
            tracking.ObjectPointer(offset, out["obj_ptr"])
            for offset, out in tracking.select_pointers(model, 9, cond, recent, 20)
        ]
        assert [m.t_pos for m in memories] == [0]
        assert [p.offset for p in pointers] == [9, 7]
        heads = tracking.track_frame(model, frame, False, memories, pointers, num_frames=20)
        memory = tracking.encode_memory(
            model, features, heads.high_res_masks, heads.object_score_logits
        )
        _assert_step(heads, memory.features, tracked, "tracked")


def _meta_features(
    meta: SAM2Base, features: torch.Tensor, high_res: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
    """Meta's track_step inputs for one frame: (HW, B, C) features, positions, sizes."""
    levels = [*high_res, features]
    positions = [meta.image_encoder.neck.position_encoding(level) for level in levels]
    flat = [level.flatten(2).permute(2, 0, 1) for level in levels]
    flat_positions = [p.flatten(2).permute(2, 0, 1) for p in positions]
    return flat, flat_positions, [tuple(level.shape[-2:]) for level in levels]


def _random_output(generator: torch.Generator, grid: int) -> dict[str, Any]:
    """A memory-bank entry as Meta's predictor keeps one (bfloat16 memory)."""
    memory = torch.randn(1, 64, grid, grid, generator=generator).to(torch.bfloat16)
    position = torch.randn(1, 64, grid, grid, generator=generator)
    pointer = torch.randn(1, 256, generator=generator)
    return {"maskmem_features": memory, "maskmem_pos_enc": [position], "obj_ptr": pointer}


def _assert_step(
    heads: tracking.HeadsOutput, memory: torch.Tensor | None, expected: dict, what: str
) -> None:
    pairs = {
        "pred_masks": heads.low_res_masks,
        "pred_masks_high_res": heads.high_res_masks,
        "obj_ptr": heads.obj_ptr,
        "object_score_logits": heads.object_score_logits,
    }
    if memory is not None:
        pairs["maskmem_features"] = memory
    for key, got in pairs.items():
        assert got.shape == expected[key].shape, f"{what} {key}"
        difference = float((got - expected[key]).abs().max())
        assert difference <= TOLERANCE, f"{what} {key}: max |difference| {difference:.2e}"


# -- frames ----------------------------------------------------------------------------


@pytest.mark.parametrize("async_loading", [False, True], ids=["at once", "in the background"])
def test_jpeg_frames_match_meta_loader(video: Path, async_loading: bool) -> None:
    """A JPEG folder: the frames in the order of their numbers, prepared exactly as
    Meta's ``load_video_frames``; height and width of the original frames."""
    expected, height, width = meta_misc.load_video_frames(
        str(video), SESSION_SIZE, False, compute_device=torch.device("cpu")
    )
    frames, got_height, got_width = load_video_frames(
        video, SESSION_SIZE, async_loading_frames=async_loading
    )
    assert (got_height, got_width) == (height, width) == FRAME_SIZE
    assert len(frames) == FRAME_COUNT
    got = torch.stack([frames[i] for i in range(len(frames))])
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_video_file_frames_are_opencv_decodes(tmp_path: Path) -> None:
    """A video file: each frame as OpenCV decodes it, prepared as Meta prepares a JPEG
    frame (its loader run on the decoded frame, saved losslessly)."""
    path = tmp_path / "clip.mp4"
    height, width = FRAME_SIZE
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (width, height))
    for frame in synthetic_frames(4, seed=1):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    capture = cv2.VideoCapture(str(path))
    decoded = []
    while (read := capture.read())[0]:
        decoded.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(decoded) == 4

    frames, got_height, got_width = load_video_frames(path, SESSION_SIZE)
    assert (got_height, got_width) == FRAME_SIZE and len(frames) == 4
    assert all(frame.shape == (3, SESSION_SIZE, SESSION_SIZE) for frame in frames)
    for index, (frame, rgb) in enumerate(zip(frames, decoded, strict=True)):
        png = tmp_path / f"{index}.png"
        Image.fromarray(rgb).save(png)
        pixels, _, _ = meta_misc._load_img_as_tensor(str(png), SESSION_SIZE)
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        assert torch.equal(frame, (pixels.float() - mean) / std)
    assert [f.shape for f in read_frames(path)] == [(height, width, 3)] * 4
    assert np.array_equal(next(read_frames(path)), decoded[0])


def test_preprocess_frame_is_meta_preprocessing(video: Path) -> None:
    """One frame prepared alone is the loader's frame (the track command reuses it)."""
    expected, _, _ = meta_misc.load_video_frames(
        str(video), SESSION_SIZE, False, compute_device=torch.device("cpu")
    )
    image = Image.open(video / f"{FRAME_NAME_STEP * 3}.jpg")
    assert torch.equal(preprocess_frame(image, SESSION_SIZE), expected[3])


# -- hole filling ----------------------------------------------------------------------


def test_fill_holes_hand_computed() -> None:
    """Background regions (logits <= 0) of at most ``max_area`` pixels, 8-connected,
    become 0.1, enclosed or not; larger ones and the foreground stay. Worked out by hand
    on a 12 x 12 mask."""
    logits = torch.full((1, 1, 12, 12), 5.0)
    logits[..., 1:3, 1:5] = -1.0  # a hole of 8 pixels: the largest filled
    logits[..., 5:8, 5:8] = -2.0  # a hole of 9 pixels
    logits[..., 0, 10:12] = 0.0  # 2 pixels at the border, logit 0 (background)
    zigzag = [(9 + c % 2, c) for c in range(9)]  # 9 pixels, each touching the next by a corner
    for row, column in zigzag:
        logits[..., row, column] = -3.0
    everywhere = torch.full((1, 1, 12, 12), -4.0)  # one region of 144 pixels

    expected = logits.clone()
    expected[..., 1:3, 1:5] = 0.1
    expected[..., 0, 10:12] = 0.1
    got = fill_holes_in_mask_scores(torch.cat([logits, everywhere]), 8)
    assert torch.equal(got, torch.cat([expected, everywhere]))  # the zigzag is one region
    expected[..., 1:3, 1:5] = -1.0  # 8 > 3
    assert torch.equal(fill_holes_in_mask_scores(logits, 3), expected)
    assert torch.equal(fill_holes_in_mask_scores(logits, 9), torch.where(logits <= 0, 0.1, logits))


# -- errors ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pair() -> tuple[SAM2VideoPredictor, Sam2]:
    meta = meta_video_predictor("sam2_hiera_t", SESSION_SIZE)
    return meta, segany_model(meta, "sam2_hiera_t")


@pytest.fixture(scope="module")
def small_predictor(small_pair: tuple[SAM2VideoPredictor, Sam2]) -> Sam2VideoPredictor:
    return Sam2VideoPredictor(small_pair[1], precision="fp32")


def test_bf16_tracks_like_meta_fp32(small_pair: tuple[SAM2VideoPredictor, Sam2], video: Path):
    """In bf16 (encoder as the image predictor runs it, tracking under autocast) the
    masks overlap Meta's fp32 masks (IoU > 0.95), objects present on the same frames."""
    meta, model = small_pair
    ours = Sam2VideoPredictor(model, precision="bf16")
    masks = []
    for predictor in (meta, ours):
        state = predictor.init_state(str(video))
        predictor.add_new_points_or_box(state, 2, 1, points=[[50, 44]], labels=[1])
        predictor.add_new_points_or_box(state, 2, 2, box=[105, 18, 135, 52])
        masks.append([frame_masks > 0 for _, _, frame_masks in predictor.propagate_in_video(state)])
    for expected, got in zip(*masks, strict=True):
        assert got.dtype == torch.bool and got.shape == expected.shape
        union = (expected | got).flatten(1).sum(1)
        overlap = (expected & got).flatten(1).sum(1) / union.clamp(min=1)
        assert torch.all(torch.where(union > 0, overlap, 1.0) > 0.95), overlap


def test_bad_input_is_a_one_line_error(
    small_predictor: Sam2VideoPredictor, video: Path, tmp_path: Path
) -> None:
    predictor = small_predictor
    with pytest.raises(SeganyError, match="video not found"):
        predictor.init_state(tmp_path / "missing.mp4")
    with pytest.raises(SeganyError, match="no JPEG frames"):
        predictor.init_state(tmp_path)
    (tmp_path / "cover.jpg").write_bytes((video / "0.jpg").read_bytes())
    with pytest.raises(SeganyError, match=r"'cover.jpg' .* not named by its frame number"):
        predictor.init_state(tmp_path)
    not_video = tmp_path / "clip.mp4"
    not_video.write_text("not a video")
    with pytest.raises(SeganyError, match="OpenCV cannot open"):
        predictor.init_state(not_video)

    state = predictor.init_state(video)
    add = predictor.add_new_points_or_box
    errors: list[tuple[Callable[[], Any], str]] = [
        (lambda: add(state, FRAME_COUNT, 1, points=[[5, 5]], labels=[1]), "out of range"),
        (lambda: add(state, -1, 1, points=[[5, 5]], labels=[1]), "out of range"),
        (lambda: add(state, 0, 1, points=[[5, 5], [6, 6]], labels=[1]), "2 points but 1"),
        (lambda: add(state, 0, 1, points=[[5, 5, 1]], labels=[1]), "shape"),
        (lambda: add(state, 0, 1, points=[[5, 5]]), "together"),
        (lambda: add(state, 0, 1), "points .* or a box"),
        (lambda: add(state, 0, 1, points=[[500, 5]], labels=[1]), "outside the 160x96"),
        (
            lambda: add(state, 0, 1, points=[[0.5, 2]], labels=[1], normalize_coords=False),
            "fractions",
        ),
        (lambda: add(state, 0, 1, box=[5, 5, 20, 20], clear_old_points=False), "before any"),
        (lambda: add(state, 0, 1, box=[[5, 5, 20, 20]] * 2), "one XYXY box"),
        (lambda: predictor.add_new_mask(state, 0, 1, np.zeros((2, 4, 4))), "2-D"),
        (lambda: predictor.clear_all_prompts_in_frame(state, 0, 7), "unknown obj_id 7"),
        (lambda: predictor.remove_object(state, 7, strict=True), "unknown obj_id 7"),
        (lambda: next(predictor.propagate_in_video(state)), "no object has a prompt"),
    ]
    for call, message in errors:
        with pytest.raises(SeganyError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)
    assert predictor.remove_object(state, 7) == ([], [])  # not strict: nothing to do
    with pytest.raises(RuntimeError):  # what Meta raises, for code that catches it
        predictor.remove_object(state, 7, strict=True)
    predictor.add_new_points_or_box(state, 0, 1, points=[[5, 5]], labels=[1])
    with pytest.raises(SeganyError, match="start_frame_idx 12 is out of range"):
        next(predictor.propagate_in_video(state, start_frame_idx=12))


def test_tracking_before_the_first_prompt(small_predictor: Sam2VideoPredictor, video: Path):
    """Frames before an object's first prompt, tracked forward, see its memory but no
    object pointer (the prompt is ahead). Meta's 1.1.0 fails there on a CPU in fp32 (its
    bfloat16 memories, alone, reach float32 weights); segany reads memories in float32."""
    state = small_predictor.init_state(video)
    small_predictor.add_new_points_or_box(state, 3, 1, points=[[50, 44]], labels=[1])
    tracked = list(small_predictor.propagate_in_video(state, start_frame_idx=0))
    assert [frame for frame, _, _ in tracked] == list(range(FRAME_COUNT))
    assert all(torch.isfinite(masks).all() for _, _, masks in tracked)


def test_state_on_cpu_is_not_copied(small_predictor: Sam2VideoPredictor, video: Path) -> None:
    """Offloading to CPU memory on a CPU changes nothing: the video's frames are kept once,
    as their resized uint8 pixels (a quarter of Meta's float32 frames: N x S x S x 3 bytes
    in all), and the state stays on the one device."""
    state = small_predictor.init_state(video, offload_video_to_cpu=True, offload_state_to_cpu=True)
    frames = state["images"]
    kept = {
        frames.pixels(i).untyped_storage().data_ptr(): frames.pixels(i) for i in range(len(frames))
    }
    assert all(p.dtype == torch.uint8 and p.device.type == "cpu" for p in kept.values())
    assert sum(p.nbytes for p in kept.values()) == FRAME_COUNT * SESSION_SIZE**2 * 3
    assert state["storage_device"] == state["device"] == torch.device("cpu")


# -- configuration ---------------------------------------------------------------------

# The tracker's fields of Sam2Config; build_sam2_video_predictor also sets the first.
BUILDER_SETS = {"binarize_mask_from_pts_for_mem_enc": True}
TRACKER_FIELDS = (
    "sigmoid_scale_for_mem_enc",
    "sigmoid_bias_for_mem_enc",
    "binarize_mask_from_pts_for_mem_enc",
    "use_mask_input_as_output_without_sam",
    "multimask_output_in_sam",
    "multimask_output_for_tracking",
    "multimask_min_pt_num",
    "multimask_max_pt_num",
    "max_obj_ptrs_in_encoder",
    "add_tpos_enc_to_obj_ptrs",
    "use_signed_tpos_enc_to_obj_ptrs",
    "only_obj_ptrs_in_the_past_for_eval",
    "fixed_no_obj_ptr",
    "soft_no_obj_ptr",
)
# SAM2Base's options the tracker does not read: fixed at the default every model keeps.
FIXED_DEFAULTS = {
    "max_cond_frames_in_attn": -1,
    "memory_temporal_stride_for_eval": 1,
    "non_overlap_masks_for_mem_enc": False,
}


@pytest.mark.parametrize("name", sorted(SAM2_CONFIGS))
def test_tracker_options_match_meta_yaml(name: str) -> None:
    path = Path(sam2.__file__).parent / yaml_path(name)
    model = yaml.safe_load(path.read_text())["model"]
    defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(SAM2Base).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    given = {**defaults, **model, **BUILDER_SETS}
    config = SAM2_CONFIGS[name]
    for field in TRACKER_FIELDS:
        assert getattr(config, field) == given[field], field
    for key, value in FIXED_DEFAULTS.items():
        assert given[key] == value, key
    predictor_defaults = inspect.signature(SAM2VideoPredictor).parameters
    ours = inspect.signature(Sam2VideoPredictor).parameters
    for option in ("non_overlap_masks", "clear_non_cond_mem_around_input"):
        assert ours[option].default == predictor_defaults[option].default
    assert ours["fill_hole_area"].default == 8  # what the builder sets
