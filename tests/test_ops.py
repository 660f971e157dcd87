"""The switch_dit::* torch.library ops: opcheck, weights read through their strides, second-order grads."""
import pytest
import torch

import switch_dit_kernels as sdk
from switch_dit_kernels import expert_ops, ops
from switch_dit_kernels import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


def routing(rows, num_experts, k):
    ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(rows)]).to(DEVICE)
    return (torch.rand(rows, k, device=DEVICE) + 0.1), ids


def rand(*shape, scale=1.0, grad=False):
    return (torch.randn(*shape, device=DEVICE) * scale).requires_grad_(grad)


# ---------------------------------------------------------------------------------------------
# opcheck: schema (no hidden mutation or aliasing), fake kernel vs real shapes/dtypes/strides,
# autograd registration, AOT dispatch with static and dynamic shapes.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_expert_linear(backend, grad):
    gates, ids = routing(5, 7, 2)
    args = (rand(15, 24, grad=grad), rand(7, 24, 37, scale=0.2, grad=grad),
            rand(7, 37, grad=grad), gates.requires_grad_(grad), ids, 3, backend, grad)
    torch.library.opcheck(ops.expert_linear_fwd_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_expert_linear_backward(backend):
    gates, ids = routing(5, 7, 2)
    x, w, b = rand(15, 24), rand(7, 24, 37, scale=0.2), rand(7, 37)
    h = ops.expert_linear_fwd_op(x, w, b, gates, ids, 3, backend, True)[1]
    torch.library.opcheck(ops.expert_linear_bwd_op,
                          (rand(15, 37), x, w, b, gates, ids, h, 3, backend,
                           [True, True, True, True]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_expert_mlp(backend, grad):
    gates, ids = routing(13, 5, 1)  # k = 1: the scatter path when nothing is kept
    args = (rand(13, 16, grad=grad), rand(5, 16, 24, scale=0.25, grad=grad), None,
            rand(5, 12, 16, scale=0.25, grad=grad), rand(5, 16, grad=grad),
            gates.requires_grad_(grad), ids, "swiglu", 1, backend, grad, grad)
    torch.library.opcheck(ops.expert_mlp_fwd_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_switch_modulation(backend, shared, grad):
    gates, ids = routing(1 if shared else 3, 4, 2)
    args = (rand(3, 5, 24, grad=grad), rand(4, 24, 24, scale=0.2, grad=grad),
            rand(4, 24, grad=grad), gates.requires_grad_(grad), ids, backend, grad)
    torch.library.opcheck(ops.switch_modulation_fwd_op, args)


@pytest.mark.parametrize("in_place", [False, True])
def test_opcheck_switch_modulation_backward(in_place):
    gates, ids = routing(3, 4, 2)
    x, w, b = rand(3, 5, 24), rand(4, 24, 24, scale=0.2), rand(4, 24)
    y = ops.switch_modulation_fwd_op(x, w, b, gates, ids, "triton", True)[1]
    op = ops.switch_modulation_bwd_inplace_op if in_place else ops.switch_modulation_bwd_op
    torch.library.opcheck(op, (rand(3, 5, 24), x, w, b, gates, ids, y, "triton",
                               [True, False, True, True]))


def test_switch_modulation_backward_overwrites_only_a_private_y(monkeypatch):
    # The public path hands y to the in-place backward op (no x-sized copy); a caller of the raw
    # op who keeps y (y_private=False) gets it back untouched after backward.
    gates, ids = routing(3, 4, 2)
    x, w = rand(3, 5, 24, grad=True), rand(4, 24, 24, scale=0.2, grad=True)
    used = []
    for name in ("switch_modulation_bwd_op", "switch_modulation_bwd_inplace_op"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _o=original, _n=name: used.append(_n) or _o(*a))
    sdk.switch_modulation(x, w, None, gates, ids, backend="triton").sum().backward()
    assert used == ["switch_modulation_bwd_inplace_op"]
    r, y = ops.switch_modulation_fwd_op(x, w, None, gates, ids, "triton", True)
    kept = y.detach().clone()
    r.sum().backward()
    assert used[-1] == "switch_modulation_bwd_op" and torch.equal(y.detach(), kept)


@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_route_topk(grad):
    torch.library.opcheck(ops.route_topk_op, (rand(37, 7, grad=grad), 3, True))


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA a bad id is a device-side assert")
def test_ops_refuse_expert_ids_out_of_range():
    # Called directly (an integration's entry point), the op itself checks the ids' values.
    gates, ids = routing(5, 7, 2)
    ids[3, 1] = 7
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="topk_ids"):
            ops.expert_linear_fwd_op(rand(5, 24), rand(7, 24, 8), None, gates, ids, 1, backend,
                                     False)


# ---------------------------------------------------------------------------------------------
# Weights read in place through their strides (transformers stores experts as [E, Dout, Din]).
# ---------------------------------------------------------------------------------------------

def _record_weight_pointers(monkeypatch):
    """Wrap the grouped GEMM launcher: the data pointers of the weights it is given."""
    seen = []
    original = expert_ops.grouped_gemm

    def recording(a, w, *args, **kwargs):
        seen.append(w.data_ptr())
        return original(a, w, *args, **kwargs)
    monkeypatch.setattr(expert_ops, "grouped_gemm", recording)
    return seen


def test_expert_linear_reads_transposed_weights_in_place(monkeypatch):
    gates, ids = routing(9, 5, 2)
    x = rand(9, 24, grad=True)
    storage = rand(5, 37, 24, scale=0.2, grad=True)   # [E, Dout, Din] like nn.Linear / HF
    bias = rand(5, 37, grad=True)
    gates.requires_grad_(True)
    seen = _record_weight_pointers(monkeypatch)
    weight = storage.transpose(1, 2)                  # [E, Din, Dout] view, not contiguous
    assert not weight.is_contiguous()
    y = sdk.expert_linear(x, weight, bias, gates, ids, backend="triton")
    assert seen and all(p == storage.data_ptr() for p in seen)  # no copy of the weight
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, storage, bias, gates], dy)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, storage, bias, gates)]
    want_y = ref.expert_linear(leaves64[0], leaves64[1].transpose(1, 2), leaves64[2], leaves64[3],
                               ids)
    want = torch.autograd.grad(want_y, leaves64, dy.double())
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_expert_mlp_reads_transposed_weights_in_place(monkeypatch):
    # HF layout: gate_up_proj [E, 2H, D] and down_proj [E, D, H], both viewed transposed.
    num_experts, dim, hidden = 5, 16, 12
    gates, ids = routing(11, num_experts, 2)
    gates.requires_grad_(True)
    x = rand(11, dim, grad=True)
    gate_up = rand(num_experts, 2 * hidden, dim, scale=0.25, grad=True)
    down = rand(num_experts, dim, hidden, scale=0.25, grad=True)
    seen = _record_weight_pointers(monkeypatch)
    y = sdk.expert_mlp(x, gate_up.transpose(1, 2), None, down.transpose(1, 2), None, gates, ids,
                       activation="swiglu", backend="triton")
    assert set(seen) <= {gate_up.data_ptr(), down.data_ptr()} and len(set(seen)) == 2
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, gate_up, down, gates], dy)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, gate_up, down, gates)]
    want_y = ref.expert_mlp(leaves64[0], leaves64[1].transpose(1, 2), None,
                            leaves64[2].transpose(1, 2), None, leaves64[3], ids,
                            activation="swiglu")
    want = torch.autograd.grad(want_y, leaves64, dy.double())
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Second-order gradients (create_graph=True): exact on the torch backend, refused on Triton.
# ---------------------------------------------------------------------------------------------

def dense_expert_linear(x, weight, bias, gates, ids):
    """Independent of the reference: every token's k expert weights gathered ([T, k, Din, Dout])."""
    w = weight[ids]
    out = torch.einsum("td,tkde->tke", x, w) + bias[ids]
    return (gates[..., None] * out).sum(1)


def weight_grad_penalty(fn, leaves):
    """||d(sum y^2)/dW||^2 with create_graph=True, then its gradient wrt every leaf."""
    x, weight = leaves[0], leaves[1]
    y = fn(*leaves)
    (dw,) = torch.autograd.grad(y.square().sum(), weight, create_graph=True)
    penalty = dw.square().sum()
    return penalty, torch.autograd.grad(penalty, leaves)


def test_torch_backend_second_order_gradients_are_exact():
    gates, ids = routing(13, 5, 2)
    inputs = [rand(13, 8), rand(5, 8, 6, scale=0.3), rand(5, 6), gates]
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    leaves64 = [t.detach().double().requires_grad_(True) for t in inputs]
    got_penalty, got = weight_grad_penalty(
        lambda x, w, b, g: sdk.expert_linear(x, w, b, g, ids, backend="torch"), leaves)
    want_penalty, want = weight_grad_penalty(
        lambda x, w, b, g: dense_expert_linear(x, w, b, g, ids), leaves64)
    torch.testing.assert_close(got_penalty.double(), want_penalty, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def _triton_layers():
    gates, ids = routing(6, 5, 2)
    gates1, ids1 = routing(3, 4, 2)
    return {
        "expert_linear": (lambda x, w, g: sdk.expert_linear(x, w, None, g, ids, backend="triton"),
                          [rand(6, 8), rand(5, 8, 8, scale=0.3), gates]),
        "expert_mlp": (lambda x, w, g: sdk.expert_mlp(x, w, None, w.transpose(1, 2), None, g, ids,
                                                      activation="gelu", backend="triton"),
                       [rand(6, 8), rand(5, 8, 8, scale=0.3), gates]),
        "switch_modulation": (lambda x, w, g: sdk.switch_modulation(x, w, None, g, ids1,
                                                                    backend="triton"),
                              [rand(3, 4, 8), rand(4, 8, 8, scale=0.3), gates1]),
    }


@pytest.mark.parametrize("name", ["expert_linear", "expert_mlp", "switch_modulation"])
def test_triton_double_backward_is_refused_not_dropped(name):
    # The case: a gradient penalty on the weight gradient. It used to come back silently
    # wrong (norm 12.85 vs 229.96 on torch); now the second backward raises.
    fn, inputs = _triton_layers()[name]
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with pytest.raises(RuntimeError, match="double backward through switch_dit's " + name):
        weight_grad_penalty(fn, leaves)


@pytest.mark.parametrize("name", ["expert_linear", "expert_mlp", "switch_modulation"])
def test_triton_create_graph_first_order_grads_still_right(name):
    # create_graph=True alone (no second differentiation) keeps working, with the same grads.
    fn, inputs = _triton_layers()[name]
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    dy = torch.randn_like(y)
    with_graph = torch.autograd.grad(y, leaves, dy, create_graph=True)
    without = torch.autograd.grad(fn(*leaves), leaves, dy)
    for a, b in zip(with_graph, without):
        assert torch.equal(a.detach(), b)


def test_route_topk_triton_second_order_matches_torch():
    # The router's backward is plain torch ops: its second-order gradients are exact.
    logits = rand(24, 7)
    results = []
    for backend in BACKENDS:
        leaf = logits.detach().double().requires_grad_(True) if backend == "torch" else \
            logits.detach().requires_grad_(True)
        weights, _ = sdk.route_topk(leaf, 3, renormalize=True, backend=backend)
        (dl,) = torch.autograd.grad((weights * torch.arange(3.0, device=DEVICE)).sum(), leaf,
                                    create_graph=True)
        (ddl,) = torch.autograd.grad(dl.square().sum(), leaf)
        results.append(ddl)
    assert results[0].abs().sum() > 0
    torch.testing.assert_close(results[1].double(), results[0], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not sdk.cuda_extension_available(), reason="needs the csrc extension")
def test_cuda_backend_double_backward_is_refused_not_dropped():
    # backend="cuda" permutes with the csrc kernels (CPU tensors run their host twin): a gradient
    # penalty through them used to come back silently wrong (w.grad None, x.grad norm 1405 vs
    # 2328 on torch); a second backward through the permutation now raises.
    gates, ids = routing(13, 5, 2)
    leaves = [t.detach().requires_grad_(True)
              for t in (rand(13, 8), rand(5, 8, 6, scale=0.3), rand(5, 6), gates)]
    with pytest.raises(RuntimeError, match="double backward through switch_dit.s csrc permutation"):
        weight_grad_penalty(
            lambda x, w, b, g: sdk.expert_linear(x, w, b, g, ids, backend="cuda"), leaves)
