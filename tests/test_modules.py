"""MoE and TimestepMoE modules: wiring, auxiliary losses, autocast, and the backends agreeing."""
import os

import pytest
import torch

from switch_dit_kernels import MoE, TimestepMoE
from switch_dit_kernels import reference as ref


# backend="triton" needs CUDA tensors unless the interpreter runs the kernels on the CPU (CI);
# gpu_check.sh runs this file on a CUDA machine, where conftest leaves TRITON_INTERPRET unset.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not _INTERPRETING else "cpu"


def _copy(src, dst):
    dst.load_state_dict(src.state_dict())
    return dst


@pytest.mark.parametrize("d_hidden,activation", [(None, "gelu_tanh"), (24, "gelu"), (12, "swiglu")])
def test_moe_matches_functional_reference(d_hidden, activation):
    moe = MoE(16, 5, 2, d_hidden=d_hidden, activation=activation, backend="torch")
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    moe = moe.double()
    y = moe(x)
    assert y.shape == x.shape
    tokens = x.reshape(-1, 16)
    weights, ids = ref.route_topk(moe.router(tokens), 2)
    if d_hidden is None:
        want = ref.expert_linear(tokens, moe.weight, moe.bias, weights, ids)
    else:
        want = ref.expert_mlp(tokens, moe.w1, moe.b1, moe.w2, moe.b2, weights, ids,
                              activation=activation)
    torch.testing.assert_close(y.reshape(-1, 16), want)


def test_moe_aux_losses_match_direct_formulas():
    moe = MoE(8, 4, 2, backend="torch", load_balance_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(30, 8)
    moe(x)
    logits = moe.router(x).detach()
    probs = logits.softmax(-1)
    ids = probs.topk(2, -1).indices
    fraction = torch.tensor([(ids == e).sum().item() / ids.numel() for e in range(4)])
    load_balance = 4 * (fraction * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(moe.load_balance_loss.detach(), load_balance)
    torch.testing.assert_close(moe.z_loss.detach(), z)
    torch.testing.assert_close(moe.aux_loss.detach(), 0.01 * load_balance + 0.001 * z)
    # The losses train the router.
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_moe_gradients_reach_router_and_experts():
    moe = MoE(8, 3, 2, d_hidden=10, backend="torch")
    moe(torch.randn(5, 8)).square().sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_under_autocast(dtype):
    moe = MoE(16, 4, 2, d_hidden=32, backend="torch")
    x = torch.randn(9, 16)
    with torch.autocast("cpu", dtype=dtype):
        y = moe(x)
    assert y.dtype == dtype
    full = moe(x)
    # Half-precision error of a two-layer MLP of width 32: well under 5e-2 relative.
    torch.testing.assert_close(y.float(), full, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert moe.w1.grad.dtype == torch.float32


def test_timestep_moe_is_identity_at_init_and_gate_shapes():
    layer = TimestepMoE(12, 3, 2, d_cond=6, backend="torch")
    x, cond = torch.randn(4, 5, 12), torch.randn(4, 6)
    r, routing = layer(x, cond)
    assert torch.equal(r, x)  # zero-initialised experts: m(x) = 1
    assert routing.probs.shape == (4, 3) and routing.topk_ids.shape == (4, 2)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(4))
    torch.testing.assert_close(layer.gate_probs(cond), routing.probs)
    # Top-k weights are the probabilities themselves (no renormalisation).
    torch.testing.assert_close(routing.topk_weights, routing.probs.gather(1, routing.topk_ids))


def test_timestep_moe_forward_and_precomputed_routing():
    layer = TimestepMoE(12, 4, 2, d_cond=6, backend="torch").double()
    torch.nn.init.normal_(layer.weight, std=0.1)
    torch.nn.init.normal_(layer.bias, std=0.1)
    x, cond = torch.randn(3, 5, 12, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    r, routing = layer(x, cond)
    want = ref.switch_modulation(x, layer.weight, layer.bias, routing.topk_weights, routing.topk_ids)
    torch.testing.assert_close(r, want)
    # A table over "all timesteps" indexed by the batch's timesteps gives the same result.
    table = layer.route(torch.cat([torch.randn(2, 6, dtype=torch.float64), cond]))
    r2, _ = layer(x, routing=table.index(torch.tensor([2, 3, 4])))
    torch.testing.assert_close(r2, r)
    # Gradients reach the gate through the top-k weights, and the experts.
    r.square().sum().backward()
    assert layer.gate[1].weight.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("d_hidden", [None, 20])
def test_moe_triton_backend_matches_torch(d_hidden):
    torch_moe = MoE(16, 5, 2, d_hidden=d_hidden, backend="torch").to(TRITON_DEVICE)
    triton_moe = _copy(torch_moe, MoE(16, 5, 2, d_hidden=d_hidden, backend="triton"))
    triton_moe = triton_moe.to(TRITON_DEVICE)
    x = torch.randn(3, 11, 16).to(TRITON_DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = torch_moe(x1), triton_moe(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    for (name, p1), (_, p2) in zip(torch_moe.named_parameters(), triton_moe.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_timestep_moe_triton_backend_matches_torch():
    torch_layer = TimestepMoE(16, 3, 2, d_cond=8, backend="torch")
    torch.nn.init.normal_(torch_layer.weight, std=0.05)
    torch.nn.init.normal_(torch_layer.bias, std=0.05)
    triton_layer = _copy(torch_layer, TimestepMoE(16, 3, 2, d_cond=8, backend="triton"))
    torch_layer, triton_layer = torch_layer.to(TRITON_DEVICE), triton_layer.to(TRITON_DEVICE)
    x, cond = torch.randn(2, 9, 16).to(TRITON_DEVICE), torch.randn(2, 8).to(TRITON_DEVICE)
    r1, _ = torch_layer(x, cond)
    r2, _ = triton_layer(x, cond)
    torch.testing.assert_close(r2, r1, rtol=1e-4, atol=1e-5)
    r1.square().sum().backward()
    r2.square().sum().backward()
    for (name, p1), (_, p2) in zip(torch_layer.named_parameters(), triton_layer.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-4, msg=name)
