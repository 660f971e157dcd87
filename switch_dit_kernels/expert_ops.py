"""Triton backend of expert_linear / expert_mlp: forward and backward over the grouped-GEMM kernels.

Forward (per layer): one grouped GEMM over the R*k*N expert-sorted rows, reading x through the
sorted index (no permuted copy), bias and activation in the epilogue, writing the *unweighted*
expert output h in sorted order; then a deterministic combine y[t] = sum_j g_j h[...] (float32).
Backward: d(topk_weights) = row dots <dY, h>; dX = grouped GEMM of g*dY (gathered) with W^T, its
k sorted rows per token combined (k = 1: scattered straight to dX by the GEMM); dW, db = per-expert
reductions over the expert's rows (no atomics). The MLP's activation backward is fused into the
epilogue of the dH GEMM. No host synchronisation anywhere: all tile counts are found on the device.

Saved for backward: x, weights, h (R*k*N x Dout) and, for the MLP, the pre-activation and the
hidden activation (R*k*N x H or 2H each). These functions are plain tensors-in, tensors-out: the
autograd formulas and the torch.compile registration live in `ops.py`, which returns the saved
intermediates as op outputs. Weights are read in place through their strides (a transformers
[E, Dout, Din] tensor viewed as [E, Din, Dout] costs no copy); dW comes back contiguous.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .kernels.activation import ACT_CODES
from .kernels.combine import combine, gate_grad
from .kernels.grouped_gemm import grouped_gemm
from .kernels.weight_grad import weight_grad
from .routing import RoutingMetadata, build_routing_metadata


def _gates(topk_weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[R*k] contiguous gate values in float32 (float64 when x is float64)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return topk_weights.detach().reshape(-1).to(dtype).contiguous()


def unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t with a unit last stride (None stays None). .contiguous() keeps any stride on a size-1
    dimension -- y.sum()'s gradient for a [1, 1] y has strides (0, 0) -- and the launchers
    assert stride(1) == 1."""
    if t is None:
        return None
    t = t.contiguous()
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def _input_layer_backward(d_out: torch.Tensor, d_out_sorted: bool, x: torch.Tensor,
                          w: torch.Tensor, meta: RoutingMetadata, *, scale: Optional[torch.Tensor],
                          need_dx: bool, need_dw: bool, need_db: bool):
    """Grads of out[i] = x[src(i)] @ w[e(i)] + b[e(i)] (sorted rows i) given d(out) = s_i d_out[.].

    d_out is [R*k*N, Dout] in sorted order when ``d_out_sorted`` (the MLP's d(pre-activation)),
    else [T, Dout] in token order (expert_linear's dY), read through the sorted index.
    ``scale`` [R*k] (the gates) multiplies its rows, or None. Returns (dx [T, Din], dW, db).
    """
    dx = dw = db = None
    if need_dx:
        # k = 1: each token row gets exactly one sorted row, so the GEMM writes dX directly.
        scatter = meta.k == 1
        dx = grouped_gemm(d_out, w, meta, gather=not d_out_sorted, transpose_w=True, scale=scale,
                          scatter=scatter)
        if not scatter:
            dx = combine(dx, meta)
    if need_dw or need_db:
        dw, db = weight_grad(x, d_out, meta, gather_a=True, gather_b=not d_out_sorted,
                             scale=scale, with_bias=need_db)
    return dx, dw, db


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor, tokens_per_route: int,
                   keep_h: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """y [T, Dout] and, when ``keep_h`` (the gates need a gradient), the unweighted expert output
    h [R*k*N, Dout] in sorted order (None otherwise). x contiguous; weight any strides."""
    meta = build_routing_metadata(topk_ids, weight.shape[0], tokens_per_route=tokens_per_route,
                                  check_ids=False)  # checked by the caller
    g = _gates(topk_weights, x)
    if meta.k == 1 and not keep_h:
        # One slot per token: the GEMM scales and scatters straight into y.
        return grouped_gemm(x, weight, meta, bias=bias, gather=True, scale=g, scatter=True), None
    h = grouped_gemm(x, weight, meta, bias=bias, gather=True)
    return combine(h, meta, g), (h if keep_h else None)


def linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    h: Optional[torch.Tensor], tokens_per_route: int, needs: Sequence[bool]):
    """(dx, dW, db, dg) of `linear_forward` given dy [T, Dout]; ``needs`` = which of the four to
    compute (None for the others). dg comes back in topk_weights' dtype."""
    need_dx, need_dw, need_db, need_dg = needs
    meta = build_routing_metadata(topk_ids, weight.shape[0], tokens_per_route=tokens_per_route,
                                  check_ids=False)  # checked by the caller
    g = _gates(topk_weights, x)
    dy = unit_stride(dy)
    dg = gate_grad(dy, h, meta).to(topk_weights.dtype) if need_dg else None
    dx, dw, db = _input_layer_backward(dy, False, x, weight, meta, scale=g, need_dx=need_dx,
                                       need_dw=need_dw, need_db=need_db and has_bias)
    return dx, dw, db, dg


def mlp_forward(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor], topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                activation: str, tokens_per_route: int, train: bool, keep_out: bool):
    """(y [T, Dout], pre [R*k*N, H or 2H] | None, h1 [R*k*N, H], out [R*k*N, Dout] | None).

    ``train``: keep the pre-activation for the activation backward. ``keep_out``: keep the
    unweighted second-layer output for the gate gradient. x contiguous; weights any strides.
    """
    meta = build_routing_metadata(topk_ids, w1.shape[0], tokens_per_route=tokens_per_route,
                                  check_ids=False)  # checked by the caller
    g = _gates(topk_weights, x)
    if train:
        h1, pre = grouped_gemm(x, w1, meta, bias=b1, gather=True, activation=activation,
                               store_pre=True)
    else:
        h1, pre = grouped_gemm(x, w1, meta, bias=b1, gather=True, activation=activation), None
    if meta.k == 1 and not keep_out:
        return grouped_gemm(h1, w2, meta, bias=b2, scale=g, scatter=True), pre, h1, None
    out = grouped_gemm(h1, w2, meta, bias=b2)
    return combine(out, meta, g), pre, h1, (out if keep_out else None)


def mlp_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, has_b1: bool,
                 w2: torch.Tensor, has_b2: bool, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, pre: torch.Tensor, h1: torch.Tensor,
                 out: Optional[torch.Tensor], activation: str, tokens_per_route: int,
                 needs: Sequence[bool]):
    """(dx, dw1, db1, dw2, db2, dg) of `mlp_forward` (None where ``needs`` says no)."""
    need_dx, need_dw1, need_db1, need_dw2, need_db2, need_dg = needs
    meta = build_routing_metadata(topk_ids, w1.shape[0], tokens_per_route=tokens_per_route,
                                  check_ids=False)  # checked by the caller
    g = _gates(topk_weights, x)
    dy = unit_stride(dy)
    dg = gate_grad(dy, out, meta).to(topk_weights.dtype) if need_dg else None
    dw2 = db2 = None
    if need_dw2 or (need_db2 and has_b2):
        dw2, db2 = weight_grad(h1, dy, meta, gather_a=False, gather_b=True, scale=g,
                               with_bias=need_db2 and has_b2)
    dx = dw1 = db1 = None
    if need_dx or need_dw1 or (need_db1 and has_b1):
        # d(pre-activation) [R*k*N, H or 2H]: (g * dY) @ w2^T times act'(pre), one kernel.
        dpre = grouped_gemm(dy, w2, meta, gather=True, transpose_w=True, scale=g,
                            activation=activation, act_input=pre)
        dx, dw1, db1 = _input_layer_backward(dpre, True, x, w1, meta, scale=None,
                                             need_dx=need_dx, need_dw=need_dw1,
                                             need_db=need_db1 and has_b1)
    return dx, dw1, db1, dw2, db2, dg


def expert_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                         tokens_per_route: int = 1) -> torch.Tensor:
    """Triton expert_linear: x [T, Din], weight [E, Din, Dout] (any strides), bias [E, Dout] |
    None, topk_* [R, k] -> y [T, Dout] in x's dtype, through the ``switch_dit::expert_linear``
    op. Arguments are assumed valid (functional.py checks them)."""
    from .ops import expert_linear_op
    return expert_linear_op(x, weight, bias, topk_weights, topk_ids, tokens_per_route, "triton")


def expert_mlp_triton(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                      w2: torch.Tensor, b2: Optional[torch.Tensor], topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, *, activation: str = "gelu_tanh",
                      tokens_per_route: int = 1) -> torch.Tensor:
    """Triton expert_mlp: x [T, D], w1 [E, D, H] ([E, D, 2H] gated), w2 [E, H, Dout] (any
    strides), biases optional, topk_* [R, k] -> y [T, Dout] in x's dtype."""
    if activation not in ACT_CODES:
        raise ValueError(f"activation must be one of {tuple(ACT_CODES)}, got {activation!r}")
    from .ops import expert_mlp_op
    return expert_mlp_op(x, w1, b1, w2, b2, topk_weights, topk_ids, activation,
                         tokens_per_route, "triton")
