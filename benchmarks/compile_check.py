"""Ahead-of-time compile check of every Triton kernel for CUDA targets, without a GPU.

The CPU interpreter (TRITON_INTERPRET=1, used by the tests) never runs Triton's compiler, so a
kernel can pass every test here and still fail to compile on the GPU machines (H100/H200, sm_90,
Triton 3.6). This script compiles each @triton.jit kernel of ``switch_dit_kernels/kernels/`` with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for every target, dtype and
main constexpr variant, and for autotuned kernels with each config of their autotune list; it
prints one row per (kernel, variant, dtype, target) and exits with status 1 on any failure.

A failure is: a compile error; a kernel, or an autotune config its pruner keeps for a realistic
problem, needing more dynamic shared memory than an sm_90 block gets (227 KB: the launch would
raise OutOfResources); a JIT kernel in the package this script has no spec for; a spec out of date
with the kernel's signature. Register spills (cuobjdump's STACK/LOCAL of the sm_90 cubin), and
sm_80 shared-memory overflows of kept configs (the pruners are calibrated for sm_90), are warnings;
--strict makes spills failures.

Usage (Triton 3.6 and 3.9 alike; TRITON_INTERPRET is removed from the environment):
    python benchmarks/compile_check.py                   # sm_90 + sm_80, fp16/bf16/fp32(/fp64)
    python benchmarks/compile_check.py --configs all     # every autotune config everywhere
    python benchmarks/compile_check.py --kernels combine,topk_softmax --targets 90 --dtypes bf16
    python benchmarks/compile_check.py --per-config      # + resources of every swept config
    SWITCH_DIT_AUTOTUNE=0 python benchmarks/compile_check.py --launch   # see below
    python benchmarks/compile_check.py --first-step XL/2   # first-call cost of a training step
Compiled kernels land in Triton's cache (TRITON_CACHE_DIR), so a second run takes seconds; --fresh
compiles into a temporary cache.

--configs: "quick" compiles each (variant, dtype, target) with the first config the kernel's pruner
keeps; "default" adds a sweep of every autotune config of the variants marked main at sm_90; "all"
sweeps every config of every variant at every target. dtype "fp32" is IEEE fp32 dots (torch's
default, allow_tf32 off), "fp32-tf32" the TF32 tensor-core path.

--launch runs the public Triton entry points (route_topk, expert_linear, expert_mlp,
switch_modulation; forward and backward) on CPU tensors through Triton's own JIT launch path with a
stand-in driver that compiles for sm_90, applies Triton's shared-memory check and launches nothing:
argument specialisation, heuristics, autotuner pruning and hooks, and the launchers' glue code run
exactly as on the GPU machines.

--first-step [MODEL] measures the first-call cost (compilations, seconds) of a Switch-DiT training
step the same way, tuned and untuned, cold and warm cache (benchmarks/first_step.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# Must happen before triton is imported: under TRITON_INTERPRET=1 triton.compile is never reached
# and the kernels' modules pick their interpreter-only configs.
os.environ.pop("TRITON_INTERPRET", None)
# The stand-in driver's "timings" are all 1.0: they must not land in the persistent autotune cache
# (--first-step keeps them in its own throwaway TRITON_CACHE_DIR, to time a warm start).
if not os.environ.get("TRITON_CACHE_DIR") or \
        os.environ.get("SWITCH_DIT_FIRST_STEP_CACHE") != os.environ.get("TRITON_CACHE_DIR"):
    os.environ["SWITCH_DIT_AUTOTUNE_CACHE"] = "0"
os.environ.pop("TRITON_CACHE_AUTOTUNING", None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import warnings  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Triton 3.9 warns once that the FP-fusion default will change in 3.10; irrelevant here.
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

PACKAGE = "switch_dit_kernels.kernels"
# Dynamic shared memory a block may opt into: sm_90 227 KB, sm_80 163 KB (CUDA programming guide,
# compute-capability table).
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                "fp32-tf32": torch.float32, "fp64": torch.float64}
TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
           torch.float64: "fp64"}


# ------------------------------------------------------------------------------------------------
# Specs: how each kernel is launched (pointer dtypes, constexpr variants, tiles).
# ------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One set of constexpr values of a kernel, as a launcher passes them."""
    name: str
    consts: dict
    ones: tuple = ()              # int arguments equal to 1: the JIT turns them into constexpr 1
    roles: dict = field(default_factory=dict)  # per-variant pointer roles (override the kernel's)
    main: bool = False            # sweep every autotune config (--configs default)
    # Why a serialised wgmma loop is allowed here (a path only an opt-out knob or another GPU
    # generation launches on sm_90): reported as a warning, not a gate failure. "" = not allowed.
    serial_ok: str = ""
    warps: int = 4                # launch options of kernels without an autotune config list
    stages: int = 3


@dataclass
class KernelSpec:
    """A kernel: module, attribute, pointer roles, variants, realistic problems for its pruner.

    Pointer roles: "in" (the tensor dtype under test), "acc" (float32, float64 for float64 inputs),
    "f32", "i32", "i64". Integer arguments named in ``aligned`` get the divisibility-by-16 hint the
    JIT gives multiples of 16 (dimensions and strides of realistic shapes); others stay plain i32.
    ``problems``: integer arguments of realistic launches, fed to the autotuner's early_config_prune
    to decide whether a config that cannot fit would actually be launched.
    """
    module: str
    attr: str
    roles: dict
    variants: list
    aligned: tuple = ()
    dtypes: tuple = ("fp16", "bf16", "fp32")
    problems: tuple = ()


def _grouped_gemm_spec():
    base = dict(GATHER_A=True, SCATTER_OUT=False, HAS_BIAS=True, HAS_SCALE=False, ACT=0,
                GATED=False, STORE_PRE=False, ACT_BWD=False, EVEN_K=True, EVEN_N=True, BLOCK_E=16)
    v = lambda name, ones=("stride_wn",), main=False, **kw: Variant(  # noqa: E731
        name, {**base, **kw}, ones=ones, main=main)
    t = ("stride_wk",)  # transpose_w: W's K stride is the unit one
    return KernelSpec(
        "grouped_gemm", "_grouped_gemm_kernel",
        roles=dict(a_ptr="in", w_ptr="in", bias_ptr="in", scale_ptr="acc", pre_ptr="in",
                   out_ptr="in", offsets_ptr="i32", sorted_pairs_ptr="i32"),
        aligned=("K", "N_OUT", "stride_am", "stride_we", "stride_wk", "stride_wn", "stride_be",
                 "stride_pre", "stride_om"),
        dtypes=("fp16", "bf16", "fp32", "fp64"),
        problems=(dict(K=1152, N_OUT=1152), dict(K=1152, N_OUT=4608), dict(K=4608, N_OUT=1152)),
        variants=[
            v("fwd-gather-bias", main=True),                                # expert_linear fwd
            v("fwd-gelu-store-pre-uneven", ACT=2, STORE_PRE=True, EVEN_K=False, EVEN_N=False),
            v("fwd-swiglu-gated", main=True, ACT=3, GATED=True, STORE_PRE=True, HAS_BIAS=True),
            v("dx-transposed-scaled", ones=t, main=True, HAS_SCALE=True, HAS_BIAS=False),
            v("bwd-geglu-gated", ones=t, ACT=1, GATED=True, ACT_BWD=True, HAS_SCALE=True,
              HAS_BIAS=False),
            v("bwd-relu", ones=t, ACT=4, ACT_BWD=True, HAS_SCALE=True, HAS_BIAS=False),
            v("sorted-scatter-k1-N1", ones=("stride_wn", "tokens_per_route", "top_k"),
              GATHER_A=False, SCATTER_OUT=True, HAS_SCALE=True),         # k = 1 token routing
            v("token-routing-N1", ones=("stride_wn", "tokens_per_route"), BLOCK_E=64),
            # expert_mlp k >= 2, N = 1: layer 2 on the sorted h (forward), and its dx
            v("sorted-layer2-N1", ones=("stride_wn", "tokens_per_route"), GATHER_A=False),
            v("sorted-layer2-dx-N1", ones=("stride_wk", "tokens_per_route"), GATHER_A=False,
              HAS_BIAS=False),
        ])


def _weight_grad_spec():
    # A gate factor is applied by _scale_sorted_rows_kernel first, so dO then comes sorted
    # (GATHER_B=False); GATHER_B=True is the unscaled token-order dO.
    base = dict(GATHER_A=True, GATHER_B=False, HAS_DB=True)
    return KernelSpec(
        "weight_grad", "_weight_grad_body",
        roles=dict(a_ptr="in", b_ptr="in", dw_ptr="acc", db_ptr="acc",
                   offsets_ptr="i32", sorted_pairs_ptr="i32"),
        aligned=("K", "N_OUT", "stride_am", "stride_bm", "stride_dw_split", "stride_db_split"),
        dtypes=("fp16", "bf16", "fp32", "fp64"),
        problems=(dict(K=1152, N_OUT=1152), dict(K=1152, N_OUT=4608), dict(K=4608, N_OUT=1152)),
        variants=[
            Variant("linear-split-partials", dict(base), main=True),   # split > 1: fp32 partials
            Variant("linear-split1", dict(base), roles=dict(dw_ptr="in", db_ptr="in")),
            Variant("linear-unscaled-gather", {**base, "GATHER_B": True}),
            Variant("mlp-dw2", {**base, "GATHER_A": False}),
            Variant("mlp-dw1", dict(base), main=True),
            Variant("token-routing-N1-k1", {**base, "HAS_DB": False},
                    ones=("tokens_per_route", "top_k")),
        ])


def _scale_rows_spec():
    return KernelSpec(
        "weight_grad", "_scale_sorted_rows_kernel",
        roles=dict(b_ptr="in", scale_ptr="acc", out_ptr="in", sorted_pairs_ptr="i32"),
        aligned=("N_OUT", "stride_bm"),
        dtypes=("fp16", "bf16", "fp32", "fp64"),
        variants=[
            Variant("gather-N256", dict(GATHER_B=True, BLOCK_R=32, BLOCK_N=128)),
            Variant("sorted-N1-k1", dict(GATHER_B=False, BLOCK_R=32, BLOCK_N=128),
                    ones=("tokens_per_route", "top_k")),
        ])


def _combine_specs():
    combine = KernelSpec(
        "combine", "_combine_kernel",
        roles=dict(h_ptr="in", gate_ptr="acc", pair_to_sorted_ptr="i32", y_ptr="in"),
        aligned=("D", "stride_h", "stride_y"),
        dtypes=("fp16", "bf16", "fp32", "fp64"),
        variants=[  # (BLOCK_T, BLOCK_D) as combine._blocks picks them: D >= 256 and D = 64
            Variant("gate-D1152", dict(HAS_GATE=True, BLOCK_T=16, BLOCK_D=256)),
            Variant("nogate-D64", dict(HAS_GATE=False, BLOCK_T=64, BLOCK_D=64)),
            Variant("gate-N1", dict(HAS_GATE=True, BLOCK_T=16, BLOCK_D=256),
                    ones=("tokens_per_route",)),
        ])
    dot = KernelSpec(
        "combine", "_pair_row_dot_kernel",
        roles=dict(dy_ptr="in", h_ptr="in", pair_to_sorted_ptr="i32", out_ptr="acc"),
        aligned=("D", "stride_dy", "stride_h"),
        dtypes=("fp16", "bf16", "fp32", "fp64"),
        variants=[
            Variant("D1152", dict(BLOCK_Q=16, BLOCK_D=256)),
            Variant("D64", dict(BLOCK_Q=64, BLOCK_D=64)),
            Variant("N1-k1", dict(BLOCK_Q=16, BLOCK_D=256), ones=("tokens_per_route", "top_k")),
        ])
    return [combine, dot]


def _topk_spec():
    return KernelSpec(
        "topk_softmax", "_topk_softmax_kernel",
        roles=dict(logits_ptr="in", weights_ptr="f32", ids_ptr="i64"),
        aligned=("stride_row",),
        variants=[  # BLOCK_R = min(128, 4096 // BLOCK_E), as the launcher picks it
            Variant("E8-k2", dict(K=2, RENORMALIZE=False, BLOCK_R=128, BLOCK_E=8)),
            Variant("E3-k1-renorm", dict(K=1, RENORMALIZE=True, BLOCK_R=128, BLOCK_E=4)),
            Variant("E64-k8-renorm", dict(K=8, RENORMALIZE=True, BLOCK_R=64, BLOCK_E=64)),
            Variant("E4096-k2", dict(K=2, RENORMALIZE=False, BLOCK_R=1, BLOCK_E=4096)),
        ])


# Opt-outs whose sm_90 loops are serialised by design (the gate warns, does not fail).
MERGED_B = ("SWITCH_DIT_SMOD_MERGED_OPERAND=b only: the merged W~ chunk as the shared operand, "
            "timed against the default")
FUSED_U_K2 = ("sm_90 runs it only with SWITCH_DIT_SMOD_DX_PREPASS=0 (k >= 2: both operands "
              "computed); the default there forms u in the pre-pass")


def _switch_modulation_specs():
    fwd = KernelSpec(
        "switch_modulation", "_switch_modulation_fwd_kernel",
        roles=dict(x_ptr="in", w_ptr="in", b_ptr="in", g_ptr="f32", ids_ptr="i32", r_ptr="in",
                   y_ptr="in"),
        aligned=("N_u", "D"),
        problems=(dict(N_u=256, D=1152), dict(N_u=1024, D=1152), dict(N_u=65536, D=4096)),
        variants=[
            Variant("k2-train", dict(K_EXP=2, HAS_BIAS=True, PREMERGED=False, STORE_Y=True,
                                     MERGED_AS_A=True), main=True),
            Variant("k1", dict(K_EXP=1, HAS_BIAS=True, PREMERGED=False, STORE_Y=False,
                               MERGED_AS_A=False)),
            Variant("k4-nobias", dict(K_EXP=4, HAS_BIAS=False, PREMERGED=False, STORE_Y=True,
                                      MERGED_AS_A=True), main=True),
            Variant("premerged", dict(K_EXP=1, HAS_BIAS=True, PREMERGED=True, STORE_Y=True,
                                      MERGED_AS_A=False),
                    roles=dict(b_ptr="f32"), main=True),
            Variant("k2-train-merged-b", dict(K_EXP=2, HAS_BIAS=True, PREMERGED=False,
                                              STORE_Y=True, MERGED_AS_A=False),
                    serial_ok=MERGED_B),
        ])
    merge = KernelSpec(
        "switch_modulation", "_merge_experts_kernel",
        roles=dict(w_ptr="in", b_ptr="in", g_ptr="f32", ids_ptr="i32", wm_ptr="in", bm_ptr="f32"),
        aligned=("D",),
        variants=[
            Variant("k2-bias", dict(K_EXP=2, HAS_BIAS=True, BLOCK=1024)),
            Variant("k1-nobias", dict(K_EXP=1, HAS_BIAS=False, BLOCK=1024)),
        ])
    dx = KernelSpec(
        "switch_modulation_bwd", "_switch_modulation_dx_kernel",
        roles=dict(dr_ptr="in", x_ptr="in", w_ptr="in", g_ptr="f32", ids_ptr="i32", y_ptr="in",
                   dx_ptr="in", usum_ptr="f32"),
        aligned=("N_u", "D"),
        problems=(dict(N_u=256, D=1152), dict(N_u=1024, D=1152), dict(N_u=65536, D=4096)),
        variants=[
            # STORE_USUM: the epilogue also writes the column sums of u (with a bias)
            # k >= 2 on sm_90: u from _u_prepass_kernel (SWITCH_DIT_SMOD_DX_PREPASS auto)
            Variant("k2-u-given", dict(K_EXP=2, PREMERGED=False, STORE_U=False, STORE_USUM=False,
                                       U_GIVEN=True, MERGED_AS_A=True), main=True),
            Variant("k4-u-given", dict(K_EXP=4, PREMERGED=False, STORE_U=False, STORE_USUM=False,
                                       U_GIVEN=True, MERGED_AS_A=True), main=True),
            # one expert chunk (k = 1, shared routing's premerged W~): u = dR * x fused
            Variant("k1-no-u", dict(K_EXP=1, PREMERGED=False, STORE_U=False, STORE_USUM=False,
                                    U_GIVEN=False, MERGED_AS_A=False), main=True),
            Variant("k1-store-u", dict(K_EXP=1, PREMERGED=False, STORE_U=True, STORE_USUM=True,
                                       U_GIVEN=False, MERGED_AS_A=False)),
            Variant("premerged-store-u", dict(K_EXP=1, PREMERGED=True, STORE_U=True,
                                              STORE_USUM=True, U_GIVEN=False, MERGED_AS_A=False),
                    main=True),
            # training without a bias (u, no column sums); shared-routing inference of dx only
            Variant("k1-store-u-nobias", dict(K_EXP=1, PREMERGED=False, STORE_U=True,
                                              STORE_USUM=False, U_GIVEN=False, MERGED_AS_A=False)),
            Variant("premerged-no-u", dict(K_EXP=1, PREMERGED=True, STORE_U=False,
                                           STORE_USUM=False, U_GIVEN=False, MERGED_AS_A=False)),
            # SWITCH_DIT_SMOD_DX_PREPASS=1 with one expert chunk
            Variant("k1-u-given", dict(K_EXP=1, PREMERGED=False, STORE_U=False, STORE_USUM=False,
                                       U_GIVEN=True, MERGED_AS_A=False)),
            Variant("premerged-u-given", dict(K_EXP=1, PREMERGED=True, STORE_U=False,
                                              STORE_USUM=False, U_GIVEN=True, MERGED_AS_A=False)),
            # the fused u with k >= 2 merged experts: off Hopper, or SWITCH_DIT_SMOD_DX_PREPASS=0
            # (STORE_USUM: the epilogue also writes the column sums of u, with a bias)
            Variant("k2-store-u", dict(K_EXP=2, PREMERGED=False, STORE_U=True, STORE_USUM=True,
                                       U_GIVEN=False, MERGED_AS_A=True), serial_ok=FUSED_U_K2),
            Variant("k4-store-u-nobias", dict(K_EXP=4, PREMERGED=False, STORE_U=True,
                                              STORE_USUM=False, U_GIVEN=False, MERGED_AS_A=True),
                    serial_ok=FUSED_U_K2),
            Variant("k2-u-given-merged-b", dict(K_EXP=2, PREMERGED=False, STORE_U=False,
                                                STORE_USUM=False, U_GIVEN=True,
                                                MERGED_AS_A=False), serial_ok=MERGED_B),
        ])
    prepass = KernelSpec(
        "switch_modulation_bwd", "_u_prepass_kernel",
        roles=dict(dr_ptr="in", x_ptr="in", y_ptr="in", dx_ptr="in", usum_ptr="f32"),
        aligned=("N_u", "D"),
        variants=[
            Variant("dx-usum", dict(WRITE_DX=True, WRITE_USUM=True, BLOCK_R=32, BLOCK_D=128)),
            Variant("usum-only", dict(WRITE_DX=False, WRITE_USUM=True, BLOCK_R=32, BLOCK_D=128)),
        ])

    def dw_variant(name, k, slots, main=False):
        mod = importlib.import_module(f"{PACKAGE}.switch_modulation_bwd")
        bi, bj = mod.dw_tile(k)
        return Variant(name, dict(K_EXP=k, SLOTS=slots, BLOCK_I=bi, BLOCK_J=bj), main=main)

    dw = KernelSpec(
        "switch_modulation_bwd", "_switch_modulation_dw_kernel",
        roles=dict(x_ptr="in", u_ptr="in", w_ptr="in", g_ptr="f32", ids_ptr="i32",
                   order_ptr="i32", partial_ptr="f32", seen_ptr="i32", dgp_ptr="f32"),
        aligned=("M", "N_u", "D"),
        problems=(dict(M=65536, N_u=256, D=1152),),
        variants=lambda: [
            dw_variant("k2", 2, 2, main=True),
            dw_variant("k1", 1, 1),
            dw_variant("k3", 3, 3),
            dw_variant("k4", 4, 4, main=True),
            dw_variant("k6-second-chunk", 6, 2),
        ])
    reduce = KernelSpec(
        "switch_modulation_bwd", "_reduce_partials_kernel",
        roles=dict(partial_ptr="f32", used_ptr="i32", out_ptr="in"),
        aligned=("DD",),
        variants=[Variant("block1024", dict(BLOCK=1024))])
    return [fwd, merge, dx, prepass, dw, reduce] + _gluon_specs()


def _gluon_specs():
    """The opt-in Gluon twins (SWITCH_DIT_SMOD_GLUON=1): fixed tiles from `gluon_tile`, no
    autotuning; written against Triton 3.6's Gluon API, so only read under 3.6."""
    mod = importlib.import_module(f"{PACKAGE}.switch_modulation_gluon")
    if not mod.gluon_supported():
        print(f"note: Gluon kernels skipped (written for Triton {mod.GLUON_TRITON_VERSIONS}, "
              f"this is {triton.__version__})")
        return []

    def variant(name, k, premerged, is_dx, store_aux, u_given, has_bias, usum=False, tile=None):
        if tile is None:
            bm, bn, bk, warps, stages = mod.gluon_tile(1 if premerged else k, is_dx and not u_given)
        else:  # a SWITCH_DIT_SMOD_GLUON_TILE alternative worth timing on a GPU
            (bm, bn, bk, stages), warps = tile, 4 if tile[0] == 64 else 8
        return Variant(name, dict(K_EXP=k, HAS_BIAS=has_bias, PREMERGED=premerged, IS_DX=is_dx,
                                  STORE_AUX=store_aux, STORE_USUM=usum, U_GIVEN=u_given,
                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages,
                                  num_warps=warps),
                       roles=dict(b_ptr="f32") if premerged else {}, warps=warps, stages=1)

    return [KernelSpec(
        "switch_modulation_gluon", "_smod_gluon_kernel",
        roles=dict(x_ptr="in", dr_ptr="in", w_ptr="in", b_ptr="in", g_ptr="f32", ids_ptr="i32",
                   out_ptr="in", y_ptr="in", usum_ptr="f32"),
        aligned=("N_u", "D"),
        dtypes=("fp16", "bf16"),
        variants=[
            variant("fwd-k2-train", 2, False, False, True, False, True),
            variant("fwd-k1", 1, False, False, False, False, True),
            variant("fwd-k4-nobias", 4, False, False, True, False, False),
            variant("fwd-premerged", 1, True, False, True, False, True),
            variant("dx-k2-store-u-usum", 2, False, True, True, False, False, usum=True),
            variant("dx-k1-no-u", 1, False, True, False, False, False),
            variant("dx-k4-store-u", 4, False, True, True, False, False),
            variant("dx-premerged-store-u-usum", 1, True, True, True, False, False, usum=True),
            variant("dx-k2-u-given", 2, False, True, False, True, False),
            variant("dx-premerged-u-given", 1, True, True, False, True, False),
            # one N = 256 sample per M tile: half the merges per MMA (forward only: the dx ring of
            # 256-row chunks does not fit with 6 stages)
            variant("fwd-k2-train-256x64", 2, False, False, True, False, True,
                    tile=(256, 64, 32, 6)),
        ])]


def all_specs():
    """Every spec whose module exists (switch_modulation* may be absent in a partial checkout)."""
    specs = [_topk_spec(), _grouped_gemm_spec(), _weight_grad_spec(), _scale_rows_spec(),
             *_combine_specs()]
    try:
        importlib.import_module(f"{PACKAGE}.switch_modulation_bwd")
        specs += _switch_modulation_specs()
    except ImportError as exc:
        print(f"note: switch_modulation kernels not importable ({exc}); skipped")
    return specs


# ------------------------------------------------------------------------------------------------
# Unwrapping @autotune / @heuristics and discovering every JIT function of the package.
# ------------------------------------------------------------------------------------------------
def unwrap(obj):
    """(JITFunction, autotune configs or None, early_config_prune or None, heuristic names)."""
    configs, prune, heur = None, None, []
    while not isinstance(obj, triton.runtime.jit.JITFunction):
        if isinstance(obj, triton.runtime.autotuner.Autotuner):
            configs = list(obj.configs)
            prune = obj.early_config_prune
        elif isinstance(obj, triton.runtime.autotuner.Heuristics):
            heur += list(obj.values)
        obj = obj.fn
    return obj, configs, prune, heur


def resolve(spec: KernelSpec):
    """The spec's kernel object; lazily built autotuners (module-level `_kernel()`) included."""
    mod = importlib.import_module(f"{PACKAGE}.{spec.module}")
    obj = getattr(mod, spec.attr)
    fn, configs, prune, heur = unwrap(obj)
    builder = getattr(mod, "_kernel", None)
    if configs is None and callable(builder):
        tuned = builder()  # grouped_gemm / weight_grad build their autotuner on first use
        tfn, tconfigs, tprune, theur = unwrap(tuned)
        if tfn is fn:
            configs, prune, heur = tconfigs, tprune, heur + theur
    return fn, configs, prune, heur


def discover_kernels():
    """Names (module.function) of JIT functions not called by another JIT function of the package:
    the launchable kernels. Device helpers (called from a kernel) are compiled as part of it."""
    pkg = importlib.import_module(PACKAGE)
    fns = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{PACKAGE}.{info.name}")
        for attr, obj in vars(mod).items():
            if not isinstance(obj, (triton.runtime.jit.KernelInterface,)):
                continue
            fn = unwrap(obj)[0]
            if fn.fn.__module__ == mod.__name__:
                fns[id(fn)] = (f"{info.name}.{fn.__name__}", fn)
    sources = {key: fn.src for key, (_, fn) in fns.items()}
    kernels = []
    for key, (qual, fn) in fns.items():
        name = fn.__name__
        called = any(re.search(rf"\b{re.escape(name)}\s*\(", src) and k != key
                     for k, src in sources.items())
        if not called:
            kernels.append(qual)
    return sorted(set(kernels))


# ------------------------------------------------------------------------------------------------
# Compilation.
# ------------------------------------------------------------------------------------------------
def ptr_type(role: str, dtype_label: str) -> str:
    dtype = TORCH_DTYPES[dtype_label]
    if role == "in":
        return "*" + TL_NAME[dtype]
    if role == "acc":
        return "*fp64" if dtype == torch.float64 else "*fp32"
    return {"f32": "*fp32", "i32": "*i32", "i64": "*i64"}[role]


def auto_consts(fn, dtype_label: str) -> dict:
    """Constexprs the launchers derive from the dtype: dot precision and accumulator type."""
    dtype = TORCH_DTYPES[dtype_label]
    precision = "tf32" if dtype_label == "fp32-tf32" or dtype in (torch.float16, torch.bfloat16) \
        else "ieee"
    out = {}
    for name in fn.arg_names:
        if name in ("PRECISION", "DOT_PRECISION"):
            out[name] = precision
        elif name == "ACC":
            out[name] = tl.float64 if dtype == torch.float64 else tl.float32
    return out


class SpecError(Exception):
    """The spec no longer matches the kernel's signature."""


def build_source(fn, spec: KernelSpec, variant: Variant, dtype_label: str, tile: dict):
    from triton.compiler import ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource  # noqa: N814
    consts = {**auto_consts(fn, dtype_label), **variant.consts, **tile}
    consts.update({name: 1 for name in variant.ones})
    roles = {**spec.roles, **variant.roles}
    unknown = [n for n in list(consts) + list(roles) if n not in fn.arg_names]
    if unknown:
        raise SpecError(f"arguments {unknown} not in {fn.__name__}{tuple(fn.arg_names)}")
    constexpr_params = [p.name for p in fn.params if p.is_constexpr]
    missing = [n for n in constexpr_params if n not in consts]
    if missing:
        raise SpecError(f"no value for constexpr {missing} of {fn.__name__}")
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        elif name in roles:
            sig[name] = ptr_type(roles[name], dtype_label)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif name.endswith("_ptr"):
            raise SpecError(f"pointer {name} of {fn.__name__} has no role in the spec")
        else:
            sig[name] = "i32"
            if name in spec.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)


def _cuobjdump():
    try:
        import triton.backends.nvidia as nv
        path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL of the cubin's kernel (cuobjdump --dump-resource-usage), or {}."""
    tool = _cuobjdump()
    if tool is None or not cubin:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    res = {}
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            res[key] = int(m.group(1))
    return res


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "fma"


@dataclass
class Result:
    ok: bool
    shared: int = 0
    regs: int = -1
    spill: int = 0
    mma: str = ""
    async_copies: int = 0
    seconds: float = 0.0
    error: str = ""
    pipe: str = "-"               # wgmma pipelining: ok / serial / c7515 / "-" (no wgmma)
    pipe_why: str = ""


def describe(exc: BaseException) -> str:
    """One line: the exception, where in the kernel (CompilationError's "at L:C"), and its cause."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    parts = [f"{type(exc).__name__}: {lines[0] if lines else ''}"]
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        parts.append(f"{type(cause).__name__}: {str(cause).strip()[:300]}")
    if len(lines) > 1:
        parts.append(f"near `{lines[-2].strip()}`")
    return " | ".join(parts)[:600]


def compile_one(fn, spec, variant, dtype_label, cc, tile, warps, stages, want_resources):
    from triton.backends.compiler import GPUTarget
    t0 = time.time()
    try:
        src = build_source(fn, spec, variant, dtype_label, tile)
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                options=dict(num_warps=warps, num_stages=stages))
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - any compiler error is the finding
        return Result(False, error=describe(exc), seconds=time.time() - t0)
    r = result_of(kernel.metadata, kernel.asm, want_resources)
    r.seconds = time.time() - t0
    return r


def result_of(md, asm, want_resources: bool) -> Result:
    """A compiled kernel's reading: shared memory, registers, spills, MMA kind, wgmma pipelining."""
    shared = md.shared if hasattr(md, "shared") else md["shared"]
    res = resource_usage(asm.get("cubin", b"")) if want_resources else {}
    ttgir = asm.get("ttgir", "")
    ptx = asm.get("ptx", "")
    # Gluon kernels start at TTGIR (no TTIR): their MMA is a warp_group_dot there
    has_dot = "tt.dot" in asm.get("ttir", "") or "warp_group_dot" in ttgir
    mma = mma_kind(ptx) if has_dot else "-"
    pipe, why = wgmma_pipelining(ptx) if mma == "wgmma" else ("-", "")
    return Result(True, shared=int(shared), regs=res.get("REG", -1),
                  spill=res.get("STACK", 0) + res.get("LOCAL", 0), mma=mma,
                  async_copies=ttgir.count("async_copy_global_to_local"), pipe=pipe,
                  pipe_why=why)


_WAIT_GROUP = re.compile(r"wgmma\.wait_group(?:\.sync)?(?:\.aligned)?\s+(\d+)")


def wgmma_pipelining(ptx: str):
    """("ok" | "serial" | "c7515", why) for a kernel whose PTX issues wgmma.

    serial: every ``wgmma.wait_group N`` has N = 0, i.e. the kernel waits for each MMA it issues
    before the next load/merge: no MMA in flight while the CUDA cores work, the tensor cores idle.
    c7515: ptxas itself serialised the wgmma chain (its performance warning C7515, e.g. a register
    operand written between two wgmma). Both are what the gate fails on."""
    waits = sorted({int(n) for n in _WAIT_GROUP.findall(ptx)})
    log = ptxas_log(ptx)
    m = re.search(r"\(C7515\)[^\n]*", log)
    if m:
        return "c7515", m.group(0)[:200]
    if waits and max(waits) == 0:
        return "serial", "only wgmma.wait_group 0 in the PTX (no MMA kept in flight)"
    return "ok", f"wait_group {','.join(map(str, waits))}"


def _ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except Exception:  # noqa: BLE001 - older/newer layouts: fall back to the bundled binary
        import triton.backends.nvidia as nv
        path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
        return path if os.path.exists(path) else shutil.which("ptxas")


def _ptxas_cache_dir() -> str:
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton",
                                                              "cache")
    path = os.path.join(base, "compile_check_ptxas")
    os.makedirs(path, exist_ok=True)
    return path


def ptxas_log(ptx: str) -> str:
    """ptxas -v's messages for ``ptx`` (Triton discards them). Triton's cache skips ptxas on a
    repeat run, so the log is cached beside it, keyed by the PTX's hash: a few seconds per new
    kernel the first time, nothing after."""
    import hashlib
    tool = _ptxas()
    if tool is None or not ptx:
        return ""
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    gpu = arch.group(1) if arch else "sm_90a"
    key = hashlib.sha256((gpu + ptx).encode()).hexdigest()[:32]
    cached = os.path.join(_ptxas_cache_dir(), key + ".log")
    if os.path.exists(cached):
        with open(cached) as f:
            return f.read()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([tool, "-v", f"--gpu-name={gpu}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    with open(cached + ".tmp", "w") as f:
        f.write(log)
    os.replace(cached + ".tmp", cached)
    return log


def pruner_keeps(spec, prune, configs, dtype_label, consts):
    """Configs the autotuner's early_config_prune keeps for at least one realistic problem (all of
    them when the kernel has no pruner), in list order; includes fallback configs a pruner builds
    when nothing in the list fits."""
    if prune is None or not spec.problems:
        return list(configs)
    from triton.runtime.driver import driver
    dtype = TORCH_DTYPES[dtype_label]
    kept, seen = [], set()
    # The pruners read the GPU generation from Triton's active driver at launch (sm_90 keeps the
    # Hopper list): prune as on an sm_90 device, the target the pruners and this check calibrate.
    previous = getattr(driver, "_active", None)
    driver.set_active(FakeCudaDriver(90))
    try:
        for problem in spec.problems:
            named = {name: torch.empty(0, dtype=dtype if role == "in" else torch.float32)
                     for name, role in spec.roles.items()}
            named.update(problem)
            for c in prune(list(configs), named, **consts):
                if config_label(c) not in seen:
                    seen.add(config_label(c))
                    kept.append(c)
    finally:
        driver.set_active(previous)
    order = {config_label(c): i for i, c in enumerate(configs)}
    return sorted(kept, key=lambda c: order.get(config_label(c), len(order)))


def config_label(c) -> str:
    tiles = "x".join(str(v) for k, v in c.kwargs.items() if k.startswith("BLOCK"))
    return f"{tiles} w{c.num_warps} s{c.num_stages}"


# ------------------------------------------------------------------------------------------------
# --launch: the public Triton entry points, forward and backward, through Triton's own JIT path.
# ------------------------------------------------------------------------------------------------
class FakeCudaDriver:
    """Stands in for Triton's active driver: the JIT specialises, compiles (for ``cc``) and checks
    shared memory exactly as on a GPU, then "launches" nothing. Outputs stay uninitialised; the
    point is the launch path itself (argument specialisation, heuristics, autotuner pruning and
    hooks, launchers' glue) under this Triton version. Uses the small driver surface that Triton
    3.6 and 3.9 share: current device/stream/target, launcher_cls, utils.load_binary /
    get_device_properties, get_benchmarker."""

    def __init__(self, cc: int):
        from types import SimpleNamespace

        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", cc, 32)
        self.compiled = []
        self.asm = {}
        self.labels = {}
        self.utils = SimpleNamespace(
            get_device_properties=lambda device: {
                "max_shared_mem": SMEM_LIMIT.get(cc, SMEM_LIMIT[80]), "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1980000,
                "mem_clock_rate": 2619000, "mem_bus_width": 5120},
            load_binary=lambda name, kernel, shared, device: (1, 1, 0, 0, 1024),
            unload_module=lambda *a: None)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **_):
            fn()  # compiles the config; OutOfResources propagates to the autotuner, as on a GPU
            return [1.0] * len(quantiles) if quantiles else 1.0
        return bench

    def launcher_cls(self, src, metadata):
        name = getattr(getattr(src, "fn", None), "__name__", getattr(metadata, "name", "?"))
        # The caller is CompiledKernel._init_handles (Triton 3.6 and 3.9): its asm holds the PTX
        # and cubin the gate reads.
        caller = sys._getframe(1).f_locals.get("self")
        self.compiled.append((name, metadata))
        self.asm[id(metadata)] = dict(getattr(caller, "asm", {}) or {})
        self.labels[id(metadata)] = launch_label(src, metadata)
        return lambda *args, **kwargs: None


def launch_label(src, md) -> str:
    """The launch's tile constexprs and options, e.g. "[64x128x128 w8 s3]"."""
    names = getattr(getattr(src, "fn", None), "arg_names", [])
    tiles = []
    for key, value in (getattr(src, "constants", None) or {}).items():
        index = key[0] if isinstance(key, tuple) else key
        name = names[index] if isinstance(index, int) and index < len(names) else str(index)
        if name.startswith("BLOCK"):
            tiles.append(str(value))
    return f"[{'x'.join(tiles)} w{getattr(md, 'num_warps', '?')} s{getattr(md, 'num_stages', '?')}]"


# Launch cases that run an opt-out knob (`opt_out_case`), by name: the kernels whose serialised
# code that knob is expected to give (printed, not gate failures); any other serialised kernel,
# compile errors and spills still fail. Kernels compiled by an opt-out case are not marked seen,
# so a default case compiling the same binary later still reads it.
OPT_OUT_KERNELS = {}


def opt_out_case(name: str, kernels, thunk):
    """(name + " [opt-out]", thunk), registering the kernel names its knob serialises."""
    name = f"{name} [opt-out]"
    OPT_OUT_KERNELS[name] = set(kernels)
    return name, thunk


def launch_cases(dtype: torch.dtype):
    """(name, thunk) pairs: each runs a public Triton entry point forward and backward on CPU
    tensors shaped like the real workloads (D = 1152, Switch-DiT's N = 256 tokens per sample)."""
    from switch_dit_kernels.expert_ops import expert_linear_triton, expert_mlp_triton

    def leaf(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt).requires_grad_(True)

    def routing(rows, k, experts):
        ids = torch.stack([torch.randperm(experts)[:k] for _ in range(rows)])
        return leaf(rows, k, dt=torch.float32), ids

    def backward(y):
        y.backward(torch.ones_like(y))

    def linear(rows, k, experts, n, dim):
        def run():
            g, ids = routing(rows, k, experts)
            backward(expert_linear_triton(leaf(rows * n, dim), leaf(experts, dim, dim),
                                          leaf(experts, dim), g, ids, tokens_per_route=n))
        return run

    def mlp(rows, k, experts, n, dim, hidden, act):
        def run():
            g, ids = routing(rows, k, experts)
            width = 2 * hidden if act in ("swiglu", "geglu") else hidden
            backward(expert_mlp_triton(leaf(rows * n, dim), leaf(experts, dim, width),
                                       leaf(experts, width), leaf(experts, hidden, dim),
                                       leaf(experts, dim), g, ids, activation=act,
                                       tokens_per_route=n))
        return run

    cases = [
        ("expert_linear N=256 k=2 E=3", linear(2, 2, 3, 256, 1152)),
        ("expert_linear N=1 k=2 E=8", linear(64, 2, 8, 1, 1152)),
        ("expert_linear N=1 k=1 E=5 (scatter)", linear(64, 1, 5, 1, 1152)),
        ("expert_mlp gelu_tanh N=1 k=2", mlp(64, 2, 8, 1, 384, 1536, "gelu_tanh")),
        ("expert_mlp swiglu N=1 k=2", mlp(64, 2, 8, 1, 384, 1536, "swiglu")),
        ("expert_mlp geglu N=1 k=1 (scatter)", mlp(64, 1, 8, 1, 384, 1536, "geglu")),
    ]
    if dtype != torch.float64:
        from switch_dit_kernels.topk_ops import route_topk_triton

        def topk(rows, experts, k):
            def run():
                # forward only: the backward is PyTorch, and would index with the ids the
                # (not run) kernel left uninitialised
                route_topk_triton(leaf(rows, experts), k, renormalize=True)
            return run
        cases.insert(0, ("route_topk E=8 k=2", topk(300, 8, 2)))
        try:
            from switch_dit_kernels.modulation_ops import switch_modulation_triton
        except ImportError:
            switch_modulation_triton = None
        if switch_modulation_triton is not None:
            def smod(batch, tokens, dim, experts, k, shared, bias=True, params=True):
                """params=False: only x needs a gradient (the dx without u, no dW kernel)."""
                def run():
                    g, ids = routing(1 if shared else batch, k, experts)
                    w = leaf(experts, dim, dim).requires_grad_(params)
                    b = leaf(experts, dim).requires_grad_(params) if bias else None
                    backward(switch_modulation_triton(leaf(batch, tokens, dim), w, b,
                                                      g.detach().requires_grad_(params), ids))
                return run
            def with_env(thunk, gluon=False, **env):
                """Run thunk with environment knobs set; gluon: SWITCH_DIT_SMOD_GLUON=1 with
                the CPU tensors taken for sm_90 ones (the stand-in driver compiles for sm_90)."""
                from benchmarks.common import environ
                from switch_dit_kernels.kernels import switch_modulation_gluon as smod_gluon

                def run():
                    knobs = dict(env, **({"SWITCH_DIT_SMOD_GLUON": "1"} if gluon else {}))
                    is_sm90 = smod_gluon._is_sm90
                    if gluon:
                        smod_gluon._is_sm90 = lambda x: True
                    try:
                        with environ(knobs):
                            thunk()
                    finally:
                        smod_gluon._is_sm90 = is_sm90
                return run

            def with_prepass(thunk):
                return with_env(thunk, SWITCH_DIT_SMOD_DX_PREPASS="1")
            cases += [
                # the defaults (k >= 2 on sm_90: the u pre-pass, the merged chunk as operand A)
                ("switch_modulation k=2 E=3", smod(2, 256, 1152, 3, 2, False)),
                ("switch_modulation k=1 E=3", smod(2, 256, 1152, 3, 1, False)),
                ("switch_modulation k=4 E=5", smod(2, 256, 1152, 5, 4, False)),
                ("switch_modulation shared [1,k]", smod(2, 256, 1152, 3, 2, True)),
                ("switch_modulation k=1 E=3 no bias", smod(2, 256, 1152, 3, 1, False, bias=False)),
                ("switch_modulation shared no bias", smod(2, 256, 1152, 3, 2, True, bias=False)),
                ("switch_modulation shared dx only", smod(2, 256, 1152, 3, 2, True, params=False)),
                # opt-in: SWITCH_DIT_SMOD_DX_PREPASS=1 where the default fuses u
                ("switch_modulation k=1 E=3 u-prepass", with_prepass(smod(2, 256, 1152, 3, 1, False))),
                ("switch_modulation shared u-prepass", with_prepass(smod(2, 256, 1152, 3, 2, True))),
                # opt-outs kept to time against the defaults: serialised on sm_90 by design
                opt_out_case("switch_modulation k=2 fused-u", ["_switch_modulation_dx_kernel"],
                             with_env(smod(2, 256, 1152, 3, 2, False),
                                      SWITCH_DIT_SMOD_DX_PREPASS="0")),
                opt_out_case("switch_modulation k=2 merged-b",
                             ["_switch_modulation_fwd_kernel", "_switch_modulation_dx_kernel"],
                             with_env(smod(2, 256, 1152, 3, 2, False),
                                      SWITCH_DIT_SMOD_DX_PREPASS="0",
                                      SWITCH_DIT_SMOD_MERGED_OPERAND="b")),
            ]
            from switch_dit_kernels.kernels.switch_modulation_gluon import gluon_supported
            if gluon_supported() and dtype in (torch.float16, torch.bfloat16):
                # opt-in: SWITCH_DIT_SMOD_GLUON=1 (the sm_90 Gluon forward and dx)
                cases += [
                    ("switch_modulation k=2 E=3 gluon", with_env(smod(2, 256, 1152, 3, 2, False),
                                                                 gluon=True)),
                    ("switch_modulation k=1 E=3 gluon", with_env(smod(2, 256, 1152, 3, 1, False),
                                                                 gluon=True)),
                    ("switch_modulation k=4 E=5 gluon", with_env(smod(2, 256, 1152, 5, 4, False),
                                                                 gluon=True)),
                    ("switch_modulation shared gluon", with_env(smod(2, 256, 1152, 3, 2, True),
                                                                gluon=True)),
                    ("switch_modulation k=2 E=3 gluon+prepass",
                     with_env(smod(2, 256, 1152, 3, 2, False), gluon=True,
                              SWITCH_DIT_SMOD_DX_PREPASS="1")),
                    ("switch_modulation S D=384 k=2 gluon", with_env(smod(2, 256, 384, 3, 2, False),
                                                                     gluon=True)),
                ]
    return cases


def run_launch_check(args) -> int:
    """--launch: every case under FakeCudaDriver; prints the kernels each compiled."""
    from triton.runtime.driver import driver
    cc = int(args.targets.split(",")[0])
    limit = SMEM_LIMIT.get(cc, SMEM_LIMIT[80])
    fake = FakeCudaDriver(cc)
    previous = getattr(driver, "_active", None)  # reset_active() would look for a real GPU
    driver.set_active(fake)
    failures = []
    wanted = [w for w in args.kernels.split(",") if w]
    print(f"triton {triton.__version__}: launch path on sm_{cc} (fake driver, nothing runs); "
          f"SWITCH_DIT_AUTOTUNE={os.environ.get('SWITCH_DIT_AUTOTUNE', '1')}; per case: kernels "
          f"compiled, wgmma kernels serialised (only wait_group 0, or ptxas C7515), spills")
    dtype_labels = [d for d in args.dtypes.split(",") if d in TORCH_DTYPES]
    todo = [(d, name, thunk) for d in dtype_labels for name, thunk in launch_cases(TORCH_DTYPES[d])
            if not wanted or any(w in name for w in wanted)]
    start = time.time()
    seen = set()  # kernel hashes already read (a kernel compiled by two cases is reported once)
    analysed = {}  # kernel hash -> its Result
    try:
        for done, (dtype_label, name, thunk) in enumerate(todo, 1):
            old_tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = dtype_label == "fp32-tf32"
            fake.compiled.clear()
            t0 = time.time()
            try:
                thunk()
                error = ""
            except Exception as exc:  # noqa: BLE001 - the finding
                error = describe(exc)
            kernels = sorted({n for n, _ in fake.compiled})
            too_big = [(n, md.shared) for n, md in fake.compiled if md.shared > limit]
            seconds = time.time() - t0
            serial, serial_allowed, spills, n_wgmma = [], [], [], 0
            for n, md in fake.compiled:
                key = getattr(md, "hash", None) or id(md)
                if key not in analysed:  # cuobjdump and the ptxas log once per kernel
                    analysed[key] = result_of(md, fake.asm.get(id(md), {}), want_resources=True)
                r = analysed[key]
                n_wgmma += r.mma == "wgmma"
                if key in seen:
                    continue
                allowed = n in OPT_OUT_KERNELS.get(name, ())
                if not allowed:
                    seen.add(key)
                if r.pipe in ("serial", "c7515"):
                    line = (f"{n.lstrip('_')} {fake.labels.get(id(md), '')}: {r.pipe} "
                            f"({r.pipe_why})")
                    (serial_allowed if allowed else serial).append(line)
                if r.spill > 0:
                    spills.append(f"{n.lstrip('_')} {fake.labels.get(id(md), '')}: {r.spill} B "
                                  f"stack/spill, {r.regs} registers")
            status = "FAIL" if error else ("SERIAL" if serial else (
                "SPILL" if spills else ("opt-out" if serial_allowed else "ok")))
            smem = max((md.shared for _, md in fake.compiled), default=0) / 1024
            secs = int(time.time() - start)
            print(f"{done:>3}/{len(todo):<3} {secs // 60:>2}:{secs % 60:02d} {name:<38} "
                  f"{dtype_label:<9} {status:<6} {len(fake.compiled):>3} new "
                  f"({n_wgmma} wgmma, {len(serial) + len(serial_allowed)} serial, "
                  f"{len(spills)} spill), "
                  f"max smem {smem:6.1f} KB, {seconds:5.1f} s  "
                  f"{' '.join(k.lstrip('_') for k in kernels)}", flush=True)
            for line in serial + spills:
                print("    " + line)
            for line in serial_allowed:
                print("    " + line + "  (opt-out: allowed)")
            if args.gate:
                failures += [f"{name} {dtype_label}: {line}" for line in serial + spills]
            for n, shared in too_big:
                print(f"    note: a {n} config needs {shared} B shared > {limit} B "
                      f"(the autotuner skips it; a lone config would raise OutOfResources)")
            if error:
                failures.append(f"{name} {dtype_label}: {error}")
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
    finally:
        driver.set_active(previous)
    if failures:
        print(f"\n{len(failures)} FAILURE(S):")
        for f in failures:
            print("  " + f)
        return 1
    print("\nall launch paths compiled")
    return 0


# ------------------------------------------------------------------------------------------------
# Driver.
# ------------------------------------------------------------------------------------------------
def plan(configs, kept, variant: Variant, cc: int, mode: str):
    """(config or None, tile constexprs, num_warps, num_stages) to compile for one table row.

    Without a sweep: the first config the pruner keeps (the one the autotuner list leads with).
    A sweep also compiles the configs the pruner drops, to show whether dropping them was needed.
    """
    if configs is None:
        return [(None, {}, variant.warps, variant.stages)]
    if mode == "all" or (mode == "default" and variant.main and cc == 90):
        labels = {config_label(c) for c in configs}
        chosen = list(configs) + [c for c in kept if config_label(c) not in labels]
    elif mode == "kept":
        chosen = kept or configs[:1]
    else:
        chosen = kept[:1] or configs[:1]
    return [(c, dict(c.kwargs), c.num_warps, c.num_stages) for c in chosen]


def verdict(r: Result, kept: bool, limit: int, cc: int) -> str:
    """FAIL (compile error, or a kept config over sm_90's shared-memory limit), smem (the same on
    another target: the pruners are calibrated for sm_90's 227 KB, and the autotuner skips a
    config that raises OutOfResources), too-big (over the limit and dropped by the pruner:
    correct), unused (dropped by the pruner), serial (a kept wgmma kernel that keeps no MMA in
    flight, or that ptxas serialised: C7515), spill, ok."""
    if not r.ok:
        return "FAIL"
    if r.shared > limit:
        if not kept:
            return "too-big"
        return "FAIL" if cc == 90 else "smem"
    if not kept:
        return "unused"
    if r.pipe in ("serial", "c7515"):
        return "serial"
    return "spill" if r.spill > 0 else "ok"


def check_spec(spec: KernelSpec, args, targets, dtypes, report):
    """Compile one kernel over variants x dtypes x targets; print a row per combination."""
    fn, configs, prune, _ = resolve(spec)
    qual = f"{spec.module}.{fn.__name__}"
    variants = spec.variants() if callable(spec.variants) else spec.variants
    for variant in variants:
        for dtype_label in dtypes:
            if not dtype_applies(spec, fn, dtype_label):
                continue
            consts = {**auto_consts(fn, dtype_label), **variant.consts}
            kept = pruner_keeps(spec, prune, configs, dtype_label, consts) if configs else []
            kept_labels = {config_label(c) for c in kept}
            for cc in targets:
                limit = SMEM_LIMIT.get(cc, SMEM_LIMIT[80])
                results = []
                for cfg, tile, warps, stages in plan(configs, kept, variant, cc, args.configs):
                    try:
                        r = compile_one(fn, spec, variant, dtype_label, cc, tile, warps, stages,
                                        want_resources=(cc == 90))
                    except SpecError as exc:
                        report["failures"].append(f"{qual} [{variant.name}]: spec out of date: "
                                                  f"{exc}")
                        return
                    label = config_label(cfg) if cfg is not None else "fixed"
                    is_kept = cfg is None or label in kept_labels
                    results.append((label, r, verdict(r, is_kept, limit, cc)))
                where = f"{qual} [{variant.name}] {dtype_label} sm_{cc}"
                report["done"] += 1
                print_row(qual, variant.name, dtype_label, cc, results, args.strict,
                          progress(report), serial_ok=bool(variant.serial_ok))
                for label, r, v in results:
                    if v == "FAIL":
                        why = r.error or f"needs {r.shared} B of shared memory > {limit} B, and " \
                                         f"the pruner keeps it for a realistic problem"
                        report["failures"].append(f"{where} {label}: {why}")
                    if v == "serial":
                        msg = f"{where} {label}: wgmma {r.pipe}: {r.pipe_why}"
                        if variant.serial_ok:
                            report["warnings"].append(f"{msg} (allowed: {variant.serial_ok})")
                        else:
                            report["failures" if args.gate else "warnings"].append(msg)
                    if v in ("spill", "serial") and r.spill > 0:
                        msg = f"{where} {label}: {r.spill} B stack/spill, {r.regs} registers"
                        report["failures" if args.strict else "warnings"].append(msg)
                    elif v == "smem":
                        report["warnings"].append(
                            f"{where} {label}: needs {r.shared} B of shared memory > {limit} B; "
                            f"the (sm_90-calibrated) pruner keeps it")
                    if args.per_config and len(results) > 1:
                        report["configs"].append((qual, variant.name, dtype_label, cc, label, r, v))


def progress(report) -> str:
    """"k/n mm:ss": rows done of the run's total, time since the start."""
    secs = int(time.time() - report["t0"])
    return f"{report['done']:>3}/{report['total']:<3} {secs // 60:>2}:{secs % 60:02d}"


PIPE_RANK = {"-": 0, "ok": 1, "serial": 2, "c7515": 3}


def row_count(spec: KernelSpec, fn, dtypes, targets) -> int:
    """Table rows check_spec prints for ``spec`` (the progress counter's denominator)."""
    variants = spec.variants() if callable(spec.variants) else spec.variants
    return sum(len(variants) * len(targets) for d in dtypes if dtype_applies(spec, fn, d))


def dtype_applies(spec: KernelSpec, fn, dtype_label: str) -> bool:
    """The kernel takes this dtype: it is in the spec's list ("fp32-tf32" counting as "fp32",
    and only for kernels with a dot-precision constexpr; the Gluon twins list 16-bit only)."""
    if dtype_label == "fp32-tf32":
        return "fp32" in spec.dtypes and any(
            n in fn.arg_names for n in ("PRECISION", "DOT_PRECISION"))
    return dtype_label in spec.dtypes


def print_row(qual, variant, dtype_label, cc, results, strict, where_in_run="", serial_ok=False):
    used = [r for _, r, v in results if v in ("ok", "spill", "smem", "serial")]
    verdicts = {v for _, _, v in results}
    status = "FAIL" if "FAIL" in verdicts else ("SPILL" if strict and "spill" in verdicts else (
        "warn" if verdicts & {"spill", "smem"} else "ok"))
    n_ok = sum(1 for _, r, _ in results if r.ok)
    smem = max((r.shared for r in used), default=0) / 1024
    regs = max((r.regs for r in used), default=-1)
    spill = max((r.spill for r in used), default=0)
    mma = ",".join(sorted({r.mma for r in used})) or "?"
    cp = min((r.async_copies for r in used), default=0)
    pipe = max((r.pipe for r in used), key=PIPE_RANK.get, default="-")
    secs = sum(r.seconds for _, r, _ in results)
    if "serial" in verdicts and status != "FAIL":
        status = "opt-out" if serial_ok else "SERIAL"
    print(f"{where_in_run} {qual:<44.44} {variant:<26.26} {dtype_label:<9} {cc:>3} "
          f"{f'{n_ok}/{len(results)}':>5} {status:<6} {smem:>8.1f} {regs if regs >= 0 else '?':>4} "
          f"{spill:>6} {mma:<5.5} {pipe:<6} {cp:>8} {secs:>6.1f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default=None,
                    help="compute capabilities, e.g. 90,80 (default 90,80; --gate: 90)")
    ap.add_argument("--dtypes", default=None,
                    help="fp16,bf16,fp32 (IEEE dots),fp32-tf32,fp64 (fp64: kernels that take it); "
                         "default all of them, --launch bf16,fp32, --gate bf16")
    ap.add_argument("--configs", choices=("quick", "kept", "default", "all"), default=None,
                    help="quick: first kept config; kept: every config the pruner keeps for a "
                         "realistic problem; default: kept + a sweep of the main variants at "
                         "sm_90; all: every config everywhere (default: default; --gate: kept)")
    ap.add_argument("--kernels", default="", help="comma-separated substrings of kernel names")
    ap.add_argument("--per-config", action="store_true", help="also list every swept config")
    ap.add_argument("--strict", action="store_true", help="register spills count as failures")
    ap.add_argument("--fresh", action="store_true", help="compile into an empty temporary cache")
    ap.add_argument("--launch", action="store_true",
                    help="instead: run the public Triton entry points (fwd + bwd) through the JIT "
                         "with a fake driver (first target only); default dtypes bf16,fp32")
    ap.add_argument("--first-step", nargs="?", const="XL/2", default=None, metavar="MODEL",
                    help="instead: compilations and seconds of the first training step of "
                         "Switch-DiT-MODEL (default XL/2), tuned and untuned, cold and warm cache, "
                         "each in a fresh process (benchmarks/first_step.py)")
    ap.add_argument("--first-step-run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=32,
                    help="--first-step: samples per GPU (default 32: 256 over 8 GPUs)")
    ap.add_argument("--gate", action="store_true",
                    help="the Hopper codegen gate: sm_90, bf16, every kept config, then the launch "
                         "path; fails on a serialised wgmma kernel (only wait_group 0, or ptxas "
                         "C7515) or a spill, besides compile errors")
    args = ap.parse_args(argv)
    if args.gate:
        args.strict = True
    args.targets = args.targets or ("90" if args.gate else "90,80")
    args.configs = args.configs or ("kept" if args.gate else "default")
    if args.dtypes is None:
        args.dtypes = "bf16" if args.gate else ("bf16,fp32" if args.launch else
                                                "fp16,bf16,fp32,fp32-tf32,fp64")

    if args.fresh:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-compile-check-")
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        print(f"this Triton cannot compile for CUDA here: {exc}")
        return 2
    if args.first_step or args.first_step_run:
        from benchmarks import first_step
        if args.first_step_run:
            print(json.dumps(first_step.run_once(args.first_step_run, args.batch,
                                                 FakeCudaDriver)))
            return 0
        return first_step.run_matrix(args.first_step, args.batch, os.path.abspath(__file__))
    if args.launch:
        return run_launch_check(args)
    rc = run_spec_check(args)
    if args.gate:
        print()
        rc = max(rc, run_launch_check(args))
        print(f"\ngate: {'FAILED' if rc else 'passed'} (sm_{args.targets.split(',')[0]}, "
              f"{args.dtypes}, configs {args.configs}, launch path "
              f"SWITCH_DIT_AUTOTUNE={os.environ.get('SWITCH_DIT_AUTOTUNE', '1')})")
    return rc


def run_spec_check(args) -> int:
    """Every kernel spec x variant x dtype x target: one table row each."""
    targets = [int(t) for t in args.targets.split(",") if t]
    dtypes = [d for d in args.dtypes.split(",") if d]
    wanted = [w for w in args.kernels.split(",") if w]
    print(f"triton {triton.__version__}, torch {torch.__version__}, python "
          f"{sys.version.split()[0]}; targets {targets}; configs: {args.configs}")

    report = {"failures": [], "warnings": [], "configs": [], "done": 0, "total": 0,
              "t0": time.time()}
    specs = all_specs()
    covered = set()
    for spec in specs:
        try:
            covered.add(f"{spec.module}.{resolve(spec)[0].__name__}")
        except Exception as exc:  # noqa: BLE001
            report["failures"].append(f"{spec.module}.{spec.attr}: cannot resolve: {exc}")
    # Gluon kernels are written against one Triton's Gluon API (_gluon_specs says which): under
    # another Triton they have no spec on purpose
    from switch_dit_kernels.kernels.switch_modulation_gluon import gluon_supported
    if not gluon_supported():
        covered.add("switch_modulation_gluon._smod_gluon_kernel")
    for qual in discover_kernels():
        if qual not in covered:
            report["failures"].append(f"{qual}: a JIT kernel with no spec in compile_check.py")

    specs = [s for s in specs if not wanted or any(w in f"{s.module}.{s.attr}" for w in wanted)]
    for spec in specs:
        try:
            report["total"] += row_count(spec, resolve(spec)[0], dtypes, targets)
        except Exception:  # noqa: BLE001 - reported by check_spec below
            pass
    header = (f"{'row':>3}/{'n':<3} {'m:ss':>5} {'kernel':<44} {'variant':<26} {'dtype':<9} "
              f"{'sm':>3} {'cfgs':>5} {'status':<6} {'smem KB':>8} {'regs':>4} {'spill':>6} "
              f"{'mma':<5} {'pipe':<6} {'cp.async':>8} {'s':>6}")
    print(header)
    print("-" * len(header))
    for spec in specs:
        try:
            check_spec(spec, args, targets, dtypes, report)
        except Exception as exc:  # noqa: BLE001 - a broken spec must not hide the other kernels
            report["failures"].append(f"{spec.module}.{spec.attr}: {describe(exc)}")

    if report["configs"]:
        print("\nswept autotune configs (verdict: ok / spill; too-big = over the shared-memory "
              "limit and dropped by the pruner; unused = dropped by the pruner):")
        for qual, var, dt, cc, label, r, v in report["configs"]:
            print(f"  {qual:<44.44} {var:<24.24} {dt:<9} sm_{cc} {label:<20} "
                  f"smem {r.shared / 1024:>6.1f} KB  regs {r.regs if r.regs >= 0 else '?':>3}  "
                  f"spill {r.spill:>6}  {v}")
    if report["warnings"]:
        print("\nwarnings (register spills, serialised wgmma, or sm_80 shared memory, in configs the "
              "autotuner may pick):")
        for w in report["warnings"]:
            print("  " + w)
    if report["failures"]:
        print(f"\n{len(report['failures'])} FAILURE(S):")
        for f in report["failures"]:
            print("  " + f)
        return 1
    print("\nall kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
