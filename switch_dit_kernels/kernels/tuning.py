"""Autotuning configurations of the grouped-GEMM kernels (sm_90), and the interpreter's one config.

Knob (environment variable, read when a kernel module is first imported):
    SWITCH_DIT_AUTOTUNE=0   use one default config instead of timing the list (faster first call).
    SWITCH_DIT_AUTOTUNE_CACHE=0   do not keep autotuning results on disk (kept by default, see
                            `autotune_cache_enabled`).
Under TRITON_INTERPRET=1 a single small config is used: timing configs in the interpreter is
meaningless and slow. Its tiles (16 rows, 32 columns, 16 or 32 deep) make the test shapes (16-48)
cross tile edges in every dimension while keeping the number of interpreted programs low.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreting

# Hopper has 227 KiB of shared memory per block; leave room for the epilogue's scratch.
_SMEM_LIMIT = 220 * 1024
# Above this many fp32 accumulator values per thread the registers spill (255 registers a thread).
_ACC_PER_THREAD = 128


def autotuning_enabled() -> bool:
    return not triton_interpreting() and os.environ.get("SWITCH_DIT_AUTOTUNE", "1") != "0"


def autotune_cache_enabled() -> bool:
    """SWITCH_DIT_AUTOTUNE_CACHE (default 1): keep each autotuner's timings on disk in Triton's
    cache (``cache_results``), keyed by Triton's version, the target GPU, the kernel source and the
    tuning key, so a second process (each DDP rank, the next training run) reuses the choice instead
    of compiling and timing every config again: 21-37 compilations, 26-92 s per entry point on a
    first call here (compile_check --launch, Triton 3.6, 2 CPU cores). 0 turns it off."""
    return not triton_interpreting() and os.environ.get("SWITCH_DIT_AUTOTUNE_CACHE", "1") != "0"


def _untuned(kept):
    """SWITCH_DIT_AUTOTUNE=0: keep only the first config that fits, so nothing is timed. The
    untuned lists carry a small fallback after the default because Triton runs the pruner only
    for lists of 2+ configs, and the default does not fit every case (float32 gated or float64
    tiles need 288-384 KB of shared memory; an H100 block gets 227 KB: OutOfResources)."""
    return kept if autotuning_enabled() else kept[:1]


def _cfg(bm, bn, bk, warps, stages, **extra):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra), num_warps=warps,
                         num_stages=stages)


def grouped_gemm_configs():
    """Configs of the grouped GEMM (BLOCK_M rows x BLOCK_N columns, BLOCK_K deep)."""
    if triton_interpreting():
        return [_cfg(16, 32, 16, 1, 1, GROUP_M=2)]
    default = _cfg(128, 128, 64, 8, 4, GROUP_M=8)
    # 128x64 w8: the gated (2 accumulators) tile that stays at 64 fp32 values a thread.
    gated = _cfg(128, 64, 64, 8, 4, GROUP_M=8)
    if not autotuning_enabled():
        return [default, gated, _cfg(64, 64, 32, 4, 3, GROUP_M=8)]
    return [
        _cfg(128, 256, 64, 8, 3, GROUP_M=8),
        default,
        gated,
        _cfg(128, 128, 64, 4, 4, GROUP_M=8),
        _cfg(128, 128, 32, 4, 4, GROUP_M=8),
        _cfg(64, 256, 64, 8, 3, GROUP_M=8),
        _cfg(64, 128, 64, 4, 4, GROUP_M=8),
        _cfg(128, 64, 64, 4, 4, GROUP_M=8),
        _cfg(64, 64, 64, 4, 3, GROUP_M=8),
    ]


def weight_grad_configs():
    """Configs of `weight_grad._weight_grad_body`: a BLOCK_K x BLOCK_N tile of dW[e], reducing
    BLOCK_M rows per step; GROUP_K K tiles per group of the L2-friendly tile order."""
    if triton_interpreting():
        return [_cfg(16, 32, 32, 1, 1, GROUP_K=2)]
    default = _cfg(64, 128, 128, 8, 3, GROUP_K=8)
    if not autotuning_enabled():
        return [default, _cfg(64, 64, 64, 4, 3, GROUP_K=8)]
    # Not listed: 32x128x128 w4 s4 and 64x128x64 w4 s4, which ptxas serialised (C7515) for bf16
    # outputs (compile_check --gate, Triton 3.6, sm_90, launch path and linear-split1).
    return [
        default,
        _cfg(64, 256, 128, 8, 3, GROUP_K=8),
        _cfg(64, 64, 128, 4, 4, GROUP_K=8),
        _cfg(64, 64, 64, 4, 3, GROUP_K=8),
    ]


def prune_gemm_configs(configs, named_args, **kwargs):
    """Drop configs that cannot fit (shared memory, registers) or are far wider than the problem."""
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
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        n_b = 2 if gated else 1
        smem = (bm * bk + n_b * bk * bn) * elem * c.num_stages
        if smem > _SMEM_LIMIT or bm * bn * n_b > acc_per_thread * 32 * c.num_warps:
            continue
        if bn > 64 and bn >= 2 * triton.next_power_of_2(n_out):
            continue
        if bk > 32 and bk >= 2 * triton.next_power_of_2(k_dim):
            continue
        if sorted_in_out and bn == 64:
            continue
        kept.append(c)
    return _untuned(kept) or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def prune_weight_grad_configs(configs, named_args, **kwargs):
    """Drop weight-gradient configs that do not fit or are much wider than dW[e]."""
    elem = named_args["a_ptr"].element_size()
    n_out, k_dim = named_args["N_OUT"], named_args["K"]
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if ((bk * bm + bm * bn) * elem * c.num_stages > _SMEM_LIMIT
                or bk * bn > _ACC_PER_THREAD * 32 * c.num_warps):
            continue
        if (bn > 64 and bn >= 2 * triton.next_power_of_2(n_out)) or \
                (bk > 32 and bk >= 2 * triton.next_power_of_2(k_dim)):
            continue
        kept.append(c)
    return _untuned(kept) or [min(configs, key=lambda c: c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"])]


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
