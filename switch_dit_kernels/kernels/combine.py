"""Combine of each token's k expert outputs, and its gradient with respect to the gates.

    combine:    y[t] = sum_j g[r, j] * h[pair_to_sorted[r*k + j] * N + n]      (t = r*N + n)
    gate grad:  dg[r, j] = sum_n <dY[r*N + n], h[pair_to_sorted[r*k + j] * N + n]>

h is the unweighted expert output in expert-sorted order [R*k*N, D]. The k terms are summed in slot
order in float32 (float64 for float64 inputs) by the program that owns the token row:
deterministic, no atomics. Keeping h unweighted makes the gate gradient one row dot per
(pair, token).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreting
from ..routing import RoutingMetadata
from . import tuning
from .buffers import new_buffer


@triton.jit
def _combine_kernel(h_ptr, gate_ptr, pair_to_sorted_ptr, y_ptr, num_tokens, D, tokens_per_route,
                    top_k, stride_h, stride_y, HAS_GATE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_T: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = tok < num_tokens
    mask = tok_ok[:, None] & (cols < D)[None, :]
    unit = tok // tokens_per_route
    n = tok % tokens_per_route
    acc = tl.full((BLOCK_T, BLOCK_D), 0.0, dtype=ACC)
    for j in range(0, top_k):
        pair = unit * top_k + j
        s = tl.load(pair_to_sorted_ptr + pair, mask=tok_ok, other=0)
        row = s.to(tl.int64) * tokens_per_route + n
        h = tl.load(h_ptr + row[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        if HAS_GATE:
            g = tl.load(gate_ptr + pair, mask=tok_ok, other=0.0).to(ACC)
            acc += g[:, None] * h.to(ACC)
        else:
            acc += h.to(ACC)
    tl.store(y_ptr + tok.to(tl.int64)[:, None] * stride_y + cols[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pair_row_dot_kernel(dy_ptr, h_ptr, pair_to_sorted_ptr, out_ptr, num_pair_rows, D,
                         tokens_per_route, top_k, stride_dy, stride_h, ACC: tl.constexpr,
                         BLOCK_Q: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # Pair rows q = p*N + n in pair order, so the k pairs of a token read its dY row back to back.
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < num_pair_rows
    pair = q // tokens_per_route
    n = q % tokens_per_route
    s = tl.load(pair_to_sorted_ptr + pair, mask=q_ok, other=0)
    h_row = s.to(tl.int64) * tokens_per_route + n
    dy_row = (pair // top_k).to(tl.int64) * tokens_per_route + n
    acc = tl.full((BLOCK_Q, BLOCK_D), 0.0, dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = q_ok[:, None] & (cols < D)[None, :]
        dy = tl.load(dy_ptr + dy_row[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        h = tl.load(h_ptr + h_row[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        acc += dy.to(ACC) * h.to(ACC)
    tl.store(out_ptr + q, tl.sum(acc, axis=1), mask=q_ok)


def _blocks(width: int):
    """(rows, columns) per program: ~4K elements, 16 x 16 in the interpreter (cross tile edges)."""
    if triton_interpreting():
        return 16, 16
    block_d = min(256, triton.next_power_of_2(max(width, 1)))
    return max(1, 4096 // block_d), block_d


def combine(h: torch.Tensor, meta: RoutingMetadata, gate: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [T, D] = sum over each token's k slots of gate[pair] * h[sorted row] (float32 sums).

    Args:
        h: [R*k*N, D] expert-sorted rows, unit column stride.  gate: [R*k] float32 or None (1).
        out: optional preallocated [T, D] output; otherwise h's dtype.
    """
    num_tokens = meta.num_routes * meta.tokens_per_route
    width = h.shape[1]
    if out is None:
        out = new_buffer((num_tokens, width), h.dtype, h.device)
    if num_tokens == 0 or width == 0:
        return out
    block_t, block_d = _blocks(width)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_d))
    _combine_kernel[grid](h, gate if gate is not None else h, meta.pair_to_sorted, out, num_tokens,
                          width, meta.tokens_per_route, meta.k, h.stride(0), out.stride(0),
                          HAS_GATE=gate is not None, ACC=tuning.acc_dtype(h.dtype),
                          BLOCK_T=block_t, BLOCK_D=block_d,
                          num_warps=4)
    return out


def gate_grad(dy: torch.Tensor, h: torch.Tensor, meta: RoutingMetadata,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dg [R, k] float32 (float64 for float64 inputs), the gradient of `combine` in the gates:

    dg[r, j] = sum_n <dy[r*N + n], h[sorted row of (r*k + j, n)]>.

    Args:
        dy: [T, D] (token order), h: [R*k*N, D] expert-sorted; unit column strides.
        out: optional preallocated [R*k*N] float32 (float64) scratch for the row dots.
    """
    num_pairs, n_tok = meta.sorted_pairs.numel(), meta.tokens_per_route
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    dots = out if out is not None else new_buffer((num_pairs * n_tok,), acc, dy.device)
    if dots.numel() > 0:
        block_q, block_d = _blocks(dy.shape[1])
        block_q = min(block_q, 64)  # the D loop is inside: keep the accumulator small
        _pair_row_dot_kernel[(triton.cdiv(dots.numel(), block_q),)](
            dy, h, meta.pair_to_sorted, dots, dots.numel(), dy.shape[1], n_tok, meta.k,
            dy.stride(0), h.stride(0), ACC=tuning.acc_dtype(dy.dtype), BLOCK_Q=block_q,
            BLOCK_D=block_d, num_warps=4)
    # Fixed-order sum over each pair's N rows: deterministic.
    return dots.view(num_pairs, n_tok).sum(1).view(meta.num_routes, meta.k)


def combine_torch(h, meta, gate=None):
    """Plain-PyTorch twin of `combine` (float32 sums)."""
    rows = meta.pair_to_sorted.long()[:, None] * meta.tokens_per_route + torch.arange(
        meta.tokens_per_route, device=h.device)
    hk = h.float()[rows].view(meta.num_routes, meta.k, meta.tokens_per_route, -1)
    if gate is not None:
        hk = hk * gate.float().view(meta.num_routes, meta.k, 1, 1)
    return hk.sum(1).reshape(meta.num_routes * meta.tokens_per_route, -1).to(h.dtype)


def gate_grad_torch(dy, h, meta):
    """Plain-PyTorch twin of `gate_grad`."""
    rows = meta.pair_to_sorted.long()[:, None] * meta.tokens_per_route + torch.arange(
        meta.tokens_per_route, device=h.device)
    hk = h.float()[rows].view(meta.num_routes, meta.k, meta.tokens_per_route, -1)
    dyk = dy.float().view(meta.num_routes, 1, meta.tokens_per_route, -1)
    return (hk * dyk).sum((2, 3))
