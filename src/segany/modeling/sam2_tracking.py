"""SAM 2's tracking step: one frame, its memory bank and its prompts -> its mask, an object
pointer and (once the mask is final) a new memory.

The video model of the paper (section 4), as Meta's ``SAM2Base`` computes it for
inference (``sam2`` 1.1.0: ``track_step`` and the methods it calls), for one object (or a
batch of objects with the same memory):

1. **Memory-conditioned features** (:func:`condition_on_memory`). The frame's 1/16
   features attend (:mod:`.memory_attention`) to the memory bank: the encoded memories of
   the prompted ("conditioning") frames and of up to ``num_maskmem - 1`` frames just
   before this one in the tracking direction (:func:`select_memory_frames`), each with a
   learned temporal encoding ``maskmem_tpos_enc[num_maskmem - t_pos - 1]`` (t_pos 0 for a
   prompted frame, ``num_maskmem - 1`` for the previous frame) added to its sine position
   encoding; then the object pointers of up to ``max_obj_ptrs_in_encoder`` frames
   (:func:`select_pointers`), each C-wide pointer split into C / C_mem tokens after the
   memory frames' tokens, with a 1-D sine encoding of its frame distance (SAM 2.1:
   projected by ``obj_ptr_tpos_proj``) and no rotary encoding. A frame prompted before
   any tracking (an initial conditioning frame) has no memory: ``no_mem_embed`` is added
   to its features instead.
2. **The SAM heads** (:func:`sam_heads`): prompt encoder and mask decoder on those
   features, with the projected 1/4 and 1/8 levels; masks where the object score says
   "absent" become :data:`NO_OBJ_SCORE`; with several masks the best predicted IoU is
   kept; the object pointer is ``obj_ptr_proj`` of the chosen mask token, replaced by
   ``no_obj_ptr`` where the object is absent. A mask prompt skips the decoder's mask
   (:func:`mask_as_output`): the mask itself, as +-10 logits, is the output.
3. **A new memory** (:func:`encode_memory`): the frame's features and its full-size mask
   (the scaled sigmoid of its logits, or 0/1 on frames the user clicked) through the
   memory encoder, plus ``no_obj_embed_spatial`` where the object is absent (SAM 2.1).

Meta's options that no official model or builder changes are fixed here at their
defaults: every conditioning frame is attended to (``max_cond_frames_in_attn=-1``),
recent memories are consecutive frames (``memory_temporal_stride_for_eval=1``), masks are
not made non-overlapping before memory encoding (``non_overlap_masks_for_mem_enc``).

Everything here is a function of the model and tensors (the modules stay stateless);
which frames exist and what they hold is the caller's (the video predictor's) state.
Shapes: B objects (batch), C = ``embed_dim`` (256), C_mem = ``mem_dim`` (64), h x w the
1/16 grid (64 x 64 at 1024 px), S = ``image_size``. Point coordinates are pixels of the
S x S model input, (x, y); labels 1 foreground, 0 background, 2 and 3 a box's corners,
-1 padding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from .memory_encoder import MemoryEncoding
from .sam2 import Sam2
from .sam2_image_encoder import sine_position_encoding

# The mask logit of an object judged absent from a frame (Meta's placeholder score).
NO_OBJ_SCORE = -1024.0
# A mask prompt used as the output becomes logits of -10 (outside) and +10 (inside).
MASK_AS_LOGITS_SCALE, MASK_AS_LOGITS_BIAS = 20.0, -10.0

Entry = TypeVar("Entry")


class FrameFeatures(NamedTuple):
    """One frame through the image encoder, as the tracker reads it.

    Attributes:
        features: (B, C, h, w) the coarsest FPN level (without ``no_mem_embed``).
        pos_enc: (B, C, h, w) its sine position encoding.
        high_res: the 1/4 and 1/8 levels projected for the decoder, (B, C / 8, 4h, 4w)
            and (B, C / 4, 2h, 2w).
    """

    features: torch.Tensor
    pos_enc: torch.Tensor
    high_res: list[torch.Tensor]


class MemoryFrame(NamedTuple):
    """One memory of the bank: ``features`` and ``pos_enc`` (B, C_mem, h, w), as the
    memory encoder made them (the features may be stored in bfloat16, in CPU memory),
    and ``t_pos``: 0 for a prompted frame, ``num_maskmem - k`` for the frame k back."""

    features: torch.Tensor
    pos_enc: torch.Tensor
    t_pos: int


class ObjectPointer(NamedTuple):
    """A past frame's (B, C) object ``pointer`` and its frame distance ``offset``
    (signed by the tracking direction where the model says so)."""

    offset: int
    pointer: torch.Tensor


class HeadsOutput(NamedTuple):
    """What the SAM heads give for a frame (Meta's ``_forward_sam_heads`` tuple).

    Attributes:
        low_res_multimasks: (B, M, 4h, 4w) mask logits, M = 3 or 1.
        high_res_multimasks: (B, M, S, S) the same, upsampled.
        ious: (B, M) predicted IoU.
        low_res_masks, high_res_masks: (B, 1, 4h, 4w) and (B, 1, S, S): the mask kept
            (the best predicted IoU of M).
        obj_ptr: (B, C) the object pointer.
        object_score_logits: (B, 1), > 0 where the object is judged present.
    """

    low_res_multimasks: torch.Tensor
    high_res_multimasks: torch.Tensor
    ious: torch.Tensor
    low_res_masks: torch.Tensor
    high_res_masks: torch.Tensor
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor


def frame_features(features: torch.Tensor, high_res: list[torch.Tensor]) -> FrameFeatures:
    """:class:`FrameFeatures` of a frame's coarsest level (B, C, h, w) and its projected
    high-resolution levels (the position encoding depends only on the grid)."""
    return FrameFeatures(features, sine_position_encoding(features), high_res)


def encode_frame(model: Sam2, images: torch.Tensor) -> FrameFeatures:
    """Preprocessed (B, 3, S, S) frames through the image encoder (the plain modules;
    the video predictor runs the inference layer's encoder instead)."""
    fine, medium, coarse = model.image_encoder(images).backbone_fpn
    return frame_features(coarse, model.sam_mask_decoder.project_high_res([fine, medium]))


# -- the memory bank ----------------------------------------------------------------------


def select_memory_frames(
    frame_idx: int,
    cond_frames: Mapping[int, Entry],
    non_cond_frames: Mapping[int, Entry],
    num_maskmem: int,
    reverse: bool = False,
) -> list[tuple[int, Entry]]:
    """The memories frame ``frame_idx`` attends to, as (t_pos, entry) pairs: every
    prompted frame (t_pos 0, in the mapping's order), then the tracked frames 1 to
    ``num_maskmem - 1`` back in the tracking direction that have an entry (t_pos
    ``num_maskmem - k`` for k frames back; earliest first)."""
    step = 1 if reverse else -1
    chosen = [(0, entry) for entry in cond_frames.values()]
    for t_pos in range(1, num_maskmem):
        entry = non_cond_frames.get(frame_idx + step * (num_maskmem - t_pos))
        if entry is not None:
            chosen.append((t_pos, entry))
    return chosen


def select_pointers(
    model: Sam2,
    frame_idx: int,
    cond_frames: Mapping[int, Entry],
    non_cond_frames: Mapping[int, Entry],
    num_frames: int,
    reverse: bool = False,
) -> list[tuple[int, Entry]]:
    """The frames whose object pointers frame ``frame_idx`` attends to, as (offset,
    entry) pairs: the prompted frames (only those already passed in the tracking
    direction, with ``only_obj_ptrs_in_the_past_for_eval``; offset the frame distance,
    signed with ``use_signed_tpos_enc_to_obj_ptrs``), then the tracked frames 1, 2, ...
    back, within the video and fewer than :func:`max_pointers` back."""
    config = model.config
    sign = -1 if reverse else 1
    chosen = []
    for t, entry in cond_frames.items():
        if config.only_obj_ptrs_in_the_past_for_eval and (t - frame_idx) * sign > 0:
            continue  # a prompted frame still ahead in the tracking direction
        distance = frame_idx - t
        chosen.append(
            (distance * sign if config.use_signed_tpos_enc_to_obj_ptrs else abs(distance), entry)
        )
    for back in range(1, max_pointers(model, num_frames)):
        t = frame_idx - sign * back
        if not 0 <= t < num_frames:
            break
        entry = non_cond_frames.get(t)
        if entry is not None:
            chosen.append((back, entry))
    return chosen


def max_pointers(model: Sam2, num_frames: int) -> int:
    """How many frames' pointers a frame of a ``num_frames`` video may attend to; also
    the scale of their temporal encoding."""
    return min(num_frames, model.config.max_obj_ptrs_in_encoder)


def sine_encoding_1d(
    positions: torch.Tensor, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """(P,) positions -> (P, dim): sines of the first dim / 2 channels' frequencies, then
    cosines of the same (the Transformer paper's encoding; pairs of channels share one
    frequency, as Meta computes it)."""
    half = dim // 2
    index = torch.arange(half, dtype=torch.float32, device=positions.device)
    frequencies = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / half)
    angles = positions.unsqueeze(-1) / frequencies
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def pointer_position_encoding(model: Sam2, offsets: Sequence[int], num_frames: int) -> torch.Tensor:
    """(P, C_mem) temporal encodings of pointers ``offsets`` frames away: their sine
    encoding, the offsets scaled by the largest one possible, projected to C_mem (SAM
    2.1); zeros for a model without it (SAM 2.0)."""
    config, device = model.config, model.device
    if not config.add_tpos_enc_to_obj_ptrs:
        return torch.zeros(len(offsets), config.mem_dim, device=device)
    # One frame: every offset is 0, and Meta's 0 / 0 would be NaN.
    largest = max(max_pointers(model, num_frames) - 1, 1)
    positions = torch.tensor(offsets, device=device) / largest
    width = config.embed_dim if config.proj_tpos_enc_in_obj_ptrs else config.mem_dim
    encoding = sine_encoding_1d(positions, width)
    return model.obj_ptr_tpos_proj(encoding) if config.proj_tpos_enc_in_obj_ptrs else encoding


def memory_tokens(
    model: Sam2,
    memories: Sequence[MemoryFrame],
    pointers: Sequence[ObjectPointer],
    num_frames: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The memory attention's keys: the memory frames' tokens (each h * w, row-major),
    then the pointers' (each C / C_mem tokens), as (B, M, C_mem) tokens in ``dtype``, their
    (B, M, C_mem) position encodings, and the number of pointer tokens (not rotated)."""
    config, device = model.config, model.device
    tokens, positions = [], []
    for memory in memories:
        # Stored in bfloat16, maybe in CPU memory: read in the frame's dtype and device.
        features = memory.features.to(device=device, dtype=dtype)
        tokens.append(features.flatten(2).transpose(1, 2))
        temporal = model.maskmem_tpos_enc[config.num_maskmem - memory.t_pos - 1]
        positions.append(memory.pos_enc.flatten(2).transpose(1, 2) + temporal)
    num_pointer_tokens = 0
    if pointers:
        stacked = torch.stack([p.pointer for p in pointers], dim=1)  # (B, P, C)
        batch, count, dim = stacked.shape
        split = dim // config.mem_dim  # tokens per pointer
        tokens.append(stacked.to(dtype).reshape(batch, count * split, config.mem_dim))
        encoding = pointer_position_encoding(model, [p.offset for p in pointers], num_frames)
        encoding = encoding.repeat_interleave(split, dim=0)
        positions.append(encoding.unsqueeze(0).expand(batch, -1, -1))
        num_pointer_tokens = count * split
    return torch.cat(tokens, dim=1), torch.cat(positions, dim=1), num_pointer_tokens


def condition_on_memory(
    model: Sam2,
    frame: FrameFeatures,
    memories: Sequence[MemoryFrame],
    pointers: Sequence[ObjectPointer],
    num_frames: int,
    attention: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """The frame's (B, C, h, w) features conditioned on its memory bank (step 1 of the
    module docstring); ``num_frames`` (the video's) scales the pointers' encoding.
    ``attention``: what computes ``model.memory_attention`` (the default), for a caller
    with a faster form of it."""
    if not memories and not pointers:
        raise ValueError("a tracked frame needs memories or pointers (a prompted frame first)")
    batch, channels, height, width = frame.features.shape
    memory, memory_pos, num_pointer_tokens = memory_tokens(
        model, memories, pointers, num_frames, frame.features.dtype
    )
    attention = model.memory_attention if attention is None else attention
    conditioned = attention(
        curr=frame.features.flatten(2).transpose(1, 2),
        curr_pos=frame.pos_enc.flatten(2).transpose(1, 2),
        memory=memory,
        memory_pos=memory_pos,
        num_obj_ptr_tokens=num_pointer_tokens,
    )
    return conditioned.transpose(1, 2).reshape(batch, channels, height, width)


def without_memory(model: Sam2, frame: FrameFeatures) -> torch.Tensor:
    """An initial prompted frame's (B, C, h, w) features: ``no_mem_embed`` added (every
    official model's ``directly_add_no_mem_embed``; the image path's embedding)."""
    return frame.features + model.no_mem_embed.view(1, -1, 1, 1)


# -- the SAM heads ------------------------------------------------------------------------


def use_multimask(model: Sam2, is_init_cond_frame: bool, num_points: int) -> bool:
    """Whether the decoder gives three masks (the best kept): on a first-prompt frame, or
    any tracked frame with ``multimask_output_for_tracking``, for prompts of
    ``multimask_min_pt_num`` to ``multimask_max_pt_num`` points (tracking has 0)."""
    config = model.config
    return (
        config.multimask_output_in_sam
        and (is_init_cond_frame or config.multimask_output_for_tracking)
        and config.multimask_min_pt_num <= num_points <= config.multimask_max_pt_num
    )


def sam_heads(
    model: Sam2,
    features: torch.Tensor,
    high_res: list[torch.Tensor],
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask_inputs: torch.Tensor | None = None,
    multimask_output: bool = False,
) -> HeadsOutput:
    """The prompt encoder and mask decoder on (B, C, h, w) ``features`` (step 2).

    Args:
        high_res: the frame's projected 1/4 and 1/8 levels.
        points: (B, N, 2) coordinates in the S x S frame and (B, N) int labels; None: one
            padding point, as SAM 2 was trained.
        mask_inputs: (B, 1, H', W') mask logits or 0/1; resized (antialiased) to the
            prompt encoder's 4h x 4w unless already that size.
        multimask_output: three masks, of which the best predicted IoU is kept.
    """
    batch, device = features.shape[0], features.device
    if points is None:
        points = (
            torch.zeros(batch, 1, 2, device=device),
            -torch.ones(batch, 1, dtype=torch.int32, device=device),
        )
    prompt_encoder = model.sam_prompt_encoder
    if mask_inputs is not None and mask_inputs.shape[-2:] != prompt_encoder.mask_input_size:
        mask_inputs = F.interpolate(
            mask_inputs.float(),
            size=prompt_encoder.mask_input_size,
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    sparse, dense = prompt_encoder(points=points, boxes=None, masks=mask_inputs)
    decoded = model.sam_mask_decoder.decode(
        features,
        prompt_encoder.get_dense_pe(),
        sparse,
        dense,
        multimask_output,
        high_res_features=high_res,
    )
    low_res = decoded.masks
    present = _object_present(model, decoded.object_score_logits)
    if present is not None:
        # The mask of an absent object is empty everywhere, for the memory too.
        low_res = torch.where(present[:, :, None, None], low_res, NO_OBJ_SCORE)
    low_res = low_res.float()
    high_res_masks = _to_model_size(model, low_res)
    token, chosen_low, chosen_high = decoded.mask_tokens[:, 0], low_res, high_res_masks
    if multimask_output:
        rows = torch.arange(batch, device=device)
        best = decoded.iou_pred.argmax(dim=-1)
        chosen_low = low_res[rows, best].unsqueeze(1)
        chosen_high = high_res_masks[rows, best].unsqueeze(1)
        if decoded.mask_tokens.shape[1] > 1:
            token = decoded.mask_tokens[rows, best]
    presence = None if present is None else _presence_weight(model, decoded.object_score_logits)
    obj_ptr = _object_pointer(model, model.obj_ptr_proj(token), presence)
    return HeadsOutput(
        low_res,
        high_res_masks,
        decoded.iou_pred,
        chosen_low,
        chosen_high,
        obj_ptr,
        decoded.object_score_logits,
    )


def mask_as_output(model: Sam2, frame: FrameFeatures, mask_inputs: torch.Tensor) -> HeadsOutput:
    """A (B, 1, S, S) 0/1 mask prompt taken as the frame's mask: logits -10/+10, low-res
    by an antialiased resize; the pointer from the decoder given the mask (downsampled by
    ``mask_downsample``) on the frame's unconditioned features; the object present where
    the mask has a pixel (``use_mask_input_as_output_without_sam``)."""
    mask = mask_inputs.float()
    high_res_masks = mask * MASK_AS_LOGITS_SCALE + MASK_AS_LOGITS_BIAS
    low_res = F.interpolate(
        high_res_masks,
        size=(high_res_masks.shape[-2] // 4, high_res_masks.shape[-1] // 4),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    ious = mask.new_ones(mask.shape[0], 1)
    heads = sam_heads(
        model, frame.features, frame.high_res, mask_inputs=model.mask_downsample(mask)
    )
    present = (mask.flatten(1) > 0).any(dim=1, keepdim=True).float()
    scores = MASK_AS_LOGITS_SCALE * present + MASK_AS_LOGITS_BIAS
    obj_ptr = heads.obj_ptr
    if model.config.pred_obj_scores:
        obj_ptr = _object_pointer(model, obj_ptr, present)
    return HeadsOutput(low_res, high_res_masks, ious, low_res, high_res_masks, obj_ptr, scores)


def _object_present(model: Sam2, object_score_logits: torch.Tensor) -> torch.Tensor | None:
    """(B, 1) bool: the object is judged present; None for a model without object scores."""
    return object_score_logits > 0 if model.config.pred_obj_scores else None


def _presence_weight(model: Sam2, object_score_logits: torch.Tensor) -> torch.Tensor:
    """(B, 1) in [0, 1]: how much of the decoder's pointer to keep (1 present, 0 absent;
    the score's sigmoid with ``soft_no_obj_ptr``)."""
    if model.config.soft_no_obj_ptr:
        return object_score_logits.sigmoid()
    return (object_score_logits > 0).float()


def _object_pointer(
    model: Sam2, pointer: torch.Tensor, presence: torch.Tensor | None
) -> torch.Tensor:
    """The (B, C) pointer with ``no_obj_ptr`` mixed in where the object is absent."""
    if presence is None:
        return pointer
    if model.config.fixed_no_obj_ptr:
        pointer = presence * pointer
    return pointer + (1 - presence) * model.no_obj_ptr


def _to_model_size(model: Sam2, low_res: torch.Tensor) -> torch.Tensor:
    size = (model.image_size, model.image_size)
    return F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)


# -- one frame ----------------------------------------------------------------------------


def track_frame(
    model: Sam2,
    frame: FrameFeatures,
    is_init_cond_frame: bool,
    memories: Sequence[MemoryFrame] = (),
    pointers: Sequence[ObjectPointer] = (),
    num_frames: int = 1,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask_inputs: torch.Tensor | None = None,
    prev_mask_logits: torch.Tensor | None = None,
    attention: Callable[..., torch.Tensor] | None = None,
) -> HeadsOutput:
    """One frame's mask and object pointer (Meta's ``track_step`` without the memory
    encoder; see :func:`encode_memory`).

    Args:
        frame: the frame's features (batch B).
        is_init_cond_frame: prompted before it was ever tracked: no memory is read.
        memories, pointers, num_frames: the memory bank (:func:`select_memory_frames`,
            :func:`select_pointers`) and the video's length; unused on an initial frame.
        points: (B, N, 2) prompt points in the S x S frame and (B, N) labels, or None.
        mask_inputs: (B, 1, S, S) 0/1 mask prompt, or None (not with points).
        prev_mask_logits: (B, 1, 4h, 4w) the frame's earlier low-res logits, decoded
            with new ``points`` (a click refining a mask).
        attention: see :func:`condition_on_memory`.
    """
    if mask_inputs is not None and model.config.use_mask_input_as_output_without_sam:
        return mask_as_output(model, frame, mask_inputs)
    if is_init_cond_frame:
        features = without_memory(model, frame)
    else:
        features = condition_on_memory(model, frame, memories, pointers, num_frames, attention)
    if prev_mask_logits is not None:
        mask_inputs = prev_mask_logits
    num_points = 0 if points is None else points[1].shape[1]
    multimask = use_multimask(model, is_init_cond_frame, num_points)
    return sam_heads(model, features, frame.high_res, points, mask_inputs, multimask)


def encode_memory(
    model: Sam2,
    features: torch.Tensor,
    high_res_masks: torch.Tensor,
    object_score_logits: torch.Tensor,
    prompted: bool = False,
) -> MemoryEncoding:
    """A new memory (step 3) of a frame's (B, C, h, w) unconditioned features, its
    (B, 1, S, S) mask logits and (B, 1) object scores. On a frame the user ``prompted``,
    the mask enters as 0/1 (``binarize_mask_from_pts_for_mem_enc``: what the user saw),
    elsewhere as its sigmoid. Returns the (B, C_mem, h, w) features and position
    encoding."""
    config = model.config
    if prompted and config.binarize_mask_from_pts_for_mem_enc:
        mask = (high_res_masks > 0).float()
    else:
        mask = torch.sigmoid(high_res_masks)
    if config.sigmoid_scale_for_mem_enc != 1.0:
        mask = mask * config.sigmoid_scale_for_mem_enc
    if config.sigmoid_bias_for_mem_enc != 0.0:
        mask = mask + config.sigmoid_bias_for_mem_enc
    memory = model.memory_encoder(features, mask, skip_mask_sigmoid=True)
    if not config.no_obj_embed_spatial:
        return memory
    absent = 1 - (object_score_logits > 0).float()  # (B, 1)
    no_object = model.no_obj_embed_spatial.view(1, -1, 1, 1)
    return MemoryEncoding(memory.features + absent[:, :, None, None] * no_object, memory.pos_enc)
