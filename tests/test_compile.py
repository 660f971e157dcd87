"""torch.compile(fullgraph=True) through every public function and layer, and a Switch-DiT training step.

Compiled with backend="aot_eager": Dynamo and AOTAutograd trace exactly what inductor would see
(the forward and backward graphs, with each switch_dit op one node), without inductor's C++ /
Triton code generation, which on a 2-core CPU costs minutes and tests nothing of ours. Each case
checks the compiled forward and every gradient against the same function run eagerly, and that
Dynamo recorded no graph break (fullgraph=True would raise on one; the counter says so twice).
The Triton backend runs through TRITON_INTERPRET=1 on the CPU (tests/conftest.py).
"""
import pytest
import torch
from torch._dynamo.utils import counters

import switch_dit_kernels as sdk
from switch_dit_kernels import MoE, TimestepMoE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


def leaves_of(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def run_and_grads(fn, args, params=()):
    """fn(*args) -> (output, grads of every leaf arg and of params) for a fixed random cotangent."""
    out = fn(*args)
    torch.manual_seed(123)
    cotangent = torch.randn_like(out)
    targets = leaves_of(args) + list(params)
    grads = torch.autograd.grad(out, targets, cotangent)
    return out.detach(), grads


def assert_compiles_whole(fn, args, params=(), rtol=1e-5, atol=1e-6):
    """Compiled (fullgraph, aot_eager) forward and gradients == eager ones; no graph break."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, got_grads = run_and_grads(compiled, args, params)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    want, want_grads = run_and_grads(fn, args, params)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def routing(rows, num_experts, k, *, grad=True):
    ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(rows)]).to(DEVICE)
    weights = (torch.rand(rows, k, device=DEVICE) + 0.1).requires_grad_(grad)
    return weights, ids


def leaf(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_topk_compiles_whole(backend):
    logits = leaf(37, 7)  # odd rows, prime E

    def fn(lg):
        weights, ids = sdk.route_topk(lg, 3, renormalize=True, backend=backend)
        return weights * (ids + 1)  # the ids reach the output too
    assert_compiles_whole(fn, [logits])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,tokens_per_route", [(2, 1), (1, 1), (7, 3)])
def test_expert_linear_compiles_whole(backend, k, tokens_per_route):
    num_experts, rows = 7, 5  # k = 7 = E: every expert; k = 1: the scatter path
    gates, ids = routing(rows, num_experts, k)
    args = [leaf(rows * tokens_per_route, 24), leaf(num_experts, 24, 40, scale=0.2),
            leaf(num_experts, 40), gates]
    assert_compiles_whole(
        lambda x, w, b, g: sdk.expert_linear(x, w, b, g, ids, tokens_per_route=tokens_per_route,
                                             backend=backend), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_expert_mlp_compiles_whole(backend, activation):
    num_experts, k, hidden = 5, 2, 12
    width = 2 * hidden if activation == "swiglu" else hidden
    gates, ids = routing(13, num_experts, k)
    args = [leaf(13, 16), leaf(num_experts, 16, width, scale=0.25), leaf(num_experts, width),
            leaf(num_experts, hidden, 16, scale=0.25), None, gates]
    assert_compiles_whole(
        lambda x, w1, b1, w2, b2, g: sdk.expert_mlp(x, w1, b1, w2, b2, g, ids,
                                                    activation=activation, backend=backend),
        args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared,recompute", [(False, False), (True, False), (False, True)])
def test_switch_modulation_compiles_whole(backend, shared, recompute):
    num_experts, k, batch = 4, 2, 3
    gates, ids = routing(1 if shared else batch, num_experts, k)
    args = [leaf(batch, 5, 24), leaf(num_experts, 24, 24, scale=0.2), leaf(num_experts, 24), gates]
    assert_compiles_whole(
        lambda x, w, b, g: sdk.switch_modulation(x, w, b, g, ids, backend=backend,
                                                 recompute=recompute), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_hidden", [None, 12])
def test_moe_compiles_whole(backend, d_hidden):
    moe = MoE(16, 5, 2, d_hidden=d_hidden, backend=backend, load_balance_coef=0.01,
              z_loss_coef=0.001).to(DEVICE)

    def step(x):  # the layer's output and its auxiliary loss, both through the graph
        return moe(x) + moe.aux_loss
    assert_compiles_whole(step, [leaf(2, 7, 16)], list(moe.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_timestep_moe_compiles_whole(backend):
    layer = TimestepMoE(16, 4, 2, backend=backend).to(DEVICE)
    with torch.no_grad():
        layer.weight.normal_(std=0.1)  # zero-initialised experts would hide a wrong gradient
        layer.bias.normal_(std=0.1)
    assert_compiles_whole(lambda x, cond: layer(x, cond)[0], [leaf(3, 5, 16), leaf(3, 16)],
                          list(layer.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_switch_dit_training_step_compiles_whole(backend):
    # Forward, diffusion MSE and the diffusion prior loss in one graph; only the prior's bipartite
    # matching (a host-side linear_sum_assignment) runs outside it, eagerly, as training does.
    from switch_dit.models.registry import create_model
    from switch_dit.prior import diffusion_prior_loss, match_prior_columns
    model = create_model("SwitchDiT-S/2", input_size=8, in_channels=4, depth=2, hidden_size=32,
                         num_heads=2, num_classes=10, backend=backend, num_timesteps=50).to(DEVICE)
    with torch.no_grad():
        for block in model.blocks:
            block.moe.weight.normal_(std=0.05)

    def step(x, t, y, noise, match):
        out = model(x, t, y)
        loss = (out[:, :4] - noise).square().mean()
        return loss + diffusion_prior_loss(model._scratch.last_probs, t, model.prior_mask,
                                           model.k, weight=model.prior_loss_weight, match=match)

    x = torch.randn(4, 4, 8, 8, device=DEVICE)
    t = torch.randint(0, 50, (4,), device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    with torch.no_grad():
        match = match_prior_columns(model.compute_gate_tables().probs, model.prior_mask, model.k)
    params = [p for p in model.parameters() if p.requires_grad]
    assert_compiles_whole(step, [x, t, y, torch.randn_like(x), match], params, rtol=1e-4,
                          atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_shapes_reuse_one_graph(backend):
    # dynamic=True: the fake kernels' shapes are symbolic in T, so new token counts (odd ones
    # included) reuse the compiled graph; results equal eager ones for each.
    weight, bias = leaf(5, 8, 6), leaf(5, 6)

    def fn(x, logits):
        gates, ids = sdk.route_topk(logits, 2, backend=backend)
        return sdk.expert_linear(x, weight, bias, gates, ids, backend=backend)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens in (12, 7, 37):
        args = [leaf(tokens, 8), leaf(tokens, 5)]
        got, got_grads = run_and_grads(compiled, args, [weight, bias])
        want, want_grads = run_and_grads(fn, args, [weight, bias])
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA a bad id is a device-side assert")
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_ops_refuse_expert_ids_out_of_range(backend):
    # The ids' values are checked inside the ops' real implementations: a compiled graph (no
    # graph break for the check) still raises the ValueError naming topk_ids.
    gates, ids = routing(6, 5, 2)
    ids[4, 0] = 5
    x, weight = leaf(6, 8), leaf(5, 8, 8)
    compiled = torch.compile(lambda x, w, g: sdk.expert_linear(x, w, None, g, ids, backend=backend),
                             backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="topk_ids"):
        compiled(x, weight, gates)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    "torch", pytest.param("triton", marks=pytest.mark.gpu)])  # interpreted Triton: ~1 min here
def test_inductor_compiles_the_ops(backend):
    # The default backend: inductor lowers the graph around the ops (fallback kernels for them).
    gates, ids = routing(3, 4, 2)
    args = [leaf(3, 5, 16), leaf(4, 16, 16, scale=0.2), leaf(4, 16), gates, leaf(12, 16),
            leaf(5, 16, 8, scale=0.3), leaf(12, 5)]

    def fn(x, w, b, g, tokens, experts, logits):
        r = sdk.switch_modulation(x, w, b, g, ids, backend=backend)
        token_gates, token_ids = sdk.route_topk(logits, 2, backend=backend)
        y = sdk.expert_linear(tokens, experts, None, token_gates, token_ids, backend=backend)
        return r.square().sum() + y.square().sum()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    got, got_grads = run_and_grads(compiled, args)
    want, want_grads = run_and_grads(fn, args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
