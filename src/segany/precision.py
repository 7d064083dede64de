"""The old home of :mod:`segany.inference.precision` (issue #21), kept for user code."""

from .inference.precision import (
    PRECISIONS,
    Precision,
    cpu_has_native_bf16,
    cpu_name,
    default_precision,
    resolve_precision,
)

__all__ = [
    "PRECISIONS",
    "Precision",
    "cpu_has_native_bf16",
    "cpu_name",
    "default_precision",
    "resolve_precision",
]
