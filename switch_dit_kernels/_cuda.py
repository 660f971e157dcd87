"""Loader of the optional compiled extension (csrc/): an availability flag, never a requirement."""
from __future__ import annotations

import functools
import importlib


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
