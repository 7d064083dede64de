"""Reading, converting and saving model weights.

Formats read: official SAM ``.pth`` state dicts, MobileSAM ``mobile_sam.pt``, Meta's
SAM 2 ``sam2*_hiera_*.pt``, Hugging Face ``transformers`` SAM and SAM 2 safetensors/bin
(keys converted), training checkpoints holding a ``model`` entry, and segany safetensors.
Pickles are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_path
from .errors import SeganyError
from .hf_sam2_names import convert_hf_sam2_state_dict, detect_sam2_model, is_hf_sam2_state_dict
from .modeling.sam2 import convert_official_state_dict as convert_official_sam2
from .modeling.sam2 import short_name

StateDict = dict[str, torch.Tensor]

# Hugging Face transformers SAM names -> official names, applied in order.
_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (
        r"^shared_image_embedding\.positional_embedding$",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    ),
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r".transformer.layers.\1.norm\2."),
    (r"\.transformer\.layer_norm_final_attn\.", ".transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
)
# Tensors that are copies of others or belong to heads SAM does not use.
_DROPPED = re.compile(
    r"(^prompt_encoder\.shared_embedding\.)|(^image_encoder\.(norm_head|head)\.)"
    r"|(\.attention_bias_idxs$)|(\.ab$)"
)
_KNOWN_VIT_SIZES = {(1280, 32): "vit_h", (1024, 24): "vit_l", (768, 12): "vit_b"}


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_raw(path: Path) -> Mapping[str, object]:
    if _is_safetensors(path):
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    return torch.load(path, map_location="cpu", weights_only=True)


# The last norm of the image encoder's neck, where a training run's embedding scale folds in.
NECK_NORM_KEYS = ("image_encoder.neck.3.weight", "image_encoder.neck.3.bias")


def _unwrap(obj: object) -> Mapping[str, object]:
    """Training checkpoints keep the weights under 'model' or 'state_dict'.

    A segany training checkpoint taken while the image embedding was scaled (see
    segany.train.warmup) records that ``embedding_scale``; it is folded in here, so the
    weights give the model as trained at that step.
    """
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                scale = obj.get("embedding_scale", 1.0)
                if isinstance(scale, float) and scale != 1.0:
                    state = {k: v * scale if k in NECK_NORM_KEYS else v for k, v in state.items()}
                return state
        return obj
    raise SeganyError("checkpoint does not hold a state dict")


def _hf_mlp_rename(key: str, depth: int = 3) -> str:
    """HF names an MLP's layers proj_in, layers.0 .. layers.(n-3), proj_out."""
    key = re.sub(r"\.proj_in\.", ".layers.0.", key)
    key = re.sub(r"\.proj_out\.", f".layers.{depth - 1}.", key)
    return key


def _convert_hf(state: StateDict) -> StateDict:
    converted: StateDict = {}
    for key, value in state.items():
        if key.startswith("prompt_encoder.shared_embedding."):
            continue
        if re.search(r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.\d+\.", key):
            key = re.sub(r"\.layers\.(\d+)\.", lambda m: f".layers.{int(m[1]) + 1}.", key)
        key = _hf_mlp_rename(key)
        for pattern, replacement in _HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


def convert_state_dict(state: Mapping[str, object]) -> StateDict:
    """Bring any supported key layout to segany's (= the official) names."""
    tensors: StateDict = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SeganyError(f"checkpoint entry {key!r} is not a tensor")
        tensors[key.removeprefix("module.")] = value
    # transformers names SAM 2's tensors under vision_encoder. too: before SAM's check.
    if is_hf_sam2_state_dict(tensors):
        tensors = convert_hf_sam2_state_dict(tensors)
    if is_sam2_state_dict(tensors):
        return convert_official_sam2(tensors)
    if any(k.startswith("vision_encoder.") for k in tensors):
        tensors = _convert_hf(tensors)
    return {k: v for k, v in tensors.items() if not _DROPPED.search(k)}


def is_sam2_state_dict(state: Mapping[str, object]) -> bool:
    """Whether ``state`` (Meta's or segany's names) is a SAM 2 model's."""
    return any(key.startswith("sam_mask_decoder.") for key in state)


def read_state_dict(path: str | Path) -> StateDict:
    """Read a checkpoint file into a state dict with segany's key names."""
    path = Path(path)
    if not path.is_file():
        raise SeganyError(f"checkpoint not found: {path}")
    try:
        raw = _read_raw(path)
    except Exception as error:  # torch and safetensors raise many types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SeganyError(f"cannot read checkpoint {path}: {reason}") from None
    return convert_state_dict(_unwrap(raw))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other formats)."""
    path = Path(path)
    if not path.is_file() or not _is_safetensors(path):
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def detect_model_type(state: Mapping[str, torch.Tensor]) -> str | None:
    """Registry name whose architecture matches ``state`` (None when none does)."""
    sam2_config = detect_sam2_model(state)
    if sam2_config is not None:
        return short_name(sam2_config)
    if any(k.startswith("image_encoder.layers.") for k in state):
        return "vit_t"
    if any(k.startswith("image_encoder.blocks.") and ".depthwise." in k for k in state):
        return "default"
    pos = state.get("image_encoder.pos_embed")
    if pos is None:
        return None
    depth = 1 + max(
        (int(m[1]) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))),
        default=-1,
    )
    return _KNOWN_VIT_SIZES.get((int(pos.shape[-1]), depth))


def _describe(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")
    return f"{len(keys)} {what} ({shown})"


# SAM 2's tensors that only video tracking uses: transformers' image-only Sam2Model files
# lack them.
_SAM2_VIDEO_ONLY = re.compile(
    r"^(memory_attention\.|memory_encoder\.|mask_downsample\.|obj_ptr_proj\.|obj_ptr_tpos_proj\."
    r"|no_mem_pos_enc$|maskmem_tpos_enc$|no_obj_ptr$|no_obj_embed_spatial$)"
)


def _with_untrained_video_part(
    model: nn.Module, state: Mapping[str, torch.Tensor], missing: list[str], source: str
) -> Mapping[str, torch.Tensor]:
    """An image-only SAM 2 file (every missing tensor video-only) fills the video part with
    ``model``'s own initial tensors, with a warning; anything else is returned as is."""
    if not missing or not is_sam2_state_dict(state):
        return state
    if not all(_SAM2_VIDEO_ONLY.match(key) for key in missing):
        return state
    warnings.warn(
        f"{source} holds SAM 2's image model only: images are fine, but video tracking "
        "would run on untrained memory weights (use Meta's checkpoint for video)",
        stacklevel=3,
    )
    own = model.state_dict()
    return {**{key: own[key] for key in missing}, **state}


def load_state_dict_into(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, model_name: str
) -> None:
    """Copy ``state`` into ``model``; any missing, extra or mis-shaped tensor is an error
    (but an image-only SAM 2 file loads with a warning: see :func:`_with_untrained_video_part`)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    state = _with_untrained_video_part(model, state, missing, source)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mis_shaped:
        problems = [
            _describe(items, what)
            for items, what in (
                (missing, "missing keys"),
                (unexpected, "unexpected keys"),
                (mis_shaped, "shape mismatches"),
            )
            if items
        ]
        guess = detect_model_type(state)
        hint = (
            f"it looks like a {guess!r} checkpoint: use --model {guess}"
            if guess and guess != model_name
            else "check that the checkpoint is a SAM model of this size"
        )
        raise SeganyError(
            f"checkpoint {source} does not fit model {model_name!r}: "
            + "; ".join(problems)
            + f"; {hint}"
        )
    model.load_state_dict(dict(state), strict=True)


def load_checkpoint(
    model: nn.Module, checkpoint: str | Path | Mapping[str, torch.Tensor], model_name: str
) -> None:
    """Load a checkpoint file or an already read state dict into ``model``."""
    if isinstance(checkpoint, Mapping):
        load_state_dict_into(model, convert_state_dict(checkpoint), "state dict", model_name)
    else:
        load_state_dict_into(model, read_state_dict(checkpoint), str(checkpoint), model_name)


def save_weights(
    model: nn.Module,
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save ``model``'s weights as safetensors, atomically.

    ``dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that type, half
    the file for shipping; loading casts them back to the model's type. Integer
    buffers (BatchNorm's step counters) keep theirs.
    """
    path = Path(path)
    tensors = {
        k: _stored(v.detach().cpu(), dtype).contiguous() for k, v in model.state_dict().items()
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "segany", **(metadata or {})})
    return path


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    if dtype == torch.float16 and tensor.abs().max() > torch.finfo(torch.float16).max:
        raise SeganyError("a weight is too large for fp16; store the model as fp32 or bf16")
    return tensor.to(dtype)
