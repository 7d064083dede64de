"""Optional ``torch.compile`` of the image encoder (``compile=True``, ``--compile``).

Compiling takes tens of seconds to minutes on the first call (and again for each new
batch size or precision), then runs the encoder as fused kernels. Where compilation is not
available (no C++ compiler for the inductor backend, an unsupported Python or platform),
the first call warns and the encoder runs in eager mode from then on, with the same
results. See benchmarks/bench_speed.py for what it gains on a given machine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

# Largest relative difference (norm of the difference over the norm of eager's output)
# between the compiled and the eager encoder: fp32 differs by summation order only,
# reduced precision by its rounding too.
AGREEMENT = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


class CompiledModule:
    """Calls a compiled ``module``, or ``module`` itself once compiling has failed.

    The first call for each input shape and number format (when the compiler makes new
    code) also runs ``module`` in eager mode and compares: code that computes something
    else (NaN from a miscompiled kernel, as PyTorch's inductor produced here with its
    kernels held to AVX2) is dropped with a warning, like a failed compilation.

    Args:
        module: the module to compile; it is left unchanged.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._checked: set[tuple] = set()
        try:
            self._compiled = torch.compile(module)
        except Exception as error:  # e.g. a Python version Dynamo does not support
            self._give_up(f"torch.compile is not available here ({_one_line(error)})")

    def _give_up(self, why: str) -> None:
        self._compiled = None
        warnings.warn(f"{why}; running the image encoder without compiling", stacklevel=3)

    @property
    def is_compiled(self) -> bool:
        """False once compilation has failed and calls run in eager mode."""
        return self._compiled is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            try:
                out = self._compiled(x)
            except Exception as error:  # the backend's compiler failed on first use
                self._give_up(f"torch.compile is not available here ({_one_line(error)})")
            else:
                key = (
                    tuple(x.shape),
                    x.dtype,
                    torch.get_autocast_dtype(x.device.type)
                    if torch.is_autocast_enabled(x.device.type)
                    else None,
                )
                if key in self._checked:
                    return out
                eager = self.module(x)
                difference = _relative_difference(out, eager)
                if difference <= AGREEMENT.get(_dtype_of(eager), 5e-2):
                    self._checked.add(key)
                    return out
                self._give_up(
                    f"the compiled image encoder disagrees with eager mode on this machine "
                    f"(relative difference {difference:.3g})"
                )
                return eager
        return self.module(x)


def _one_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _tensors(out: object) -> list[torch.Tensor]:
    """The tensors of an output: a tensor, or (nested) tuples and lists of them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _dtype_of(out: object) -> torch.dtype:
    found = _tensors(out)
    return found[0].dtype if found else torch.float32


def _relative_difference(got: object, expected: object) -> float:
    """The largest over the output's tensors of |got - expected| / |expected| (norms);
    infinite where got is not finite."""
    worst = 0.0
    for a, b in zip(_tensors(got), _tensors(expected), strict=True):
        a, b = a.detach().float(), b.detach().float()
        if not torch.isfinite(a).all():
            return float("inf")
        worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-12)))
    return worst


def compiled(module: nn.Module) -> CompiledModule:
    """``module`` behind ``torch.compile``, falling back to eager mode with a warning."""
    return CompiledModule(module)
