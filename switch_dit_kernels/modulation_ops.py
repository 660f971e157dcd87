"""Autograd of the fused SMoE modulation: `switch_modulation_triton` and its torch.autograd.Function.

r = x * (1 + sum_j g[b, j] * (x[b] @ W[e_bj] + b[e_bj])) with the Triton kernels of
`kernels/switch_modulation.py` (forward) and `kernels/switch_modulation_bwd.py` (backward).
Training saves one x-sized activation (y) besides x, or none with ``recompute=True`` (the backward
then recomputes y: one more D x D GEMM); inference (no grad needed) stores nothing and never
synchronises with the host, so a sampling step can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import reference


class SwitchModulationFunction(torch.autograd.Function):
    """Differentiable in x, weight, bias and topk_weights (not topk_ids); no double backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, topk_weights, topk_ids, recompute=False):
        from .kernels.switch_modulation import switch_modulation_fwd
        # y (one x-sized tensor) is only needed for dx = dR * (1 + y) + ...; with recompute the
        # backward computes it again instead of keeping it alive from forward to backward.
        r, y, merged = switch_modulation_fwd(x, weight, bias, topk_weights, topk_ids,
                                             store_y=ctx.needs_input_grad[0] and not recompute)
        ctx.save_for_backward(x, weight, bias, topk_weights, topk_ids)
        # y is an intermediate the backward overwrites in place (with u = dR * x): kept on ctx,
        # not in saved_tensors, and dropped after use; a second backward (retain_graph) recomputes.
        ctx.y = y
        ctx.merged = merged
        return r

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_r):
        from .kernels.switch_modulation import switch_modulation_fwd
        from .kernels.switch_modulation_bwd import switch_modulation_bwd
        x, weight, bias, topk_weights, topk_ids = ctx.saved_tensors
        need_x, need_w, need_b, need_g = ctx.needs_input_grad[:4]
        need_params = need_w or need_b or need_g
        y, ctx.y = ctx.y, None
        if y is None and need_x:  # recompute, or consumed by an earlier backward (retain_graph)
            _, y, _ = switch_modulation_fwd(x, weight, bias, topk_weights, topk_ids, store_y=True,
                                            merged=ctx.merged)
        elif y is None:  # parameters only: a buffer for u = dR * x
            y = torch.empty_like(x, memory_format=torch.contiguous_format)
        dx, dw, db, dg = switch_modulation_bwd(grad_r, x, weight, bias, topk_weights, topk_ids, y,
                                               merged=ctx.merged, need_dx=need_x,
                                               need_params=need_params)
        return (dx if need_x else None,
                dw if need_w else None,
                db if need_b else None,
                dg.to(topk_weights.dtype) if need_g else None,
                None, None)


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
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, topk_weights))
    if needs_grad:
        return SwitchModulationFunction.apply(x, weight, bias, topk_weights, topk_ids, recompute)
    from .kernels.switch_modulation import switch_modulation_fwd
    return switch_modulation_fwd(x, weight, bias, topk_weights, topk_ids)[0]
