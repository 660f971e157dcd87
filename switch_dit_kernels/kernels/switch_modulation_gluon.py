"""Gluon (sm_90) twins of the Switch-DiT forward and dx kernels: the W~ merge overlaps the wgmma.

Why a second implementation: with the merged W~ chunk as the MMA's shared operand, Triton 3.6
stores it into one single-buffered shared tile and waits for every wgmma (`wgmma.wait_group 0`)
before overwriting it. The Triton kernels now avoid that by making the merged chunk the register
operand (`switch_modulation.modulation_gemm`; what was first read as ptxas serialising that form,
C7515, was the loop's zero-trip path), but the dx with k >= 2 then needs the u pre-pass (u and W~
are both computed). Gluon writes the pipeline by hand, double-buffering whatever is computed, so
its dx keeps the fused u; a GPU run decides which is faster:

    ring of STAGES (3-6) shared slots, by cp.async:   x chunk [BM, BK] + k expert chunks [BK, BN]
    two merged buffers w~[0], w~[1] [BK, BN]

    K step i:  wait for slot i's copies; barrier (A)
               issue the copies of step i + STAGES - 2 into the slot step i - 2 used
               merge:   w~[i % 2] = sum_j g_j * expert_j chunk   (fp32 sum, one cast, as Triton's)
               fence (generic -> async proxy); barrier (B)
               acc += x chunk @ w~[i % 2]      (wgmma, async)
               wait until at most 1 wgmma is in flight     (wgmma.wait_group 1)

so the merge of step i + 1 runs on the CUDA cores while the wgmma of step i runs on the tensor
cores. Barrier (A) also tells every warpgroup that both warpgroups' wgmma of step i - 2 retired
(each waited for it in step i - 1), which is what frees slot i - 2 and w~[i % 2]. k = 1 and
PREMERGED feed the expert slot straight to the wgmma (no merge; acc scaled by g after the loop).

dx is the same loop on A = u = dR * x (formed from two ring chunks, stored to a double-buffered
A tile the same way; or read from the u pre-pass) and B = W~^T: the expert chunks are loaded as
[BN, BK] row-major pieces of W (W[e][cols, kk]) and handed to the wgmma through a transposed view.
Its epilogue is the Triton dx kernel's: dx, u over y and the per-M-tile column sums of u.

Known cost to time on a GPU: Triton's barrier pass treats all slots of one shared allocation as one
buffer, so it adds 3-5 CTA barriers per K step beyond the two above (between the copies of
different experts into the ring, before the merge reads it). A ring allocated [STAGES, k, rows,
cols] and filled by one 3-D copy per stage would avoid most of them.

Status: compiled and read by the Hopper gate (benchmarks/compile_check.py, Triton 3.6, sm_90), not
yet run: the CPU interpreter cannot execute Gluon and no GPU has run it. It is therefore opt-in
(SWITCH_DIT_SMOD_GLUON=1, 16-bit inputs, sm_90 only); the Triton kernels stay the tested default
until a GPU run (benchmarks/gpu_check.sh, tests/test_switch_modulation_gluon.py) shows it correct
and faster.
"""
from __future__ import annotations

import os

import torch
import triton

from .tuning import SMOD_SMEM_BUDGET

try:  # Gluon ships with Triton >= 3.5; the package must import without it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False


def gluon_smem_bytes(block_m: int, block_n: int, block_k: int, stages: int, k_loads: int,
                     forms_u: bool) -> int:
    """Shared memory of `_smod_gluon_kernel` (16-bit): the ring (A chunk, dR chunk when forming
    u, k expert chunks per stage), the two merged B buffers (k > 1) and two u buffers."""
    chunk_a, chunk_b = block_m * block_k, block_k * block_n
    ring = stages * ((2 if forms_u else 1) * chunk_a + k_loads * chunk_b)
    merged = (2 * chunk_b if k_loads > 1 else 0) + (2 * chunk_a if forms_u else 0)
    return 2 * (ring + merged)


# (BLOCK_K, STAGES) in order of preference: prefetch depth first. With 3 stages the loop waits at
# every step for copies issued one step (one 128x128x64 wgmma, ~500 cycles) earlier, likely shorter
# than an HBM load; 32-wide chunks buy 5-6 stages in the same shared memory. A GPU run decides
# (SWITCH_DIT_SMOD_GLUON_TILE=BK,STAGES overrides it to compare).
_TILE_PREFERENCE = ((64, 4), (32, 6), (32, 5), (64, 3), (32, 4), (32, 3))


def _tile_override():
    """SWITCH_DIT_SMOD_GLUON_TILE="BK,STAGES" or "BM,BN,BK,STAGES" (to time alternatives on a
    GPU), as (BM, BN, BK, STAGES) with BM, BN None when not given; or None."""
    value = os.environ.get("SWITCH_DIT_SMOD_GLUON_TILE", "")
    if not value:
        return None
    usage = (f"SWITCH_DIT_SMOD_GLUON_TILE={value!r}: expected 'BLOCK_K,STAGES' or "
             f"'BLOCK_M,BLOCK_N,BLOCK_K,STAGES', e.g. '64,3' or '256,64,32,6'")
    try:
        parts = [int(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(usage) from None
    if len(parts) not in (2, 4):
        raise ValueError(usage)
    bm, bn, bk, stages = parts if len(parts) == 4 else (None, None, *parts)
    if bk not in (16, 32, 64) or stages < 3 or bm not in (None, 64, 128, 256) \
            or bn not in (None, 64, 128, 256):
        raise ValueError(f"{usage}; BLOCK_M and BLOCK_N 64, 128 or 256, BLOCK_K 16, 32 or 64, "
                         f"STAGES >= 3 (copies run STAGES - 2 steps ahead)")
    return bm, bn, bk, stages


def gluon_tile(k_loads: int, forms_u: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, STAGES) of the Gluon kernels for `k_loads` expert
    chunks per K step (1: k = 1 or premerged); forms_u: the dx kernel forming u = dR * x.

    128x128 with 8 warps (two warpgroups of 64 rows, 64 fp32 accumulators a thread), the first
    (BLOCK_K, STAGES) of `_TILE_PREFERENCE` that fits 200 KB of shared memory. The loop needs
    STAGES >= 3: copies run STAGES - 2 steps ahead of the merge. Triton 3.6 sm_90 bf16
    (compile_check): 99-221 registers, 0 spills, wgmma.wait_group 1 in the loop.
    Raises ValueError when nothing fits (many experts per sample: the Triton kernel runs).
    """
    bm, bn, warps = 128, 128, 8
    override = _tile_override()
    if override:
        bm, bn = override[0] or bm, override[1] or bn
        warps = 4 if bm == 64 else 8
    for bk, stages in ((override[2:],) if override else _TILE_PREFERENCE):
        if gluon_smem_bytes(bm, bn, bk, stages, k_loads, forms_u) <= SMOD_SMEM_BUDGET:
            return bm, bn, bk, warps, stages
    raise ValueError(f"no Gluon tile fits {k_loads} expert chunks per step"
                     f"{' at SWITCH_DIT_SMOD_GLUON_TILE' if override else ''}; "
                     f"use the Triton kernel")


# Gluon is experimental and its API moves between releases (Triton 3.9 renamed the cp.async
# builtin): the kernels are written for, and read by the gate under, the GPU machines' Triton.
GLUON_TRITON_VERSIONS = ("3.6.",)


def gluon_supported() -> bool:
    """This Triton has the Gluon API these kernels are written against (3.6)."""
    return HAVE_GLUON and triton.__version__.startswith(GLUON_TRITON_VERSIONS)


def _is_sm90(x: torch.Tensor) -> bool:
    """x lives on a Hopper GPU (the compile check's stand-in driver patches this)."""
    return x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] == 9


def gluon_enabled(x: torch.Tensor) -> bool:
    """SWITCH_DIT_SMOD_GLUON=1 and the Gluon kernels apply: 16-bit x on an sm_90 GPU, Triton 3.6.

    Opt-in until a GPU run shows the kernels correct and faster (module docstring)."""
    if os.environ.get("SWITCH_DIT_SMOD_GLUON", "0") != "1" or not gluon_supported():
        return False
    return x.dtype in (torch.float16, torch.bfloat16) and _is_sm90(x)


if HAVE_GLUON:

    @gluon.constexpr_function
    def _chunk_layout(cols, num_warps):
        """Blocked register layout of a [rows, cols] 16-bit chunk: 16-byte vectors along cols."""
        vec = 8
        lanes_c = min(32, max(1, cols // vec))
        return gl.BlockedLayout(size_per_thread=[1, vec], threads_per_warp=[32 // lanes_c, lanes_c],
                                warps_per_cta=[num_warps, 1], order=[1, 0])

    @gluon.constexpr_function
    def _mma_layout(block_m, block_n, num_warps):
        """wgmma accumulator layout: warps stacked along M (16 rows each), one N-wide instruction."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                         instr_shape=[16, block_n, 16])

    @gluon.constexpr_function
    def _smem_layout(rows, cols):
        """NVMMA shared layout of a [rows, cols] 16-bit tile (128-byte swizzle when it fits)."""
        width = cols * 2
        swizzle = 128 if width % 128 == 0 else (64 if width % 64 == 0 else 32)
        return gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=16, rank=2)

    @gluon.jit
    def _tile_coords(N_u, D, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """(unit, tile_base int64, m_start, n_start) of this program, as `unit_row_tile`."""
        pid = gl.program_id(0)
        n_tiles_n = gl.cdiv(D, BLOCK_N)
        tiles_per_unit = gl.cdiv(N_u, BLOCK_M)
        pid_m = pid // n_tiles_n
        unit = pid_m // tiles_per_unit
        m_start = (pid_m % tiles_per_unit) * BLOCK_M
        tile_base = (unit.to(gl.int64) * N_u + m_start) * D
        return unit, tile_base, m_start, (pid % n_tiles_n) * BLOCK_N

    @gluon.jit
    def _issue_step(step, slot, x_tile, dr_tile, w_ptr, ids_ptr, unit, rows_left, n_start, D,
                    x_ring, dr_ring, e_ring,
                    K_EXP_LOADS: gl.constexpr, PREMERGED: gl.constexpr, IS_DX: gl.constexpr,
                    U_GIVEN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    BLOCK_K: gl.constexpr, num_warps: gl.constexpr):
        """cp.async of K step `step` into ring slot `slot`; one commit group (empty past D)."""
        a_layout: gl.constexpr = _chunk_layout(BLOCK_K, num_warps)
        k0 = step * BLOCK_K
        rm = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_layout))
        kk = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
        a_offs = rm[:, None] * D + kk[None, :]
        a_mask = (rm < rows_left)[:, None] & (kk < D)[None, :]
        async_copy.async_copy_global_to_shared(x_ring.index(slot), x_tile + a_offs, mask=a_mask)
        if IS_DX and not U_GIVEN:
            async_copy.async_copy_global_to_shared(dr_ring.index(slot), dr_tile + a_offs,
                                                   mask=a_mask)
        if IS_DX:
            # W~^T chunk as W rows: piece [BN, BK] = W[e][n_start + nn, k0 + kk], rows contiguous
            b_layout: gl.constexpr = _chunk_layout(BLOCK_K, num_warps)
            bn = n_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, b_layout))
            bk = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, b_layout))
            b_offs = bn[:, None] * D + bk[None, :]
            b_mask = (bn < D)[:, None] & (bk < D)[None, :]
        else:
            b_layout: gl.constexpr = _chunk_layout(BLOCK_N, num_warps)
            bk = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
            bn = n_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, b_layout))
            b_offs = bk[:, None] * D + bn[None, :]
            b_mask = (bk < D)[:, None] & (bn < D)[None, :]
        for j in gl.static_range(K_EXP_LOADS):
            if PREMERGED:
                base = w_ptr
            else:
                base = w_ptr + gl.load(ids_ptr + unit * K_EXP_LOADS + j).to(gl.int64) * D * D
            async_copy.async_copy_global_to_shared(e_ring.index(slot * K_EXP_LOADS + j),
                                                   base + b_offs, mask=b_mask)
        async_copy.commit_group()

    @gluon.jit
    def _merged_b(e_ring, slot, g_ptr, unit, w_bufs, buf,
                  K_EXP_LOADS: gl.constexpr, MERGE: gl.constexpr, B_ROWS: gl.constexpr,
                  B_COLS: gl.constexpr, num_warps: gl.constexpr):
        """The B chunk of this step in shared memory: the expert slot itself (no merge), or
        w~[buf] = sum_j g_j * expert_j (fp32 sum, one cast to the input dtype)."""
        if MERGE:
            layout: gl.constexpr = _chunk_layout(B_COLS, num_warps)
            w = gl.zeros([B_ROWS, B_COLS], gl.float32, layout)
            for j in gl.static_range(K_EXP_LOADS):
                gj = gl.load(g_ptr + unit * K_EXP_LOADS + j)
                w += gj * e_ring.index(slot * K_EXP_LOADS + j).load(layout).to(gl.float32)
            dst = w_bufs.index(buf)
            dst.store(w.to(e_ring.dtype))
            return dst
        else:
            return e_ring.index(slot)

    @gluon.jit
    def _smod_gluon_kernel(
            x_ptr, dr_ptr, w_ptr, b_ptr, g_ptr, ids_ptr, out_ptr, y_ptr, usum_ptr,
            N_u, D, usum_tiles,
            K_EXP: gl.constexpr, HAS_BIAS: gl.constexpr, PREMERGED: gl.constexpr,
            IS_DX: gl.constexpr, STORE_AUX: gl.constexpr, STORE_USUM: gl.constexpr,
            U_GIVEN: gl.constexpr,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
            STAGES: gl.constexpr, num_warps: gl.constexpr):
        """Forward (IS_DX=False): out = r = x * (1 + x W~ + b~), STORE_AUX: y -> y_ptr.
        dx (IS_DX=True): out = dx = dR * (1 + y) + (dR * x) W~^T, STORE_AUX: u = dR * x -> y_ptr
        (over y, as the Triton dx kernel); STORE_USUM (with STORE_AUX): the column sums of this
        tile's u (fp32 of the rounded u) -> usum[unit * usum_tiles + m tile, cols], usum
        [units * usum_tiles, D] fp32 zeros (the Triton dx kernel's contract); U_GIVEN: y_ptr
        holds u and out_ptr dR * (1 + y).
        x, dr, out, y: [units * N_u, D] 16-bit; w: [E, D, D] (or W~ [D, D] when PREMERGED);
        b: [E, D] / b~ [D] fp32 (forward only); g [R, k] fp32; ids [R, k] int32."""
        gl.static_assert(STAGES >= 3, "copies run STAGES - 2 steps ahead: STAGES >= 3")
        K_EXP_LOADS: gl.constexpr = 1 if PREMERGED else K_EXP
        MERGE: gl.constexpr = K_EXP_LOADS > 1
        # dx forms u from dR and x chunks; with the pre-pass it reads u like the forward reads x
        FORM_U: gl.constexpr = IS_DX and not U_GIVEN
        in_ty: gl.constexpr = x_ptr.dtype.element_ty
        mma_layout: gl.constexpr = _mma_layout(BLOCK_M, BLOCK_N, num_warps)
        a_sl: gl.constexpr = _smem_layout(BLOCK_M, BLOCK_K)
        if IS_DX:
            B_ROWS: gl.constexpr = BLOCK_N
            B_COLS: gl.constexpr = BLOCK_K
        else:
            B_ROWS: gl.constexpr = BLOCK_K
            B_COLS: gl.constexpr = BLOCK_N
        b_sl: gl.constexpr = _smem_layout(B_ROWS, B_COLS)

        unit, tile_base, m_start, n_start = _tile_coords(N_u, D, BLOCK_M, BLOCK_N)
        rows_left = N_u - m_start
        a_src = y_ptr if U_GIVEN else x_ptr      # the A operand's source rows (u or x)
        a_tile = a_src + tile_base
        dr_tile = dr_ptr + tile_base

        a_ring = gl.allocate_shared_memory(in_ty, [STAGES, BLOCK_M, BLOCK_K], a_sl)
        if FORM_U:
            dr_ring = gl.allocate_shared_memory(in_ty, [STAGES, BLOCK_M, BLOCK_K], a_sl)
            u_bufs = gl.allocate_shared_memory(in_ty, [2, BLOCK_M, BLOCK_K], a_sl)
        else:
            dr_ring = a_ring
            u_bufs = a_ring
        e_ring = gl.allocate_shared_memory(in_ty, [STAGES * K_EXP_LOADS, B_ROWS, B_COLS], b_sl)
        if MERGE:
            w_bufs = gl.allocate_shared_memory(in_ty, [2, B_ROWS, B_COLS], b_sl)
        else:
            w_bufs = e_ring

        n_steps = gl.cdiv(D, BLOCK_K)
        for s in gl.static_range(STAGES - 2):
            _issue_step(s, s, a_tile, dr_tile, w_ptr, ids_ptr, unit, rows_left, n_start, D,
                        a_ring, dr_ring, e_ring, K_EXP_LOADS, PREMERGED, IS_DX, U_GIVEN,
                        BLOCK_M, BLOCK_N, BLOCK_K, num_warps)

        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        for i in range(n_steps):
            slot = i % STAGES
            async_copy.wait_group(STAGES - 3)   # step i's copies (this thread's) landed
            # cp.async writes through the generic proxy, the wgmma reads through the async one
            fence_async_shared()
            gl.thread_barrier()                 # (A) everyone's; wgmma i - 2 retired everywhere
            nxt = i + STAGES - 2
            _issue_step(nxt, nxt % STAGES, a_tile, dr_tile, w_ptr, ids_ptr, unit, rows_left,
                        n_start, D, a_ring, dr_ring, e_ring, K_EXP_LOADS, PREMERGED, IS_DX,
                        U_GIVEN, BLOCK_M, BLOCK_N, BLOCK_K, num_warps)
            if FORM_U:
                # u = dR * x rounded to the input dtype, as autograd's own product
                u_layout: gl.constexpr = _chunk_layout(BLOCK_K, num_warps)
                u = (dr_ring.index(slot).load(u_layout).to(gl.float32)
                     * a_ring.index(slot).load(u_layout).to(gl.float32))
                a_op = u_bufs.index(i % 2)
                a_op.store(u.to(in_ty))
            else:
                a_op = a_ring.index(slot)
            b_op = _merged_b(e_ring, slot, g_ptr, unit, w_bufs, i % 2, K_EXP_LOADS, MERGE,
                             B_ROWS, B_COLS, num_warps)
            if MERGE or FORM_U:
                fence_async_shared()            # generic-proxy stores -> the wgmma's async reads
                gl.thread_barrier()             # (B) every thread's part of the tile is stored
            if IS_DX:
                b_op = b_op.permute((1, 0))
            acc = warpgroup_mma(a_op, b_op, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        async_copy.wait_group(0)

        if K_EXP == 1 and not PREMERGED:
            acc = acc * gl.load(g_ptr + unit)
        rm = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        cn = n_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
        mask_n = cn < D
        if HAS_BIAS and not IS_DX:
            if PREMERGED:
                acc += gl.load(b_ptr + cn, mask=mask_n, other=0.0).to(gl.float32)[None, :]
            else:
                # b~ summed in fp32 first, then added once: the Triton twin's order, same bits
                bt = gl.zeros([BLOCK_N], gl.float32, gl.SliceLayout(0, mma_layout))
                for j in gl.static_range(K_EXP):
                    e = gl.load(ids_ptr + unit * K_EXP + j).to(gl.int64)
                    gj = gl.load(g_ptr + unit * K_EXP + j)
                    bt += gj * gl.load(b_ptr + e * D + cn, mask=mask_n, other=0.0).to(gl.float32)
                acc += bt[None, :]
        offs = tile_base + rm[:, None] * D + cn[None, :]
        mask = (rm < rows_left)[:, None] & mask_n[None, :]
        if IS_DX:
            if U_GIVEN:
                dx_pw = gl.load(out_ptr + offs, mask=mask, other=0.0).to(gl.float32)
                gl.store(out_ptr + offs, (dx_pw + acc).to(out_ptr.dtype.element_ty), mask=mask)
            else:
                dr = gl.load(dr_ptr + offs, mask=mask, other=0.0).to(gl.float32)
                y = gl.load(y_ptr + offs, mask=mask, other=0.0).to(gl.float32)
                gl.store(out_ptr + offs, (dr * (1.0 + y) + acc).to(out_ptr.dtype.element_ty),
                         mask=mask)
                if STORE_AUX:
                    x = gl.load(x_ptr + offs, mask=mask, other=0.0).to(gl.float32)
                    # every thread's read of this y tile precedes any thread's overwrite with u
                    gl.thread_barrier()
                    u = (dr * x).to(y_ptr.dtype.element_ty)
                    gl.store(y_ptr + offs, u, mask=mask)
                    if STORE_USUM:
                        # masked rows and columns loaded dR = x = 0: they add 0
                        usum_row = unit.to(gl.int64) * usum_tiles + m_start // BLOCK_M
                        gl.store(usum_ptr + usum_row * D + cn, gl.sum(u.to(gl.float32), axis=0),
                                 mask=mask_n)
        else:
            x = gl.load(x_ptr + offs, mask=mask, other=0.0).to(gl.float32)
            gl.store(out_ptr + offs, (x * (1.0 + acc)).to(out_ptr.dtype.element_ty), mask=mask)
            if STORE_AUX:
                gl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x, dr, weight, bias, g, ids, out, y, rows_per_unit: int, *, premerged: bool,
            is_dx: bool, store_aux: bool, u_given: bool = False, usum_part=None,
            usum_tiles: int = 0) -> None:
    num_units, k = ids.shape
    dim = x.shape[-1]
    bm, bn, bk, warps, stages = gluon_tile(1 if premerged else k, is_dx and not u_given)
    if usum_part is not None and usum_tiles < triton.cdiv(rows_per_unit, bm):
        raise ValueError(f"usum_tiles={usum_tiles}: fewer than the {triton.cdiv(rows_per_unit, bm)} "
                         f"M tiles of {rows_per_unit} rows")
    grid = (num_units * triton.cdiv(rows_per_unit, bm) * triton.cdiv(dim, bn),)
    _smod_gluon_kernel[grid](
        x, dr if dr is not None else x, weight, bias if bias is not None else x, g, ids, out,
        y if y is not None else out, usum_part if usum_part is not None else g, rows_per_unit,
        dim, usum_tiles,
        K_EXP=1 if premerged else k, HAS_BIAS=bias is not None, PREMERGED=premerged,
        IS_DX=is_dx, STORE_AUX=store_aux, STORE_USUM=store_aux and usum_part is not None,
        U_GIVEN=u_given,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, num_warps=warps)


def gluon_applies(k_loads: int, forms_u: bool, x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """The opt-in is on and this call fits the Gluon kernels: 16-bit x on sm_90, every tensor in
    x's dtype (the kernel copies them into x-typed buffers; the Triton twin would cast), D a
    multiple of 16 and every tensor 16-byte aligned (16-byte cp.async: every row starts at a
    multiple of D; without the JIT's divisibility-16 hint on D Triton 3.6 fails to lower them),
    and a tile that fits `k_loads` expert chunks (forms_u: the dx kernel forming u = dR * x).
    Switch-DiT's D = 384 ... 1152 and torch's allocations all qualify."""
    if not gluon_enabled(x) or x.shape[-1] % 16 != 0:
        return False
    if any(t.dtype != x.dtype for t in tensors):
        return False
    if any(t.data_ptr() % 16 for t in (x, *tensors)):
        return False
    try:
        gluon_tile(k_loads, forms_u)
    except ValueError:
        return False
    return True


def launch_fwd_gluon(x, weight, bias, g, ids, rows_per_unit, r, y, *, premerged: bool) -> None:
    """Same contract as `switch_modulation.launch_fwd` (where `gluon_applies` holds)."""
    _launch(x, None, weight, bias, g, ids, r, y, rows_per_unit, premerged=premerged,
            is_dx=False, store_aux=y is not None)


def launch_dx_gluon(dr, x, weight, g, ids, y, dx, rows_per_unit, *, premerged: bool,
                    store_u: bool, u_given: bool = False, usum_part=None,
                    usum_tiles: int = 0) -> None:
    """Same contract as `switch_modulation_bwd.launch_dx` (where `gluon_applies` holds): y is
    read (dR * (1 + y)) and, with store_u, overwritten by u; u_given: y holds u already;
    usum_part [units * usum_tiles, D] fp32 zeros (with store_u): the per-M-tile sums of u
    (usum_tiles >= the Gluon kernel's M tiles per unit, ceil(rows_per_unit / 128))."""
    _launch(x, dr, weight, None, g, ids, dx, y, rows_per_unit, premerged=premerged, is_dx=True,
            store_aux=store_u and not u_given, u_given=u_given, usum_part=usum_part,
            usum_tiles=usum_tiles)
