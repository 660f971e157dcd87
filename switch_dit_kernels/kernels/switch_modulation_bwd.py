"""Backward kernels of Switch-DiT's SMoE modulation: dx, dW, db and d(topk_weights), no atomics.

Forward (see switch_modulation.py): y_b = x_b W~_b + b~_b, r_b = x_b * (1 + y_b), W~_b = sum_j g_bj W_ej.
With dR the incoming gradient and u = dR * x (the gradient with respect to y):

    dx_b   = dR_b * (1 + y_b) + u_b W~_b^T                     (dx kernel: one GEMM, W~ on chip)
    P_b    = x_b^T u_b                                          ([D, D] per sample, never stored)
    dW_e   = sum_{b: e in E_b} g_be P_b                         (dW kernel)
    dg_bj  = <W_ej, P_b>_F + <b_ej, s_b>,   s_b = sum_n u_bn    (dW kernel + a [B, k] torch epilogue)
    db_e   = sum_b g_be s_b

Work, B*N*D*D MACs = one dense Linear(D, D):
- dx kernel: 1 GEMM + the same on-chip W~ formation as the forward (k/BLOCK_M of the MACs). It
  forms u = dR * x on the fly, except on sm_90 with k >= 2 (`u_prepass_enabled`): there an
  elementwise pre-pass writes u (and dR * (1 + y), and the column sums of u) first, about two
  x-sized memory round trips more, so that only W~ is computed inside the GEMM's loop.
- dW kernel: 1 GEMM for k <= 4, whatever E (ceil(k/4) GEMMs beyond). Each program owns one
  [BLOCK_I, BLOCK_J] tile of the D x D grid and a contiguous range ("split") of the samples, sorted
  by their expert tuple (e_b0..e_b,k-1). Per sample it computes the P_b tile once
  (N*BLOCK_I*BLOCK_J MACs on the tensor cores), then on the CUDA cores adds g_bj * P_b into k fp32
  accumulators (one per slot) and forms the k Frobenius products <W_ej tile, P_b tile> for dg:
  2k*BLOCK_I*BLOCK_J FMAs, i.e. 2k/N of the GEMM's MACs (k=2, N=256: 1.6 %; CUDA cores being ~15x
  slower per op than the tensor cores, ~20 % of its time). Because samples are sorted by tuple, all
  samples between two tuple changes share the experts of every slot, and the accumulators are
  flushed (read-modify-write of the program's own dW tile in a per-split fp32 buffer) only when
  the tuple changes: at most min(B, E!/(E-k)!) times per split (6 for E=3, k=2), not per sample.
  The loops run over samples (B, known on the host), so no bound depends on the routing.
  The main loop is one flat loop of (sample, BLOCK_R-row chunk) steps, so the software pipeline
  runs across samples: the next sample's first chunks load while this sample's last MMAs run,
  and the MMAs wait for each other (wgmma.wait_group 0) only at a sample's last step, where P_b
  is consumed; a loop per sample drained and refilled the pipeline every N/BLOCK_R steps.
  Computing dW per (expert, tile) over the samples routed to the expert instead (the grouped-GEMM
  way, via build_routing_metadata's expert offsets) would compute every P_b tile k times: k GEMMs.
- The split buffer [S, E, D, D] fp32 is not zero-filled: a split's first flush of an expert stores
  its tiles, later ones add, and `reduce_partials` sums the slices each split wrote (in split
  order) and casts to the weight's dtype in one pass. At XL (S=4, E=3, D=1152: 64 MB) that saves
  writing zeros, reading them back at each first flush and a [E, D, D] fp32 round trip.
- The reduction over splits and over tiles for dg are fixed-order sums: the backward is
  bit-identical run to run. No float atomics anywhere.
Total: about 2 dense GEMMs of MACs for the backward, independent of k and E.

Memory: no B x D x D tensor exists. The forward saved y (x-sized); the dx kernel (or the
pre-pass) overwrites it in place with u (each program reads its y tile, then writes u to it), so
the backward allocates no second x-sized buffer: extra peak = y + S*E*D*D fp32 (S <= 16 splits,
see choose_splits) + [B, k, tiles] and [B, D] fp32.

One routing shared by the whole batch ([1, k]): dx runs on the premerged W~ as one dense GEMM over
B*N rows; dW/dg treat the B*N rows as S "virtual units" of ceil(B*N/S) rows routed alike (one tuple,
one flush per program) and sum dg over them.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreting
from . import switch_modulation_gluon, tuning
from .buffers import new_buffer
from .tuning import autotune_cache_enabled, autotuning_enabled, bench_unless_untuned
from .switch_modulation import (
    dot_precision, fwd_configs, is_shared_routing, issues_wgmma, merge_experts,
    merged_as_register_operand, modulation_gemm, prepare_routing, prune_fwd_configs, unit_row_tile,
    unit_tile_grid,
)


# ----------------------------------------------------------------------------------------------
# dx = dR * (1 + y) + (dR * x) @ W~^T, and u = dR * x written over y.
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=fwd_configs(), key=["N_u", "D", "K_EXP", "PREMERGED", "STORE_U",
                                             "STORE_USUM", "U_GIVEN", "MERGED_AS_A",
                                             "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_fwd_configs},
                 # benchmarking reruns the kernel, which is not idempotent: y -> u, and with the u
                 # pre-pass dx += the GEMM (dx restored too, or each timing run adds it again)
                 restore_value=["y_ptr", "dx_ptr"],
                 # a config with a larger BLOCK_M writes fewer usum rows than the one timed before
                 reset_to_zero=["usum_ptr"],
                 cache_results=autotune_cache_enabled(), do_bench=bench_unless_untuned)
@triton.jit
def _switch_modulation_dx_kernel(
        dr_ptr, x_ptr, w_ptr, g_ptr, ids_ptr, y_ptr, dx_ptr, usum_ptr,
        N_u, D, usum_tiles,
        K_EXP: tl.constexpr, PREMERGED: tl.constexpr, STORE_U: tl.constexpr,
        STORE_USUM: tl.constexpr, U_GIVEN: tl.constexpr, MERGED_AS_A: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[rows, cols] and (STORE_U) u[rows, cols] -> y_ptr; one program per (M tile, N tile).

    STORE_USUM (with STORE_U): usum[unit * usum_tiles + m, cols] = the column sums of this tile's
    u (fp32 of the rounded u), m the tile's index in its unit; usum [units * usum_tiles, D] fp32,
    zero on entry (usum_tiles >= ceil(N_u / BLOCK_M); rows a config does not reach stay 0). The
    dW kernel then needs no row sums: this epilogue holds u in registers anyway.

    U_GIVEN (the u pre-pass ran, `_u_prepass_kernel`): y_ptr holds u and dx_ptr dR * (1 + y);
    the main loop reads u as a plain operand (nothing computed between its load and the MMA) and
    the epilogue adds the GEMM to dx. MERGED_AS_A: see `modulation_gemm`; with k >= 2 merged
    experts only U_GIVEN keeps an MMA in flight on sm_90 (otherwise u, computed too, sits in
    the one shared buffer), hence the pre-pass there (`u_prepass_enabled`)."""
    unit, tile_base, lm, mask_m, cols, mask_n = unit_row_tile(N_u, D, BLOCK_M, BLOCK_N)
    dr_tile = dr_ptr + tile_base
    x_tile = x_ptr + tile_base

    if U_GIVEN:
        acc = modulation_gemm(y_ptr + tile_base, dr_tile, w_ptr, ids_ptr, g_ptr, unit, lm, mask_m,
                              cols, mask_n, D, K_EXP, PREMERGED, True, False, MERGED_AS_A,
                              DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = modulation_gemm(x_tile, dr_tile, w_ptr, ids_ptr, g_ptr, unit, lm, mask_m,
                              cols, mask_n, D, K_EXP, PREMERGED, True, True, MERGED_AS_A,
                              DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if K_EXP == 1 and not PREMERGED:
        acc = acc * tl.load(g_ptr + unit)

    offs = lm[:, None] * D + cols[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if U_GIVEN:
        # dR * (1 + y) was rounded to dx's dtype by the pre-pass: two roundings, as autograd's
        # own dx = dR * m + (dR * x) @ W~^T has.
        dx_pw = tl.load(dx_ptr + tile_base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + tile_base + offs, (dx_pw + acc).to(dx_ptr.dtype.element_ty), mask=mask)
        return
    dr = tl.load(dr_tile + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + tile_base + offs, mask=mask, other=0.0).to(tl.float32)
    dx = dr * (1.0 + y) + acc
    tl.store(dx_ptr + tile_base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if STORE_U:
        x = tl.load(x_tile + offs, mask=mask, other=0.0).to(tl.float32)
        # This tile of y is read by this program only. The barrier orders every thread's read of y
        # (consumed by the dx store above) before any thread overwrites it with u.
        tl.debug_barrier()
        u = (dr * x).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + tile_base + offs, u, mask=mask)
        if STORE_USUM:
            # masked rows and columns loaded dR = x = 0: they add 0
            m_tile = (tl.program_id(0) // tl.cdiv(D, BLOCK_N)) % tl.cdiv(N_u, BLOCK_M)
            usum_row = unit.to(tl.int64) * usum_tiles + m_tile
            tl.store(usum_ptr + usum_row * D + cols, tl.sum(u.to(tl.float32), axis=0),
                     mask=mask_n)


def dx_usum_tiles(rows_per_unit: int) -> int:
    """Rows of usum partials per unit that `launch_dx` needs: M tiles of the smallest BLOCK_M the
    dx kernel's autotuner may pick."""
    block_m = min(c.kwargs["BLOCK_M"] for c in _switch_modulation_dx_kernel.configs)
    return triton.cdiv(rows_per_unit, block_m)


def launch_dx(dr, x, weight, g, ids, y, dx, rows_per_unit: int, *, premerged: bool, store_u: bool,
              u_given: bool = False, usum_part: Optional[torch.Tensor] = None) -> None:
    """Launch _switch_modulation_dx_kernel on [M, D] views (weight: [E, D, D] or W~ [D, D]).
    u_given: `launch_u_prepass` ran (y holds u, dx holds dR * (1 + y)).
    usum_part: with store_u, [units * dx_usum_tiles(rows_per_unit), D] float32 zeros: receives
    the per-M-tile column sums of u (sum over each unit's block of rows: the unit's sums)."""
    num_units, k = ids.shape
    store_usum = usum_part is not None and store_u and not u_given
    if switch_modulation_gluon.gluon_applies(1 if premerged else k, not u_given, x, dr, weight,
                                             y, dx):
        # opt-in sm_90 twin that overlaps the W~ merge with the wgmma (SWITCH_DIT_SMOD_GLUON=1)
        switch_modulation_gluon.launch_dx_gluon(
            dr, x, weight, g, ids, y, dx, rows_per_unit, premerged=premerged, store_u=store_u,
            u_given=u_given, usum_part=usum_part if store_usum else None,
            usum_tiles=dx_usum_tiles(rows_per_unit))
        return
    dim = x.shape[-1]
    if usum_part is None:
        usum_part = torch.empty(1, device=x.device, dtype=torch.float32)  # never written
    _switch_modulation_dx_kernel[unit_tile_grid(num_units, rows_per_unit, dim)](
        dr, x, weight, g, ids, y, dx, usum_part, rows_per_unit, dim,
        dx_usum_tiles(rows_per_unit),
        K_EXP=1 if premerged else k, PREMERGED=premerged, STORE_U=store_u and not u_given,
        STORE_USUM=store_usum, U_GIVEN=u_given,
        MERGED_AS_A=merged_as_register_operand(1 if premerged else k),
        DOT_PRECISION=dot_precision(x.dtype))


def u_prepass_enabled(k_merged: int, dtype: torch.dtype, gluon_dx: bool = False) -> bool:
    """Whether the backward forms u = dR * x (and its per-unit sums) in a separate elementwise pass,
    so the dx GEMM reads u as a plain pipelined operand.

    SWITCH_DIT_SMOD_DX_PREPASS=1 always, =0 never, unset ("auto"): where the dx kernel would
    otherwise wait for every wgmma, i.e. on sm_90 with wgmma dots (16-bit or TF32 `dtype`,
    `issues_wgmma`) and k_merged >= 2 experts merged on chip (the merged W~ chunk and u would
    both be computed operands, and one of them sits in the single shared buffer the pending
    wgmma reads: Triton 3.6 emits wait_group 0). With one expert chunk
    (k = 1, shared routing's premerged W~) the fused u keeps an MMA in flight and costs no extra
    pass. gluon_dx: the opt-in Gluon dx runs, whose own ring keeps the MMA in flight with the
    fused u. The pass reads dR, x, y and writes u and dR * (1 + y): about two x-sized round trips
    more than the fused u; a GPU run weighs that against the serialised loop
    (`benchmarks.decide`)."""
    value = os.environ.get("SWITCH_DIT_SMOD_DX_PREPASS", "auto")
    if value not in ("0", "1", "auto"):
        raise ValueError(f"SWITCH_DIT_SMOD_DX_PREPASS must be 0, 1 or auto, got {value!r}")
    if value != "auto":
        return value == "1"
    return (k_merged >= 2 and not gluon_dx and issues_wgmma(dtype)
            and tuning.generation(tuning.target_capability()) == "hopper")


@triton.jit
def _u_prepass_kernel(dr_ptr, x_ptr, y_ptr, dx_ptr, usum_ptr, M, N_u, D,
                      WRITE_DX: tl.constexpr, WRITE_USUM: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (unit, BLOCK_D columns): u = dR * x over y, dx = dR * (1 + y), and
    usum[unit] = column sums of u (of the rounded u, as the dW kernel would sum it), in row order:
    deterministic, each column sum formed once instead of in every dW program."""
    unit = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = cols < D
    row0 = unit.to(tl.int64) * N_u
    unit_rows = tl.minimum(N_u, M - row0).to(tl.int32)  # the last shared-path unit may be short
    base = row0 * D
    usum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, N_u, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < unit_rows)[:, None] & mask_c[None, :]
        offs = base + rows[:, None] * D + cols[None, :]
        dr = tl.load(dr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if WRITE_DX:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, (dr * (1.0 + y)).to(dx_ptr.dtype.element_ty), mask=mask)
        u = (dr * x).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs, u, mask=mask)
        if WRITE_USUM:
            usum += tl.sum(u.to(tl.float32), axis=0)
    if WRITE_USUM:
        tl.store(usum_ptr + unit.to(tl.int64) * D + cols, usum, mask=mask_c)


def launch_u_prepass(dr, x, y, dx, usum, rows_per_unit: int, num_units: int) -> None:
    """Launch _u_prepass_kernel on [M, D] views; dx / usum may be None (not written)."""
    rows, dim = x.shape
    block_d = min(128, triton.next_power_of_2(dim))
    block_r = 16 if triton_interpreting() else 32
    _u_prepass_kernel[(num_units, triton.cdiv(dim, block_d))](
        dr, x, y, dx if dx is not None else y, usum if usum is not None else x, rows,
        rows_per_unit, dim, WRITE_DX=dx is not None, WRITE_USUM=usum is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


# ----------------------------------------------------------------------------------------------
# dW, dg (weight part) and s = per-unit column sums of u.
# ----------------------------------------------------------------------------------------------
MAX_SLOTS = 4  # slot accumulators one dW kernel launch holds; k > 4 runs ceil(k / 4) launches


def dw_tile(k: int) -> Tuple[int, int]:
    """(BLOCK_I, BLOCK_J) of the dW kernel for k experts per sample (8 warps).

    A program holds the P tile and min(k, 4) slot accumulators, fp32 in the MMA layout. Checked
    with ptxas for sm_90 (bf16): k <= 2 at 128x64 and k = 3, 4 at 64x64 compile without spills;
    128x128 spills even at k = 1.
    """
    if triton_interpreting():
        return 32, 32
    return (128, 64) if k <= 2 else (64, 64)


def _dw_configs():
    if triton_interpreting():
        return [triton.Config({"BLOCK_R": 16}, num_warps=4, num_stages=1)]
    # BLOCK_R is the K of the per-sample P tile GEMM (rows of the sample per step). (32, 4) leads:
    # the one config without spills at k = 2's 128x64 tile (see _prune_dw_configs).
    points = ((32, 4), (64, 3), (32, 3), (64, 4)) if autotuning_enabled() else ((32, 4),)
    return [triton.Config({"BLOCK_R": br}, num_warps=8, num_stages=s) for br, s in points]


def _prune_dw_configs(configs, named_args, **kwargs):
    """k >= 2 at the 128x64 tile (P tile + 2 slot accumulators): keep BLOCK_R 32 s4 only. It was
    the one config without spills there (255 registers); since the flat loop, the u sums moved to
    the dx epilogue and the lazy split buffer, all four compile clean (238-248 registers, Triton
    3.6 sm_90 bf16, compile_check --configs all), so this now only spares the first call three
    compilations; whether the others are faster needs a GPU."""
    if kwargs.get("SLOTS", 1) >= 2 and kwargs.get("BLOCK_I", 0) * kwargs.get("BLOCK_J", 0) >= 128 * 64:
        kept = [c for c in configs if c.kwargs["BLOCK_R"] == 32 and c.num_stages == 4]
        return kept or configs[:1]
    return configs if autotuning_enabled() else configs[:1]  # SWITCH_DIT_AUTOTUNE=0: one config


@triton.autotune(configs=_dw_configs(), key=["N_u", "D", "K_EXP", "SLOTS", "BLOCK_I", "BLOCK_J",
                                                 "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_dw_configs},
                 reset_to_zero=["seen_ptr"],  # the first flush of an expert stores, later ones add
                 cache_results=autotune_cache_enabled(), do_bench=bench_unless_untuned)
@triton.jit
def _switch_modulation_dw_kernel(
        x_ptr, u_ptr, w_ptr, g_ptr, ids_ptr, order_ptr, partial_ptr, seen_ptr, dgp_ptr,
        M, N_u, D, E, num_units, units_per_split, slot0,
        K_EXP: tl.constexpr, SLOTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per (split, D x D tile): P_b tiles of its units, mixed into dW / dg / s.

    Handles slots slot0 .. slot0 + SLOTS - 1 (SLOTS <= 4) of each unit's k.
    partial: [S, E, D, D] fp32, uninitialised (a launch per 4 slots, each its own S slices): the
    first flush of an expert in a split stores its tile, later ones add to it; slices a split
    never flushes stay unwritten. seen: [S * tiles, E] int32, zero on entry: this program's
    "flushed expert e" flags. All programs of a split run the same units, so they flush the same
    experts: program (split, tile 0)'s flags say which slices of `partial` the split wrote.
    dgp: [R, k, tiles] fp32.
    order: [R] int32, units sorted by expert tuple; split s owns
    order[s * units_per_split : (s + 1) * units_per_split].
    The slot accumulators are separate 2-D tensors (acc0..acc3, unused ones compiled away), so they
    stay in the tl.dot result's register layout: updating them needs no layout conversion.
    """
    pid = tl.program_id(0)
    n_tiles_j = tl.cdiv(D, BLOCK_J)
    n_tiles = tl.cdiv(D, BLOCK_I) * n_tiles_j
    split = pid // n_tiles       # programs of one split are adjacent: they stream the same x/u rows
    tile = pid % n_tiles
    ti = tile // n_tiles_j
    tj = tile % n_tiles_j
    offs_i = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < D
    mask_j = offs_j < D
    split_base = partial_ptr + split.to(tl.int64) * E * D * D
    seen_row = seen_ptr + pid.to(tl.int64) * E

    p_start = split * units_per_split
    p_end = tl.minimum(p_start + units_per_split, num_units)
    # One flat loop of (unit, row chunk) steps instead of a loop per unit: the software pipeline
    # loads the next unit's first chunks while the current unit's last MMAs run (a nested loop
    # drained and refilled it for every unit: 8 steps of BLOCK_R=32 at N=256, 3 of them the
    # 4-stage prologue). The P tile is consumed only on a unit's last step (the `if` below), so
    # every other step keeps its wgmma in flight.
    steps_per_unit = tl.cdiv(N_u, BLOCK_R)
    n_steps = (p_end - p_start) * steps_per_unit
    # acc_j: sum of g_bj P_b over the current run of units with equal tuples (units are sorted).
    acc0 = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    ptile = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for step in range(0, n_steps):
        p = p_start + step // steps_per_unit
        r0 = (step % steps_per_unit) * BLOCK_R
        unit = tl.load(order_ptr + p)
        # P tile = x_unit[:, I]^T @ u_unit[:, J] over the unit's N_u rows (the tensor-core work).
        # Scalar int64 base of the unit, int32 offsets inside it (N_u * D < 2^31, see launch_dw):
        # per-element int64 offsets would cost 2 registers per element and pipeline stage.
        row0 = unit.to(tl.int64) * N_u
        unit_rows = tl.minimum(N_u, M - row0).to(tl.int32)  # the last shared-path unit may be short
        local = r0 + tl.arange(0, BLOCK_R)
        mask_r = local < unit_rows
        xt = tl.load(x_ptr + row0 * D + (local[:, None] * D + offs_i[None, :]),
                     mask=mask_r[:, None] & mask_i[None, :], other=0.0)
        ut = tl.load(u_ptr + row0 * D + (local[:, None] * D + offs_j[None, :]),
                     mask=mask_r[:, None] & mask_j[None, :], other=0.0)
        ptile = tl.dot(tl.trans(xt), ut, ptile, input_precision=DOT_PRECISION)
        if r0 + BLOCK_R >= N_u:  # the unit's last chunk: P_b is complete
            base = unit * K_EXP + slot0
            # Mix P into the slot accumulators and form dg's Frobenius products (CUDA cores).
            e0 = tl.load(ids_ptr + base)
            acc0 += tl.load(g_ptr + base) * ptile
            _slot_dg(dgp_ptr, base, n_tiles, tile, w_ptr, e0, offs_i, offs_j, D, ptile)
            if SLOTS > 1:
                e1 = tl.load(ids_ptr + base + 1)
                acc1 += tl.load(g_ptr + base + 1) * ptile
                _slot_dg(dgp_ptr, base + 1, n_tiles, tile, w_ptr, e1, offs_i, offs_j, D, ptile)
            if SLOTS > 2:
                e2 = tl.load(ids_ptr + base + 2)
                acc2 += tl.load(g_ptr + base + 2) * ptile
                _slot_dg(dgp_ptr, base + 2, n_tiles, tile, w_ptr, e2, offs_i, offs_j, D, ptile)
            if SLOTS > 3:
                e3 = tl.load(ids_ptr + base + 3)
                acc3 += tl.load(g_ptr + base + 3) * ptile
                _slot_dg(dgp_ptr, base + 3, n_tiles, tile, w_ptr, e3, offs_i, offs_j, D, ptile)
            ptile = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
            # The run closes at the split's last unit or when the next unit's tuple differs: flush
            # the accumulators into the split's dW tiles (rare, units being sorted by tuple), slot
            # by slot so that a row naming one expert twice adds both slots.
            nxt = tl.load(order_ptr + tl.minimum(p + 1, p_end - 1)) * K_EXP + slot0
            close = (p == p_end - 1) | (tl.load(ids_ptr + nxt) != e0)
            if SLOTS > 1:
                close = close | (tl.load(ids_ptr + nxt + 1) != e1)
            if SLOTS > 2:
                close = close | (tl.load(ids_ptr + nxt + 2) != e2)
            if SLOTS > 3:
                close = close | (tl.load(ids_ptr + nxt + 3) != e3)
            if close:
                _flush_slot(acc0, e0, split_base, seen_row, offs_i, offs_j, D)
                if SLOTS > 1:
                    _flush_slot(acc1, e1, split_base, seen_row, offs_i, offs_j, D)
                if SLOTS > 2:
                    _flush_slot(acc2, e2, split_base, seen_row, offs_i, offs_j, D)
                if SLOTS > 3:
                    _flush_slot(acc3, e3, split_base, seen_row, offs_i, offs_j, D)
            acc0 = tl.where(close, 0.0, acc0)
            if SLOTS > 1:
                acc1 = tl.where(close, 0.0, acc1)
            if SLOTS > 2:
                acc2 = tl.where(close, 0.0, acc2)
            if SLOTS > 3:
                acc3 = tl.where(close, 0.0, acc3)


# tl.debug_barrier() inside the dW kernel's flat loop stops Triton 3.6 from pipelining it at all
# (no cp.async, only wgmma.wait_group 0: compile_check, sm_90); the same bar.sync written as inline
# PTX does not. The interpreter runs no inline PTX (and runs a program's threads in lockstep).
_PTX_BARRIER = tl.constexpr(not triton_interpreting())


@triton.jit
def _cta_barrier():
    """bar.sync 0: every thread of the program waits here, and their global writes before it are
    visible to all of them after it (PTX ISA, barrier: memory ordering among the participants)."""
    if _PTX_BARRIER:
        tl.inline_asm_elementwise("bar.sync 0;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)
    else:
        tl.debug_barrier()


@triton.jit
def _flush_slot(acc, e, split_base, seen_row, offs_i, offs_j, D):
    """partial[split, e, tile] = acc on the program's first flush of expert e, += acc after it
    (the old tile is not read the first time: no zero-filled buffer to write and read back).
    This program is the only writer of its (split, tile) region and of its flags (no atomics);
    the barrier orders its read-modify-writes of one tile, and its flag, across its threads."""
    tile_offs = offs_i[:, None] * D + offs_j[None, :]
    tile_mask = (offs_i < D)[:, None] & (offs_j < D)[None, :]
    ptrs = split_base + e.to(tl.int64) * D * D + tile_offs
    seen = tl.load(seen_row + e)
    seen_rows = (offs_i * 0 + seen) != 0  # a vector: the interpreter rejects tensor & scalar masks
    old = tl.load(ptrs, mask=tile_mask & seen_rows[:, None], other=0.0)
    tl.store(ptrs, old + acc, mask=tile_mask)
    # Every thread has read the flag (it masks `old`, which the store above needs) before one
    # thread sets it: without this barrier a late warp could read 1 on the expert's first flush
    # and add the uninitialised buffer. bf16/fp16 got one by accident (the layout conversions
    # between load and store go through shared memory); fp32's IEEE path had none (PTX review).
    _cta_barrier()
    tl.store(seen_row + e, 1)
    _cta_barrier()


@triton.jit
def _slot_dg(dgp_ptr, slot_index, n_tiles, tile, w_ptr, e, offs_i, offs_j, D, ptile):
    """dgp[unit, slot, tile] = <W_e tile, P tile>_F (the W tile is an L2 hit: E*D*D is small)."""
    tile_offs = offs_i[:, None] * D + offs_j[None, :]
    tile_mask = (offs_i < D)[:, None] & (offs_j < D)[None, :]
    w = tl.load(w_ptr + e.to(tl.int64) * D * D + tile_offs, mask=tile_mask, other=0.0)
    tl.store(dgp_ptr + slot_index.to(tl.int64) * n_tiles + tile,
             tl.sum(tl.sum(w.to(tl.float32) * ptile, axis=1), axis=0))


@triton.jit
def _reduce_partials_kernel(partial_ptr, used_ptr, out_ptr, n_slices, E, DD,
                            BLOCK: tl.constexpr):
    """out[e] = sum over slices s = 0, 1, ... (in order) of partial[s, e] where used[s, e], cast to
    out's dtype; slices a split never wrote are not read. partial [n_slices, E, DD] fp32,
    used [n_slices, E] int32, out [E, DD]. Grid (cdiv(DD, BLOCK), E)."""
    e = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < DD
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n_slices):
        used = tl.load(used_ptr + s * E + e)
        used_v = (offs * 0 + used) != 0  # a vector mask (interpreter)
        acc += tl.load(partial_ptr + (s * E + e).to(tl.int64) * DD + offs, mask=mask & used_v,
                       other=0.0)
    tl.store(out_ptr + e.to(tl.int64) * DD + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_partials(partial: torch.Tensor, used: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, D, D] in ``dtype``: the fixed-order sum of the used slices of partial [n, E, D, D]
    (used [n, E] int32): one pass instead of torch's sum then cast (and no zero-filled buffer)."""
    n, num_experts, dim = partial.shape[0], partial.shape[1], partial.shape[2]
    out = torch.empty(num_experts, dim, dim, device=partial.device, dtype=dtype)
    if out.numel() == 0:
        return out
    block = 1024
    _reduce_partials_kernel[(triton.cdiv(dim * dim, block), num_experts)](
        partial, used, out, n, num_experts, dim * dim, BLOCK=block, num_warps=4)
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Tensor-core rate over HBM bandwidth of the GPUs the project is checked on (H100/H200: ~800
# TFLOP/s dense bf16, 3.4-4.8 TB/s): flops the dW GEMM does in the time one byte of the split
# reduction moves.
_FLOP_PER_BYTE = 200


def choose_splits(n_tiles: int, sms: int, limit: int, rows: int, num_experts: int) -> int:
    """S in 1..limit minimising the dW kernel's estimated time, in units of its GEMM spread evenly
    over the SMs:

        ceil(S * tiles / SMs) / S * SMs / tiles     waves of programs, each 1/S of a tile's rows
      + S * 4 * E * _FLOP_PER_BYTE / rows           the split buffer: every split writes E*D*D fp32
                                                    (flushes) and the reduction reads it back
                                                    (8*E*D^2 bytes) against the GEMM's 2*rows*D^2

    One program per SM at a time: the k <= 2 tile holds 255 registers x 8 warps, the whole
    register file, so a second wave of half-size programs gains nothing and costs a split. XL
    (D=1152, 162 tiles of 128x64, 132 SMs, B*N=65536, E=3): S=4, 648 programs; S (D=384, 18
    tiles): S=7, 126 programs (one wave; 14+ splits would add the reduction twice over and a
    second wave).
    """
    best, best_cost = 1, float("inf")
    for s in range(1, max(1, limit) + 1):
        waves = -(-s * n_tiles // sms)
        cost = waves / s * sms / n_tiles + s * 4 * num_experts * _FLOP_PER_BYTE / max(rows, 1)
        if cost < best_cost:
            best, best_cost = s, cost
    return best


def dw_splits(num_units: int, n_tiles: int, device: torch.device, budget_bytes: int,
              slice_bytes: int, rows: int, num_experts: int) -> int:
    """Number of sample splits S of the dW kernel (SWITCH_DIT_SMOD_DW_SPLITS overrides): programs
    = S * tiles, `choose_splits` with S <= min(16, units) and the [S, E, D, D] fp32 buffer within
    ``budget_bytes``. Under the interpreter: 2, so the tests cross split boundaries.
    """
    env = os.environ.get("SWITCH_DIT_SMOD_DW_SPLITS")
    if env:
        return max(1, min(int(env), num_units))
    if device.type != "cuda":
        return max(1, min(2, num_units))
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    limit = max(1, min(16, num_units, budget_bytes // max(slice_bytes, 1)))
    return choose_splits(n_tiles, sms, limit, rows, num_experts)


def unit_order(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[R] int32: units sorted (stably) by their expert tuple (ids[r, 0], ..., ids[r, k-1]).

    Device sorts only (no sync). A mixed-radix int64 key when E^k < 2^62, else k stable sorts.
    """
    num_units, k = ids.shape
    ids = ids.long()
    if num_experts ** k < 2 ** 62:
        key = torch.zeros(num_units, dtype=torch.int64, device=ids.device)
        for j in range(k):
            key = key * num_experts + ids[:, j]
        return torch.argsort(key, stable=True).to(torch.int32)
    order = torch.arange(num_units, device=ids.device)
    for j in reversed(range(k)):
        order = order[torch.argsort(ids[order, j], stable=True)]
    return order.to(torch.int32)


def launch_dw(x, u, weight, g, ids, order, rows_per_unit: int, splits: int, *,
              dgp: Optional[torch.Tensor] = None):
    """Launch _switch_modulation_dw_kernel: returns (partial [C*S, E, D, D], used [C*S, E] int32,
    dgp [R, k, T]); `reduce_partials` sums the used slices of partial (the others are unwritten).

    x, u: [M, D].  weight [E, D, D].  g [R, k] float32, ids [R, k] int32, order [R] int32.
    R * rows_per_unit >= M (the last unit may be partial). k > 4: one launch per 4 slots, in order
    (C = ceil(k / 4) launches, each recomputing P, each with its own S slices of `partial`).
    """
    num_units, k = ids.shape
    num_experts, dim = weight.shape[0], weight.shape[1]
    bi, bj = dw_tile(k)
    n_tiles = triton.cdiv(dim, bi) * triton.cdiv(dim, bj)
    units_per_split = triton.cdiv(num_units, splits)
    splits = triton.cdiv(num_units, units_per_split)
    chunks = triton.cdiv(k, MAX_SLOTS)
    # Its own S slices of `partial` and flags for each launch: the autotuner zeroes the `seen`
    # flags it is given before each timing run (and before the real run).
    partial = new_buffer((chunks * splits, num_experts, dim, dim), torch.float32, x.device)
    seen = torch.zeros(chunks, splits, n_tiles, num_experts, device=x.device, dtype=torch.int32)
    if dgp is None:
        dgp = torch.empty(num_units, k, n_tiles, device=x.device, dtype=torch.float32)
    for chunk, slot0 in enumerate(range(0, k, MAX_SLOTS)):
        _switch_modulation_dw_kernel[(splits * n_tiles,)](
            x, u, weight, g, ids, order, partial[chunk * splits:(chunk + 1) * splits], seen[chunk],
            dgp,
            x.shape[0], rows_per_unit, dim, num_experts, num_units, units_per_split, slot0,
            K_EXP=k, SLOTS=min(MAX_SLOTS, k - slot0),
            DOT_PRECISION=dot_precision(x.dtype), BLOCK_I=bi, BLOCK_J=bj)
    # Every program of a split flushes the same experts: tile 0's flags stand for the split.
    return partial, seen[:, :, 0].reshape(chunks * splits, num_experts).contiguous(), dgp


# ----------------------------------------------------------------------------------------------
# The whole backward.
# ----------------------------------------------------------------------------------------------
def switch_modulation_bwd(dr: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor, y: torch.Tensor, *,
                          merged: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
                          need_dx: bool = True, need_params: bool = True,
                          dx_out: Optional[torch.Tensor] = None):
    """Gradients of r = x * (1 + y) with the Triton kernels (no autograd, deterministic).

    Args:
        dr: [B, N, D] gradient of r.  x, weight, bias, topk_*: the forward's arguments.
        y: [B, N, D] the forward's y (x's dtype, contiguous). OVERWRITTEN with u = dR * x.
        merged: the forward's (W~, b~) on the shared-routing path (recomputed when None).
        need_dx: compute dx.  need_params: compute dW, db, dg.
        dx_out: optional preallocated dx.
    Returns:
        (dx | None, dW [E, D, D] weight's dtype | None, db [E, D] | None, dg [R, k] float32 | None).
    """
    batch, tokens, dim = x.shape
    num_experts = weight.shape[0]
    x = x.contiguous()
    dr = dr.contiguous()
    weight = weight.contiguous()
    g, ids = prepare_routing(topk_weights, topk_ids)
    shared = is_shared_routing(x, topk_ids)
    x2, dr2, y2 = x.view(-1, dim), dr.view(-1, dim), y.view(-1, dim)

    k = ids.shape[1]
    rows = batch * tokens
    if need_params:
        bi, bj = dw_tile(k)
        n_tiles = triton.cdiv(dim, bi) * triton.cdiv(dim, bj)
        slice_bytes = triton.cdiv(k, MAX_SLOTS) * num_experts * dim * dim * 4
        # The split buffer may use up to an x-sized budget (at least 4 weight-sized slices).
        budget = max(x.numel() * x.element_size(), 4 * slice_bytes)
        if shared:
            # B*N rows routed alike: S virtual units, one per split, each a run of ceil(B*N / S) rows.
            splits = dw_splits(rows, n_tiles, x.device, budget, slice_bytes, rows, num_experts)
            # units of at most 2^31 elements: the kernel addresses rows inside a unit with int32
            unit_rows = min(triton.cdiv(rows, splits), (2 ** 31 - 1) // dim)
            num_units = triton.cdiv(rows, unit_rows)
            g_u = g.expand(num_units, k).contiguous()
            ids_u = ids.expand(num_units, k).contiguous()
            order = torch.arange(num_units, device=x.device, dtype=torch.int32)
        else:
            splits = dw_splits(batch, n_tiles, x.device, budget, slice_bytes, rows,
                                num_experts)
            unit_rows, num_units, g_u, ids_u = tokens, batch, g, ids
            order = unit_order(ids, num_experts)

    dx = None
    # usum [units, D] fp32: the per-unit column sums of u, which only the bias gradients need
    # (db and dg's <b_ej, s_b>). Formed once, where u is formed: by the dx kernel's epilogue
    # (per-M-tile partials), the pre-pass, or the u-only pass; never by the dW kernel.
    usum = None
    need_usum = need_params and bias is not None
    if need_dx:
        dx = dx_out if dx_out is not None else torch.empty_like(x)
    k_merged = 1 if shared else k
    gluon_dx = need_dx and switch_modulation_gluon.gluon_applies(k_merged, True, x, dr, weight, y,
                                                                 dx)
    prepass = (u_prepass_enabled(k_merged, x.dtype, gluon_dx) and rows > 0
               and (need_dx or need_params))
    if prepass:
        # u over y, dR * (1 + y) into dx, the per-unit sums of u: one pass.
        usum = (torch.empty(num_units, dim, device=x.device, dtype=torch.float32)
                if need_usum else None)
        launch_u_prepass(dr2, x2, y2, dx.view(-1, dim) if need_dx else None, usum,
                         unit_rows if need_params else tokens,
                         num_units if need_params else batch)
    if need_dx:
        dx_units, dx_rows = (1, rows) if shared else (batch, tokens)
        usum_part = None
        if need_usum and not prepass:
            usum_tiles = dx_usum_tiles(dx_rows)
            usum_part = torch.zeros(dx_units * usum_tiles, dim, device=x.device,
                                    dtype=torch.float32)
        if shared:
            if merged is None:
                merged = merge_experts(weight, bias, g.reshape(-1), ids.reshape(-1))
            launch_dx(dr2, x2, merged[0], g, ids, y2, dx.view(-1, dim), rows,
                      premerged=True, store_u=need_params, u_given=prepass, usum_part=usum_part)
        else:
            launch_dx(dr2, x2, weight, g, ids, y2, dx.view(-1, dim), tokens,
                      premerged=False, store_u=need_params, u_given=prepass, usum_part=usum_part)
        if usum_part is not None:
            usum = usum_part.view(dx_units, usum_tiles, dim).sum(1)    # fixed order
    elif need_params and not prepass:
        if need_usum and rows > 0:
            usum = torch.empty(num_units, dim, device=x.device, dtype=torch.float32)
            launch_u_prepass(dr2, x2, y2, None, usum, unit_rows, num_units)
        else:
            torch.mul(dr, x, out=y)
            if need_usum:
                usum = torch.zeros(num_units, dim, device=x.device, dtype=torch.float32)
    if not need_params:
        return dx, None, None, None

    partial, used, dgp = launch_dw(x2, y2, weight, g_u, ids_u, order, unit_rows, splits)

    dw = reduce_partials(partial, used, weight.dtype)
    dg = dgp.sum(-1)                                                     # [R_u, k]
    g_s, ids_s = g_u, ids_u
    if shared:
        # One routing: only the batch's totals matter (dg and db are linear in P and s).
        dg = dg.sum(0, keepdim=True)
        g_s, ids_s = g, ids
    db = None
    if bias is not None:
        if shared:
            usum = usum.sum(0, keepdim=True)                            # [1, D]
        gate = torch.zeros(usum.shape[0], num_experts, device=x.device, dtype=torch.float32)
        gate.scatter_add_(1, ids_s.long(), g_s)     # one add per (unit, expert) unless ids repeat
        used = torch.zeros(usum.shape[0], num_experts, device=x.device, dtype=torch.bool)
        used.scatter_(1, ids_s.long(), True)
        # A select, not gate * usum alone: a unit's NaN must not reach the bias gradient of an
        # expert it did not use through 0 * NaN.
        db = torch.where(used[:, :, None], gate[:, :, None] * usum[:, None, :], 0.0)
        db = db.sum(0).to(bias.dtype)                                                   # [E, D]
        dg = dg + (bias.float()[ids_s.long()] * usum[:, None, :]).sum(-1)
    return dx, dw, db, dg


def switch_modulation_bwd_torch(dr: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                bias: Optional[torch.Tensor], topk_weights: torch.Tensor,
                                topk_ids: torch.Tensor):
    """Reference of `switch_modulation_bwd` by the closed-form gradients in plain PyTorch (float32,
    float64 for float64 inputs; W~_b and P_b materialised). Returns (dx, dW, db | None, dg), dg in
    the compute dtype (float32, or float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch = x.shape[0]
    g = topk_weights.to(acc)
    ids = topk_ids.long()
    xf, drf = x.to(acc), dr.to(acc)
    w_t = (g[:, :, None, None] * weight[ids].to(acc)).sum(1)      # [R, D, D]
    y = torch.matmul(xf, w_t)
    if bias is not None:
        y = y + (g[:, :, None] * bias[ids].to(acc)).sum(1)[:, None, :]
    u = drf * xf
    dx = drf * (1 + y) + torch.matmul(u, w_t.transpose(1, 2))
    p = torch.matmul(xf.transpose(1, 2), u)                         # [B, D, D]
    s = u.sum(1)                                                     # [B, D]
    if ids.shape[0] == 1 and batch > 1:
        p, s = p.sum(0, keepdim=True), s.sum(0, keepdim=True)
    dw = torch.zeros_like(weight, dtype=acc)
    dw.index_add_(0, ids.reshape(-1), (g[:, :, None, None] * p[:, None]).reshape(-1, *p.shape[1:]))
    dg = (weight[ids].to(acc) * p[:, None]).sum((-2, -1))
    db = None
    if bias is not None:
        db = torch.zeros_like(bias, dtype=acc)
        db.index_add_(0, ids.reshape(-1), (g[:, :, None] * s[:, None]).reshape(-1, s.shape[-1]))
        dg = dg + (bias[ids].to(acc) * s[:, None]).sum(-1)
    return (dx.to(x.dtype), dw.to(weight.dtype), db.to(bias.dtype) if db is not None else None,
            dg)
