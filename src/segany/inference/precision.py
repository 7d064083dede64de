"""Inference precision: the one place that decides which dtype each part of SAM runs in.

Modes (``precision=`` on :class:`~segany.SamPredictor` and
:class:`~segany.SamAutomaticMaskGenerator`, ``--precision`` on the command line):

``fp32``
    Everything in float32: the official code's numbers (parity within 1e-4).
``bf16``
    The image encoder under bfloat16 autocast: matrix products and convolutions in
    bfloat16, while the transformer's residual stream and layer norms stay float32
    (autocast keeps a float32 input's dtype through additions and norms) and softmax
    accumulates in float32; on CPU its attention runs as explicit batched products in
    chunks of query rows (see ``image_encoder.rel_pos_attention``), the scores rounded to
    bfloat16 before the softmax. The mask decoder runs in bfloat16 too: on CUDA under
    autocast; on CPU as a bfloat16 copy of the decoder fed bfloat16 inputs (autocast's
    per-operation casts of the 4096 x 256 image side cost more there than the bfloat16
    products save), while the prompt encoder stays float32 so that point positions keep
    their precision. About 1% relative logit error, ~99% mask IoU with float32. Fast on
    CPUs with AVX512-BF16 or AMX and on Ampere or newer GPUs.
``fp16``
    CUDA only: encoder and decoder under float16 autocast. SAM ViT-H can overflow
    float16 in its largest activations, so an embedding that comes out non-finite is
    recomputed in bfloat16 (or float32 where bfloat16 is not supported), with a warning.
``auto`` (default)
    CUDA: ``bf16`` where supported, else ``fp16``. CPU: ``bf16`` when the CPU has native
    bfloat16 arithmetic (AVX512-BF16 or AMX), else ``fp32``. Always ``fp32`` for a model
    whose image encoder is marked ``reduced_precision_accurate = False``: the bundled
    default model's CNN loses ~8% of its embedding in bfloat16 (its trained depthwise and
    1x1 convolutions cancel large terms) and is fast in fp32.

Outputs (masks, scores, logits, embeddings returned to the user) are always float32.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SeganyError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# PyTorch's kernel levels (torch.backends.cpu.get_cpu_capability) below AVX-512.
_KERNELS_WITHOUT_BF16 = ("DEFAULT", "NO AVX", "AVX2")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX) and PyTorch's
    kernels may use it: where they are held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, this
    project's stand-in for an AVX2-only CPU) bfloat16 runs emulated, as there."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    if not (capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")):
        return False
    return torch.backends.cpu.get_cpu_capability() not in _KERNELS_WITHOUT_BF16


def cpu_name() -> str:
    """The processor's model name and whether it computes bfloat16 natively, for reports
    beside timings (e.g. "AMD EPYC, native bf16")."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                name,
            )
    except OSError:
        pass
    return f"{name}, {'native' if cpu_has_native_bf16() else 'no native'} bf16"


def default_precision(device: torch.device, model: nn.Module | None = None) -> str:
    """What ``auto`` means on ``device`` for ``model`` (see the module documentation)."""
    encoder = getattr(model, "image_encoder", None)
    if not getattr(encoder, "reduced_precision_accurate", True):
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


@dataclass(frozen=True)
class Precision:
    """A resolved precision mode for one device.

    Attributes:
        name: ``fp32``, ``bf16`` or ``fp16``.
        device_type: ``cpu`` or ``cuda``.
        encoder_dtype: autocast dtype of the image encoder (None: float32).
        decoder_dtype: autocast dtype of the prompt encoder and mask decoder (None: float32).
    """

    name: str
    device_type: str
    encoder_dtype: torch.dtype | None
    decoder_dtype: torch.dtype | None

    def _autocast(self, dtype: torch.dtype | None) -> torch.autocast:
        # No weight-cast cache: it would keep a bfloat16 copy of every weight for as long
        # as the context lasts (1.3 GB for ViT-H).
        return torch.autocast(
            self.device_type, dtype=dtype, enabled=dtype is not None, cache_enabled=False
        )

    @property
    def casts_decoder(self) -> bool:
        """Whether the mask decoder runs as a lower-precision copy instead of autocast."""
        return self.device_type == "cpu" and self.decoder_dtype is not None

    def decoder(self) -> torch.autocast:
        """Context manager for prompt encoding (and, with autocast, mask decoding)."""
        return self._autocast(None if self.casts_decoder else self.decoder_dtype)

    @property
    def decoder_input_dtype(self) -> torch.dtype:
        """The dtype of the tensors the mask decoder is fed (its cast copy's on CPU)."""
        return self.decoder_dtype if self.casts_decoder else torch.float32

    def decoder_input(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) image embeddings as the mask decoder reads them: in
        :attr:`decoder_input_dtype`, channels-last, so that the decoder's (B, h * w, C)
        tokens are a view. Worth keeping per image: it saves a cast and a transposing copy
        (about 1 ms each on a CPU core) on every decode."""
        return embeddings.to(self.decoder_input_dtype, memory_format=torch.channels_last)

    def encode(self, encoder: Callable[[torch.Tensor], Any], images: torch.Tensor) -> Any:
        """Run ``encoder`` on (B, 3, S, S) ``images``; returns its float32 embedding, or
        (embedding, [high-resolution features]) in float32 for an encoder that gives both.

        Under ``fp16`` a non-finite result (overflow) is recomputed in the fallback dtype.
        """
        with self._autocast(self.encoder_dtype):
            features = encoder(images)
        if self.encoder_dtype == torch.float16 and not all(
            torch.isfinite(t).all() for t in _tensors_of(features)
        ):
            fallback = torch.bfloat16 if _bf16_supported(self.device_type) else None
            warnings.warn(
                "the image embedding overflowed float16; recomputing it in "
                f"{'bfloat16' if fallback else 'float32'}",
                stacklevel=3,
            )
            with self._autocast(fallback):
                features = encoder(images)
        if isinstance(features, torch.Tensor):
            return features.float()
        embedding, high_res = features
        return embedding.float(), [f.float() for f in high_res]


def _tensors_of(features: Any) -> list[torch.Tensor]:
    """The tensors of an embedding or an (embedding, [high-resolution features]) pair."""
    if isinstance(features, torch.Tensor):
        return [features]
    return [features[0], *features[1]]


def cast_keeping_broadcast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, keeping broadcast (stride-0) dimensions broadcast: the
    no-mask prompt is one vector expanded over the grid, and a full-size copy of it would
    cost a pass over the grid."""
    if tensor.dtype == dtype or 0 not in tensor.stride():
        return tensor.to(dtype)
    base = tensor[tuple(slice(0, 1) if step == 0 else slice(None) for step in tensor.stride())]
    return base.to(dtype).expand_as(tensor)


def _bf16_supported(device_type: str) -> bool:
    return torch.cuda.is_bf16_supported() if device_type == "cuda" else True


def resolve_precision(
    precision: str | None, device: torch.device, model: nn.Module | None = None
) -> Precision:
    """A :class:`Precision` for the name ``precision`` (None means ``auto``) on ``device``,
    for ``model`` if given (``auto`` depends on it).

    Raises SeganyError for an unknown name or a mode the device cannot run.
    """
    name = "auto" if precision is None else precision
    if name not in PRECISIONS:
        raise SeganyError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")
    if name == "auto":
        name = default_precision(device, model)
    if name == "fp16" and device.type != "cuda":
        raise SeganyError("precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SeganyError("this GPU has no bfloat16 support; use precision fp16 or fp32")
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "this CPU has no native bfloat16 (AVX512-BF16 or AMX): bf16 is emulated and "
            "likely slower than fp32",
            stacklevel=2,
        )
    dtype = _DTYPES[name]
    return Precision(name, device.type, dtype, dtype)
