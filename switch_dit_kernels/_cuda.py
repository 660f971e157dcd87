"""Loader of the optional compiled extension (csrc/): an availability flag, never a requirement.

The extension ``switch_dit_kernels._C`` is built by setup.py when nvcc is found (see its docstring
for the knobs). Nothing here runs at import time: the module is imported on the first call that
asks for it, and never queries the GPU.
"""
from __future__ import annotations

import functools
import importlib

BUILD_HINT = (
    "build it with nvcc on PATH: `pip install -e .` (or `python setup.py build_ext --inplace` in a "
    "checkout); SWITCH_DIT_BUILD_CUDA=1 makes a failed build an error instead of a warning, "
    "SWITCH_DIT_CUDA_ARCHS='90' picks the GPU architectures")


@functools.lru_cache(maxsize=None)
def load_extension():
    """The compiled module ``switch_dit_kernels._C`` or None when it was not built (imported lazily)."""
    try:
        return importlib.import_module("switch_dit_kernels._C")
    except ImportError:
        return None


def cuda_extension_available() -> bool:
    """True when the csrc extension was built and imports (does not query the GPU)."""
    return load_extension() is not None


def require_extension(what: str = "backend='cuda'"):
    """The compiled module, or a RuntimeError that says how to build it."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"{what} needs the compiled extension switch_dit_kernels._C, which is "
                           f"not built; {BUILD_HINT}")
    return ext
