"""expert_linear's Triton path vs the float64 reference: forward and every gradient."""
import functools

import pytest
import torch

from moe_testing import (check_against_reference, make_routing, run_twice_second_without_host_sync,
                         run_with_grads)
from switch_dit_kernels import expert_linear
from switch_dit_kernels import reference as ref
from switch_dit_kernels.kernels import buffers


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an unwritten tile fails the test."""
    monkeypatch.setattr(buffers, "POISON", True)


def make_inputs(num_routes, k, tokens_per_route, num_experts, d_in, d_out, pattern, bias,
                device="cpu"):
    topk_weights, topk_ids = make_routing(num_routes, k, num_experts, pattern, device)
    floats = {
        "x": torch.randn(num_routes * tokens_per_route, d_in, device=device),
        "weight": torch.randn(num_experts, d_in, d_out, device=device) / d_in ** 0.5,
        "bias": torch.randn(num_experts, d_out, device=device) * 0.5 if bias else None,
        "topk_weights": topk_weights,
    }
    return floats, {"topk_ids": topk_ids}


def fast(tokens_per_route, **kw):
    return expert_linear(**kw, tokens_per_route=tokens_per_route, backend="triton")


def slow(tokens_per_route, **kw):
    return ref.expert_linear(**kw, tokens_per_route=tokens_per_route)


# (R, k, N, E, Din, Dout, routing pattern, bias): the edge each shape covers. Interpreter tiles
# are 16 x 16 x 16, so 24 / 37 / 40 give partial tiles in every dimension.
CASES = [
    (1, 1, 1, 3, 16, 24, "random", True),    # T = 1: a single row on a single expert
    (5, 2, 1, 7, 24, 40, "random", True),    # 10 sorted rows: fewer rows than a tile; prime E = 7
    (13, 3, 1, 5, 37, 24, "random", False),  # odd Din = 37 (partial K step); bias None
    (6, 5, 1, 5, 24, 37, "random", True),    # k = E; odd Dout = 37 (partial column tile)
    (9, 1, 1, 4, 40, 24, "random", True),    # k = 1: dX scattered by the GEMM, no combine
    (20, 1, 1, 5, 24, 24, "one", True),      # every row on one expert (two row tiles), 4 empty
    (7, 2, 1, 7, 24, 24, "sparse", True),    # experts 0, 2, 4, 6 receive no rows
    (2, 2, 24, 5, 24, 40, "random", True),   # tokens_per_route = 24: a pair's run spans 2 tiles
    (3, 2, 5, 3, 40, 24, "random", False),   # tokens_per_route = 5: runs shorter than a tile
]


@pytest.mark.parametrize("case", CASES, ids=[str(c[:7]) for c in CASES])
def test_expert_linear_float32(case):
    floats, ints = make_inputs(*case)
    check_against_reference(functools.partial(fast, case[2]), functools.partial(slow, case[2]),
                            floats, ints, torch.float32)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[7]], ids=["few-rows", "k=E", "N=24"])
def test_expert_linear_float16(case):
    floats, ints = make_inputs(*case)
    check_against_reference(functools.partial(fast, case[2]), functools.partial(slow, case[2]),
                            floats, ints, torch.float16)


def test_expert_linear_float64():
    # float64 inputs accumulate in float64 (tl.dot on float64 needs a float64 accumulator).
    case = (5, 2, 3, 5, 24, 40, "random", True)  # tokens_per_route = 3
    floats, ints = make_inputs(*case)
    check_against_reference(functools.partial(fast, 3), functools.partial(slow, 3), floats, ints,
                            torch.float64)


def test_expert_linear_deterministic():
    # Same inputs twice: identical bits in y and every gradient (no atomics anywhere).
    floats, ints = make_inputs(6, 3, 2, 5, 24, 40, "random", True)
    dy = torch.randn(12, 40)
    y1, g1 = run_with_grads(functools.partial(fast, 2), floats, ints, torch.float32, dy)
    y2, g2 = run_with_grads(functools.partial(fast, 2), floats, ints, torch.float32, dy)
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_expert_linear_partial_grads_and_gate_dtype():
    # k = 1 with gates that need no grad: the forward scales and scatters inside the GEMM.
    # Gates in bfloat16: used in float32, their grad comes back in bfloat16.
    floats, ints = make_inputs(9, 1, 1, 4, 24, 40, "random", True)
    x = floats["x"].requires_grad_(True)
    y = fast(1, x=x, weight=floats["weight"], bias=floats["bias"],
             topk_weights=floats["topk_weights"], **ints)
    want = slow(1, x=floats["x"].double(), weight=floats["weight"].double(),
                bias=floats["bias"].double(), topk_weights=floats["topk_weights"].double(), **ints)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.shape == x.shape and not dx.isnan().any()

    floats, ints = make_inputs(6, 2, 1, 5, 24, 24, "random", False)
    gates = floats["topk_weights"].to(torch.bfloat16).requires_grad_(True)
    y = fast(1, x=floats["x"], weight=floats["weight"], bias=None, topk_weights=gates, **ints)
    (dg,) = torch.autograd.grad(y.sum(), gates)
    gates64 = gates.detach().double().requires_grad_(True)
    y64 = slow(1, x=floats["x"].double(), weight=floats["weight"].double(), bias=None,
               topk_weights=gates64, **ints)
    (dg64,) = torch.autograd.grad(y64.sum(), gates64)
    assert dg.dtype == torch.bfloat16
    torch.testing.assert_close(dg.double(), dg64, rtol=1e-2, atol=1e-2)


def test_expert_linear_int32_ids_and_strided_input():
    # int32 ids and a non-contiguous x (a column slice): the ops make what they need contiguous.
    floats, ints = make_inputs(5, 2, 3, 5, 24, 24, "random", True)
    wide = torch.randn(15, 40)
    x = wide[:, 3:27]
    y = fast(3, x=x, weight=floats["weight"], bias=floats["bias"],
             topk_weights=floats["topk_weights"], topk_ids=ints["topk_ids"].to(torch.int32))
    want = slow(3, x=x, weight=floats["weight"], bias=floats["bias"],
                topk_weights=floats["topk_weights"], topk_ids=ints["topk_ids"])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


# GPU: bf16 and shapes where the autotuned tiles (64-256 wide) see many row tiles per expert.
GPU_CASES = [
    (2048, 2, 1, 8, 512, 384, "random", True),    # token routing, Mixtral-like k = 2 of 8
    (512, 8, 1, 64, 256, 256, "random", True),    # many experts: E64 k8, several empty-ish
    (8, 2, 256, 3, 384, 384, "random", True),     # Switch-DiT: one route per sample, N = 256
    (1, 1, 1, 5, 128, 128, "random", False),      # T = 1 through the autotuned kernels
    (300, 1, 1, 7, 192, 200, "one", True),        # every row on one expert; Dout = 200 (partial)
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(c[:7]) for c in GPU_CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expert_linear_gpu(case, dtype):
    floats, ints = make_inputs(*case, device="cuda")
    check_against_reference(functools.partial(fast, case[2]), functools.partial(slow, case[2]),
                            floats, ints, dtype)


@pytest.mark.gpu
def test_expert_linear_gpu_deterministic():
    floats, ints = make_inputs(1024, 4, 1, 16, 256, 256, "random", True, device="cuda")
    dy = torch.randn(1024, 256, device="cuda")
    runs = [run_with_grads(functools.partial(fast, 1), floats, ints, torch.bfloat16, dy)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


@pytest.mark.gpu
def test_expert_linear_gpu_no_host_sync():
    # Switch-DiT routing (N = 256) forward and backward with no host synchronisation; the first
    # call autotunes (which synchronises), so it runs before sync checking is switched on.
    floats, ints = make_inputs(8, 2, 256, 3, 256, 256, "random", True, device="cuda")
    dy = torch.randn(8 * 256, 256, device="cuda")
    fn = functools.partial(fast, 256)
    run_twice_second_without_host_sync(
        lambda: run_with_grads(fn, floats, ints, torch.bfloat16, dy))
