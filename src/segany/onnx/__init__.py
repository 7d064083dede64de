"""ONNX: export a model (``segany export``) and predict with ONNX Runtime alone.

* :mod:`.export` (PyTorch): :func:`~.export.export_onnx` writes an image encoder and the
  official decoder interface to a folder, for SAM and SAM 2 models (SAM 2's encoder also
  gives the decoder's high-resolution features);
* :mod:`.format` (no dependencies): the folder's layout, ``model.json`` (which records the
  model family and its preprocessing) and the decoder's inputs, shared by both sides;
* :mod:`.predictor` (NumPy and ONNX Runtime, no PyTorch): :class:`~.predictor.OnnxSamPredictor`,
  a :class:`segany.SamPredictor` (or, for a SAM 2 folder, a ``Sam2ImagePredictor``) over
  such a folder.

Names are imported on first use, so that ``segany.onnx.OnnxSamPredictor`` works where
PyTorch is not installed (``pip install segany[onnx]``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .export import export_onnx
    from .predictor import OnnxSamPredictor

# Public name -> the submodule that defines it.
_LAZY = {"OnnxSamPredictor": ".predictor", "export_onnx": ".export"}

__all__ = ["OnnxSamPredictor", "export_onnx"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
