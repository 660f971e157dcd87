"""expert_mlp's Triton path vs the float64 reference: forward and all gradients, each activation."""
import functools

import pytest
import torch

from moe_testing import (check_against_reference, make_routing, run_twice_second_without_host_sync,
                         run_with_grads)
from switch_dit_kernels import expert_mlp
from switch_dit_kernels import reference as ref
from switch_dit_kernels.kernels import buffers

GATED = ("swiglu", "geglu")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an unwritten tile fails the test."""
    monkeypatch.setattr(buffers, "POISON", True)


def make_inputs(num_routes, k, tokens_per_route, num_experts, dim, hidden, pattern, bias,
                activation, device="cpu"):
    topk_weights, topk_ids = make_routing(num_routes, k, num_experts, pattern, device)
    h1 = 2 * hidden if activation in GATED else hidden
    floats = {
        "x": torch.randn(num_routes * tokens_per_route, dim, device=device),
        "w1": torch.randn(num_experts, dim, h1, device=device) / dim ** 0.5,
        "b1": torch.randn(num_experts, h1, device=device) * 0.5 if bias else None,
        "w2": torch.randn(num_experts, hidden, dim, device=device) / hidden ** 0.5,
        "b2": torch.randn(num_experts, dim, device=device) * 0.5 if bias else None,
        "topk_weights": topk_weights,
    }
    return floats, {"topk_ids": topk_ids}


def fast(tokens_per_route, activation, **kw):
    return expert_mlp(**kw, activation=activation, tokens_per_route=tokens_per_route,
                      backend="triton")


def slow(tokens_per_route, activation, **kw):
    return ref.expert_mlp(**kw, activation=activation, tokens_per_route=tokens_per_route)


def check(case, dtype):
    floats, ints = make_inputs(*case)
    n_tok, act = case[2], case[8]
    check_against_reference(functools.partial(fast, n_tok, act),
                            functools.partial(slow, n_tok, act), floats, ints, dtype)


# (R, k, N, E, D, H, routing pattern, bias, activation): the edge each shape covers; every
# activation appears at least once. Interpreter tiles are 16 x 16 x 16.
CASES = [
    (1, 1, 1, 3, 16, 24, "random", True, "gelu_tanh"),  # T = 1
    (5, 2, 1, 7, 24, 40, "random", True, "gelu"),       # 10 sorted rows < a tile; prime E = 7
    (13, 3, 1, 5, 37, 24, "random", False, "silu"),     # odd D = 37 (K of GEMM 1, N of 2); no bias
    (6, 5, 1, 5, 24, 37, "random", True, "relu"),       # k = E; odd H = 37
    (9, 1, 1, 4, 24, 40, "random", True, "swiglu"),     # k = 1: dX scattered; gated, w1 [E, D, 80]
    (20, 1, 1, 5, 24, 24, "one", True, "geglu"),        # every row on one expert, 4 empty experts
    (7, 2, 1, 7, 24, 24, "sparse", False, "swiglu"),    # experts 0, 2, 4, 6 empty; gated, no bias
    (2, 2, 24, 5, 24, 40, "random", True, "gelu_tanh"),  # tokens_per_route = 24 (runs span tiles)
    (3, 2, 5, 3, 40, 24, "random", True, "geglu"),      # tokens_per_route = 5 (runs < a tile)
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[:6]}-{c[8]}" for c in CASES])
def test_expert_mlp_float32(case):
    check(case, torch.float32)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["gelu", "swiglu"])
def test_expert_mlp_float16(case):
    check(case, torch.float16)


def test_expert_mlp_deterministic():
    # Same inputs twice: identical bits in y and every gradient (no atomics anywhere).
    case = (6, 3, 2, 5, 24, 24, "random", True, "silu")
    floats, ints = make_inputs(*case)
    dy = torch.randn(12, 24)
    fn = functools.partial(fast, 2, "silu")
    (y1, g1), (y2, g2) = [run_with_grads(fn, floats, ints, torch.float32, dy) for _ in range(2)]
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_expert_mlp_partial_grads():
    # Only the weights need grads and k = 1 with fixed gates: the second GEMM scales and scatters
    # straight into y, and no dX / d(gate) kernels run.
    case = (9, 1, 1, 4, 24, 24, "random", True, "gelu")
    floats, ints = make_inputs(*case)
    w1 = floats["w1"].clone().requires_grad_(True)
    w2 = floats["w2"].clone().requires_grad_(True)
    kw = dict(x=floats["x"], b1=floats["b1"], b2=floats["b2"], topk_weights=floats["topk_weights"],
              **ints)
    y = fast(1, "gelu", w1=w1, w2=w2, **kw)
    dw1, dw2 = torch.autograd.grad(y.square().sum(), [w1, w2])
    w1r = floats["w1"].clone().requires_grad_(True)
    w2r = floats["w2"].clone().requires_grad_(True)
    yr = slow(1, "gelu", w1=w1r, w2=w2r, **kw)
    dw1r, dw2r = torch.autograd.grad(yr.square().sum(), [w1r, w2r])
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw1, dw1r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw2, dw2r, rtol=1e-4, atol=1e-4)


# GPU: bf16 and shapes where the autotuned tiles (64-256 wide) see many row tiles per expert.
GPU_CASES = [
    (1024, 2, 1, 8, 512, 896, "random", True, "gelu_tanh"),  # Mixtral-like k = 2 of 8
    (512, 8, 1, 64, 256, 128, "random", False, "gelu"),      # fine-grained E64 k8
    (1024, 2, 1, 8, 256, 352, "random", True, "swiglu"),     # gated, H not a multiple of 128
    (700, 1, 1, 7, 320, 200, "one", True, "geglu"),          # every row on one expert
    (4, 2, 256, 3, 384, 512, "random", True, "silu"),        # Switch-DiT routing, N = 256
    (1, 1, 1, 5, 128, 128, "random", True, "relu"),          # T = 1
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"{c[:6]}-{c[8]}" for c in GPU_CASES])
def test_expert_mlp_gpu_bf16(case):
    floats, ints = make_inputs(*case, device="cuda")
    n_tok, act = case[2], case[8]
    check_against_reference(functools.partial(fast, n_tok, act),
                            functools.partial(slow, n_tok, act), floats, ints, torch.bfloat16)


@pytest.mark.gpu
def test_expert_mlp_gpu_deterministic():
    case = (2048, 4, 1, 16, 256, 512, "random", True, "swiglu")
    floats, ints = make_inputs(*case, device="cuda")
    dy = torch.randn(2048, 256, device="cuda")
    fn = functools.partial(fast, 1, "swiglu")
    (y1, g1), (y2, g2) = [run_with_grads(fn, floats, ints, torch.bfloat16, dy) for _ in range(2)]
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.gpu
def test_expert_mlp_gpu_no_host_sync():
    # Forward and backward never wait on the host (tile counts are found on the device). The
    # first call autotunes (which synchronises), so it runs before sync checking is switched on.
    case = (512, 2, 1, 8, 256, 256, "random", True, "gelu_tanh")
    floats, ints = make_inputs(*case, device="cuda")
    fn = functools.partial(fast, 1, "gelu_tanh")
    dy = torch.randn(512, 256, device="cuda")
    run_twice_second_without_host_sync(
        lambda: run_with_grads(fn, floats, ints, torch.bfloat16, dy))
