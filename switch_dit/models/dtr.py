"""DTR: DiT with the fixed timestep channel masks of Denoising Task Routing (Park et al., 2023).

Each timestep t owns a binary mask over the D hidden channels: a window of int(beta * D) ones whose
start is round((t / (T - 1)) ** alpha * (D - int(beta * D))), so neighbouring timesteps share most
channels and distant ones few (alpha = 4, beta = 0.8, as the official Switch-DiT configuration of
its DTR baseline). The mask is applied the way Switch-DiT applies m: r = x * mask_t feeds attention
and MLP, x is the skip (`DiTBlock.forward_routed`), i.e. the official ``h + (1 - mask) * x``.

Choice documented here: one mask table serves every block, as in the official DTR/Switch-DiT code
(each block's router is built with the same unit count, task count, alpha and beta, hence the same
table). The table is a non-persistent buffer, so DiT and DTR state dicts are interchangeable.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np
import torch
import torch.nn as nn

from .dit import DiT


def dtr_channel_masks(hidden_size: int, num_timesteps: int, alpha: float = 4.0,
                      beta: float = 0.8) -> torch.Tensor:
    """Sliding-window channel masks [num_timesteps, hidden_size] float32 (ones = active channels)."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")
    active = int(math.floor(hidden_size * beta + 1e-9))
    if active < 1:
        raise ValueError(f"beta * hidden_size must leave at least one active channel, got {beta!r}")
    # numpy's linspace and round-half-to-even, as the official table.
    start = np.round(np.linspace(0.0, 1.0, num_timesteps) ** alpha * (hidden_size - active))
    cols = np.arange(hidden_size)[None, :]
    start = start.astype(np.int64)[:, None]
    return torch.from_numpy(((cols >= start) & (cols < start + active)).astype(np.float32))


class DTR(DiT):
    """DiT + DTR masks. Args beyond `DiT`'s: num_timesteps (T, default 1000; t in [0, T)),
    dtr_alpha (4.0), dtr_beta (0.8)."""

    integer_timesteps = True

    def __init__(self, *, num_timesteps: int = 1000, dtr_alpha: float = 4.0, dtr_beta: float = 0.8,
                 **dit_kwargs: Any):
        if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        super().__init__(**dit_kwargs)
        self.num_timesteps, self.dtr_alpha, self.dtr_beta = num_timesteps, dtr_alpha, dtr_beta
        masks = dtr_channel_masks(self.hidden_size, num_timesteps, dtr_alpha, dtr_beta)
        # .to: follows a `with torch.device(...)` construction (numpy tensors start on the CPU)
        self.register_buffer("dtr_masks", masks.to(self.pos_embed.device), persistent=False)

    def _timestep_context(self, t: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        return self.t_embedder(t), self.dtr_masks[t].unsqueeze(1)      # [len(t), 1, D]

    def _run_block(self, index: int, block: nn.Module, x: torch.Tensor, c: torch.Tensor,
                   t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return block.forward_routed(x, x * mask.to(x.dtype), c)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_timesteps={self.num_timesteps}, "
                f"dtr_alpha={self.dtr_alpha}, dtr_beta={self.dtr_beta}")
