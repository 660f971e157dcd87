"""Bad input raises a ValueError/TypeError naming the argument, on every backend."""
import subprocess
import sys

import pytest
import torch

import switch_dit_kernels as sk

E, D, T, K = 4, 8, 6, 2


def _args(**over):
    args = dict(x=torch.randn(T, D), weight=torch.randn(E, D, D), bias=torch.randn(E, D),
                topk_weights=torch.rand(T, K), topk_ids=torch.randint(0, E, (T, K)))
    args.update(over)
    return args


BAD_LINEAR = [
    ({"x": torch.randn(T, D, 1)}, ValueError, "x must have 2 dimensions"),
    ({"x": torch.randn(T, D).long()}, TypeError, "x must have dtype"),
    ({"weight": torch.randn(E, D + 1, D)}, ValueError, "weight must be"),
    ({"weight": torch.randn(E, D, D).double()}, TypeError, "weight has dtype"),
    ({"bias": torch.randn(E, D + 1)}, ValueError, "bias must have shape"),
    ({"topk_ids": torch.randint(0, E, (T, K)).float()}, TypeError, "topk_ids must have dtype"),
    ({"topk_weights": torch.rand(T, K + 1)}, ValueError, "same shape"),
    ({"topk_weights": torch.rand(T, E + 1), "topk_ids": torch.randint(0, E, (T, E + 1))},
     ValueError, "k \\(topk_ids.shape\\[1\\]\\)"),
    ({"topk_weights": torch.rand(T - 1, K), "topk_ids": torch.randint(0, E, (T - 1, K))},
     ValueError, "route units"),
    ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("over,exc,match", BAD_LINEAR)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_linear_rejects_bad_input(over, exc, match, backend):
    a = _args(**over)
    with pytest.raises(exc, match=match):
        sk.expert_linear(a["x"], a["weight"], a["bias"], a["topk_weights"], a["topk_ids"],
                         backend=backend)


def test_unknown_backend_and_bad_tokens_per_route():
    a = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.expert_linear(*a.values(), backend="cutlass")
    with pytest.raises(ValueError, match="tokens_per_route must be a positive int"):
        sk.expert_linear(*a.values(), tokens_per_route=0)
    with pytest.raises(ValueError, match="tokens_per_route"):
        sk.expert_linear(*a.values(), tokens_per_route=2)


def test_expert_mlp_rejects_bad_input():
    x, ids, g = torch.randn(T, D), torch.randint(0, E, (T, K)), torch.rand(T, K)
    w1, w2 = torch.randn(E, D, 5), torch.randn(E, 5, D)
    with pytest.raises(ValueError, match="activation must be one of"):
        sk.expert_mlp(x, w1, None, w2, None, g, ids, activation="tanh")
    with pytest.raises(ValueError, match="even last dimension"):
        sk.expert_mlp(x, w1, None, w2, None, g, ids, activation="swiglu")
    with pytest.raises(ValueError, match="w2 must be"):
        sk.expert_mlp(x, w1, None, torch.randn(E, 6, D), None, g, ids)
    with pytest.raises(ValueError, match="w1 has 4 experts but w2 has 3"):
        sk.expert_mlp(x, w1, None, torch.randn(3, 5, D), None, g, ids)


def test_switch_modulation_and_route_topk_reject_bad_input():
    x = torch.randn(3, 5, D)
    w, b = torch.randn(E, D, D), torch.randn(E, D)
    with pytest.raises(ValueError, match="weight must be"):
        sk.switch_modulation(x, torch.randn(E, D, D + 1), b, torch.rand(3, K),
                             torch.randint(0, E, (3, K)))
    with pytest.raises(ValueError, match="one row per sample"):
        sk.switch_modulation(x, w, b, torch.rand(2, K), torch.randint(0, E, (2, K)))
    with pytest.raises(ValueError, match="k must be an int"):
        sk.route_topk(torch.randn(4, 3), 4)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        sk.route_topk(torch.randn(4), 1)


def test_modules_reject_bad_config():
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        sk.MoE(8, 2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.TimestepMoE(8, 3, 2, backend="fast")
    with pytest.raises(ValueError, match="d_model"):
        sk.MoE(8, 4, 2)(torch.randn(2, 9))
    with pytest.raises(ValueError, match="cond"):
        sk.TimestepMoE(8, 3, 2)(torch.randn(2, 4, 8))


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = _args()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        sk.expert_linear(*a.values(), backend="triton")


def test_package_imports_without_triton_and_extension():
    # sys.modules['triton'] = None makes `import triton` fail as if it were not installed.
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "import torch, switch_dit_kernels as sk\n"
        "assert not sk.triton_available()\n"
        "m = sk.MoE(8, 4, 2)\n"
        "print(m(torch.randn(3, 8)).shape)\n"
        "try:\n"
        "    sk.route_topk(torch.randn(3, 4), 2, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('raised', 'pip install triton' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PATH": "", "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    assert "torch.Size([3, 8])" in out.stdout and "raised True" in out.stdout
