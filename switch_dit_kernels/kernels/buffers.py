"""Output allocation of the kernel launchers, with NaN poisoning for tests.

With ``POISON = True`` (tests set it; or SWITCH_DIT_POISON_OUTPUTS=1) every buffer a launcher
allocates is filled with NaN instead of left uninitialised, so a tile that a kernel forgets to write
shows up as NaN in the result instead of passing by luck with stale memory.
"""
from __future__ import annotations

import os

import torch

POISON = os.environ.get("SWITCH_DIT_POISON_OUTPUTS", "0") == "1"


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor when `POISON` is on (floating dtypes only)."""
    if POISON and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
