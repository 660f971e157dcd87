"""Triton device helpers for the expert-sorted row space of `routing.RoutingMetadata`.

Sorted row i (0 <= i < R*k*N) belongs to sorted pair s = i // N, whose flat pair index is
p = sorted_pairs[s] = r*k + j; it reads token row t = (p // k) * N + i % N of x (or of dY).
Expert e owns sorted rows [offsets[e] * N, offsets[e+1] * N).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pair_and_token(sorted_pairs_ptr, rows, tokens_per_route, top_k):
    """(pair p, token row t) of a block of valid sorted rows (int32 each)."""
    pair = tl.load(sorted_pairs_ptr + rows // tokens_per_route)
    token = (pair // top_k) * tokens_per_route + rows % tokens_per_route
    return pair, token


@triton.jit
def locate_tile(offsets_ptr, pid_m, num_experts, tokens_per_route,
                BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map a row-tile index to (expert, first row, end row) without a host-side tile list.

    Tiles are numbered expert by expert, cdiv(rows_e, BLOCK_M) for expert e, so the launcher can
    use the upper bound cdiv(R*k*N, BLOCK_M) + E of the tile count (no host sync, and correct for
    every BLOCK_M the autotuner picks). Returns expert >= num_experts for a tile past the last one.
    """
    e_idx = tl.arange(0, BLOCK_E)
    e_ok = e_idx < num_experts
    lo = tl.load(offsets_ptr + e_idx, mask=e_ok, other=0)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=e_ok, other=0)
    # (x + BLOCK_M - 1) // BLOCK_M rather than tl.cdiv / tl.zeros, here and in the kernels: those
    # are jit functions, and every jit-function call costs the CPU interpreter a re-patch (~1 ms).
    tiles = ((hi - lo) * tokens_per_route + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)  # inclusive prefix sum: tiles of experts 0..e
    # Experts whose tiles all come before pid_m; the expert of pid_m is the next one.
    expert = tl.sum((ends <= pid_m).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(e_idx < expert, tiles, 0), 0)
    # Valid only when expert < num_experts (the caller exits otherwise): clamp the address.
    e_c = tl.minimum(expert, num_experts - 1)
    row_lo = tl.load(offsets_ptr + e_c) * tokens_per_route
    row_hi = tl.load(offsets_ptr + e_c + 1) * tokens_per_route
    return expert, row_lo + (pid_m - first_tile) * BLOCK_M, row_hi
