"""Grouped GEMM over expert-sorted rows: out[i] = epilogue(A[src(i)] @ W[e(i)] (+ b[e(i)])).

Row i of the expert-sorted space (see `sorted_rows`) multiplies its expert's weight. A is read
either in token order through the sorted index while loading (``gather=True``: x or dY, no permuted
copy in memory) or already in sorted order (the MLP hidden). Epilogue options, all fused:
    bias; per-row gate scale (scale[pair]); forward activation (optionally keeping the
    pre-activation), with the gated swiglu/geglu forms computing gate and up halves in one program;
    activation backward (out = acc * act'(pre), gated: d_gate / d_up); scatter of row i to its token
    row (k = 1 only, where every token row is written exactly once).
The transposed-weight product A @ W[e]^T (dX, dH) is the same kernel with W's strides swapped.

Launch grid: cdiv(R*k*N, BLOCK_M) + E row tiles (an upper bound; no host sync) times the column
tiles; each program finds its (expert, tile) from expert_offsets and exits past the last tile.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import activation_fn
from ..routing import RoutingMetadata
from . import tuning
from .activation import ACT_CODES, ACT_NONE, act_fwd, act_grad
from .buffers import new_buffer
from .sorted_rows import locate_tile, pair_and_token


@triton.jit
def _grouped_gemm_body(a_ptr, w_ptr, bias_ptr, scale_ptr, pre_ptr, out_ptr, offsets_ptr,
                       sorted_pairs_ptr, num_sorted_rows, tokens_per_route, top_k, num_experts,
                       K, N_OUT, stride_am, stride_we, stride_wk, stride_wn, stride_be, stride_pre,
                       stride_om,
                       GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_SCALE: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                       STORE_PRE: tl.constexpr, ACT_BWD: tl.constexpr, PRECISION: tl.constexpr,
                       ACC: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = (num_sorted_rows + BLOCK_M - 1) // BLOCK_M + num_experts
    num_pid_n = (N_OUT + BLOCK_N - 1) // BLOCK_N
    # Grouped ordering: GROUP_M row tiles (mostly of one expert) sweep the column tiles together,
    # so both their A rows and the expert's W tiles stay in L2.
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m

    expert, row_start, row_end = locate_tile(offsets_ptr, pid_m, num_experts, tokens_per_route,
                                             BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    # Clamp rows past the expert's end onto its last row: every load is in bounds without a row
    # mask (those rows are computed and never stored).
    rows_c = tl.minimum(rows, row_end - 1)
    if GATHER_A or SCATTER_OUT or HAS_SCALE:
        pair, token = pair_and_token(sorted_pairs_ptr, rows_c, tokens_per_route, top_k)
    if GATHER_A:
        a_rows = token.to(tl.int64)
    else:
        a_rows = rows_c.to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # A column mask, not a wrap (cols % N_OUT): the modulo hides contiguity from the compiler and
    # stops it from pipelining the weight loads (cp.async needs >= 4 contiguous bytes).
    col_ok = cols < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    b_ptrs = w_base + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC)
    if GATED and not ACT_BWD:
        acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC)
    for kk in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b_mask = col_ok[None, :]
        else:
            k_ok = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b_mask = k_ok[:, None] & col_ok[None, :]
        if EVEN_K and EVEN_N:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        # out_dtype=ACC: Triton <= 3.6 defaults out_dtype to float32 and rejects a float64 acc.
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        if GATED and not ACT_BWD:
            # Up half: columns N_OUT + cols of the [K, 2H] weight, same A tile.
            if EVEN_K and EVEN_N:
                b_up = tl.load(b_ptrs + N_OUT * stride_wn)
            else:
                b_up = tl.load(b_ptrs + N_OUT * stride_wn, mask=b_mask, other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION, out_dtype=ACC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias_row = bias_ptr + expert.to(tl.int64) * stride_be
        acc += tl.load(bias_row + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        if GATED and not ACT_BWD:
            up_bias = tl.load(bias_row + N_OUT + cols, mask=col_ok, other=0.0)
            acc_up += up_bias.to(ACC)[None, :]
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + pair).to(ACC)[:, None]

    mask = row_ok[:, None] & col_ok[None, :]
    if SCATTER_OUT:
        out_rows = token.to(tl.int64)
    else:
        out_rows = rows.to(tl.int64)
    out_ptrs = out_ptr + out_rows[:, None] * stride_om + cols[None, :]
    out_ty = out_ptr.dtype.element_ty
    if ACT_BWD:
        # acc is dL/dh; turn it into dL/d(pre-activation) with the stored forward pre-activation.
        pre_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pre + cols[None, :]
        pre = tl.load(pre_ptrs, mask=mask, other=0.0).to(ACC)
        if GATED:
            up = tl.load(pre_ptrs + N_OUT, mask=mask, other=0.0).to(ACC)
            tl.store(out_ptrs, (acc * up * act_grad(pre, ACT)).to(out_ty), mask=mask)
            tl.store(out_ptrs + N_OUT, (acc * act_fwd(pre, ACT)).to(out_ty), mask=mask)
        else:
            tl.store(out_ptrs, (acc * act_grad(pre, ACT)).to(out_ty), mask=mask)
    elif ACT != 0:
        if STORE_PRE:
            pre_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pre + cols[None, :]
            tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
            if GATED:
                tl.store(pre_ptrs + N_OUT, acc_up.to(pre_ptr.dtype.element_ty), mask=mask)
        if GATED:
            h = act_fwd(acc, ACT) * acc_up
        else:
            h = act_fwd(acc, ACT)
        tl.store(out_ptrs, h.to(out_ty), mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ty), mask=mask)


_grouped_gemm_kernel = triton.heuristics({
    "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
    "EVEN_N": lambda args: args["N_OUT"] % args["BLOCK_N"] == 0,
})(_grouped_gemm_body)
_tuned_kernel = None


def _kernel():
    """The autotuned kernel (built on first use: the config list depends on the environment)."""
    global _tuned_kernel
    if _tuned_kernel is None:
        _tuned_kernel = triton.autotune(
            configs=tuning.grouped_gemm_configs(),
            # Every constexpr that changes the compiled kernel (the dtypes are added by Triton).
            key=["K", "N_OUT", "GATHER_A", "SCATTER_OUT", "HAS_BIAS", "HAS_SCALE", "ACT", "GATED",
                 "STORE_PRE", "ACT_BWD", "PRECISION", "EVEN_K", "EVEN_N", "BLOCK_E"],
            prune_configs_by={"early_config_prune": tuning.prune_gemm_configs},
            cache_results=tuning.autotune_cache_enabled(),
            do_bench=tuning.bench_unless_untuned,
        )(_grouped_gemm_kernel)
    return _tuned_kernel


def _gemm_shapes(a, w, meta, *, gather, transpose_w, activation, act_input, scatter):
    """(gemm columns N_OUT, out shape, act code, gated) with consistency checks."""
    k_dim = w.shape[2] if transpose_w else w.shape[1]
    w_cols = w.shape[1] if transpose_w else w.shape[2]
    assert a.shape[1] == k_dim, f"A has {a.shape[1]} columns, W expects {k_dim}"
    num_tokens = meta.num_routes * meta.tokens_per_route
    assert a.shape[0] == (num_tokens if gather else meta.num_sorted_rows), "A: wrong row count"
    assert not scatter or meta.k == 1, "scatter writes each token row once: only for k == 1"
    out_rows = num_tokens if scatter else meta.num_sorted_rows
    if activation is None:
        assert act_input is None
        return w_cols, (out_rows, w_cols), ACT_NONE, False
    code, gated = ACT_CODES[activation]
    if act_input is not None:  # backward: columns of dH, out holds d(pre) [rows, (2)H]
        assert act_input.shape == (meta.num_sorted_rows, w_cols * (2 if gated else 1))
        return w_cols, (out_rows, act_input.shape[1]), code, gated
    n_out = w_cols // 2 if gated else w_cols
    return n_out, (out_rows, n_out), code, gated


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, meta: RoutingMetadata, *,
                 bias: Optional[torch.Tensor] = None, gather: bool = False,
                 transpose_w: bool = False, activation: Optional[str] = None,
                 store_pre: bool = False, act_input: Optional[torch.Tensor] = None,
                 scale: Optional[torch.Tensor] = None, scatter: bool = False,
                 out: Optional[torch.Tensor] = None, pre_out: Optional[torch.Tensor] = None):
    """Launch the grouped GEMM over the R*k*N expert-sorted rows.

    Args:
        a: [T, K] in token order when ``gather`` (rows read through ``meta.sorted_pairs``), else
            [R*k*N, K] in sorted order; float32/float16/bfloat16, unit column stride.
        w: [E, K, Nw], or [E, Nw, K] with ``transpose_w`` (computes A @ w[e]^T); a's dtype.
        bias: [E, Nw] or None.  scale: [R*k] float32 (float64 for float64 a) per-pair row factor.
        activation: None, or a name of `activation.ACT_CODES`:
            forward (act_input None): out = act(A W + b) [rows, Nw] (gated: [rows, Nw/2]);
            ``store_pre`` also returns the pre-activation [rows, Nw].
            backward (act_input = that pre-activation): out = (A W) * act'(pre), [rows, F] or,
            gated, [rows, 2H] = [d_gate | d_up].
        scatter: write sorted row i to its token row (k == 1): [T, ·] instead of [R*k*N, ·].
        out / pre_out: optional preallocated outputs (tests pass NaN-poisoned ones).
    Returns:
        out in a's dtype, or (out, pre) when ``store_pre``.
    """
    n_out, out_shape, act, gated = _gemm_shapes(a, w, meta, gather=gather,
                                                transpose_w=transpose_w, activation=activation,
                                                act_input=act_input, scatter=scatter)
    assert a.stride(1) == 1 and w.dtype == a.dtype
    if out is None:
        out = new_buffer(out_shape, a.dtype, a.device)
    store_pre = store_pre and act != ACT_NONE and act_input is None
    pre = None
    if store_pre:
        pre = pre_out if pre_out is not None else new_buffer(
            (meta.num_sorted_rows, n_out * (2 if gated else 1)), a.dtype, a.device)
    num_rows = meta.num_sorted_rows
    if num_rows == 0 or n_out == 0:
        return (out, pre) if store_pre else out
    if transpose_w:
        stride_wk, stride_wn = w.stride(2), w.stride(1)
    else:
        stride_wk, stride_wn = w.stride(1), w.stride(2)
    pre_arg = act_input if act_input is not None else pre
    num_experts = meta.num_experts
    k_dim = a.shape[1]

    def grid(meta_args):
        m_tiles = triton.cdiv(num_rows, meta_args["BLOCK_M"]) + num_experts
        return (m_tiles * triton.cdiv(n_out, meta_args["BLOCK_N"]),)

    _kernel()[grid](
        a, w, bias if bias is not None else w, scale if scale is not None else w,
        pre_arg if pre_arg is not None else out, out, meta.expert_offsets, meta.sorted_pairs,
        num_rows, meta.tokens_per_route, meta.k, num_experts, k_dim, n_out,
        a.stride(0), w.stride(0), stride_wk, stride_wn,
        bias.stride(0) if bias is not None else 0,
        pre_arg.stride(0) if pre_arg is not None else 0, out.stride(0),
        GATHER_A=gather, SCATTER_OUT=scatter, HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None, ACT=act, GATED=gated, STORE_PRE=store_pre,
        ACT_BWD=act_input is not None, PRECISION=tuning.dot_precision(a.dtype),
        ACC=tuning.acc_dtype(a.dtype),
        BLOCK_E=max(16, triton.next_power_of_2(num_experts)),
    )
    return (out, pre) if store_pre else out


def grouped_gemm_torch(a, w, meta, *, bias=None, gather=False, transpose_w=False, activation=None,
                       store_pre=False, act_input=None, scale=None, scatter=False):
    """Plain-PyTorch twin of `grouped_gemm` (loops over experts, syncs with the host; fp32 math)."""
    src = meta.sorted_row_sources()
    pairs = meta.sorted_pairs.long().repeat_interleave(meta.tokens_per_route)
    rows = a.float()[src] if gather else a.float()
    bounds = (meta.expert_offsets.long() * meta.tokens_per_route).tolist()
    outs = []
    for e in range(meta.num_experts):
        we = w[e].float().t() if transpose_w else w[e].float()
        o = rows[bounds[e]:bounds[e + 1]] @ we
        if bias is not None:
            o = o + bias[e].float()
        outs.append(o)
    acc = torch.cat(outs) if outs else rows.new_zeros(0, w.shape[2])
    if scale is not None:
        acc = acc * scale.float()[pairs][:, None]
    pre = None
    if activation is not None and act_input is not None:
        pre_f = act_input.float().requires_grad_(True)
        with torch.enable_grad():
            h = activation_fn(activation, pre_f)
            (res,) = torch.autograd.grad(h, pre_f, acc)
    elif activation is not None:
        pre, res = acc, activation_fn(activation, acc)
    else:
        res = acc
    if scatter:
        res = torch.empty_like(res).index_copy_(0, src, res)
    res = res.to(a.dtype)
    if store_pre and pre is not None:
        return res, pre.to(a.dtype)
    return res
