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


class CompiledModule:
    """Calls a compiled ``module``, or ``module`` itself once compiling has failed.

    Args:
        module: the module to compile; it is left unchanged.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._compiled: Callable[..., torch.Tensor] | None = None
        try:
            self._compiled = torch.compile(module)
        except Exception as error:  # e.g. a Python version Dynamo does not support
            self._give_up(error)

    def _give_up(self, error: Exception) -> None:
        self._compiled = None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(
            f"torch.compile is not available here ({type(error).__name__}: {first_line}); "
            "running the image encoder without compiling",
            stacklevel=3,
        )

    @property
    def is_compiled(self) -> bool:
        """False once compilation has failed and calls run in eager mode."""
        return self._compiled is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(x)
            except Exception as error:  # the backend's compiler failed on first use
                self._give_up(error)
        return self.module(x)


def compiled(module: nn.Module) -> CompiledModule:
    """``module`` behind ``torch.compile``, falling back to eager mode with a warning."""
    return CompiledModule(module)
