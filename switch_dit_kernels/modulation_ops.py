"""Triton backend of the fused SMoE modulation: `switch_modulation_triton` and its forward/backward.

r = x * (1 + sum_j g[b, j] * (x[b] @ W[e_bj] + b[e_bj])) with the Triton kernels of
`kernels/switch_modulation.py` (forward) and `kernels/switch_modulation_bwd.py` (backward).
Training saves one x-sized activation (y) besides x, or none with ``recompute=True`` (the backward
then recomputes y: one more D x D GEMM); inference (no grad needed) stores nothing and never
synchronises with the host, so a sampling step can be captured in a CUDA graph. The autograd
formula and the torch.compile registration live in `ops.py` (``switch_dit::switch_modulation``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import reference


def modulation_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor, keep_y: bool):
    """(r [B, N, D], y [B, N, D] | None): y = x W~ + b~ is kept only when ``keep_y`` (training
    with x needing a gradient, without recompute)."""
    from .kernels.switch_modulation import switch_modulation_fwd
    r, y, _ = switch_modulation_fwd(x, weight, bias, topk_weights, topk_ids, store_y=keep_y)
    return r, y


def modulation_backward(grad_r: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, y: Optional[torch.Tensor], needs: Sequence[bool]):
    """(dx, dW, db, dg) of r = x * (1 + y), None where ``needs`` (x, weight, bias, topk_weights)
    says no. ``y`` is the forward's (contiguous), or None (recompute: one more forward GEMM); it
    is OVERWRITTEN with u = dR * x, the kernel's buffer (`ops` copies it when it must not be)."""
    from .kernels.switch_modulation import switch_modulation_fwd
    from .kernels.switch_modulation_bwd import switch_modulation_bwd
    need_x, need_w, need_b, need_g = needs
    need_params = need_w or need_b or need_g
    merged = None  # the recompute's (W~, b~) of a shared routing row: the backward reuses it
    if y is None and need_x:
        _, y, merged = switch_modulation_fwd(x, weight, bias, topk_weights, topk_ids,
                                             store_y=True)
    elif y is None:  # parameters only: a buffer for u = dR * x
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
    dx, dw, db, dg = switch_modulation_bwd(grad_r, x, weight, bias, topk_weights, topk_ids, y,
                                           merged=merged, need_dx=need_x,
                                           need_params=need_params)
    return (dx if need_x else None,
            dw if need_w else None,
            db if need_b and bias is not None else None,
            dg.to(topk_weights.dtype) if need_g else None)


def switch_modulation_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                             recompute: bool = False) -> torch.Tensor:
    """Fused SMoE modulation on the Triton kernels (arguments already checked by functional.py).

    Args:
        x: [B, N, D] float32/float16/bfloat16.  weight: [E, D, D] x's dtype.  bias: [E, D] or None.
        topk_weights: [B, k] or [1, k] (one routing shared by every sample), any float dtype (used in
            float32; its gradient comes back in its own dtype).  topk_ids: same shape, int32/int64.
        recompute: keep no y from forward to backward (see `functional.switch_modulation`).
    Returns:
        r: [B, N, D] in x's dtype. float64 inputs go to the reference (tl.dot has no fp64 path we
        test), and so do empty ones (a zero-size grid).
    """
    if x.dtype == torch.float64 or x.numel() == 0:
        return reference.switch_modulation(x, weight, bias, topk_weights, topk_ids)
    from .ops import switch_modulation_op
    return switch_modulation_op(x, weight, bias, topk_weights, topk_ids, "triton", recompute)
