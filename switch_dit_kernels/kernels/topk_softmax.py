"""Fused softmax + top-k router kernel: logits [R, E] -> (weights [R, k] float32, ids [R, k] int64).

One program handles BLOCK_R rows; the E logits of a row sit in registers (E <= 4096), so the kernel
reads the logits once and writes 2k values per row instead of materialising the [R, E] probabilities
that torch.softmax + torch.topk would write and re-read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, num_rows, num_experts, stride_row,
                         K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_rows
    col_ok = cols < num_experts
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    logits = tl.load(logits_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
    # Padded rows are all -inf: give them a finite max so exp() does not produce NaN there.
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_ok, row_max, 0.0)
    exp = tl.exp(logits - row_max[:, None])
    exp = tl.where(mask, exp, 0.0)
    denom = tl.sum(exp, axis=1)
    denom = tl.where(row_ok, denom, 1.0)
    probs = exp / denom[:, None]
    # Selection key: the probability, NaN -> -0.5 (below every probability, which is >= 0, so a
    # NaN row -- NaN, +inf or all -inf logits -- picks ids 0..k-1 as the reference does),
    # padded columns -1, picked columns -2. No NaN ever enters max/==, whose NaN behaviour
    # differs between the GPU and the interpreter (the old kernel returned id E for NaN rows).
    work = tl.where(probs == probs, probs, -0.5)
    work = tl.where(mask, work, -1.0)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    if RENORMALIZE:
        # The sum of the k picks comes from a first selection pass in registers. Storing the
        # weights and reading them back to divide would race on the GPU: a stored value can be
        # read by another thread of the program (a replica of the row's reduction result, possibly
        # in another warp), with nothing ordering that read after the store.
        scan = work
        for j in tl.static_range(K):
            best = tl.max(scan, axis=1)
            best_id = tl.min(tl.where(scan == best[:, None], cols[None, :], BLOCK_E), axis=1)
            picked = cols[None, :] == best_id[:, None]
            # The pick's probability itself (NaN stays NaN), not its key.
            total += tl.sum(tl.where(picked, probs, 0.0), axis=1)
            scan = tl.where(picked, -2.0, scan)
        total = tl.where(row_ok, total, 1.0)  # padded rows sum to 0: avoid 0 / 0 there
    for j in tl.static_range(K):
        best = tl.max(work, axis=1)
        # Lowest column holding the maximum: the tie rule is "lower expert id wins".
        is_best = work == best[:, None]
        best_id = tl.min(tl.where(is_best, cols[None, :], BLOCK_E), axis=1)
        picked = cols[None, :] == best_id[:, None]
        weight = tl.sum(tl.where(picked, probs, 0.0), axis=1)
        if RENORMALIZE:
            weight = weight / total
        tl.store(weights_ptr + rows.to(tl.int64) * K + j, weight, mask=row_ok)
        tl.store(ids_ptr + rows.to(tl.int64) * K + j, best_id.to(tl.int64), mask=row_ok)
        work = tl.where(picked, -2.0, work)


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool = False,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused router. logits [R, E] (row stride free, unit column stride) ->
    (weights [R, k] float32, ids [R, k] int64). ``out`` lets tests pass poisoned buffers."""
    num_rows, num_experts = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if out is None:
        weights = torch.empty(num_rows, k, dtype=torch.float32, device=logits.device)
        ids = torch.empty(num_rows, k, dtype=torch.int64, device=logits.device)
    else:
        weights, ids = out
    if num_rows == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    # Keep about 4K logits per program in registers: 128 rows at E = 32, 1 row at E >= 4096.
    block_r = max(1, min(128, 4096 // block_e, triton.next_power_of_2(num_rows)))
    grid = (triton.cdiv(num_rows, block_r),)
    _topk_softmax_kernel[grid](logits, weights, ids, num_rows, num_experts, logits.stride(0),
                               K=k, RENORMALIZE=renormalize, BLOCK_R=block_r, BLOCK_E=block_e)
    return weights, ids


def topk_softmax_torch(logits: torch.Tensor, k: int, renormalize: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of `topk_softmax`: the same ids (ties to the lower id, NaN rows 0..k-1)
    and weights up to rounding."""
    probs = torch.softmax(logits.float(), dim=-1)
    rank_key = torch.nan_to_num(probs, nan=-1.0)
    ids = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids
