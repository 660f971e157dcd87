"""MoE layer benchmark: implementations x shapes x modes -> a table on stdout and JSON rows.

Each row is printed once, in the table at the end; while the run goes, one progress line per row
("[3/24] case impl mode: 1.23 ms") goes to stderr.

Usage (from the repository root):

    python -m benchmarks.moe_layer                                   # all cases on the GPU
    python -m benchmarks.moe_layer --cases switch --json out/moe_switch.json
    python -m benchmarks.moe_layer --quick --device cpu              # tiny shapes, 1 thread, < 1 min
    python -m benchmarks.moe_layer --impls reference,switch_modulation_triton --filter XL

Suites (``--cases``):
  switch  Switch-DiT's SMoE layer: per-sample top-k of E linear experts D -> D with bias, N = 256
          tokens, r = x * (1 + y): S (B256 D384), B (B256 D768), XL (B32 and B256, D1152), E = 3, 8,
          k = 2. Baseline "reference" = the official loop (benchmarks/official_loop.py).
  ffn     token-choice MoE with GELU MLP experts (no biases), softmax top-k (ANCHORS.md):
          T8192 D4096 F14336 E8 k2 and T16384 D2048 F1024 E64 k8. Baseline "loop" = Mixtral style.

Implementations (``--impls``, comma-separated; "default" or "all"):
  reference / loop                 the official Switch-DiT loop / the Hugging Face Mixtral loop
  torch_grouped_mm                 PyTorch-side sort + gather, torch._grouped_mm, index_add
  switch_modulation_triton         our fused `switch_modulation` (merged expert weight per sample)
  switch_modulation_triton_fused_u the same with SWITCH_DIT_SMOD_DX_PREPASS=0: u = dR * x formed
                                   in the dx GEMM's loop (what sm_90's default pre-pass replaced)
  switch_modulation_triton_merged_b ... and SWITCH_DIT_SMOD_MERGED_OPERAND=b: the merged W~ chunk
                                   as the MMA's shared operand (the only orientation until
                                   2026-12-01: with the fused u, the kernels as they were)
  switch_modulation_gluon          the same with SWITCH_DIT_SMOD_GLUON=1: the sm_90 Gluon forward
                                   and dx (merge overlapped with the wgmma; error row elsewhere)
  switch_modulation_gluon_256x64   ... with SWITCH_DIT_SMOD_GLUON_TILE=256,64,32,6 (forward tile of
                                   one N=256 sample; dx on the Triton kernel)
  expert_linear_triton             our token-level `expert_linear` (tokens_per_route=N), then x*(1+y)
  expert_mlp_triton                our `expert_mlp`
  *_grouped_mm, *_cuda, *_torch    the library's other backends ("cuda" only when csrc was built)
  dense_same_flops                 ONE GEMM with the same FLOPs: [B*N*k, D] x [D, D] (switch) or
                                   [T*k, D] x [D, 2F] (ffn): the ceiling
  dense_linear                     (switch) nn.Linear(D, D) on the B*N tokens: what the fused layer
                                   should approach, since it does one GEMM per token, not k

Modes: "forward" runs under torch.no_grad() (sampling); "forward+backward" is forward then
``out.backward(grad)`` with a fixed random grad, every input (x, weights, biases, gate weights)
requiring grad; gradients are reset to None between runs (not timed).

Numbers per row: ms = median of triton.testing.do_bench on a GPU (p20_ms/p80_ms its 20th/80th
percentiles), of time.perf_counter runs on the CPU. flops = the analytic count of the work of the
expert algorithm (GEMMs only, bias/activation/gating ignored): switch forward 2*B*N*k*D^2, ffn
forward 2*T*k*2*D*F, forward+backward 3x forward; dense_linear counts its own 2*B*N*D^2. tflops =
flops / time — for the fused switch layer, which does one GEMM per token instead of k, this is an
*effective* rate and may exceed the card's. peak_mib = torch.cuda.max_memory_allocated of one call
(inputs included), peak_extra_mib = the same minus what was allocated before the call, inputs_mib =
the inputs' own bytes (GPU only). rel_err = ||out - ref|| / ||ref|| of the forward output against the
baseline loop run in float32 on upcast inputs, grad_rel_err the same for dx (a sanity check; the
tests are the correctness gate). A failing implementation gives a row with "error" and the run
goes on; "skipped: ..." errors mark implementations not available here.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.official_loop import (expert_mlp_grouped_mm, expert_mlp_loop, grouped_mm_unavailable,
                                      switch_modulation_grouped_mm, switch_modulation_loop)

MODES = ("forward", "forward+backward")
BASELINE = {"switch": "reference", "ffn": "loop"}


@dataclass(frozen=True)
class SwitchCase:
    """Switch-DiT SMoE layer: x [B, N, D], E experts D -> D, k per sample."""

    size: str
    B: int
    N: int
    D: int
    E: int
    k: int

    suite = "switch"

    @property
    def name(self) -> str:
        return f"{self.size}: B{self.B} N{self.N} D{self.D} E{self.E} k{self.k}"

    def flops_forward(self) -> int:
        return 2 * self.B * self.N * self.k * self.D * self.D


@dataclass(frozen=True)
class FFNCase:
    """Token-choice MoE: x [T, D], E MLP experts D -> F -> D, k per token."""

    T: int
    D: int
    F: int
    E: int
    k: int
    activation: str = "gelu_tanh"

    suite = "ffn"

    @property
    def name(self) -> str:
        return f"T{self.T} D{self.D} F{self.F} E{self.E} k{self.k}"

    def flops_forward(self) -> int:
        return 2 * self.T * self.k * 2 * self.D * self.F


# Ordered by importance, so a run cut short by its time budget keeps the figures that matter most.
SWITCH_CASES = [
    SwitchCase("XL", 256, 256, 1152, 3, 2), SwitchCase("S", 256, 256, 384, 3, 2),
    SwitchCase("XL", 32, 256, 1152, 3, 2), SwitchCase("XL", 256, 256, 1152, 8, 2),
    SwitchCase("B", 256, 256, 768, 3, 2), SwitchCase("S", 256, 256, 384, 8, 2),
    SwitchCase("B", 256, 256, 768, 8, 2), SwitchCase("XL", 32, 256, 1152, 8, 2),
]
FFN_CASES = [FFNCase(8192, 4096, 14336, 8, 2), FFNCase(16384, 2048, 1024, 64, 8)]
# --quick: tiny shapes with odd sizes, prime E and an expert that may get no sample.
QUICK_SWITCH_CASES = [SwitchCase("tiny", 4, 16, 32, 3, 2), SwitchCase("tiny", 3, 8, 24, 5, 2)]
QUICK_FFN_CASES = [FFNCase(40, 32, 48, 5, 2)]


class Inputs:
    """Tensors of one case; the leaves that require grad are listed per implementation."""

    def __init__(self, **tensors: torch.Tensor):
        self.__dict__.update(tensors)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _routing(rows: int, num_experts: int, k: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax of random logits, then top-k (no renormalisation): [rows, k] float32 leaf, int64."""
    probs = torch.softmax(torch.randn(rows, num_experts, device=device), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return _leaf(weights), ids


def make_switch_inputs(case: SwitchCase, device, dtype) -> Inputs:
    """x [B, N, D]; weight [E, D, D] (library layout) and weight_t (nn.Linear layout, for the loop)."""
    weight = torch.randn(case.E, case.D, case.D, device=device) * case.D ** -0.5
    tw, ti = _routing(case.B, case.E, case.k, device)
    return Inputs(
        x=_leaf(torch.randn(case.B, case.N, case.D, device=device, dtype=dtype)),
        weight=_leaf(weight.to(dtype)),
        weight_t=_leaf(weight.transpose(1, 2).contiguous().to(dtype)),
        bias=_leaf((torch.randn(case.E, case.D, device=device) * 0.1).to(dtype)),
        tw=tw, ti=ti)


def make_ffn_inputs(case: FFNCase, device, dtype) -> Inputs:
    """x [T, D]; w1 [E, D, F], w2 [E, F, D] (library layout) and their nn.Linear-layout copies."""
    w1 = torch.randn(case.E, case.D, case.F, device=device, dtype=dtype) * case.D ** -0.5
    w2 = torch.randn(case.E, case.F, case.D, device=device, dtype=dtype) * case.F ** -0.5
    tw, ti = _routing(case.T, case.E, case.k, device)
    return Inputs(
        x=_leaf(torch.randn(case.T, case.D, device=device, dtype=dtype)),
        w1=_leaf(w1), w2=_leaf(w2),
        w1_t=_leaf(w1.transpose(1, 2).contiguous()), w2_t=_leaf(w2.transpose(1, 2).contiguous()),
        tw=tw, ti=ti)


def reference_outputs(case, inp: Inputs, grad_out: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, dx) of the baseline loop in float32 on upcast inputs: the yardstick of rel_err."""
    f32 = lambda t: t.detach().float()  # noqa: E731
    x = f32(inp.x).requires_grad_(True)
    if case.suite == "switch":
        out = switch_modulation_loop(x, f32(inp.weight_t), f32(inp.bias), f32(inp.tw), inp.ti)
    else:
        out = expert_mlp_loop(x, f32(inp.w1_t), f32(inp.w2_t), f32(inp.tw), inp.ti, case.activation)
    out.backward(grad_out.float())
    return out.detach(), x.grad


# --------------------------------------------------------------------------------------------------
# Implementations: name -> (suite, requirement, builder). A builder returns (forward closure, leaves,
# flops of one forward or None for the case's count, whether its output is comparable to the ref).

Builder = Callable[..., Tuple[Callable[[], torch.Tensor], List[torch.Tensor], Optional[int], bool]]


def _api():
    import switch_dit_kernels
    return switch_dit_kernels


def _switch_api(backend: str) -> Builder:
    def build(case: SwitchCase, inp: Inputs):
        fn = lambda: _api().switch_modulation(inp.x, inp.weight, inp.bias, inp.tw, inp.ti,  # noqa: E731
                                              backend=backend)
        return fn, [inp.x, inp.weight, inp.bias, inp.tw], None, True
    return build


def _switch_expert_linear(case: SwitchCase, inp: Inputs):
    def fn():
        y = _api().expert_linear(inp.x.reshape(case.B * case.N, case.D), inp.weight, inp.bias,
                                 inp.tw, inp.ti, tokens_per_route=case.N, backend="triton")
        return inp.x * (1 + y.view(case.B, case.N, case.D))
    return fn, [inp.x, inp.weight, inp.bias, inp.tw], None, True


def _switch_reference(case: SwitchCase, inp: Inputs):
    fn = lambda: switch_modulation_loop(inp.x, inp.weight_t, inp.bias, inp.tw, inp.ti)  # noqa: E731
    return fn, [inp.x, inp.weight_t, inp.bias, inp.tw], None, True


def _switch_grouped(case: SwitchCase, inp: Inputs):
    fn = lambda: switch_modulation_grouped_mm(inp.x, inp.weight, inp.bias, inp.tw, inp.ti)  # noqa: E731
    return fn, [inp.x, inp.weight, inp.bias, inp.tw], None, True


def _switch_dense_same_flops(case: SwitchCase, inp: Inputs):
    a = _leaf(torch.randn(case.B * case.N * case.k, case.D, device=inp.x.device, dtype=inp.x.dtype))
    w = _leaf(torch.randn(case.D, case.D, device=a.device, dtype=a.dtype) * case.D ** -0.5)
    return (lambda: a @ w), [a, w], None, False


def _switch_dense_linear(case: SwitchCase, inp: Inputs):
    w = _leaf(torch.randn(case.D, case.D, device=inp.x.device, dtype=inp.x.dtype) * case.D ** -0.5)
    b = _leaf(torch.zeros(case.D, device=inp.x.device, dtype=inp.x.dtype))
    fn = lambda: F.linear(inp.x, w, b)  # noqa: E731
    return fn, [inp.x, w, b], 2 * case.B * case.N * case.D * case.D, False


def _ffn_api(backend: str) -> Builder:
    def build(case: FFNCase, inp: Inputs):
        fn = lambda: _api().expert_mlp(inp.x, inp.w1, None, inp.w2, None, inp.tw, inp.ti,  # noqa: E731
                                       activation=case.activation, backend=backend)
        return fn, [inp.x, inp.w1, inp.w2, inp.tw], None, True
    return build


def _ffn_loop(case: FFNCase, inp: Inputs):
    fn = lambda: expert_mlp_loop(inp.x, inp.w1_t, inp.w2_t, inp.tw, inp.ti, case.activation)  # noqa: E731
    return fn, [inp.x, inp.w1_t, inp.w2_t, inp.tw], None, True


def _ffn_grouped(case: FFNCase, inp: Inputs):
    fn = lambda: expert_mlp_grouped_mm(inp.x, inp.w1, inp.w2, inp.tw, inp.ti, case.activation)  # noqa: E731
    return fn, [inp.x, inp.w1, inp.w2, inp.tw], None, True


def _ffn_dense_same_flops(case: FFNCase, inp: Inputs):
    a = _leaf(torch.randn(case.T * case.k, case.D, device=inp.x.device, dtype=inp.x.dtype))
    w = _leaf(torch.randn(case.D, 2 * case.F, device=a.device, dtype=a.dtype) * case.D ** -0.5)
    return (lambda: a @ w), [a, w], None, False


@dataclass(frozen=True)
class Impl:
    name: str
    suite: str
    needs: str  # "" | "triton" | "grouped_mm" (torch's) | "cuda" (CUDA tensors) | "cuda_ext" (csrc)
    build: Builder
    # environment knobs set while this implementation is built and timed (opt-in kernel paths)
    env: Optional[Tuple[Tuple[str, str], ...]] = None


IMPLS: Dict[str, Impl] = {i.name + "/" + i.suite: i for i in [
    Impl("reference", "switch", "", _switch_reference),
    Impl("switch_modulation_triton", "switch", "triton", _switch_api("triton")),
    # the defaults' predecessors, timed beside them (benchmarks.decide)
    Impl("switch_modulation_triton_fused_u", "switch", "triton", _switch_api("triton"),
         env=(("SWITCH_DIT_SMOD_DX_PREPASS", "0"),)),
    Impl("switch_modulation_triton_merged_b", "switch", "triton", _switch_api("triton"),
         env=(("SWITCH_DIT_SMOD_DX_PREPASS", "0"), ("SWITCH_DIT_SMOD_MERGED_OPERAND", "b"))),
    Impl("expert_linear_triton", "switch", "triton", _switch_expert_linear),
    Impl("torch_grouped_mm", "switch", "grouped_mm", _switch_grouped),
    Impl("dense_same_flops", "switch", "", _switch_dense_same_flops),
    Impl("dense_linear", "switch", "", _switch_dense_linear),
    Impl("switch_modulation_grouped_mm", "switch", "cuda", _switch_api("grouped_mm")),
    Impl("switch_modulation_cuda", "switch", "cuda_ext", _switch_api("cuda")),
    Impl("switch_modulation_torch", "switch", "", _switch_api("torch")),
    # last of its suite: a kernel never run before must not take the other rows down with it
    Impl("switch_modulation_gluon", "switch", "gluon", _switch_api("triton"),
         env=(("SWITCH_DIT_SMOD_GLUON", "1"),)),
    # one sample of N = 256 per forward tile (half the merges per MMA); dx has no 256-row tile
    # that fits, so its forward+backward row runs the Triton dx
    Impl("switch_modulation_gluon_256x64", "switch", "gluon", _switch_api("triton"),
         env=(("SWITCH_DIT_SMOD_GLUON", "1"), ("SWITCH_DIT_SMOD_GLUON_TILE", "256,64,32,6"))),
    Impl("loop", "ffn", "", _ffn_loop),
    Impl("expert_mlp_triton", "ffn", "triton", _ffn_api("triton")),
    Impl("torch_grouped_mm", "ffn", "grouped_mm", _ffn_grouped),
    Impl("dense_same_flops", "ffn", "", _ffn_dense_same_flops),
    Impl("expert_mlp_grouped_mm", "ffn", "cuda", _ffn_api("grouped_mm")),
    Impl("expert_mlp_cuda", "ffn", "cuda_ext", _ffn_api("cuda")),
    Impl("expert_mlp_torch", "ffn", "", _ffn_api("torch")),
]}
ALL_IMPL_NAMES = sorted({i.name for i in IMPLS.values()})


def default_impls(suite: str, device: torch.device) -> List[str]:
    """GPU: everything but the library's torch backend (the loop baseline already stands for it).
    CPU: the torch paths, plus the Triton kernels when TRITON_INTERPRET=1 (they are slow there)."""
    names = [i.name for i in IMPLS.values() if i.suite == suite]
    if device.type == "cuda":
        return [n for n in names if not n.endswith("_torch")]
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return [n for n in names if IMPLS[f"{n}/{suite}"].needs in ("", "grouped_mm")
            or (interpreting and n.endswith("_triton"))]


def unavailable(impl: Impl, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``impl`` cannot run here, or None."""
    if impl.needs == "triton":
        from switch_dit_kernels.backend import triton_available, triton_interpreting
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not triton_interpreting():
            return "Triton kernels need CUDA tensors or TRITON_INTERPRET=1"
        if device.type != "cuda" and dtype == torch.bfloat16:
            return "the Triton interpreter's tl.dot is wrong on bfloat16"
    if impl.needs == "gluon":
        from switch_dit_kernels.kernels import switch_modulation_gluon as sg
        if not sg.gluon_supported():
            return "the Gluon kernels are written for Triton 3.6"
        probe = torch.empty(16, device=device, dtype=dtype)
        with common.environ({"SWITCH_DIT_SMOD_GLUON": "1"}):
            if not sg.gluon_enabled(probe):
                return "the Gluon kernels need 16-bit inputs on an sm_90 GPU"
    if impl.needs == "grouped_mm":
        return grouped_mm_unavailable(device.type, dtype)
    if impl.needs == "cuda" and device.type != "cuda":
        return "this backend needs CUDA tensors"
    if impl.needs == "cuda_ext":
        if device.type != "cuda":
            return "the csrc extension needs CUDA tensors"
        if not _api().cuda_extension_available():
            return "the csrc extension was not built (SWITCH_DIT_BUILD_CUDA)"
    return None


# --------------------------------------------------------------------------------------------------

def _row(env: dict, case, impl: str, mode: str, dtype: torch.dtype, **fields) -> dict:
    row = {"benchmark": "moe_layer", "suite": case.suite, "case": case.name, "impl": impl,
           "mode": mode, "dtype": str(dtype).replace("torch.", ""), "params": asdict(case),
           "ms": None, "p20_ms": None, "p80_ms": None, "flops": None, "tflops": None,
           "peak_mib": None, "peak_extra_mib": None, "inputs_mib": None, "rel_err": None,
           "grad_rel_err": None, "timer": None, "error": None,
           "device": env["device"], "torch": env["torch"], "triton": env["triton"]}
    row.update(fields)
    return row


def run_case(case, impl_names: Sequence[str], modes: Sequence[str], device: torch.device,
             dtype: torch.dtype, env: dict, *, quick: bool, check: bool, deadline: common.Deadline,
             emit: Callable[[dict], None]) -> None:
    """Measure every implementation of one case; each row goes to ``emit`` as soon as it exists."""
    def skip_all(reason: str) -> None:
        for name in impl_names:
            for mode in modes:
                emit(_row(env, case, name, mode, dtype, error=reason))

    if deadline.expired():
        return skip_all("skipped: time budget of the run spent")
    torch.manual_seed(0)
    try:
        inp = make_switch_inputs(case, device, dtype) if case.suite == "switch" \
            else make_ffn_inputs(case, device, dtype)
        grad_out = torch.randn(inp.x.shape, device=device, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: record it, go on with the next case
        common.free_memory(device)
        return skip_all(f"inputs: {common.format_error(exc)}")
    ref_out = ref_dx = None
    if check:
        try:
            ref_out, ref_dx = reference_outputs(case, inp, grad_out)
        except Exception as exc:  # noqa: BLE001 - time the case anyway, without rel_err
            print(f"# {case.name}: no float32 reference ({common.format_error(exc)})", flush=True)
            check = False
    common.free_memory(device)

    for name in impl_names:
        impl = IMPLS[f"{name}/{case.suite}"]
        # opt-in kernel paths are environment knobs, read at every launch (backward too)
        with common.environ(dict(impl.env or ())):
            unavailable_reason = unavailable(impl, device, dtype)
            reason = None if unavailable_reason is None else f"skipped: {unavailable_reason}"
            state: dict = {}
            if reason is None and not deadline.expired():
                try:  # build and one untimed forward: the output is checked against the reference
                    fwd, leaves, own_flops, comparable = impl.build(case, inp)
                    with torch.no_grad():
                        out = fwd()
                    state = dict(fwd=fwd, leaves=leaves, flops=own_flops or case.flops_forward(),
                                 comparable=comparable and check,
                                 rel_err=common.rel_err(out, ref_out) if comparable and check else None,
                                 gout=grad_out if comparable else torch.randn_like(out))
                    del out
                except Exception as exc:  # noqa: BLE001 - record, go on with the next implementation
                    reason = common.format_error(exc)
            for mode in modes:
                if reason is not None:
                    emit(_row(env, case, name, mode, dtype, error=reason))
                elif deadline.expired():
                    emit(_row(env, case, name, mode, dtype, error="skipped: time budget of the run spent"))
                else:
                    try:
                        emit(_row(env, case, name, mode, dtype,
                                  **_measure(state, mode, device, quick, ref_dx, inp)))
                    except Exception as exc:  # noqa: BLE001 - record, go on with the next mode
                        emit(_row(env, case, name, mode, dtype, error=common.format_error(exc)))
                        common.free_memory(device)
            state.clear()
            common.free_memory(device)
    del inp
    common.free_memory(device)


def _measure(state: dict, mode: str, device: torch.device, quick: bool, ref_dx, inp: Inputs) -> dict:
    """Time one mode of a built implementation; forward+backward also checks dx once."""
    fwd, leaves, gout = state["fwd"], state["leaves"], state["gout"]
    grad_err = None
    if mode == "forward":
        def fn():
            with torch.no_grad():
                return fwd()
        flops = state["flops"]
    else:
        def fn():
            fwd().backward(gout)
        flops = 3 * state["flops"]
        if state["comparable"]:
            for t in leaves:
                t.grad = None
            fn()
            grad_err = common.rel_err(inp.x.grad, ref_dx)
    timing = common.time_fn(fn, device, quick=quick, grad_to_none=leaves)
    peak, extra = common.peak_memory(fn, device, grad_to_none=leaves)
    return dict(ms=timing.ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, timer=timing.timer,
                flops=flops, tflops=common.tflops(flops, timing.ms), peak_mib=peak,
                peak_extra_mib=extra,
                inputs_mib=common.tensors_mib(leaves) if device.type == "cuda" else None,
                rel_err=state["rel_err"], grad_rel_err=grad_err)


TABLE_COLUMNS = [("case", "case", ""), ("impl", "impl", ""), ("mode", "mode", ""), ("ms", "ms", ".4g"),
                 ("p20", "p20_ms", ".4g"), ("p80", "p80_ms", ".4g"), ("TFLOP/s", "tflops", ".3g"),
                 ("peak MiB", "peak_mib", ".0f"), ("+MiB", "peak_extra_mib", ".0f"),
                 ("rel err", "rel_err", ".1e"), ("dx err", "grad_rel_err", ".1e"), ("error", "error", "")]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_layer",
                                description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few runs (CPU: < 1 minute)")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after every row)")
    p.add_argument("--cases", choices=("switch", "ffn", "all"), default="all")
    p.add_argument("--impls", default="default",
                   help=f"comma-separated subset of {ALL_IMPL_NAMES}, 'default' or 'all'")
    p.add_argument("--filter", default=None,
                   help="comma-separated substrings; keep cases whose name contains one (e.g. XL,S:)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + str(MODES))
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time budget: rows not started in time are recorded as skipped")
    p.add_argument("--no-check", action="store_true", help="skip the float32 reference (rel_err)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    """Run the benchmark; returns the rows (also printed, and written to --json)."""
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    with common.cpu_threads(device, 1 if args.quick else None):  # see common.cpu_threads
        return _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> List[dict]:
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; choose from {MODES}")
    suites = ("switch", "ffn") if args.cases == "all" else (args.cases,)
    cases = []
    for suite in suites:
        if suite == "switch":
            cases += QUICK_SWITCH_CASES if args.quick else SWITCH_CASES
        else:
            cases += QUICK_FFN_CASES if args.quick else FFN_CASES
    if args.filter:
        keys = [s for s in args.filter.split(",") if s]
        cases = [c for c in cases if any(s in c.name for s in keys)]

    def impls_for(suite: str) -> List[str]:
        if args.impls == "default":
            return default_impls(suite, device)
        names = [i.name for i in IMPLS.values() if i.suite == suite]
        if args.impls == "all":
            return names
        wanted = [s for s in args.impls.split(",") if s]
        unknown = [w for w in wanted if w not in ALL_IMPL_NAMES]
        if unknown:
            raise SystemExit(f"--impls: unknown {unknown}; choose from {ALL_IMPL_NAMES}")
        return [w for w in wanted if w in names]

    env = common.environment(device)
    config = {"quick": args.quick, "dtype": str(dtype).replace("torch.", ""), "modes": modes,
              "cases": [c.name for c in cases], "baseline": BASELINE,
              "impls": {s: impls_for(s) for s in suites}}
    print(f"# moe_layer on {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{config['dtype']} | {env['date']}", flush=True)
    rows: List[dict] = []
    total = sum(len(impls_for(c.suite)) * len(modes) for c in cases)

    def emit(row: dict) -> None:
        rows.append(row)
        result = f"{row['ms']:.4g} ms" if row["ms"] is not None else (row["error"] or "-")
        print(f"[{len(rows)}/{total}] {row['case']} {row['impl']} {row['mode']}: {result}",
              file=sys.stderr, flush=True)
        if args.json:
            common.write_json(args.json, "moe_layer", env, rows, config)

    deadline = common.Deadline(args.budget_s)
    for case in cases:
        run_case(case, impls_for(case.suite), modes, device, dtype, env, quick=args.quick,
                 check=not args.no_check, deadline=deadline, emit=emit)
    return common.report(rows, TABLE_COLUMNS, args.json, "moe_layer", env, config)


if __name__ == "__main__":
    main()
    sys.exit(0)
