"""pytest-benchmark cases of the CPU paths: the baselines and the library's torch backend.

Run apart from the correctness suite (pytest's testpaths is tests/ only, so `make test` never
collects this file):

    make bench-cpu                                            # = the line below
    pytest benchmarks/test_bench_cpu.py --benchmark-only -q
    pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-json out/bench_cpu.json

Small float32 shapes (a few ms per call on one core) so the whole file runs in about a minute.
Single-threaded unless SWITCH_DIT_BENCH_THREADS says otherwise: on a shared 2-core machine, torch's
second thread waits for a busy core at every op (an official-loop forward measured 1.4 ms on one
thread and 736 ms on two).
Switch layer: x [B=16, N=64, D=128], E=3, k=2. Token MLP: T=512, D=128, F=256, E=8, k=2.
Each case is timed forward (no autograd) and forward+backward.
"""
import os

import pytest
import torch

from benchmarks.official_loop import (expert_mlp_grouped_mm, expert_mlp_loop, grouped_mm_unavailable,
                                      switch_modulation_grouped_mm, switch_modulation_loop)
from switch_dit_kernels import (build_routing_metadata, expert_linear, expert_mlp, route_topk,
                                switch_modulation)

B, N, D, E, K = 16, 64, 128, 3, 2
T, DM, F, EM, KM = 512, 128, 256, 8, 2


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SWITCH_DIT_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


def _leaf(t):
    return t.detach().requires_grad_(True)


@pytest.fixture(scope="module")
def switch_inputs():
    torch.manual_seed(0)
    weight = torch.randn(E, D, D) / D ** 0.5
    probs = torch.softmax(torch.randn(B, E), -1)
    tw, ti = torch.topk(probs, K, -1)
    return dict(x=_leaf(torch.randn(B, N, D)), weight=_leaf(weight),
                weight_t=_leaf(weight.transpose(1, 2).contiguous()),
                bias=_leaf(torch.randn(E, D) / 10), tw=_leaf(tw), ti=ti)


@pytest.fixture(scope="module")
def mlp_inputs():
    torch.manual_seed(0)
    w1, w2 = torch.randn(EM, DM, F) / DM ** 0.5, torch.randn(EM, F, DM) / F ** 0.5
    tw, ti = torch.topk(torch.softmax(torch.randn(T, EM), -1), KM, -1)
    return dict(x=_leaf(torch.randn(T, DM)), w1=_leaf(w1), w2=_leaf(w2),
                w1_t=_leaf(w1.transpose(1, 2).contiguous()), w2_t=_leaf(w2.transpose(1, 2).contiguous()),
                tw=_leaf(tw), ti=ti)


def _run(benchmark, fn, mode, leaves):
    if mode == "forward":
        def call():
            with torch.no_grad():
                return fn()
    else:
        grad = torch.randn_like(fn().detach())

        def call():
            for t in leaves:
                t.grad = None
            fn().backward(grad)
    benchmark(call)


MODES = ["forward", "forward+backward"]
SWITCH_IMPLS = {
    "official_loop": lambda i: switch_modulation_loop(i["x"], i["weight_t"], i["bias"], i["tw"], i["ti"]),
    "torch_grouped_mm": lambda i: switch_modulation_grouped_mm(i["x"], i["weight"], i["bias"], i["tw"], i["ti"]),
    "switch_modulation_torch": lambda i: switch_modulation(i["x"], i["weight"], i["bias"], i["tw"], i["ti"],
                                                           backend="torch"),
    "expert_linear_torch": lambda i: expert_linear(i["x"].reshape(B * N, D), i["weight"], i["bias"], i["tw"],
                                                   i["ti"], tokens_per_route=N, backend="torch"),
}
MLP_IMPLS = {
    "mixtral_loop": lambda i: expert_mlp_loop(i["x"], i["w1_t"], i["w2_t"], i["tw"], i["ti"]),
    "torch_grouped_mm": lambda i: expert_mlp_grouped_mm(i["x"], i["w1"], i["w2"], i["tw"], i["ti"]),
    "expert_mlp_torch": lambda i: expert_mlp(i["x"], i["w1"], None, i["w2"], None, i["tw"], i["ti"],
                                             backend="torch"),
}


def _skip_unavailable(impl):
    if impl == "torch_grouped_mm":
        reason = grouped_mm_unavailable("cpu", torch.float32)
        if reason:
            pytest.skip(reason)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", list(SWITCH_IMPLS))
def test_switch_layer(benchmark, switch_inputs, impl, mode):
    _skip_unavailable(impl)
    benchmark.group = f"switch B{B} N{N} D{D} E{E} k{K} {mode}"
    leaves = [switch_inputs[n] for n in ("x", "weight", "weight_t", "bias", "tw")]
    _run(benchmark, lambda: SWITCH_IMPLS[impl](switch_inputs), mode, leaves)


@pytest.mark.parametrize("mode", MODES)
def test_switch_dense_linear(benchmark, switch_inputs, mode):
    """The ceiling: nn.Linear(D, D) on the same B*N tokens."""
    benchmark.group = f"switch B{B} N{N} D{D} E{E} k{K} {mode}"
    w, b = _leaf(torch.randn(D, D) / D ** 0.5), _leaf(torch.zeros(D))
    x = switch_inputs["x"]
    _run(benchmark, lambda: torch.nn.functional.linear(x, w, b), mode, [x, w, b])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", list(MLP_IMPLS))
def test_token_mlp(benchmark, mlp_inputs, impl, mode):
    _skip_unavailable(impl)
    benchmark.group = f"mlp T{T} D{DM} F{F} E{EM} k{KM} {mode}"
    leaves = [mlp_inputs[n] for n in ("x", "w1", "w2", "w1_t", "w2_t", "tw")]
    _run(benchmark, lambda: MLP_IMPLS[impl](mlp_inputs), mode, leaves)


def test_route_topk(benchmark):
    benchmark.group = "routing"
    logits = torch.randn(T * 8, 64)
    benchmark(lambda: route_topk(logits, 8, backend="torch"))


def test_build_routing_metadata(benchmark):
    benchmark.group = "routing"
    topk_ids = torch.topk(torch.randn(T * 8, 64), 8, -1).indices
    benchmark(lambda: build_routing_metadata(topk_ids, 64, tokens_per_route=1))
