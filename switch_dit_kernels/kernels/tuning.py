"""Autotuning configurations of the grouped-GEMM kernels, per GPU generation, and the interpreter's one config.

Knobs (environment variables):
    SWITCH_DIT_AUTOTUNE=1   (default) time the curated configs of the GPU's generation (see
                            `generation`), each one compilation (about 1 s) on the first call per key.
    SWITCH_DIT_AUTOTUNE=0   use the generation's first config that fits instead: nothing is timed, one
                            compilation per kernel and key, the same bits in every process.
    SWITCH_DIT_AUTOTUNE=full  time every config of the kernels' whole space (no generation list).
    SWITCH_DIT_AUTOTUNE_CACHE=0   do not keep autotuning results on disk (kept by default, see
                            `autotune_cache_enabled`).
The generation is read at launch time, by the pruners (from Triton's active driver: the GPU the
kernel is being compiled for), never at import. Under TRITON_INTERPRET=1 a single small config is
used: timing configs in the interpreter is meaningless and slow. Its tiles (16 rows, 32 columns, 16
or 32 deep) make the test shapes (16-48) cross tile edges in every dimension while keeping the
number of interpreted programs low.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreting

# Hopper has 227 KiB of shared memory per block; leave room for the epilogue's scratch.
_SMEM_LIMIT = 220 * 1024
# The same for Switch-DiT's fused forward / dx (Triton and Gluon): their epilogues hold more.
SMOD_SMEM_BUDGET = 200 * 1024
# Above this many fp32 accumulator values per thread the registers spill (255 registers a thread).
_ACC_PER_THREAD = 128

# Dynamic shared memory one block may opt into, less a few KB of headroom for the epilogue's
# scratch (CUDA programming guide, compute-capability table): sm_80/sm_87 163 KB, sm_86/sm_89
# 99 KB. Other targets keep the Hopper-calibrated figures (the autotuner skips a config that raises
# OutOfResources; only an untuned lone config would fail).
_SMEM_BY_CC = {80: 160 * 1024, 87: 160 * 1024, 86: 96 * 1024, 89: 96 * 1024}


def target_capability() -> Optional[int]:
    """Compute capability (e.g. 90) of the GPU the kernel being launched compiles for, or None.

    Read from Triton's active driver (its current CUDA device; compile_check's stand-in driver
    reports sm_90), so it is what the JIT compiles for. Called by the pruners, i.e. at launch time,
    never at import. None for non-CUDA backends and where no GPU driver is available (CPU)."""
    try:
        from triton.runtime.driver import driver
        target = driver.active.get_current_target()
    except Exception:  # noqa: BLE001 - no GPU driver (CPU machine): no generation
        return None
    arch = getattr(target, "arch", None)
    if getattr(target, "backend", None) != "cuda" or not isinstance(arch, int):
        return None
    return arch


def generation(capability: Optional[int]) -> str:
    """"hopper" (sm_90: wgmma), "ampere" (sm_80/86/87/89: mma.sync + cp.async, 99-163 KB of shared
    memory) or "default" (anything else, e.g. Blackwell or no GPU): the whole config list."""
    if capability == 90:
        return "hopper"
    if capability in (80, 86, 87, 89):
        return "ampere"
    return "default"


def smem_budget(capability: Optional[int], hopper_budget: int) -> int:
    """Shared memory a config may need on ``capability`` (``hopper_budget`` where no smaller limit
    is known)."""
    return min(hopper_budget, _SMEM_BY_CC.get(capability, hopper_budget))


def autotune_mode() -> str:
    """"off" (SWITCH_DIT_AUTOTUNE=0, and always under the interpreter), "full" or "curated"."""
    if triton_interpreting():
        return "off"
    value = os.environ.get("SWITCH_DIT_AUTOTUNE", "1")
    return "off" if value == "0" else ("full" if value == "full" else "curated")


Point = Tuple[int, ...]  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)


def config_point(c) -> Point:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
            c.num_stages)


def for_generation(configs: Sequence, curated: Dict[str, Sequence[Point]],
                   capability: Optional[int]) -> list:
    """``configs`` (an autotuner's whole list) cut to the curated list of ``capability``'s
    generation, in that list's order (its first entry is the untuned default); the whole list for
    generations without one and under SWITCH_DIT_AUTOTUNE=full."""
    points = curated.get(generation(capability))
    if points is None or autotune_mode() == "full":
        return list(configs)
    by_point = {config_point(c): c for c in configs}
    return [by_point[p] for p in points if p in by_point]


def bench_unless_untuned(kernel_call, quantiles):
    """The autotuners' `do_bench`: Triton's own benchmarker, except under SWITCH_DIT_AUTOTUNE=0.
    There the pruners keep one config, and Triton (3.6 and 3.9 alike) would still time it on a
    cache miss: dozens of runs, ~0.1 s per key, rerunning kernels that overwrite an input
    (restore_value / reset_to_zero make those reruns safe, at a cost). Untuned, nothing runs:
    every config times 0, the one kept is compiled by the real launch."""
    if autotune_mode() == "off":
        return [0.0] * len(quantiles) if quantiles else 0.0
    from triton.runtime.driver import driver
    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def autotuning_enabled() -> bool:
    return autotune_mode() != "off"


def autotune_cache_enabled() -> bool:
    """SWITCH_DIT_AUTOTUNE_CACHE (default 1): keep each autotuner's timings on disk in Triton's
    cache (``cache_results``: TRITON_CACHE_DIR, default ~/.triton/cache), keyed by Triton's version,
    the target GPU, the kernel source, the tuning key and the configs timed, so a second process
    (each DDP rank, the next training run) loads the winner instead of compiling and timing every
    config again. Triton writes each entry to a temporary file and renames it (atomic on POSIX):
    processes tuning the same key at once each time it and the last rename wins, never a torn
    file. 0 turns it off."""
    return not triton_interpreting() and os.environ.get("SWITCH_DIT_AUTOTUNE_CACHE", "1") != "0"


def _untuned(kept):
    """SWITCH_DIT_AUTOTUNE=0: keep only the first config that fits, so nothing is timed. The
    config lists always hold 2+ entries (Triton runs the pruner only for lists of 2+ configs), and
    the first does not fit every case (float32 gated or float64 tiles need 288-384 KB of shared
    memory; an H100 block gets 227 KB: OutOfResources), so the next that fits is the fallback."""
    return kept if autotuning_enabled() else kept[:1]


def _cfg(bm, bn, bk, warps, stages, **extra):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra), num_warps=warps,
                         num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the grouped GEMM. The whole space leads
# with the untuned default, the gated tile and a small fallback (the order SWITCH_DIT_AUTOTUNE=0
# picks from on generations without a list of their own).
GEMM_SPACE = [
    (128, 128, 64, 8, 4),   # default
    (128, 64, 64, 8, 4),    # gated (2 accumulators): 64 fp32 values a thread
    (64, 64, 64, 4, 3),
    (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 256, 64, 8, 3),
    (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
]
GEMM_CURATED = {
    # Triton 3.6 sm_90 bf16, compile_check --gate --configs all over the 10 launch variants
    # (2026-12-01): every config keeps an MMA in flight; the pruner's register rule leaves no spill.
    # Kept: BLOCK_M = 64 rows per warpgroup (wgmma's M) and BLOCK_K = 64 (128-byte swizzled bf16
    # rows): 128x128x64 w8 (108-169 regs, the default), 128x64x64 w8 (gated: 129-157 regs), 128x256x64
    # w8 (182-254 regs, plain GEMMs), 64x128x64 w4 (116-166 regs), 64x64x64 w4 (64-158 regs, small
    # problems and fallback). Dropped: 128x128x64 w4 and 128x64x64 w4 (128 rows on one warpgroup:
    # 190-218 / 124-168 regs, spills with an activation), 128x128x32 w4 (BLOCK_K 32 halves the
    # wgmma depth a stage; 168-203 regs), 64x256x64 w8 (the 128x128 tile's per-warpgroup MMA with
    # half the reuse of each row tile). 9 -> 5 compilations per key (gated: 2, activations: 4).
    "hopper": [(128, 128, 64, 8, 4), (128, 64, 64, 8, 4), (128, 256, 64, 8, 3),
               (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)],
    # mma.sync tiles within 99 KB (sm_86/89) at bf16, 4 warps: BLOCK_K 32 with 4 stages for the
    # square tile (64 KB), 64-deep half tiles (96 KB), the small fallback (48 KB). Not gate-read
    # (the gate reads sm_90 only).
    "ampere": [(128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
               (64, 64, 64, 4, 3)],
}


def grouped_gemm_configs():
    """Configs of the grouped GEMM (BLOCK_M rows x BLOCK_N columns, BLOCK_K deep): the whole space,
    which `prune_gemm_configs` cuts to the GPU generation's list at launch."""
    if triton_interpreting():
        return [_cfg(16, 32, 16, 1, 1, GROUP_M=2)]
    return [_cfg(*p, GROUP_M=8) for p in GEMM_SPACE]


WEIGHT_GRAD_SPACE = [(64, 128, 128, 8, 3), (64, 256, 128, 8, 3), (64, 64, 128, 4, 4),
                     (64, 64, 64, 4, 3)]
WEIGHT_GRAD_CURATED = {
    # BLOCK_M here is the reduction (rows); the dW tile is BLOCK_K x BLOCK_N, wgmma's M x N.
    # Triton 3.6 sm_90 bf16 (compile_check --gate --configs all, 6 variants, 2026-12-01): all four
    # keep an MMA in flight without spills (80-224 regs) in every launched variant, so Hopper keeps
    # the whole (already short) list. Not listed at all: 32x128x128 w4 s4 and 64x128x64 w4 s4,
    # which ptxas serialised (C7515) for bf16 outputs.
    "hopper": WEIGHT_GRAD_SPACE,
    # Within 99 KB at bf16 (96, 48 and 89 KB by the pruner's count); 64x256x128 (192 KB) is not.
    "ampere": [(64, 128, 128, 8, 3), (64, 64, 64, 4, 3), (64, 64, 128, 4, 4)],
}


def weight_grad_configs():
    """Configs of `weight_grad._weight_grad_body`: a BLOCK_K x BLOCK_N tile of dW[e], reducing
    BLOCK_M rows per step; GROUP_K K tiles per group of the L2-friendly tile order."""
    if triton_interpreting():
        return [_cfg(16, 32, 32, 1, 1, GROUP_K=2)]
    return [_cfg(*p, GROUP_K=8) for p in WEIGHT_GRAD_SPACE]


def _fallback(configs, area, smem, limit):
    """Nothing fits (e.g. float32 gated tiles on sm_86/89's 99 KB, float64 on any GPU): the
    smallest tile, with as few pipeline stages as it takes to fit in ``limit`` (one at least)."""
    c = min(configs, key=area)
    stages = c.num_stages
    while stages > 1 and smem(c, stages) > limit:
        stages -= 1
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages)]


def prune_gemm_configs(configs, named_args, **kwargs):
    """The generation's configs (`for_generation`) that fit (shared memory, registers) and are not
    far wider than the problem; only the first under SWITCH_DIT_AUTOTUNE=0."""
    capability = target_capability()
    smem_limit = smem_budget(capability, _SMEM_LIMIT)
    gated = bool(kwargs.get("GATED", False))
    # An activation epilogue (ACT, GATED, STORE_PRE) needs registers beside the accumulator: Triton
    # 3.6 sm_90 bf16 (compile_check --gate) spilled 16-272 B in every such variant at 128 fp32
    # values a thread (128x128 w4, 128x256 w8, gated 64x256 w8 ...), none at 64.
    acc_per_thread = _ACC_PER_THREAD // 2 if (gated or kwargs.get("ACT", 0) or
                                               kwargs.get("STORE_PRE", False)) else _ACC_PER_THREAD
    # Sorted rows in and out (expert_mlp's layer 2 and its dx for k >= 2), ungated: ptxas serialised
    # every 64-column tile (C7515: 128x64 w8/w4, 64x64 w4; Triton 3.6, sm_90, bf16), none wider.
    sorted_in_out = not (kwargs.get("GATHER_A", True) or kwargs.get("SCATTER_OUT", False) or gated)
    elem = named_args["a_ptr"].element_size()
    n_out, k_dim = named_args["N_OUT"], named_args["K"]
    n_b = 2 if gated else 1  # B tiles a stage (gate and up halves)

    def smem(c, stages):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return (bm * bk + n_b * bk * bn) * elem * stages

    candidates = for_generation(configs, GEMM_CURATED, capability)
    kept = []
    for c in candidates:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (smem(c, c.num_stages) > smem_limit
                or bm * bn * n_b > acc_per_thread * 32 * c.num_warps):
            continue
        if bn > 64 and bn >= 2 * triton.next_power_of_2(n_out):
            continue
        if bk > 32 and bk >= 2 * triton.next_power_of_2(k_dim):
            continue
        if sorted_in_out and bn == 64:
            continue
        kept.append(c)
    return _untuned(kept) or _fallback(
        candidates or configs, lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], smem,
        smem_limit)


def prune_weight_grad_configs(configs, named_args, **kwargs):
    """The generation's weight-gradient configs that fit and are not much wider than dW[e]."""
    capability = target_capability()
    smem_limit = smem_budget(capability, _SMEM_LIMIT)
    elem = named_args["a_ptr"].element_size()
    n_out, k_dim = named_args["N_OUT"], named_args["K"]

    def smem(c, stages):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return (bk * bm + bm * bn) * elem * stages

    candidates = for_generation(configs, WEIGHT_GRAD_CURATED, capability)
    kept = []
    for c in candidates:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (smem(c, c.num_stages) > smem_limit
                or bk * bn > _ACC_PER_THREAD * 32 * c.num_warps):
            continue
        if (bn > 64 and bn >= 2 * triton.next_power_of_2(n_out)) or \
                (bk > 32 and bk >= 2 * triton.next_power_of_2(k_dim)):
            continue
        kept.append(c)
    return _untuned(kept) or _fallback(
        candidates or configs, lambda c: c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"], smem,
        smem_limit)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision. float32 follows torch's TF32 switch (off by default), so the kernels
    are as exact as torch.matmul on the same inputs; 16-bit inputs keep the default ("tf32" is
    ignored for them: their products are exact), which is the tensor-core path."""
    if dtype == torch.float64 or (dtype == torch.float32
                                  and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def acc_dtype(dtype: torch.dtype):
    """Accumulator type of the kernels: float32, float64 for float64 inputs (tl.dot on float64
    operands must accumulate in float64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (queried at call time, cached by torch)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
