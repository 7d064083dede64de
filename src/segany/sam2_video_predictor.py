"""SAM 2 video prediction: prompt objects on some frames, then track them through the video.

:class:`Sam2VideoPredictor` is a drop-in for Meta's
``sam2.sam2_video_predictor.SAM2VideoPredictor`` (``sam2`` 1.1.0): the same methods,
arguments, return values and inference state (a plain dict with Meta's keys, so code that
reads it keeps working), plus segany's ``precision=`` and ``compile=``. The tracking
computation is :mod:`segany.modeling.sam2_tracking`; the image encoder and the memory
attention (the costliest part of a tracked frame,
:class:`~segany.inference.memory_attention.FastMemoryAttention`) run on the inference
layer (:class:`~segany.inference.model.InferenceModel`); frames are read by
:mod:`segany.video_frames` (JPEG folders as Meta reads them, and any video file OpenCV
decodes).

A session::

    state = predictor.init_state("video.mp4")   # or a folder of 0.jpg, 1.jpg, ...
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1,
                                    points=[[210, 350]], labels=[1])
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=2, box=[300, 0, 500, 400])
    for frame_idx, obj_ids, masks in predictor.propagate_in_video(state):
        ...  # masks: (objects, 1, H, W) float32 logits; > 0 is the object

Conventions: coordinates are pixels of the original frame, (x, y) (fractions 0-1 of its
width and height with ``normalize_coords=False``); boxes are XYXY; point label 1 =
foreground, 0 = background. Masks returned are logits at the video's size, one per object
in the order of ``obj_ids``; an object without output on a frame is -1024 there.

Where it differs from Meta's: every bad input is a one-line
:class:`~segany.errors.SeganyError`; ``fill_hole_area`` works everywhere (Meta's needs its
CUDA extension and is silently skipped without it); ``clear_non_cond_mem_around_input``
works (Meta's 1.1.0 calls a method it lacks); frames before an object's first prompt can
be tracked in float32 (Meta's 1.1.0 then mixes its bfloat16 memories with float32
weights); clearing prompts of an unknown object id raises instead of adding an empty
object; a video file is read with OpenCV (Meta's needs decord).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SeganyError
from .inference.model import InferenceModel
from .inference.precision import resolve_precision
from .inputs import ArrayLike
from .masks import remove_small_regions
from .modeling import sam2_tracking as tracking
from .modeling.sam2 import Sam2
from .modeling.sam2_tracking import NO_OBJ_SCORE, FrameFeatures, MemoryFrame, ObjectPointer
from .sam2_predictor import _with_box_corners, checked_prompts
from .video_frames import PathLike, load_video_frames

InferenceState = dict[str, Any]
FrameOutput = dict[str, Any]
VideoMasks = tuple[int, list[Any], torch.Tensor]

COND, NON_COND = "cond_frame_outputs", "non_cond_frame_outputs"
# Meta clamps the earlier logits fed back with a new click (rare numerical issues).
PREV_LOGITS_LIMIT = 32.0
# A filled hole becomes this logit: just inside the mask.
HOLE_FILL_LOGIT = 0.1
# Where two objects overlap, every one but the highest-scoring is pushed below this.
OVERLAP_LOGIT = -10.0


class VideoStateError(SeganyError, RuntimeError):
    """A call the inference state cannot answer (tracking before any prompt, an unknown
    object id): a :class:`SeganyError`, and the ``RuntimeError`` Meta's predictor raises."""


class Sam2VideoPredictor:
    """Tracks prompted objects through a video with SAM 2 (see the module docstring).

    Args:
        sam_model: the SAM 2 model (on the device to run on).
        fill_hole_area: background regions of a mask of at most this many low-res pixels
            (8-connected) become foreground (0: off); 8 as Meta's builder sets it.
        non_overlap_masks: at each pixel, only the highest-scoring object keeps a
            positive logit in the masks returned.
        clear_non_cond_mem_around_input: after a correction on a frame, forget the tracked
            (not prompted) memories within ``num_maskmem`` frames of it.
        add_all_frames_to_correct_as_cond: a correction on a tracked frame makes it a
            prompted (conditioning) frame, as a first prompt is.
        precision: ``auto`` (default), ``fp32``, ``bf16`` or ``fp16``; see
            :mod:`segany.inference.precision`. ``fp32`` gives Meta's numbers. Other
            modes run the encoder as there and the tracking under autocast (on a CPU
            in ``bf16``, the memory attention as a bfloat16 copy).
        compile: run the image encoder through ``torch.compile``.
    """

    def __init__(
        self,
        sam_model: Sam2,
        fill_hole_area: int = 8,
        non_overlap_masks: bool = False,
        clear_non_cond_mem_around_input: bool = False,
        add_all_frames_to_correct_as_cond: bool = False,
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        if not isinstance(sam_model, Sam2):
            raise SeganyError(
                f"Sam2VideoPredictor takes a SAM 2 model (Sam2), got {type(sam_model).__name__}"
            )
        if fill_hole_area < 0:
            raise SeganyError(f"fill_hole_area must be 0 (off) or more, got {fill_hole_area}")
        self.model = sam_model
        self.fill_hole_area = fill_hole_area
        self.non_overlap_masks = non_overlap_masks
        self.clear_non_cond_mem_around_input = clear_non_cond_mem_around_input
        self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond
        self.precision = resolve_precision(precision, sam_model.device, sam_model)
        self.inference = InferenceModel(sam_model, self.precision, compile)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def image_size(self) -> int:
        """Side S of the square model input (1024)."""
        return self.model.image_size

    # -- the state ---------------------------------------------------------------------

    def init_state(
        self,
        video_path: PathLike,
        offload_video_to_cpu: bool = False,
        offload_state_to_cpu: bool = False,
        async_loading_frames: bool = False,
    ) -> InferenceState:
        """Read a video and start a tracking session on it.

        Args:
            video_path: a folder of JPEG frames (``0.jpg``, ``1.jpg``, ...) or a video
                file (:mod:`segany.video_frames`).
            offload_video_to_cpu: keep the frames in CPU memory (GPU memory saved).
            offload_state_to_cpu: keep the memories and masks in CPU memory.
            async_loading_frames: read a JPEG folder's frames in the background.

        Returns:
            The inference state (Meta's dict) that every other method takes.
        """
        self.inference.refresh()  # prepare again if the weights changed since
        images, height, width = load_video_frames(
            video_path, self.image_size, offload_video_to_cpu, self.device, async_loading_frames
        )
        storage = torch.device("cpu") if offload_state_to_cpu else self.device
        state: InferenceState = {
            "images": images,
            "num_frames": len(images),
            "offload_video_to_cpu": offload_video_to_cpu,
            "offload_state_to_cpu": offload_state_to_cpu,
            "video_height": height,
            "video_width": width,
            "device": self.device,
            "storage_device": storage,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            # the features of the frame last encoded, for the next prompt on it
            "cached_features": {},
            # what is the same on every frame and object (the memory's position encoding)
            "constants": {},
            "obj_id_to_idx": {},
            "obj_idx_to_id": {},
            "obj_ids": [],
            # per object: {COND: {frame: output}, NON_COND: {frame: output}}
            "output_dict_per_obj": {},
            # outputs of prompts not yet tracked from (memory encoded when tracking starts)
            "temp_output_dict_per_obj": {},
            # per object: {frame: {"reverse": bool}} for the frames tracked
            "frames_tracked_per_obj": {},
        }
        with torch.inference_mode():
            self._frame_features(state, 0)  # the frame most likely prompted first
        return state

    @torch.inference_mode()
    def reset_state(self, inference_state: InferenceState) -> None:
        """Forget every object, prompt and tracking result (the frames stay)."""
        state = inference_state
        for key in (
            "obj_id_to_idx",
            "obj_idx_to_id",
            "point_inputs_per_obj",
            "mask_inputs_per_obj",
            "output_dict_per_obj",
            "temp_output_dict_per_obj",
            "frames_tracked_per_obj",
        ):
            state[key].clear()
        state["obj_ids"].clear()

    # -- prompts -----------------------------------------------------------------------

    @torch.inference_mode()
    def add_new_points_or_box(
        self,
        inference_state: InferenceState,
        frame_idx: int,
        obj_id: Any,
        points: ArrayLike | torch.Tensor | None = None,
        labels: ArrayLike | torch.Tensor | None = None,
        clear_old_points: bool = True,
        normalize_coords: bool = True,
        box: ArrayLike | torch.Tensor | None = None,
    ) -> VideoMasks:
        """Prompt object ``obj_id`` on frame ``frame_idx`` with clicks and/or a box.

        Args:
            points: (N, 2) or (1, N, 2) x, y in pixels of the frame (fractions 0-1 of its
                width and height with ``normalize_coords=False``).
            labels: (N,) or (1, N): 1 foreground, 0 background.
            clear_old_points: replace the object's clicks on this frame (else add to them).
            box: (4,) XYXY box; it goes before the clicks, so only with
                ``clear_old_points``.

        Returns:
            (frame_idx, obj_ids, masks): the (objects, 1, H, W) float32 mask logits of
            every object on this frame, in the order of ``obj_ids``.
        """
        state = inference_state
        self._check_frame(state, frame_idx)
        new_points = self._point_prompt(
            state, points, labels, box, clear_old_points, normalize_coords
        )
        obj_idx = self._obj_idx(state, obj_id)  # a new object only for a valid prompt
        point_inputs_per_frame = state["point_inputs_per_obj"][obj_idx]
        old = point_inputs_per_frame.get(frame_idx) if not clear_old_points else None
        if old is not None:
            new_points = {key: torch.cat([old[key], new_points[key]], dim=1) for key in new_points}
        point_inputs_per_frame[frame_idx] = new_points
        state["mask_inputs_per_obj"][obj_idx].pop(frame_idx, None)
        return self._prompt_frame(state, obj_idx, frame_idx, points=new_points)

    def add_new_points(self, *args: Any, **kwargs: Any) -> VideoMasks:
        """The old name of :meth:`add_new_points_or_box` (Meta keeps it too)."""
        return self.add_new_points_or_box(*args, **kwargs)

    @torch.inference_mode()
    def add_new_mask(
        self,
        inference_state: InferenceState,
        frame_idx: int,
        obj_id: Any,
        mask: ArrayLike | torch.Tensor,
    ) -> VideoMasks:
        """Prompt object ``obj_id`` on frame ``frame_idx`` with an (H, W) mask (any size;
        non-zero = the object), which becomes the object's mask there. Returns as
        :meth:`add_new_points_or_box`."""
        state = inference_state
        self._check_frame(state, frame_idx)
        mask_inputs = self._mask_prompt(state, mask)
        obj_idx = self._obj_idx(state, obj_id)
        state["mask_inputs_per_obj"][obj_idx][frame_idx] = mask_inputs
        state["point_inputs_per_obj"][obj_idx].pop(frame_idx, None)
        return self._prompt_frame(state, obj_idx, frame_idx, mask=mask_inputs)

    def _prompt_frame(
        self,
        state: InferenceState,
        obj_idx: int,
        frame_idx: int,
        points: dict[str, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> VideoMasks:
        """Decode an object's new prompt on a frame and keep the result until tracking.

        A frame never tracked for the object is decoded alone, as SAM decodes an image
        (an initial conditioning frame); a tracked one with its memory, a correction.
        """
        tracked = state["frames_tracked_per_obj"][obj_idx]
        is_init_cond_frame = frame_idx not in tracked
        reverse = False if is_init_cond_frame else tracked[frame_idx]["reverse"]
        is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
        key = COND if is_cond else NON_COND
        prev_logits = None
        if points is not None:
            previous = self._latest_output(state, obj_idx, frame_idx, key)
            if previous is not None and previous["pred_masks"] is not None:
                prev_logits = previous["pred_masks"].to(self.device)
                prev_logits = prev_logits.clamp(-PREV_LOGITS_LIMIT, PREV_LOGITS_LIMIT)
        output, _ = self._run_frame(
            state,
            obj_idx,
            frame_idx,
            is_init_cond_frame=is_init_cond_frame,
            points=points,
            mask=mask,
            reverse=reverse,
            # Memories are encoded when tracking starts, after every prompt is in.
            run_mem_encoder=False,
            prev_mask_logits=prev_logits,
        )
        state["temp_output_dict_per_obj"][obj_idx][key][frame_idx] = output
        return frame_idx, state["obj_ids"], self._frame_masks(state, frame_idx, is_cond)

    def _latest_output(
        self, state: InferenceState, obj_idx: int, frame_idx: int, key: str
    ) -> FrameOutput | None:
        """The object's most recent output on a frame: a prompt's not yet tracked from
        (under ``key``), else the tracked one."""
        output = state["temp_output_dict_per_obj"][obj_idx][key].get(frame_idx)
        outputs = state["output_dict_per_obj"][obj_idx]
        if output is None:
            output = outputs[COND].get(frame_idx)
        if output is None:
            output = outputs[NON_COND].get(frame_idx)
        return output

    @torch.inference_mode()
    def clear_all_prompts_in_frame(
        self,
        inference_state: InferenceState,
        frame_idx: int,
        obj_id: Any,
        need_output: bool = True,
    ) -> VideoMasks | None:
        """Remove object ``obj_id``'s clicks, box or mask on frame ``frame_idx``; its
        output there (if tracked) stays as a tracked frame's. Returns the frame's masks
        as :meth:`add_new_points_or_box` (None without ``need_output``)."""
        state = inference_state
        self._check_frame(state, frame_idx)
        obj_idx = self._known_obj_idx(state, obj_id)
        state["point_inputs_per_obj"][obj_idx].pop(frame_idx, None)
        state["mask_inputs_per_obj"][obj_idx].pop(frame_idx, None)
        temp = state["temp_output_dict_per_obj"]
        temp[obj_idx][COND].pop(frame_idx, None)
        temp[obj_idx][NON_COND].pop(frame_idx, None)
        outputs = state["output_dict_per_obj"][obj_idx]
        output = outputs[COND].pop(frame_idx, None)
        if output is not None:
            # Without its prompt the frame is a tracked frame like the others.
            outputs[NON_COND][frame_idx] = output
            state["frames_tracked_per_obj"][obj_idx].pop(frame_idx, None)
        if not need_output:
            return None
        return (
            frame_idx,
            state["obj_ids"],
            self._frame_masks(state, frame_idx, _any_cond(state, frame_idx)),
        )

    @torch.inference_mode()
    def remove_object(
        self,
        inference_state: InferenceState,
        obj_id: Any,
        strict: bool = False,
        need_output: bool = True,
    ) -> tuple[list[Any], list[tuple[int, torch.Tensor]]]:
        """Remove object ``obj_id`` and everything about it (an unknown id is ignored
        unless ``strict``).

        Returns:
            The object ids left, and (frame_idx, masks) for each frame the object was
            prompted on, with the others' masks there (with ``need_output``).
        """
        state = inference_state
        if obj_id not in state["obj_id_to_idx"]:
            if strict:
                self._known_obj_idx(state, obj_id)  # raises, naming the known ids
            return state["obj_ids"], []
        if len(state["obj_id_to_idx"]) == 1:
            self.reset_state(state)
            return state["obj_ids"], []
        removed = state["obj_id_to_idx"][obj_id]
        prompted = {*state["point_inputs_per_obj"][removed], *state["mask_inputs_per_obj"][removed]}
        for frame_idx in prompted:
            # Downgrades its prompted frames as clearing would, before the indices move.
            self.clear_all_prompts_in_frame(state, frame_idx, obj_id, need_output=False)
        _drop_object_index(state, removed)
        updated = []
        if need_output:
            for frame_idx in prompted:
                masks = self._frame_masks(state, frame_idx, _any_cond(state, frame_idx))
                updated.append((frame_idx, masks))
        return state["obj_ids"], updated

    # -- tracking ----------------------------------------------------------------------

    @torch.inference_mode()
    def propagate_in_video_preflight(self, inference_state: InferenceState) -> None:
        """Make the prompts' outputs part of the tracking: encode their memories (masks
        as the user saw them, 0/1) and move them into each object's outputs."""
        state = inference_state
        if not state["obj_ids"]:
            raise VideoStateError(
                "no object has a prompt yet; add points, a box or a mask before propagating"
            )
        for obj_idx, obj_id in enumerate(state["obj_ids"]):
            outputs = state["output_dict_per_obj"][obj_idx]
            temp = state["temp_output_dict_per_obj"][obj_idx]
            for key in (NON_COND, COND):
                for frame_idx, output in temp[key].items():
                    if output["maskmem_features"] is None:
                        self._encode_prompted_memory(state, frame_idx, output)
                    outputs[key][frame_idx] = output
                    if self.clear_non_cond_mem_around_input:
                        self._clear_memory_around(state, obj_idx, frame_idx)
                temp[key].clear()
            if not outputs[COND]:
                raise VideoStateError(
                    f"object {obj_id!r} has no prompt on any frame; add points, a box or a "
                    "mask to it, or remove it"
                )
            for frame_idx in outputs[COND]:
                outputs[NON_COND].pop(frame_idx, None)

    @torch.inference_mode()
    def propagate_in_video(
        self,
        inference_state: InferenceState,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
        reverse: bool = False,
    ) -> Iterator[VideoMasks]:
        """Track every object from ``start_frame_idx`` (default: the first prompted
        frame) forward (or backward with ``reverse``) through up to
        ``max_frame_num_to_track`` more frames (default: to the video's end).

        Yields:
            (frame_idx, obj_ids, masks) for each frame in order, masks as
            :meth:`add_new_points_or_box` returns them.
        """
        state = inference_state
        self.propagate_in_video_preflight(state)
        num_frames = state["num_frames"]
        if start_frame_idx is None:
            start_frame_idx = min(
                t for outputs in state["output_dict_per_obj"].values() for t in outputs[COND]
            )
        self._check_frame(state, start_frame_idx, "start_frame_idx")
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        obj_ids = state["obj_ids"]
        for frame_idx in _processing_order(
            start_frame_idx, max_frame_num_to_track, num_frames, reverse
        ):
            masks = [
                self._track(state, obj_idx, frame_idx, reverse) for obj_idx in range(len(obj_ids))
            ]
            yield frame_idx, obj_ids, self._video_masks(state, torch.cat(masks))

    def _track(
        self, state: InferenceState, obj_idx: int, frame_idx: int, reverse: bool
    ) -> torch.Tensor:
        """One object's (1, 1, 4h, 4w) mask logits on a frame it is tracked through."""
        outputs = state["output_dict_per_obj"][obj_idx]
        if frame_idx in outputs[COND]:  # a prompted frame keeps its prompt's output
            masks = outputs[COND][frame_idx]["pred_masks"].to(self.device)
            if self.clear_non_cond_mem_around_input:
                self._clear_memory_around(state, obj_idx, frame_idx)
        else:
            output, masks = self._run_frame(
                state,
                obj_idx,
                frame_idx,
                is_init_cond_frame=False,
                reverse=reverse,
                run_mem_encoder=True,
            )
            outputs[NON_COND][frame_idx] = output
        state["frames_tracked_per_obj"][obj_idx][frame_idx] = {"reverse": reverse}
        return masks

    def _clear_memory_around(self, state: InferenceState, obj_idx: int, frame_idx: int) -> None:
        """Forget the object's tracked memories within ``num_maskmem`` frames of a
        prompted one (they may hold what the prompt corrected)."""
        reach = self.model.config.num_maskmem
        tracked = state["output_dict_per_obj"][obj_idx][NON_COND]
        for t in range(frame_idx - reach, frame_idx + reach + 1):
            tracked.pop(t, None)

    # -- one frame ---------------------------------------------------------------------

    def _frame_features(self, state: InferenceState, frame_idx: int) -> FrameFeatures:
        """The frame through the image encoder (kept for the frame last asked for)."""
        cached = state["cached_features"].get(frame_idx)
        if cached is not None:
            return cached[1]
        image = state["images"][frame_idx].to(self.device).float().unsqueeze(0)
        features = tracking.frame_features(*self.inference.encode_frame(image))
        state["cached_features"] = {frame_idx: (image, features)}
        return features

    def _tracking_precision(self) -> torch.autocast:
        """The tracking step's autocast: none in fp32, else the decoder's dtype."""
        dtype = self.precision.decoder_dtype
        return torch.autocast(
            self.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False
        )

    def _run_frame(
        self,
        state: InferenceState,
        obj_idx: int,
        frame_idx: int,
        is_init_cond_frame: bool,
        points: dict[str, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        reverse: bool = False,
        run_mem_encoder: bool = False,
        prev_mask_logits: torch.Tensor | None = None,
    ) -> tuple[FrameOutput, torch.Tensor]:
        """One object on one frame (:func:`~segany.modeling.sam2_tracking.track_frame`),
        and its memory with ``run_mem_encoder``.

        Returns:
            The output kept in the state (Meta's compact dict: ``maskmem_features``
            bfloat16, ``maskmem_pos_enc``, ``pred_masks`` (1, 1, 4h, 4w) with small holes
            filled, ``obj_ptr`` (1, C), ``object_score_logits`` (1, 1)), and its
            ``pred_masks`` on the compute device.
        """
        frame = self._frame_features(state, frame_idx)
        memories, pointers = [], []
        if not is_init_cond_frame:
            memories, pointers = self._memory_bank(state, obj_idx, frame_idx, reverse)
        prompt = None if points is None else (points["point_coords"], points["point_labels"])
        with self._tracking_precision():
            heads = tracking.track_frame(
                self.model,
                frame,
                is_init_cond_frame,
                memories,
                pointers,
                state["num_frames"],
                prompt,
                mask,
                prev_mask_logits,
                attention=self.inference.memory_attention,
            )
            memory = None
            if run_mem_encoder:
                memory = tracking.encode_memory(
                    self.model,
                    frame.features,
                    heads.high_res_masks,
                    heads.object_score_logits,
                    prompted=points is not None,
                )
        masks = heads.low_res_masks
        if self.fill_hole_area > 0:
            masks = fill_holes_in_mask_scores(masks, self.fill_hole_area)
        output = {
            "maskmem_features": None,
            "maskmem_pos_enc": None,
            "pred_masks": masks.to(state["storage_device"]),
            "obj_ptr": heads.obj_ptr,
            "object_score_logits": heads.object_score_logits,
        }
        if memory is not None:
            self._keep_memory(state, output, memory.features, memory.pos_enc)
        return output, masks

    def _memory_bank(
        self, state: InferenceState, obj_idx: int, frame_idx: int, reverse: bool
    ) -> tuple[list[MemoryFrame], list[ObjectPointer]]:
        """The memories and object pointers of the object that the frame attends to."""
        outputs = state["output_dict_per_obj"][obj_idx]
        cond, tracked = outputs[COND], outputs[NON_COND]
        num_maskmem = self.model.config.num_maskmem
        memories = [
            MemoryFrame(output["maskmem_features"], output["maskmem_pos_enc"][-1], t_pos)
            for t_pos, output in tracking.select_memory_frames(
                frame_idx, cond, tracked, num_maskmem, reverse
            )
        ]
        pointers = [
            ObjectPointer(offset, output["obj_ptr"])
            for offset, output in tracking.select_pointers(
                self.model, frame_idx, cond, tracked, state["num_frames"], reverse
            )
        ]
        return memories, pointers

    def _encode_prompted_memory(
        self, state: InferenceState, frame_idx: int, output: FrameOutput
    ) -> None:
        """The memory of a prompt's output, from its kept low-res mask (0/1, as shown)."""
        frame = self._frame_features(state, frame_idx)
        size = (self.image_size, self.image_size)
        masks = F.interpolate(
            output["pred_masks"].to(self.device), size=size, mode="bilinear", align_corners=False
        )
        with self._tracking_precision():
            memory = tracking.encode_memory(
                self.model, frame.features, masks, output["object_score_logits"], prompted=True
            )
        self._keep_memory(state, output, memory.features, memory.pos_enc)

    def _keep_memory(
        self,
        state: InferenceState,
        output: FrameOutput,
        features: torch.Tensor,
        pos_enc: torch.Tensor,
    ) -> None:
        """Store a memory in an output as Meta does: the features in bfloat16 (half the
        memory; what the tracker then reads), the position encoding (the same for every
        frame and object) once per session."""
        output["maskmem_features"] = features.to(torch.bfloat16).to(state["storage_device"])
        constants = state["constants"]
        if "maskmem_pos_enc" not in constants:
            constants["maskmem_pos_enc"] = [pos_enc[0:1].clone()]
        batch = pos_enc.shape[0]
        output["maskmem_pos_enc"] = [
            x.expand(batch, -1, -1, -1) for x in constants["maskmem_pos_enc"]
        ]

    # -- masks at the video's size -----------------------------------------------------

    def _frame_masks(self, state: InferenceState, frame_idx: int, is_cond: bool) -> torch.Tensor:
        """Every object's latest mask logits on a frame, (objects, 1, H, W) at the video's
        size (NO_OBJ_SCORE for an object without output there)."""
        height, width = state["video_height"], state["video_width"]
        key = COND if is_cond else NON_COND
        masks = torch.full(
            (len(state["obj_ids"]), 1, height, width),
            NO_OBJ_SCORE,
            dtype=torch.float32,
            device=state["storage_device"],
        )
        for obj_idx in range(len(state["obj_ids"])):
            output = self._latest_output(state, obj_idx, frame_idx, key)
            if output is not None:
                masks[obj_idx : obj_idx + 1] = _resized(output["pred_masks"], (height, width))
        return self._video_masks(state, masks)

    def _video_masks(self, state: InferenceState, masks: torch.Tensor) -> torch.Tensor:
        """(objects, 1, h', w') logits -> (objects, 1, H, W) on the compute device, at the
        video's size, without overlaps with ``non_overlap_masks``."""
        masks = _resized(masks.to(self.device), (state["video_height"], state["video_width"]))
        return non_overlapping(masks) if self.non_overlap_masks else masks

    # -- checks and bookkeeping --------------------------------------------------------

    @staticmethod
    def _check_frame(state: InferenceState, frame_idx: int, name: str = "frame_idx") -> None:
        count = state["num_frames"]
        if isinstance(frame_idx, bool) or not isinstance(frame_idx, (int, np.integer)):
            raise SeganyError(f"{name} must be an integer, got {type(frame_idx).__name__}")
        if not 0 <= frame_idx < count:
            raise SeganyError(
                f"{name} {frame_idx} is out of range: the video has {count} frames "
                f"(0 to {count - 1})"
            )

    @staticmethod
    def _obj_idx(state: InferenceState, obj_id: Any) -> int:
        """The model-side index of ``obj_id``; a new object gets the next one."""
        obj_idx = state["obj_id_to_idx"].get(obj_id)
        if obj_idx is not None:
            return obj_idx
        obj_idx = len(state["obj_id_to_idx"])
        state["obj_id_to_idx"][obj_id] = obj_idx
        state["obj_idx_to_id"][obj_idx] = obj_id
        state["obj_ids"] = list(state["obj_id_to_idx"])
        state["point_inputs_per_obj"][obj_idx] = {}
        state["mask_inputs_per_obj"][obj_idx] = {}
        state["output_dict_per_obj"][obj_idx] = {COND: {}, NON_COND: {}}
        state["temp_output_dict_per_obj"][obj_idx] = {COND: {}, NON_COND: {}}
        state["frames_tracked_per_obj"][obj_idx] = {}
        return obj_idx

    @staticmethod
    def _known_obj_idx(state: InferenceState, obj_id: Any) -> int:
        obj_idx = state["obj_id_to_idx"].get(obj_id)
        if obj_idx is None:
            raise VideoStateError(
                f"unknown obj_id {obj_id!r}; the objects are {state['obj_ids']} "
                "(add a prompt to create one)"
            )
        return obj_idx

    def _point_prompt(
        self,
        state: InferenceState,
        points: ArrayLike | torch.Tensor | None,
        labels: ArrayLike | torch.Tensor | None,
        box: ArrayLike | torch.Tensor | None,
        clear_old_points: bool,
        normalize_coords: bool,
    ) -> dict[str, torch.Tensor]:
        """Clicks and a box, checked, as the model takes them: ``point_coords`` (1, N, 2)
        in the S x S frame (a box first, as its two corners) and int32 ``point_labels``
        (1, N) (a box's corners labelled 2 and 3)."""
        if points is None and box is None:
            raise SeganyError("give points (with labels) or a box")
        if box is not None and not clear_old_points:
            raise SeganyError(
                "a box must come before any clicks: add it with clear_old_points=True, "
                "then the clicks with clear_old_points=False"
            )
        size = (state["video_height"], state["video_width"])
        point_sets, boxes = checked_prompts(
            _array(points), _array(labels), _array(box), size, normalize_coords
        )
        if point_sets is not None and len(point_sets[0]) != 1:
            raise SeganyError(
                f"points are for one object: (N, 2) or (1, N, 2), got {point_sets[0].shape}"
            )
        if boxes is not None and len(boxes) != 1:
            raise SeganyError(f"box is one XYXY box for one object, (4,); got {boxes.shape}")
        coords = labels_t = corners = None
        if point_sets is not None:
            coords = self._to_model_frame(point_sets[0], size, normalize_coords)
            labels_t = torch.as_tensor(point_sets[1], dtype=torch.int32, device=self.device)
        if boxes is not None:
            corners = self._to_model_frame(boxes.reshape(-1, 2, 2), size, normalize_coords)
        prompt = _with_box_corners(coords, labels_t, corners)
        assert prompt is not None  # points or a box, checked above
        return {"point_coords": prompt[0], "point_labels": prompt[1].to(torch.int32)}

    def _to_model_frame(
        self, coords: np.ndarray, size: tuple[int, int], normalize: bool
    ) -> torch.Tensor:
        """x, y pixels of an (H, W) frame (fractions when not ``normalize``) -> pixels of
        the S x S model input (the frame was squashed: each axis scales on its own)."""
        points = torch.as_tensor(coords, dtype=torch.float32, device=self.device)
        if normalize:
            height, width = size
            points = points / torch.tensor([width, height], dtype=torch.float32, device=self.device)
        return points * self.image_size

    def _mask_prompt(self, state: InferenceState, mask: ArrayLike | torch.Tensor) -> torch.Tensor:
        """An (H, W) mask (non-zero = the object) -> (1, 1, S, S) 0/1 float32: resized
        (bilinear, antialiased) and thresholded at 0.5 where not S x S already."""
        array = np.asarray(_array(mask))
        if array.ndim != 2 or 0 in array.shape:
            raise SeganyError(f"mask must be a 2-D (H, W) array, got shape {array.shape}")
        mask_inputs = torch.as_tensor(array != 0, device=self.device)[None, None].float()
        size = (self.image_size, self.image_size)
        if tuple(array.shape) != size:
            mask_inputs = F.interpolate(
                mask_inputs, size=size, mode="bilinear", align_corners=False, antialias=True
            )
            mask_inputs = (mask_inputs >= 0.5).float()
        return mask_inputs


def fill_holes_in_mask_scores(masks: torch.Tensor, max_area: float) -> torch.Tensor:
    """Fill small holes: every background region (logits <= 0, 8-connected) of at most
    ``max_area`` pixels gets logit 0.1, just inside the mask, whether it is enclosed or
    not (Meta's rule, with OpenCV's connected components for its CUDA kernel).

    Args:
        masks: (N, 1, H, W) mask logits.
        max_area: the largest region filled, in pixels.
    """
    foreground = (masks > 0).cpu().numpy()
    holes = np.zeros_like(foreground)
    min_kept = math.floor(max_area) + 1  # regions of fewer pixels than this are filled
    for index, mask in enumerate(foreground[:, 0]):
        filled, changed = remove_small_regions(mask, min_kept, "holes")
        if changed:
            holes[index, 0] = filled & ~mask
    if not holes.any():
        return masks
    return torch.where(torch.from_numpy(holes).to(masks.device), HOLE_FILL_LOGIT, masks)


def non_overlapping(masks: torch.Tensor) -> torch.Tensor:
    """(objects, 1, H, W) logits with, at each pixel, every object but the highest
    scoring one lowered to at most -10 (outside its mask)."""
    if masks.shape[0] == 1:
        return masks
    best = masks.argmax(dim=0, keepdim=True)
    objects = torch.arange(masks.shape[0], device=masks.device)[:, None, None, None]
    return torch.where(best == objects, masks, masks.clamp(max=OVERLAP_LOGIT))


def _resized(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if masks.shape[-2:] == size:
        return masks
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)


def _processing_order(start: int, count: int, num_frames: int, reverse: bool) -> range:
    """The frames tracked, in order: ``start`` and up to ``count`` more, within the video
    (Meta's; backward from frame 0 is none)."""
    if reverse:
        end = max(start - count, 0)
        return range(start, end - 1, -1) if start > 0 else range(0)
    return range(start, min(start + count, num_frames - 1) + 1)


def _any_cond(state: InferenceState, frame_idx: int) -> bool:
    """Whether any object has a prompt on the frame not yet tracked from, as a
    conditioning frame."""
    return any(frame_idx in temp[COND] for temp in state["temp_output_dict_per_obj"].values())


def _drop_object_index(state: InferenceState, removed: int) -> None:
    """Remove object index ``removed`` from the state's mappings and per-object tables,
    the later objects moving down by one."""
    kept = [idx for idx in range(len(state["obj_ids"])) if idx != removed]
    new_ids = [state["obj_ids"][idx] for idx in kept]
    state["obj_id_to_idx"] = {obj_id: idx for idx, obj_id in enumerate(new_ids)}
    state["obj_idx_to_id"] = dict(enumerate(new_ids))
    state["obj_ids"] = new_ids
    for key in (
        "point_inputs_per_obj",
        "mask_inputs_per_obj",
        "output_dict_per_obj",
        "temp_output_dict_per_obj",
        "frames_tracked_per_obj",
    ):
        table = state[key]
        values = [table.pop(idx) for idx in range(len(kept) + 1)]
        table.update((new, values[old]) for new, old in enumerate(kept))


def _array(value: Any) -> Any:
    """A tensor as a NumPy array (the checks of :mod:`segany.inputs` take arrays)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value
