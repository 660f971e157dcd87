"""Backend selection: which implementation ("torch", "triton", "cuda", "grouped_mm") serves a call.

Nothing here imports Triton or the CUDA extension at module import time, and nothing queries the GPU:
availability is probed lazily, on the first call that needs it.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "grouped_mm")


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the `triton` package can be found (checked once, without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Turn the user's ``backend`` argument into a concrete backend name.

    "auto" picks "triton" for CUDA tensors (and for any tensor under TRITON_INTERPRET=1) when Triton
    is installed, "torch" otherwise. An explicit "triton" without Triton raises, so a user who asked
    for the kernels never silently gets the slow path.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "auto":
        if triton_available() and (on_cuda or triton_interpreting()):
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' needs the `triton` package (pip install triton); "
                "use backend='torch' for the pure-PyTorch reference")
        if not on_cuda and not triton_interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                "imported to run the kernels on the CPU through the interpreter")
    return backend
