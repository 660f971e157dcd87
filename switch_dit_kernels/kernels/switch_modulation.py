"""Forward kernel of Switch-DiT's SMoE modulation: r = x * (1 + x W~ + b~), W~ formed on chip.

For sample b with experts e_j and gate weights g_j (j < k), the k linear experts collapse into one:

    y_b = sum_j g_j (x_b W_ej + b_ej) = x_b W~_b + b~_b,   W~_b = sum_j g_j W_ej,  b~_b = sum_j g_j b_ej
    r_b = x_b * (1 + y_b)

so the layer is one GEMM per sample, not k. The kernel never writes a W~_b: each program forms the
[BLOCK_K, BLOCK_N] chunk of W~_b it needs (as its transpose, see `modulation_gemm`) from the
k expert chunks (fp32 sum, cast to the input dtype, then tl.dot with fp32 accumulation) and fuses
r = x * (1 + acc + b~) into the epilogue.

Work (M = B*N rows): B*N*D*D MACs on the tensor cores (one dense Linear(D, D)) plus the W~ formation,
k*BLOCK_K*BLOCK_N FMAs per program per K step = k/BLOCK_M of the MACs (k=2, BLOCK_M=128: 1.6 %),
but on the CUDA cores, ~15x slower per op than the tensor cores: up to ~25 % of the GEMM's time
where it does not overlap, hence BLOCK_M=128 and the premerged shared path. On sm_90 it overlaps:
the merged chunk is the MMA's register operand (`modulation_gemm`), so the wgmma of K step i is
still in flight while step i + 1 merges. k = 1 skips it (the accumulator is scaled by g). Expert
tiles come from L2 (E*D*D*2 bytes = 8 MB at E=3, D=1152).
Memory: reads x once (+ the epilogue's x tile, an L2 hit), writes r; in training (x needing a gradient)
also y, one x-sized tensor: the backward's only saved activation.

Route units: the kernel sees R units of N_u contiguous rows, unit u routed by row u of topk_* [R, k].
Per-sample routing: R = B, N_u = N; M-tiles never straddle two samples (partial last tiles are masked).
One routing shared by the batch ([1, k]: sampling, CFG pairs): `merge_experts` forms W~ [D, D] once
(k*D*D reads, a few microseconds) and the kernel runs PREMERGED as one plain dense GEMM over R = 1 unit of B*N rows.

Launch order: program id -> (M tile, N tile) with the N tiles of an M tile adjacent, so the x row
block [BLOCK_M, D] is read by D/BLOCK_N programs that run together (L2 hits) rather than re-read from
HBM; x (150 MB at B=256, N=256, D=1152) does not fit in L2, the weights do.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreting
from . import switch_modulation_gluon, tuning
from .tuning import autotune_cache_enabled, autotuning_enabled

# ----------------------------------------------------------------------------------------------
# Autotuning, keyed on (rows per unit, D, k) (the autotuner adds the tensors' dtypes to the key).
# The space is BLOCK_M 64/128, BLOCK_N 64/128/256, BLOCK_K 32/64, 4/8 warps, 3/4 stages; by default
# a curated 10 of its 48 points plus one 256-row tile (`SMOD_SPACE`), which the pruner cuts at
# launch to the GPU generation's list (`SMOD_CURATED`; each config costs a compilation, ~1 s, on
# the first call per key). SWITCH_DIT_AUTOTUNE=full (or SWITCH_DIT_SMOD_AUTOTUNE=full) benchmarks
# all 48 + 1; SWITCH_DIT_AUTOTUNE=0 keeps the first that fits (one compilation per key, the same
# bits in every process). Under the interpreter a single small config: no benchmarking, and tiles
# small enough that odd test sizes (24, 37, 40) span several tiles.
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
SMOD_SPACE = [
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3),
    (128, 256, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 32, 4, 3),
    (64, 256, 32, 8, 4), (64, 64, 64, 4, 3),
    # One sample of N = 256 per M tile: each merged W~ chunk feeds twice the MMA work of a 128-row
    # tile (half the merges per MMA); no spill on sm_90 (Triton 3.6 bf16: 195 regs in the forward
    # with the merged chunk as operand A); the autotuner decides on a GPU.
    (256, 64, 64, 8, 3),
]
SMOD_CURATED = {
    # Triton 3.6 sm_90 bf16, compile_check --gate --configs all (2026-12-01): every kept config of
    # every default variant keeps a wgmma in flight (fwd k = 1, 2, 4 and premerged; dx with u from
    # the pre-pass at k >= 2, with the fused u at k = 1 and premerged), so the list is picked on
    # the rest of the reading: BLOCK_M = 64 rows per warpgroup, BLOCK_K = 64 where it compiles
    # clean. Kept: 128x128x64 w8 s3 (the default; fwd 139-209 regs, dx 126-217), 256x64x64 w8 s3
    # (fwd: half the merges per MMA, 195 regs; the dx's two row tiles exceed shared memory, the
    # pruner drops it there), 64x128x64 w4 s4 (fwd up to 238 regs, no spill), 64x128x32 w4 s3,
    # 64x64x64 w4 s3 (small problems). Dropped: 128x128x32 w8 s4 and 64x256x32 w8 s4 (BLOCK_K 32
    # at 8 warps: half the wgmma depth a stage), 128x64x64 w4 s4 (128 rows on one warpgroup); the
    # 128x256 and 128x128 w4 tiles spill (328-352 B) and were already pruned. At Switch-DiT-XL/2
    # (N = 256, D = 1152, k = 2): fwd 8 -> 5, dx 7 -> 4 compilations.
    "hopper": [(128, 128, 64, 8, 3), (256, 64, 64, 8, 3), (64, 128, 64, 4, 4), (64, 128, 32, 4, 3),
               (64, 64, 64, 4, 3)],
    # mma.sync: 32-deep tiles with 3-4 stages and two 64-deep half tiles; the pruner's shared-memory
    # budget follows the device (160 KB sm_80, 96 KB sm_86/89). Not gate-read (sm_90 only).
    "ampere": [(128, 128, 32, 8, 4), (64, 128, 32, 4, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)],
}


def fwd_configs(interpreting: bool | None = None):
    """The forward/dx kernels' autotuning space (one config under TRITON_INTERPRET=1)."""
    if triton_interpreting() if interpreting is None else interpreting:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    if "full" in (os.environ.get("SWITCH_DIT_SMOD_AUTOTUNE", ""),
                  os.environ.get("SWITCH_DIT_AUTOTUNE", "")):
        points = [(bm, bn, bk, w, s) for bm in (64, 128) for bn in (64, 128, 256) for bk in (32, 64)
                  for w in (4, 8) for s in (3, 4)] + [(256, 64, 64, 8, 3)]
    else:
        points = SMOD_SPACE
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in points]


def prune_fwd_configs(configs, named_args, **kwargs):
    """The GPU generation's configs (`tuning.for_generation`) whose pipelined loads fit in shared
    memory and whose tiles do not exceed the problem; only the first under SWITCH_DIT_AUTOTUNE=0.

    Per stage the kernel loads one x chunk [BLOCK_M, BLOCK_K] and k expert chunks [BLOCK_K, BLOCK_N]
    (1 when PREMERGED or k = 1), so k = 8 with 256-wide N tiles cannot pipeline 4 stages. The dx
    kernel (which has a ``dr_ptr`` argument) loads two row tiles per stage, dR and x: without
    counting both, 128x64x64 with 4 fp32 stages (262-278 KB) survived the pruner on sm_90.
    """
    if len(configs) <= 1:
        return configs
    capability = tuning.target_capability()  # at launch: the GPU being compiled for
    smem_limit = tuning.smem_budget(capability, tuning.SMOD_SMEM_BUDGET)
    dim = named_args["D"]
    rows = named_args["N_u"]
    loads = 1 if (kwargs.get("PREMERGED") or kwargs.get("K_EXP", 1) == 1) else kwargs["K_EXP"]
    elt = named_args["x_ptr"].element_size()
    row_tiles = 2 if "dr_ptr" in named_args else 1
    max_n = max(64, triton.next_power_of_2(dim))
    max_m = max(64, triton.next_power_of_2(rows))
    kept = []
    for c in tuning.for_generation(configs, SMOD_CURATED, capability):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        smem = c.num_stages * (row_tiles * bm * bk + loads * bk * bn) * elt
        if smem > smem_limit or bn > max_n or bm > max_m or bk > max(32, triton.next_power_of_2(dim)):
            continue
        # At most 64 fp32 accumulator values a thread: the epilogue (r = x * (1 + acc), y / u / dx
        # stores) needs registers beside them. Triton 3.6 sm_90 bf16 (compile_check --gate): every
        # config at 128 values a thread (128x128 w4, 128x256 w8) spilled 16-608 B in the fwd or dx
        # kernel, none at 64.
        if bm * bn > 64 * 32 * c.num_warps:
            continue
        kept.append(c)
    if not kept:  # many experts per sample: a small tile, pipelined only if that fits
        stages = 2 if 2 * (row_tiles * 64 * 32 + loads * 32 * 64) * elt <= smem_limit else 1
        kept = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4,
                              num_stages=stages)]
    return kept if autotuning_enabled() else kept[:1]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: IEEE fp32 unless PyTorch itself allows TF32 (it does not by default)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; ignored for 16-bit operands


def issues_wgmma(dtype: torch.dtype) -> bool:
    """Whether the forward / dx dots on `dtype` inputs run on sm_90's tensor cores (wgmma): 16-bit
    inputs, or float32 as TF32 (torch.backends.cuda.matmul.allow_tf32). IEEE float32 (PyTorch's
    default) and float64 compile to FMA / DMMA, which have no MMA to keep in flight."""
    return dtype in (torch.float16, torch.bfloat16) or (
        dtype == torch.float32 and dot_precision(dtype) == "tf32")


def unit_tile_grid(num_units: int, rows_per_unit: int, dim: int):
    """Launch grid of the kernels that start with `unit_row_tile`: one program per (M tile, N tile),
    M tiles counted per unit so that no tile straddles two units."""
    def grid(meta):
        tiles_m = num_units * triton.cdiv(rows_per_unit, meta["BLOCK_M"])
        return (tiles_m * triton.cdiv(dim, meta["BLOCK_N"]),)
    return grid


@triton.jit
def unit_row_tile(N_u, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (M tile, N tile) of the [units * N_u, D] rows, tiles never straddling units.

    Returns (unit, tile_base, lm, mask_m, cols, mask_n): the unit (sample) it reads W~ of; the
    tile's first element as a scalar int64 (B*N*D exceeds 2^31 at B=256, N=1024, D=1152) so
    offsets inside the tile stay int32 (BLOCK_M*D < 2^31; per-element int64 costs registers);
    local rows lm [BLOCK_M] and their mask; columns cols [BLOCK_N] and their mask.
    """
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(D, BLOCK_N)
    tiles_per_unit = tl.cdiv(N_u, BLOCK_M)
    pid_m = pid // n_tiles_n
    unit = pid_m // tiles_per_unit
    m_start = (pid_m % tiles_per_unit) * BLOCK_M
    tile_base = (unit.to(tl.int64) * N_u + m_start) * D
    lm = tl.arange(0, BLOCK_M)
    cols = (pid % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return unit, tile_base, lm, lm < N_u - m_start, cols, cols < D


@triton.jit
def load_merged_tile(w_ptr, ids_ptr, g_ptr, unit, rows, cols, mask, D,
                     K_EXP: tl.constexpr, PREMERGED: tl.constexpr, TRANSPOSE: tl.constexpr):
    """The [len(rows), len(cols)] chunk of W~ (chunk[i, j] = W~[rows[i], cols[j]]), or of W~^T
    when TRANSPOSE (chunk[i, j] = W~[cols[j], rows[i]]), in W's dtype; mask [len(rows), len(cols)].

    W~ = sum_j g_j W_ej summed in fp32 over the k expert chunks, then cast once to the input dtype
    (the operand tl.dot runs on). k = 1 and PREMERGED load the chunk as is: k = 1 scales the
    accumulator by g instead (exact in fp32), PREMERGED weights are W~ already.
    """
    if TRANSPOSE:
        offs = cols[None, :] * D + rows[:, None]
    else:
        offs = rows[:, None] * D + cols[None, :]
    if PREMERGED or K_EXP == 1:
        if PREMERGED:
            base = w_ptr
        else:
            base = w_ptr + tl.load(ids_ptr + unit * K_EXP).to(tl.int64) * D * D
        return tl.load(base + offs, mask=mask, other=0.0)
    w = tl.zeros(offs.shape, dtype=tl.float32)
    for j in tl.static_range(K_EXP):
        e = tl.load(ids_ptr + unit * K_EXP + j).to(tl.int64)
        gj = tl.load(g_ptr + unit * K_EXP + j)
        w += gj * tl.load(w_ptr + e * D * D + offs, mask=mask, other=0.0).to(tl.float32)
    return w.to(w_ptr.dtype.element_ty)


@triton.jit
def _modulation_gemm_step(acc, kk, a_tile, dr_tile, w_ptr, ids_ptr, g_ptr, unit, lm, mask_m, cols,
                          mask_n, D, K_EXP: tl.constexpr, PREMERGED: tl.constexpr,
                          W_TRANSPOSED: tl.constexpr, FORM_U: tl.constexpr,
                          MERGED_AS_A: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K step (columns kk) of `modulation_gemm`: acc (acc^T when MERGED_AS_A) += the chunk's
    product."""
    in_ty = a_tile.dtype.element_ty
    mask_k = kk < D
    if MERGED_AS_A:
        a_offs = lm[None, :] * D + kk[:, None]
        a_mask = mask_m[None, :] & mask_k[:, None]
    else:
        a_offs = lm[:, None] * D + kk[None, :]
        a_mask = mask_m[:, None] & mask_k[None, :]
    a = tl.load(a_tile + a_offs, mask=a_mask, other=0.0)
    if FORM_U:
        a = (tl.load(dr_tile + a_offs, mask=a_mask, other=0.0).to(tl.float32)
             * a.to(tl.float32)).to(in_ty)
    if MERGED_AS_A:
        # [BLOCK_N, BLOCK_K]: W~^T chunk for the forward, W~ chunk for the dx
        w = load_merged_tile(w_ptr, ids_ptr, g_ptr, unit, cols, kk,
                             mask_n[:, None] & mask_k[None, :], D, K_EXP, PREMERGED,
                             not W_TRANSPOSED)
        acc = tl.dot(w.to(in_ty), a, acc, input_precision=DOT_PRECISION)
    else:
        w = load_merged_tile(w_ptr, ids_ptr, g_ptr, unit, kk, cols,
                             mask_k[:, None] & mask_n[None, :], D, K_EXP, PREMERGED,
                             W_TRANSPOSED)
        acc = tl.dot(a, w.to(in_ty), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def modulation_gemm(a_tile, dr_tile, w_ptr, ids_ptr, g_ptr, unit, lm, mask_m, cols, mask_n, D,
                    K_EXP: tl.constexpr, PREMERGED: tl.constexpr, W_TRANSPOSED: tl.constexpr,
                    FORM_U: tl.constexpr, MERGED_AS_A: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 = A @ W~ (W~^T when W_TRANSPOSED: the dx) over all D columns.

    A: rows lm of the [*, D] tile at a_tile (the input dtype); FORM_U: A = dR * x formed on the
    fly from dr_tile and a_tile (x), rounded to the input dtype as autograd's own product is.
    MERGED_AS_A: computed as acc^T = W~^T A^T (dx: W~ A^T), so the chunk merged from the k
    experts on the CUDA cores is the MMA's register operand and the loaded A^T chunk its shared
    operand. On sm_90 that keeps the wgmma of step i in flight while step i + 1 merges (Triton 3.6:
    wgmma.wait_group 1-3 in the loop); with the merged chunk as the shared operand (MERGED_AS_A
    off) Triton stores it to one shared buffer the pending wgmma still reads, and waits for every
    wgmma (wait_group 0). The transposed accumulator costs one layout change after the loop.
    """
    if MERGED_AS_A:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if DOT_PRECISION == "ieee":
        # IEEE float32: FMA dots, no wgmma. The counted loop below made ptxas keep the fp32
        # accumulator in local memory here (Triton 3.6 sm_90, k = 1, 128x128x64 w8: 5.6 KB of stack
        # and 32 registers, against 24 B with this loop).
        for k0 in range(0, D, BLOCK_K):
            acc = _modulation_gemm_step(acc, k0 + tl.arange(0, BLOCK_K), a_tile, dr_tile, w_ptr,
                                        ids_ptr, g_ptr, unit, lm, mask_m, cols, mask_n, D, K_EXP,
                                        PREMERGED, W_TRANSPOSED, FORM_U, MERGED_AS_A,
                                        DOT_PRECISION)
    else:
        # At least one step, counted: a `range(0, D, BLOCK_K)` loop may run zero times as far as
        # the compiler knows, and its separate zero-trip path sets the accumulator with movs
        # where the loop's last wgmma is still in flight: ptxas then serialised the whole wgmma
        # chain (C7515, Triton 3.6 sm_90 bf16, e.g. the dx with u = dR * x and its column sums,
        # every tile). D >= 1.
        for step in range(0, tl.maximum(tl.cdiv(D, BLOCK_K), 1)):
            acc = _modulation_gemm_step(acc, step * BLOCK_K + tl.arange(0, BLOCK_K), a_tile,
                                        dr_tile, w_ptr, ids_ptr, g_ptr, unit, lm, mask_m, cols,
                                        mask_n, D, K_EXP, PREMERGED, W_TRANSPOSED, FORM_U,
                                        MERGED_AS_A, DOT_PRECISION)
    if MERGED_AS_A:
        acc = tl.trans(acc)
    return acc


def merged_as_register_operand(k_merged: int) -> bool:
    """Whether the forward / dx kernel makes the merged W~ chunk the MMA's register operand
    (`modulation_gemm`'s MERGED_AS_A): whenever k_merged >= 2 experts are merged on chip (one
    chunk is loaded, not merged: no), unless SWITCH_DIT_SMOD_MERGED_OPERAND=b asks for the other
    orientation (the merged chunk as the shared operand: the only one until 2026-12-01) to time
    against. The compiled code favours `a` everywhere it was read (Triton 3.6, forward k = 2):
    sm_90 bf16 keeps the wgmma in flight (b: wait_group 0); IEEE float32 (FMA dots) keeps its
    accumulator in registers on sm_90 and sm_80 (b: 5-12 KB of local memory, 32 registers);
    sm_80 bf16 needs 109-188 registers against 159-255 (one b tile spills 8 B)."""
    value = os.environ.get("SWITCH_DIT_SMOD_MERGED_OPERAND", "a")
    if value not in ("a", "b"):
        raise ValueError(f"SWITCH_DIT_SMOD_MERGED_OPERAND must be 'a' (the merged W~ chunk is the "
                         f"MMA's register operand, the default) or 'b' (its shared operand), "
                         f"got {value!r}")
    return k_merged >= 2 and value == "a"


@triton.jit
def merged_bias(b_ptr, ids_ptr, g_ptr, unit, cols_n, mask_n, D,
                K_EXP: tl.constexpr, PREMERGED: tl.constexpr):
    """b~[cols] = sum_j g_j b_ej[cols] in fp32 (PREMERGED: b_ptr already holds b~ in fp32)."""
    if PREMERGED:
        return tl.load(b_ptr + cols_n, mask=mask_n, other=0.0).to(tl.float32)
    bt = tl.zeros(cols_n.shape, dtype=tl.float32)
    for j in tl.static_range(K_EXP):
        e = tl.load(ids_ptr + unit * K_EXP + j).to(tl.int64)
        gj = tl.load(g_ptr + unit * K_EXP + j)
        bt += gj * tl.load(b_ptr + e * D + cols_n, mask=mask_n, other=0.0).to(tl.float32)
    return bt


# Keyed on every constexpr that changes the compiled kernel (PREMERGED / STORE_Y: another loop body
# and epilogue), so no variant reuses a config timed on another.
@triton.autotune(configs=fwd_configs(), key=["N_u", "D", "K_EXP", "HAS_BIAS", "PREMERGED", "STORE_Y",
                                             "MERGED_AS_A", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_fwd_configs},
                 cache_results=autotune_cache_enabled(), do_bench=tuning.bench_unless_untuned)
@triton.jit
def _switch_modulation_fwd_kernel(
        x_ptr, w_ptr, b_ptr, g_ptr, ids_ptr, r_ptr, y_ptr,
        N_u, D,
        K_EXP: tl.constexpr, HAS_BIAS: tl.constexpr, PREMERGED: tl.constexpr,
        STORE_Y: tl.constexpr, MERGED_AS_A: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """r[rows, cols] = x * (1 + y), y = x @ W~_unit + b~_unit; one program per (M tile, N tile).
    MERGED_AS_A: see `modulation_gemm`."""
    unit, tile_base, lm, mask_m, cols, mask_n = unit_row_tile(N_u, D, BLOCK_M, BLOCK_N)
    x_tile = x_ptr + tile_base

    acc = modulation_gemm(x_tile, x_tile, w_ptr, ids_ptr, g_ptr, unit, lm, mask_m, cols, mask_n,
                          D, K_EXP, PREMERGED, False, False, MERGED_AS_A, DOT_PRECISION,
                          BLOCK_M, BLOCK_N, BLOCK_K)
    if K_EXP == 1 and not PREMERGED:
        acc = acc * tl.load(g_ptr + unit)
    if HAS_BIAS:
        acc += merged_bias(b_ptr, ids_ptr, g_ptr, unit, cols, mask_n, D, K_EXP, PREMERGED)[None, :]

    out_offs = lm[:, None] * D + cols[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    xo = tl.load(x_tile + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(r_ptr + tile_base + out_offs, (xo * (1.0 + acc)).to(r_ptr.dtype.element_ty), mask=out_mask)
    if STORE_Y:
        tl.store(y_ptr + tile_base + out_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_experts_kernel(w_ptr, b_ptr, g_ptr, ids_ptr, wm_ptr, bm_ptr, D,
                          K_EXP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """wm = sum_j g_j W[e_j] (fp32 sum, cast to W's dtype), bm = sum_j g_j b[e_j] (fp32), flat."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D * D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bacc = tl.zeros([BLOCK], dtype=tl.float32)
    bmask = offs < D
    for j in tl.static_range(K_EXP):
        e = tl.load(ids_ptr + j).to(tl.int64)
        gj = tl.load(g_ptr + j)
        acc += gj * tl.load(w_ptr + e * D * D + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bacc += gj * tl.load(b_ptr + e * D + offs, mask=bmask, other=0.0).to(tl.float32)
    tl.store(wm_ptr + offs, acc.to(wm_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(bm_ptr + offs, bacc, mask=bmask)


def merge_experts(weight: torch.Tensor, bias: Optional[torch.Tensor], g: torch.Tensor,
                  ids: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """W~ [D, D] (weight's dtype) and b~ [D] (float32) of one routing row: g [k] float32, ids [k] int32.

    The same fp32-sum-then-cast as the in-kernel formation; one launch, no host sync.
    """
    dim = weight.shape[1]
    wm = torch.empty(dim, dim, device=weight.device, dtype=weight.dtype)
    bm = torch.empty(dim, device=weight.device, dtype=torch.float32) if bias is not None else None
    block = 1024
    _merge_experts_kernel[(triton.cdiv(dim * dim, block),)](
        weight, bias if bias is not None else wm, g, ids, wm, bm if bm is not None else wm, dim,
        K_EXP=g.numel(), HAS_BIAS=bias is not None, BLOCK=block)
    return wm, bm


def merge_experts_torch(weight, bias, g, ids):
    """Reference of `merge_experts` in plain PyTorch."""
    g = g.float().reshape(-1)
    ids = ids.long().reshape(-1)
    wm = (g[:, None, None] * weight[ids].float()).sum(0).to(weight.dtype)
    bm = (g[:, None] * bias[ids].float()).sum(0) if bias is not None else None
    return wm, bm


def is_shared_routing(x: torch.Tensor, topk_ids: torch.Tensor) -> bool:
    """One routing row for B > 1 samples: the one-timestep fast path (a shape test, no sync)."""
    return topk_ids.shape[0] == 1 and x.shape[0] > 1


def launch_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], g: torch.Tensor,
               ids: torch.Tensor, rows_per_unit: int, r: torch.Tensor, y: Optional[torch.Tensor], *,
               premerged: bool) -> None:
    """Launch the forward kernel on prepared arguments (all contiguous).

    x, r, y: [M, D] views (y None: not stored).  weight: [E, D, D], or W~ [D, D] when premerged.
    bias: [E, D] / b~ [D] float32 (premerged) / None.  g: [R, k] float32.  ids: [R, k] int32.
    rows_per_unit: N_u, with R * N_u = M.
    """
    num_units, k = ids.shape
    if switch_modulation_gluon.gluon_applies(1 if premerged else k, False, x, weight, r):
        # opt-in sm_90 twin that overlaps the W~ merge with the wgmma (SWITCH_DIT_SMOD_GLUON=1)
        switch_modulation_gluon.launch_fwd_gluon(x, weight, bias, g, ids, rows_per_unit, r, y,
                                                 premerged=premerged)
        return
    dim = x.shape[-1]
    _switch_modulation_fwd_kernel[unit_tile_grid(num_units, rows_per_unit, dim)](
        x, weight, bias if bias is not None else x, g, ids, r, y if y is not None else r,
        rows_per_unit, dim,
        K_EXP=1 if premerged else k, HAS_BIAS=bias is not None, PREMERGED=premerged,
        STORE_Y=y is not None, MERGED_AS_A=merged_as_register_operand(1 if premerged else k),
        DOT_PRECISION=dot_precision(x.dtype))


def prepare_routing(topk_weights: torch.Tensor, topk_ids: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """topk_weights -> contiguous float32, topk_ids -> contiguous int32 (device casts, no sync)."""
    return (topk_weights.detach().to(torch.float32).contiguous(),
            topk_ids.to(torch.int32).contiguous())


def switch_modulation_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, store_y: bool = False,
                          out: Optional[torch.Tensor] = None, y_out: Optional[torch.Tensor] = None,
                          merged: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None):
    """Forward of the SMoE modulation with the Triton kernel (no autograd).

    Args:
        x: [B, N, D] float32/float16/bfloat16.  weight: [E, D, D] x's dtype.  bias: [E, D] or None.
        topk_weights: [B, k] or [1, k] (shared by all samples) any float dtype, used in float32.
        topk_ids: same shape, int32/int64.
        store_y: also return y = x W~ + b~ [B, N, D] in x's dtype (the backward's saved activation).
        out, y_out: optional preallocated [B, N, D] outputs (tests poison them with NaN).
        merged: (W~, b~) of a shared routing row when already computed.
    Returns:
        (r, y or None, merged or None): r [B, N, D] in x's dtype; merged is the (W~ [D, D], b~ [D] fp32)
        pair used on the shared-routing path, for the backward to reuse.
    """
    batch, tokens, dim = x.shape
    x = x.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    r = out if out is not None else torch.empty_like(x)
    y = (y_out if y_out is not None else torch.empty_like(x)) if store_y else None
    g, ids = prepare_routing(topk_weights, topk_ids)
    if is_shared_routing(x, topk_ids):
        if merged is None:
            merged = merge_experts(weight, bias, g.reshape(-1), ids.reshape(-1))
        launch_fwd(x.view(-1, dim), merged[0], merged[1], g, ids, batch * tokens, r.view(-1, dim),
                   y.view(-1, dim) if y is not None else None, premerged=True)
    else:
        merged = None
        launch_fwd(x.view(-1, dim), weight, bias, g, ids, tokens, r.view(-1, dim),
                   y.view(-1, dim) if y is not None else None, premerged=False)
    return r, y, merged


def switch_modulation_fwd_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                topk_weights: torch.Tensor, topk_ids: torch.Tensor
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of `switch_modulation_fwd` (store_y=True) in plain PyTorch, computed in float32
    (float64 for float64 inputs) with W~_b materialised: returns (r, y) in x's dtype."""
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = topk_weights.to(acc_dtype)
    ids = topk_ids.long()
    w_t = (g[:, :, None, None] * weight[ids].to(acc_dtype)).sum(1)  # [R, D, D]
    y = torch.matmul(x.to(acc_dtype), w_t)                              # R = 1 broadcasts
    if bias is not None:
        y = y + (g[:, :, None] * bias[ids].to(acc_dtype)).sum(1)[:, None, :]
    r = x.to(acc_dtype) * (1 + y)
    return r.to(x.dtype), y.to(x.dtype)
