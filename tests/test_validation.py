"""Bad input raises a ValueError/TypeError naming the argument, on every backend."""
import os
import subprocess
import sys

import pytest
import torch

import switch_dit_kernels as sk

E, D, T, K = 4, 8, 6, 2

# backend="triton" needs CUDA tensors unless the interpreter runs the kernels on the CPU (CI).
# Argument checks run before the backend is resolved, so the refusal tests use CPU tensors.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not _INTERPRETING else "cpu"


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


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


# ------------------------------------------------------------------------------------------------
# Issue 14, item 1: expert ids outside [0, E) are refused on every backend, naming topk_ids.
# (Before: the torch backend dropped the slot silently, Triton switch_modulation read out of
# bounds, Triton expert_linear failed with "index 4 is out of bounds" from inside.)
# ------------------------------------------------------------------------------------------------

ALL_BACKENDS = ["torch", "triton", "cuda", "grouped_mm"]
BAD_IDS = [E, -1, 10**6]


def _ids_with(bad, rows=T):
    ids = torch.randint(0, E, (rows, K))
    ids[rows // 2, K - 1] = bad
    return ids


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_expert_linear_refuses_out_of_range_ids(bad, backend):
    a = _args(topk_ids=_ids_with(bad))
    with pytest.raises(ValueError, match=r"topk_ids must hold expert ids in \[0, num_experts=4\)"):
        sk.expert_linear(*a.values(), backend=backend)


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_expert_mlp_refuses_out_of_range_ids(bad, backend):
    x, g = torch.randn(T, D), torch.rand(T, K)
    w1, w2 = torch.randn(E, D, 6), torch.randn(E, 6, D)
    with pytest.raises(ValueError, match="topk_ids must hold expert ids"):
        sk.expert_mlp(x, w1, None, w2, None, g, _ids_with(bad), backend=backend)


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_switch_modulation_refuses_out_of_range_ids(bad, backend):
    x, w, b = torch.randn(3, 5, D), torch.randn(E, D, D), torch.randn(E, D)
    with pytest.raises(ValueError, match="topk_ids must hold expert ids"):
        sk.switch_modulation(x, w, b, torch.rand(3, K), _ids_with(bad, 3), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_timestep_moe_refuses_out_of_range_routing(backend):
    moe = sk.TimestepMoE(D, E, K, backend=backend)
    routing = sk.TimestepRouting(torch.rand(3, E), torch.rand(3, K), _ids_with(E, 3))
    with pytest.raises(ValueError, match="topk_ids must hold expert ids"):
        moe(torch.randn(3, 5, D), routing=routing)


def test_build_routing_metadata_names_bad_arguments():
    ids = torch.randint(0, E, (T, K))
    with pytest.raises(ValueError, match="topk_ids must hold expert ids"):
        sk.build_routing_metadata(_ids_with(-1), E)
    with pytest.raises(TypeError, match="topk_ids must be a torch.Tensor"):
        sk.build_routing_metadata(ids.tolist(), E)
    with pytest.raises(ValueError, match="topk_ids must have 2 dimensions"):
        sk.build_routing_metadata(ids.reshape(-1), E)
    with pytest.raises(TypeError, match="topk_ids must have dtype"):
        sk.build_routing_metadata(ids.float(), E)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        sk.build_routing_metadata(ids, 0)
    with pytest.raises(ValueError, match="tokens_per_route must be a positive int"):
        sk.build_routing_metadata(ids, E, tokens_per_route=0)
    with pytest.raises(ValueError, match="k >= 1 columns"):
        sk.build_routing_metadata(ids[:, :0], E)


@pytest.mark.parametrize("impl", ["torch", "csrc"])
def test_permute_and_unpermute_tokens_name_bad_arguments(impl):
    from switch_dit_kernels.permute_ops import permute_tokens, unpermute_tokens
    if impl == "csrc" and not sk.cuda_extension_available():
        pytest.skip("csrc extension not built")
    meta = sk.build_routing_metadata(torch.randint(0, E, (T, K)), E, tokens_per_route=2)
    x, h, g = torch.randn(2 * T, D), torch.randn(2 * T * K, D), torch.rand(T, K)
    with pytest.raises(TypeError, match="meta must be a RoutingMetadata"):
        permute_tokens(x, "meta", impl=impl)
    with pytest.raises(ValueError, match="x must have meta.num_routes \\* N = 12 rows"):
        permute_tokens(x[:-1], meta, impl=impl)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        permute_tokens(x.reshape(2, T, D), meta, impl=impl)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        permute_tokens(None, meta, impl=impl)
    with pytest.raises(ValueError, match="h must have meta.num_sorted_rows"):
        unpermute_tokens(h[:-2], meta, g, impl=impl)
    with pytest.raises(ValueError, match=r"topk_weights must be \[R, k\] = \[6, 2\]"):
        unpermute_tokens(h, meta, g[:-1], impl=impl)
    with pytest.raises(TypeError, match="topk_weights must have dtype"):
        unpermute_tokens(h, meta, g.long(), impl=impl)
    with pytest.raises(TypeError, match="meta must be a RoutingMetadata"):
        unpermute_tokens(h, None, g, impl=impl)
    # and good arguments still round-trip
    y = unpermute_tokens(permute_tokens(x, meta, impl=impl), meta, None, impl=impl)
    torch.testing.assert_close(y, K * x)


# ------------------------------------------------------------------------------------------------
# Item 2: routing on NaN / Inf, and ties, the same on every backend.
# ------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
NONFINITE_ROWS = {
    "nan": [0.0, NAN, 1.0, 2.0, -1.0],
    "plus_inf": [0.0, INF, 1.0, 2.0, -1.0],
    "all_minus_inf": [-INF] * 5,
    "nan_and_inf": [NAN, INF, -INF, 0.0, 1.0],
}


@pytest.mark.parametrize("kind", list(NONFINITE_ROWS))
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_route_topk_nonfinite_row_gets_first_ids_and_nan_weights(kind, renormalize, backend):
    # Row 1 is the bad one; rows 0 and 2 are ordinary and must be unaffected.
    logits = torch.tensor([[3.0, 1.0, 4.0, 1.5, 5.0], NONFINITE_ROWS[kind], [2.0, 7.0, 1.0, 8.0, 2.5]])
    weights, ids = sk.route_topk(logits.to(_device(backend)), 3, renormalize=renormalize,
                                 backend=backend)
    weights, ids = weights.cpu(), ids.cpu()
    assert torch.equal(ids, torch.tensor([[4, 2, 0], [0, 1, 2], [3, 1, 4]]))
    assert weights[1].isnan().all()
    assert weights[[0, 2]].isfinite().all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("num_experts,k", [(4, 2), (7, 7), (5, 1)])
def test_route_topk_ties_go_to_lower_id(backend, num_experts, k):
    # The torch backend used torch.topk, which returned [2, 3] for a zero row of E = 4.
    logits = torch.zeros(3, num_experts)
    logits[1, 3 % num_experts] = 1.0  # one winner, then ties among the rest
    ids = sk.route_topk(logits.to(_device(backend)), k, backend=backend)[1].cpu()
    rest = [e for e in range(num_experts) if e != 3 % num_experts]
    assert ids[0].tolist() == list(range(k))
    assert ids[1].tolist() == ([3 % num_experts] + rest)[:k]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("d_hidden", [None, 6])
def test_moe_on_nan_input_propagates_nan_only_to_its_tokens(backend, d_hidden):
    torch.manual_seed(1)
    moe = sk.MoE(D, 5, 2, d_hidden=d_hidden, backend=backend)
    x = torch.randn(7, D)
    x[2, 3] = NAN
    x[5] = INF
    reference = sk.MoE(D, 5, 2, d_hidden=d_hidden, backend="torch")
    reference.load_state_dict(moe.state_dict())
    y = moe.to(_device(backend))(x.to(_device(backend))).cpu()
    good = [0, 1, 3, 4, 6]
    torch.testing.assert_close(y[good], reference(x)[good])
    assert y[[2, 5]].isnan().any(dim=1).all()


# ------------------------------------------------------------------------------------------------
# Item 5: empty feature dimensions, empty batches, dtypes, module arguments.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("din,dout", [(0, D), (D, 0), (0, 0)])
def test_empty_feature_dimension_is_refused(backend, din, dout):
    ids, g = torch.randint(0, E, (T, K)), torch.rand(T, K)
    with pytest.raises(ValueError, match="weight must have at least one input and one output"):
        sk.expert_linear(torch.randn(T, din), torch.randn(E, din, dout), None, g, ids,
                         backend=backend)
    with pytest.raises(ValueError, match="w[12] must have at least one input and one output"):
        sk.expert_mlp(torch.randn(T, din), torch.randn(E, din, 4), None, torch.randn(E, 4, dout),
                      None, g, ids, backend=backend)
    with pytest.raises(ValueError, match="w1 must have at least one input"):  # hidden size 0
        sk.expert_mlp(torch.randn(T, D), torch.randn(E, D, 0), None, torch.randn(E, 0, D),
                      None, g, ids, activation="relu", backend=backend)
    with pytest.raises(ValueError, match="weight must have at least one input"):
        sk.switch_modulation(torch.randn(2, 3, 0), torch.randn(E, 0, 0), None, torch.rand(2, K),
                             torch.randint(0, E, (2, K)), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("d_hidden", [None, 6])
@pytest.mark.parametrize("shape", [(0, D), (0, 5, D)])
def test_moe_on_empty_batch(backend, d_hidden, shape):
    # (0, D): y.sum()'s gradient is an expanded [0, D] (stride 0), which the Triton launchers
    # asserted on before empty batches went to the reference.
    moe = sk.MoE(D, E, K, d_hidden=d_hidden, backend=backend, load_balance_coef=0.01,
                 z_loss_coef=0.001).to(_device(backend))
    x = torch.randn(*shape, device=_device(backend), requires_grad=True)
    y = moe(x)
    assert y.shape == shape
    assert moe.aux_loss.isfinite() and moe.aux_loss.item() == 0.0
    (y.sum() + moe.aux_loss).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.isfinite().all()


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_expert_layers_on_an_empty_strided_view(backend):
    dev = _device(backend)
    base = torch.randn(0, 2 * D, device=dev, requires_grad=True)
    x = base[:, ::2]  # strides (2D, 2): .contiguous() keeps them on an empty tensor
    ids = torch.zeros(0, K, dtype=torch.long, device=dev)
    g = torch.zeros(0, K, device=dev)
    y = sk.expert_linear(x, torch.randn(E, D, 3, device=dev), None, g, ids, backend=backend)
    y2 = sk.expert_mlp(x, torch.randn(E, D, 4, device=dev), None, torch.randn(E, 4, 3, device=dev),
                       None, g, ids, backend=backend)
    assert y.shape == y2.shape == (0, 3)
    (y.sum() + y2.sum()).backward()
    assert base.grad.shape == base.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("d_hidden", [None, 3])
def test_moe_one_token_one_feature_backward(backend, d_hidden):
    # y.sum()'s gradient for a [1, 1] y has strides (0, 0), which .contiguous() keeps (size-1
    # dims): the Triton launchers asserted stride(1) == 1. Found by tests/test_properties.py.
    torch.manual_seed(3)
    moe = sk.MoE(1, 3, 2, d_hidden=d_hidden, backend=backend).to(_device(backend))
    x = torch.randn(1, 1, device=_device(backend), requires_grad=True)
    moe(x).sum().backward()
    reference = sk.MoE(1, 3, 2, d_hidden=d_hidden, backend="torch")
    reference.load_state_dict(moe.state_dict())
    x_ref = x.detach().cpu().requires_grad_(True)
    reference(x_ref).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad)


def test_moe_dtype_mismatch_names_expected_dtype_or_follows_autocast():
    moe = sk.MoE(D, E, K, backend="torch")
    with pytest.raises(TypeError, match="x has dtype torch.float64 but MoE's parameters are "
                                        "torch.float32"):
        moe(torch.randn(3, D, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        moe(torch.ones(3, D, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        moe([[0.0] * D])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(torch.randn(3, D, dtype=torch.float16))
    assert y.dtype == torch.bfloat16 and y.isfinite().all()
    assert moe.double()(torch.randn(3, D, dtype=torch.float64)).dtype == torch.float64


def test_moe_activation_checked_in_constructor():
    with pytest.raises(ValueError, match="activation must be one of"):
        sk.MoE(D, E, K, d_hidden=16, activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        sk.MoE(D, E, K, activation="swish")  # linear experts: checked all the same
    for bad in (float("nan"), float("inf"), -0.1, "0.01", None):
        with pytest.raises(ValueError, match="load_balance_coef must be a finite number"):
            sk.MoE(D, E, K, load_balance_coef=bad)
        with pytest.raises(ValueError, match="z_loss_coef must be a finite number"):
            sk.MoE(D, E, K, z_loss_coef=bad)


def test_timestep_moe_names_cond():
    moe = sk.TimestepMoE(D, E, K, backend="torch")
    x = torch.randn(3, 5, D)
    with pytest.raises(ValueError, match=r"cond must have one row per sample \(B=3\)"):
        moe(x, torch.randn(2, D))
    with pytest.raises(ValueError, match="cond must be \\[M, d_cond=8\\]"):
        moe(x, torch.randn(3, 1, D))
    with pytest.raises(ValueError, match="cond must be \\[M, d_cond=8\\]"):
        moe(x, torch.randn(3, D + 1))
    with pytest.raises(TypeError, match="cond has dtype torch.float64 but TimestepMoE's"):
        moe(x, torch.randn(3, D, dtype=torch.float64))
    with pytest.raises(TypeError, match="cond must be a floating tensor"):
        moe(x, torch.zeros(3, D, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a floating torch.Tensor"):
        moe(x.long(), torch.randn(3, D))
    r, routing = moe(x, torch.randn(1, D))  # one row shared by every sample
    assert r.shape == x.shape and routing.topk_ids.shape == (1, K)


@pytest.mark.gpu
def test_out_of_range_ids_on_cuda_assert_on_device_without_host_sync():
    # In range: the check queues a device-side assert and never waits on the host.
    ids = torch.randint(0, E, (T, K), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        from switch_dit_kernels._validate import check_topk_ids_values
        check_topk_ids_values(ids, E)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Out of range: the stream fails with a device-side assert (which ends the CUDA context, hence
    # a child process) before the kernel can read out of bounds -- no segfault, no garbage.
    code = (
        "import torch, switch_dit_kernels as sk\n"
        f"x, w = torch.randn({T}, {D}, device='cuda'), torch.randn({E}, {D}, {D}, device='cuda')\n"
        f"ids = torch.randint(0, {E}, ({T}, {K}), device='cuda'); ids[1, 0] = 10**6\n"
        f"r = sk.expert_linear(x, w, None, torch.rand({T}, {K}, device='cuda'), ids, backend='triton')\n"
        "torch.cuda.synchronize()\n"
        "print('no error')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode not in (0, -11) and "no error" not in out.stdout, out.stderr[-2000:]
    assert "assert" in out.stderr.lower(), out.stderr[-2000:]
