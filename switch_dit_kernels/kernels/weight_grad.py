"""Per-expert weight and bias gradients: dW[e] = A_e^T @ dO_e, db[e] = sum of dO_e's rows.

A_e and dO_e are expert e's rows of the expert-sorted space; either operand is read in token
order through the sorted index (x, dY) or already sorted (the MLP hidden h, d(pre-activation)),
and dO's rows may carry a per-pair factor (the gate g: dO = g * dY). Deterministic, no atomics:
one program owns one (expert, BLOCK_K x BLOCK_N tile of dW[e], row split) and loops over that
expert's rows in a fixed order. With ``split`` > 1 each expert's rows are cut into ``split``
contiguous chunks whose float32 partials are summed afterwards in a fixed order — for few
experts with many rows each (Switch-DiT: E = 3, 65k rows), where E x tiles cannot fill the GPU.

Why the gate factor is applied by a separate pass (`scale_sorted_rows`, writing g * dY once in
sorted order, as ScatterMoE does) and not in the main loop: a per-row scale computed on the CUDA
cores between dO's load and the MMA makes Triton 3.6's sm_90 code wait for every wgmma it issues
(only ``wgmma.wait_group 0`` in the loop: the tensor cores idle while the next tile is scaled).
The pass costs one write and one read of the sorted dO (R*k*N x N_OUT) and makes dO's rows
contiguous for the main loop.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..routing import RoutingMetadata
from . import tuning
from .buffers import new_buffer
from .sorted_rows import pair_and_token


@triton.jit
def _weight_grad_step(a_ptr, b_ptr, sorted_pairs_ptr, tokens_per_route, top_k, stride_am,
                      stride_bm, m0, end, offs_k, offs_n, k_ok, n_ok, acc, db,
                      GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, HAS_DB: tl.constexpr,
                      PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc += A[rows]^T dO[rows] (and db += the column sums of dO[rows]) for the sorted rows
    m0 .. m0 + BLOCK_M - 1 below ``end``; rows past it (all of them for an empty range) are
    masked, their addresses clamped to a valid row (>= 0: sorted_pairs has one when launched)."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    rows_c = tl.maximum(tl.minimum(rows, end - 1), 0)
    if GATHER_A or GATHER_B:
        pair, token = pair_and_token(sorted_pairs_ptr, rows_c, tokens_per_route, top_k)
    if GATHER_A:
        a_rows = token.to(tl.int64)
    else:
        a_rows = rows_c.to(tl.int64)
    if GATHER_B:
        b_rows = token.to(tl.int64)
    else:
        b_rows = rows_c.to(tl.int64)
    # A^T tile [BLOCK_K, BLOCK_M]: each of A's rows is contiguous along K.
    a_t = tl.load(a_ptr + a_rows[None, :] * stride_am + offs_k[:, None],
                  mask=k_ok[:, None] & row_ok[None, :], other=0.0)
    b = tl.load(b_ptr + b_rows[:, None] * stride_bm + offs_n[None, :],
                mask=row_ok[:, None] & n_ok[None, :], other=0.0)
    if HAS_DB:
        db += tl.sum(b.to(ACC), axis=0)
    # out_dtype=ACC: Triton <= 3.6 defaults out_dtype to float32 and rejects a float64 acc.
    acc = tl.dot(a_t, b, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc, db


@triton.jit
def _weight_grad_body(a_ptr, b_ptr, dw_ptr, db_ptr, offsets_ptr, sorted_pairs_ptr,
                      tokens_per_route, top_k, K, N_OUT, stride_am, stride_bm, stride_dw_split,
                      stride_db_split,
                      GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
                      HAS_DB: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_K: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    tiles_k = tl.maximum((K + BLOCK_K - 1) // BLOCK_K, 1)  # K == 0 still needs programs for db
    tiles_n = (N_OUT + BLOCK_N - 1) // BLOCK_N
    # Expert-major order: neighbouring programs read the same expert's rows. Within an expert the
    # (K tile, N tile) grid is walked in groups of GROUP_K K tiles, column by column, so the
    # programs resident at once read GROUP_K tiles of A and ~#SMs / GROUP_K tiles of dO instead of
    # one A tile and #SMs dO tiles (FFN dW1: dpre is no longer re-read for every K tile).
    expert = pid // (tiles_k * tiles_n)
    tile = pid % (tiles_k * tiles_n)
    per_group = GROUP_K * tiles_n
    first_k = (tile // per_group) * GROUP_K
    group_k = tl.minimum(tiles_k - first_k, GROUP_K)
    pid_k = first_k + (tile % per_group) % group_k
    pid_n = (tile % per_group) // group_k

    lo = tl.load(offsets_ptr + expert) * tokens_per_route
    hi = tl.load(offsets_ptr + expert + 1) * tokens_per_route
    per_split = (hi - lo + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    n_ok = offs_n < N_OUT
    acc = tl.full((BLOCK_K, BLOCK_N), 0.0, dtype=ACC)
    db = tl.full((BLOCK_N,), 0.0, dtype=ACC)
    if PRECISION == "ieee":
        # float32 (IEEE) / float64: FMA or DMMA, no wgmma. The step-counted loop below made
        # ptxas keep their accumulators in local memory (fp32 9 KB, fp64 3.4 KB of stack, Triton
        # 3.6 sm_90); this form spills as little as before.
        for m0 in range(start, end, BLOCK_M):
            acc, db = _weight_grad_step(
                a_ptr, b_ptr, sorted_pairs_ptr, tokens_per_route, top_k, stride_am, stride_bm,
                m0, end, offs_k, offs_n, k_ok, n_ok, acc, db,
                GATHER_A, GATHER_B, HAS_DB, PRECISION, ACC, BLOCK_M)
    else:
        # At least one (masked) step, also for an expert or split with no rows. A loop that may
        # run zero times compiled with a separate zero-trip path that sets the accumulator
        # registers with movs and joins the loop's exit, where its last wgmma is still in flight;
        # without HAS_DB ptxas then serialised the wgmma chain (C7515; Triton 3.6, sm_90, bf16,
        # 64x128x128 w8 s3). A trip count of max(n, 1) lets LLVM drop that path; an empty range
        # costs one MMA of zeros.
        n_steps = tl.maximum((end - start + BLOCK_M - 1) // BLOCK_M, 1)
        for step in range(0, n_steps):
            acc, db = _weight_grad_step(
                a_ptr, b_ptr, sorted_pairs_ptr, tokens_per_route, top_k, stride_am, stride_bm,
                start + step * BLOCK_M, end, offs_k, offs_n, k_ok, n_ok, acc, db,
                GATHER_A, GATHER_B, HAS_DB, PRECISION, ACC, BLOCK_M)

    dw_ptrs = (dw_ptr + split.to(tl.int64) * stride_dw_split
               + expert.to(tl.int64) * K * N_OUT + offs_k.to(tl.int64)[:, None] * N_OUT
               + offs_n[None, :])
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
    if HAS_DB:
        if pid_k == 0:
            db_ptrs = (db_ptr + split.to(tl.int64) * stride_db_split
                       + expert.to(tl.int64) * N_OUT + offs_n)
            tl.store(db_ptrs, db.to(db_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _scale_sorted_rows_kernel(b_ptr, scale_ptr, out_ptr, sorted_pairs_ptr, tokens_per_route, top_k,
                              num_rows, N_OUT, stride_bm,
                              GATHER_B: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[i] = s[pair(i)] * b[row(i)] for the sorted rows i of one BLOCK_R x BLOCK_N tile."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    rows_c = tl.minimum(rows, num_rows - 1)
    pair, token = pair_and_token(sorted_pairs_ptr, rows_c, tokens_per_route, top_k)
    src = token.to(tl.int64) if GATHER_B else rows_c.to(tl.int64)
    mask = row_ok[:, None] & (cols < N_OUT)[None, :]
    b = tl.load(b_ptr + src[:, None] * stride_bm + cols[None, :], mask=mask, other=0.0)
    s = tl.load(scale_ptr + pair).to(ACC)
    # Rounded to b's dtype once: the same value as g * dY computed in the input dtype.
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * N_OUT + cols[None, :],
             (b.to(ACC) * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def scale_sorted_rows(b: torch.Tensor, scale: torch.Tensor, meta: RoutingMetadata, *,
                      gather_b: bool) -> torch.Tensor:
    """[R*k*N, N_OUT] in b's dtype: sorted row i = scale[pair(i)] * b[row(i)].

    Args:
        b: [T, N_OUT] token order (``gather_b``) or [R*k*N, N_OUT] sorted; unit column stride.
        scale: [R*k] float32 (float64 for float64 b), one factor per (route, slot) pair.
    """
    num_rows, n_out = meta.num_sorted_rows, b.shape[1]
    out = new_buffer((num_rows, n_out), b.dtype, b.device)
    if num_rows == 0 or n_out == 0:
        return out
    block_n = min(128, triton.next_power_of_2(n_out))
    block_r = 16 if tuning.triton_interpreting() else 32
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(n_out, block_n))
    _scale_sorted_rows_kernel[grid](
        b, scale, out, meta.sorted_pairs, meta.tokens_per_route, meta.k, num_rows, n_out,
        b.stride(0), GATHER_B=gather_b, ACC=tuning.acc_dtype(b.dtype), BLOCK_R=block_r,
        BLOCK_N=block_n, num_warps=4)
    return out


_tuned_kernel = None


def _kernel():
    """The autotuned kernel (built on first use: the config list depends on the environment)."""
    global _tuned_kernel
    if _tuned_kernel is None:
        _tuned_kernel = triton.autotune(
            configs=tuning.weight_grad_configs(),
            # Every constexpr that changes the compiled kernel (the dtypes are added by Triton).
            key=["K", "N_OUT", "GATHER_A", "GATHER_B", "HAS_DB", "PRECISION"],
            prune_configs_by={"early_config_prune": tuning.prune_weight_grad_configs},
            cache_results=tuning.autotune_cache_enabled(),
            do_bench=tuning.bench_unless_untuned,
        )(_weight_grad_body)
    return _tuned_kernel


def default_split(meta: RoutingMetadata, k_dim: int, n_out: int, device: torch.device) -> int:
    """Row splits per expert so that E x (128 x 128 tiles of dW) x split programs fill the GPU about
    twice, without cutting an expert's average row run below 1024 rows."""
    tiles = meta.num_experts * triton.cdiv(k_dim, 128) * triton.cdiv(n_out, 128)
    want = triton.cdiv(2 * tuning.num_sms(device), tiles)
    rows_per_expert = meta.num_sorted_rows // max(1, meta.num_experts)
    return int(max(1, min(want, rows_per_expert // 1024, 32)))


def weight_grad(a: torch.Tensor, b: torch.Tensor, meta: RoutingMetadata, *,
                gather_a: bool, gather_b: bool, scale: Optional[torch.Tensor] = None,
                with_bias: bool = False, split: Optional[int] = None,
                out: Optional[torch.Tensor] = None, bias_out: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dW [E, K, N] = sum over expert e's sorted rows i of A[i]^T (s_i dO[i]); db [E, N] likewise.

    Args:
        a: [T, K] (``gather_a``: token order, read through the sorted index) or [R*k*N, K] sorted.
        b: [T, N] or [R*k*N, N] the same way (``gather_b``); a's dtype; unit column strides.
        scale: [R*k] float32 (float64 for float64 a) factor s of dO's rows, or None.
        with_bias: also return db.  split: row chunks per expert (None: `default_split`).
        out / bias_out: optional preallocated [E, K, N] / [E, N] outputs (used when split == 1).
    Returns:
        (dW [E, K, N], db [E, N] or None) in a's dtype; experts without rows get zeros.
    """
    assert a.stride(1) == 1 and b.stride(1) == 1 and a.dtype == b.dtype
    num_experts, k_dim, n_out = meta.num_experts, a.shape[1], b.shape[1]
    if scale is not None:
        b, gather_b = scale_sorted_rows(b, scale, meta, gather_b=gather_b), False
    if split is None:
        split = default_split(meta, k_dim, n_out, a.device)
    if split == 1:
        dw = out if out is not None else new_buffer((num_experts, k_dim, n_out), a.dtype, a.device)
        db = None
        if with_bias:
            db = bias_out if bias_out is not None else new_buffer((num_experts, n_out), a.dtype,
                                                                  a.device)
    else:
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        dw = new_buffer((split, num_experts, k_dim, n_out), acc, a.device)
        db = new_buffer((split, num_experts, n_out), acc, a.device) if with_bias else None
    if meta.num_sorted_rows == 0:
        # Nothing routed: every dW / db is zero. (The kernel's loop runs at least once, reading
        # sorted_pairs[0], which does not exist here.)
        dw.zero_()
        if db is not None:
            db.zero_()
    elif n_out > 0:
        def grid(meta_args):
            return (num_experts * max(1, triton.cdiv(k_dim, meta_args["BLOCK_K"]))
                    * triton.cdiv(n_out, meta_args["BLOCK_N"]), split)

        _kernel()[grid](
            a, b, dw, db if db is not None else dw,
            meta.expert_offsets, meta.sorted_pairs, meta.tokens_per_route, meta.k, k_dim, n_out,
            a.stride(0), b.stride(0), num_experts * k_dim * n_out, num_experts * n_out,
            GATHER_A=gather_a, GATHER_B=gather_b, HAS_DB=with_bias, PRECISION=tuning.dot_precision(a.dtype),
            ACC=tuning.acc_dtype(a.dtype),
        )
    if split > 1:
        # Fixed-order reduction of the partials: deterministic.
        dw_final = dw.sum(0).to(a.dtype)
        db_final = db.sum(0).to(a.dtype) if db is not None else None
        if out is not None:
            dw_final = out.copy_(dw_final)
        if bias_out is not None and db_final is not None:
            db_final = bias_out.copy_(db_final)
        return dw_final, db_final
    return dw, db


def weight_grad_torch(a, b, meta, *, gather_a, gather_b, scale=None, with_bias=False):
    """Plain-PyTorch twin of `weight_grad` (loops over experts, syncs with the host; fp32 math)."""
    src = meta.sorted_row_sources()
    pairs = meta.sorted_pairs.long().repeat_interleave(meta.tokens_per_route)
    a_s = a.float()[src] if gather_a else a.float()
    b_s = b.float()[src] if gather_b else b.float()
    if scale is not None:
        b_s = (b_s * scale.float()[pairs][:, None]).to(b.dtype).float()
    bounds = (meta.expert_offsets.long() * meta.tokens_per_route).tolist()
    dw = torch.stack([a_s[bounds[e]:bounds[e + 1]].t() @ b_s[bounds[e]:bounds[e + 1]]
                      for e in range(meta.num_experts)])
    db = None
    if with_bias:
        db = torch.stack([b_s[bounds[e]:bounds[e + 1]].sum(0) for e in range(meta.num_experts)])
        db = db.to(a.dtype)
    return dw.to(a.dtype), db
