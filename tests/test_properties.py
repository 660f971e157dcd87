"""Property-based tests (hypothesis) of the public API: a named error or the reference's answer.

Each test draws shapes (odd sizes, T = 0 and 1, prime E, k = 1 and k = E), dtypes, memory layouts
(contiguous, transposed and strided views), expert ids (duplicates and empty experts included),
weights and backends, and asserts agreement with the float64 reference -- forward and every
gradient, by the rule of tests/moe_testing.py -- or, for a drawn bad argument, a ValueError or
TypeError whose message names that argument.

Profiles: "ci" (the default) runs few examples, derandomized (the same examples on every run,
so CI cannot flake) and without a database; "dev" runs many, randomly, for local bug hunts:

    HYPOTHESIS_PROFILE=dev python -m pytest tests/test_properties.py -n 0

Shapes stay tiny: on the CPU the Triton kernels run through the interpreter.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import switch_dit_kernels as sk  # noqa: E402
from switch_dit_kernels import reference as ref  # noqa: E402
from switch_dit_kernels.permute_ops import permute_tokens, unpermute_tokens  # noqa: E402
from moe_testing import assert_matches_reference  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("dev", max_examples=300, deadline=None, suppress_health_check=_SLOW_OK,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# backend="triton" needs CUDA tensors unless the interpreter runs the kernels on the CPU (CI).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not _INTERPRETING else "cpu"


def _device(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


# The Triton backend is tested in float32 and float16 (the interpreter's bf16 tl.dot is wrong);
# "cuda" runs the csrc permutation on the host (float32/float16/bfloat16 only).
FAST_BACKENDS = ["triton", "cuda"]
LAYOUTS = ["contiguous", "transposed", "strided"]


# ------------------------------------------------------------------------------------------------
# Drawing inputs
# ------------------------------------------------------------------------------------------------

def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _routing(gen: torch.Generator, num_routes: int, k: int, num_experts: int, ids_kind: str):
    """(topk_weights [R, k] float32 in [-1, 1), topk_ids [R, k] int64) of the drawn kind:
    "distinct" (k different experts a row), "repeat" (ids drawn independently: duplicates in a
    row), "low" (only the lowest experts used: the others get no rows)."""
    if ids_kind == "distinct":
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k]
                           for _ in range(num_routes)]) if num_routes else torch.zeros(0, k)
    elif ids_kind == "repeat":
        ids = torch.randint(0, num_experts, (num_routes, k), generator=gen)
    else:
        ids = torch.randint(0, max(1, num_experts // 2), (num_routes, k), generator=gen)
    weights = torch.rand(num_routes, k, generator=gen) * 2 - 1
    return weights, ids.long()


class Layout:
    """A logical tensor stored as a leaf ``base`` that the function sees through a view.

    "transposed": base holds the last two dims swapped, the view is base.transpose(-1, -2);
    "strided": base is twice as wide in the last dim, the view is base[..., ::2]. Gradients land
    on base, so fast path and reference are compared through the same view.
    """

    def __init__(self, value: torch.Tensor, kind: str):
        self.kind = kind if value.dim() >= 2 or kind == "strided" else "contiguous"
        if self.kind == "transposed":
            self.base = value.transpose(-1, -2).contiguous()
        elif self.kind == "strided":
            self.base = torch.zeros(*value.shape[:-1], 2 * value.shape[-1], dtype=value.dtype)
            self.base[..., ::2] = value
        else:
            self.base = value.clone()

    def view(self, base: torch.Tensor) -> torch.Tensor:
        if self.kind == "transposed":
            return base.transpose(-1, -2)
        if self.kind == "strided":
            return base[..., ::2]
        return base


def _run(fn, layouts: dict, ints: dict, dtype: torch.dtype, dy64: torch.Tensor, device="cpu"):
    """fn(**views, **ints) on ``device`` with the floating inputs in ``dtype`` (topk_weights stays
    float32 unless dtype is float64); returns (y, {name: grad of its base})."""
    leaves = {}
    for name, lay in layouts.items():
        if lay is None:
            leaves[name] = None
            continue
        cast = torch.float32 if name == "topk_weights" and dtype != torch.float64 else dtype
        leaves[name] = lay.base.to(device, cast).requires_grad_(True)
    ints = {n: t.to(device) for n, t in ints.items()}
    views = {n: (None if lay is None else lay.view(leaves[n])) for n, lay in layouts.items()}
    y = fn(**views, **ints)
    names = [n for n, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(y, [leaves[n] for n in names], dy64.to(device, y.dtype),
                                allow_unused=True)
    return y, {n: g for n, g in zip(names, grads)}


def _check_against_reference(fast_fn, ref_fn, layouts: dict, ints: dict, dtype,
                             device="cpu") -> None:
    """Forward and every gradient of fast_fn in ``dtype`` on ``device`` vs ref_fn in float64
    (and in dtype, for PyTorch's own error) on the CPU."""
    with torch.no_grad():
        probe = ref_fn(**{n: (None if lay is None else lay.view(lay.base.double()))
                          for n, lay in layouts.items()}, **ints)
    dy64 = torch.randn(probe.shape, dtype=torch.float64)
    y64, g64 = _run(ref_fn, layouts, ints, torch.float64, dy64)
    y_same, g_same = _run(ref_fn, layouts, ints, dtype, dy64)
    y, g = _run(fast_fn, layouts, ints, dtype, dy64, device)
    y, g = y.cpu(), {n: (None if t is None else t.cpu()) for n, t in g.items()}
    assert y.dtype == dtype and y.shape == y64.shape
    assert_matches_reference("y", y, y64, y_same, dtype)
    for name, want in g64.items():
        got = g[name]
        if want is None or got is None:  # an input no output depends on (e.g. T = 0)
            assert (want is None or not want.any()) and (got is None or not got.any()), name
            continue
        assert_matches_reference(f"d{name}", got, want, g_same[name], dtype)


_shapes = st.fixed_dictionaries({
    "num_experts": st.sampled_from([1, 2, 3, 5, 7]),
    "num_routes": st.sampled_from([0, 1, 2, 3, 5]),
    "tokens_per_route": st.sampled_from([1, 2, 3]),
    "din": st.sampled_from([1, 3, 8, 13]),
    "dout": st.sampled_from([1, 5, 8, 16]),
})


@st.composite
def _expert_case(draw, backends):
    case = draw(_shapes)
    case["k"] = draw(st.integers(1, case["num_experts"]))
    case["backend"] = draw(st.sampled_from(backends))
    dtypes = [torch.float32, torch.float16] if case["backend"] in ("triton", "cuda") else \
        [torch.float32, torch.float64]
    case["dtype"] = draw(st.sampled_from(dtypes))
    case["ids_kind"] = draw(st.sampled_from(["distinct", "repeat", "low"]))
    case["layouts"] = draw(st.lists(st.sampled_from(LAYOUTS), min_size=6, max_size=6))
    case["seed"] = draw(st.integers(0, 2**31 - 1))
    return case


# ------------------------------------------------------------------------------------------------
# Agreement with the reference
# ------------------------------------------------------------------------------------------------

@given(case=_expert_case(FAST_BACKENDS + ["torch"]), with_bias=st.booleans())
def test_expert_linear_matches_reference(case, with_bias):
    gen = _generator(case["seed"])
    e, r, n, k = case["num_experts"], case["num_routes"], case["tokens_per_route"], case["k"]
    weights, ids = _routing(gen, r, k, e, case["ids_kind"])
    lay = case["layouts"]
    layouts = {
        "x": Layout(torch.randn(r * n, case["din"], generator=gen, dtype=torch.float64), lay[0]),
        "weight": Layout(torch.randn(e, case["din"], case["dout"], generator=gen,
                                     dtype=torch.float64) / case["din"] ** 0.5, lay[1]),
        "bias": Layout(torch.randn(e, case["dout"], generator=gen, dtype=torch.float64), lay[2])
        if with_bias else None,
        "topk_weights": Layout(weights.double(), lay[3]),
    }
    ids_layout = Layout(ids, lay[4])  # ids through a view too (not differentiated)
    ints = {"topk_ids": ids_layout.view(ids_layout.base)}
    backend = case["backend"]
    fast = lambda **a: sk.expert_linear(**a, tokens_per_route=n, backend=backend)  # noqa: E731
    oracle = lambda **a: ref.expert_linear(**a, tokens_per_route=n)  # noqa: E731
    _check_against_reference(fast, oracle, layouts, ints, case["dtype"], _device(backend))


@given(case=_expert_case(FAST_BACKENDS + ["torch"]),
       activation=st.sampled_from(["gelu_tanh", "gelu", "silu", "relu", "swiglu", "geglu"]),
       hidden=st.sampled_from([1, 4, 9]), with_bias=st.booleans())
def test_expert_mlp_matches_reference(case, activation, hidden, with_bias):
    gen = _generator(case["seed"])
    e, r, n, k, d = (case["num_experts"], case["num_routes"], case["tokens_per_route"], case["k"],
                     case["din"])
    width1 = 2 * hidden if activation in ("swiglu", "geglu") else hidden
    weights, ids = _routing(gen, r, k, e, case["ids_kind"])
    lay = case["layouts"]
    f64 = dict(generator=gen, dtype=torch.float64)
    layouts = {
        "x": Layout(torch.randn(r * n, d, **f64), lay[0]),
        "w1": Layout(torch.randn(e, d, width1, **f64) / d ** 0.5, lay[1]),
        "b1": Layout(torch.randn(e, width1, **f64), lay[2]) if with_bias else None,
        "w2": Layout(torch.randn(e, hidden, case["dout"], **f64) / hidden ** 0.5, lay[3]),
        "b2": Layout(torch.randn(e, case["dout"], **f64), lay[4]) if with_bias else None,
        "topk_weights": Layout(weights.double(), lay[5]),
    }
    ints = {"topk_ids": ids}
    backend = case["backend"]
    fast = lambda **a: sk.expert_mlp(**a, activation=activation, tokens_per_route=n,  # noqa: E731
                                     backend=backend)
    oracle = lambda **a: ref.expert_mlp(**a, activation=activation,  # noqa: E731
                                        tokens_per_route=n)
    _check_against_reference(fast, oracle, layouts, ints, case["dtype"], _device(backend))


@given(case=_expert_case(["triton", "torch"]), shared=st.booleans(), with_bias=st.booleans())
def test_switch_modulation_matches_reference(case, shared, with_bias):
    gen = _generator(case["seed"])
    e, batch, k, d = case["num_experts"], case["num_routes"], case["k"], case["din"]
    tokens = case["tokens_per_route"] + 1
    weights, ids = _routing(gen, 1 if shared else batch, k, e, case["ids_kind"])
    lay = case["layouts"]
    f64 = dict(generator=gen, dtype=torch.float64)
    layouts = {
        "x": Layout(torch.randn(batch, tokens, d, **f64), lay[0]),
        "weight": Layout(torch.randn(e, d, d, **f64) / d ** 0.5, lay[1]),
        "bias": Layout(torch.randn(e, d, **f64), lay[2]) if with_bias else None,
        "topk_weights": Layout(weights.double(), lay[3]),
    }
    backend = case["backend"]
    fast = lambda **a: sk.switch_modulation(**a, backend=backend)  # noqa: E731
    _check_against_reference(fast, ref.switch_modulation, layouts, {"topk_ids": ids},
                             case["dtype"], _device(backend))


_SPECIAL_LOGITS = [float("nan"), float("inf"), -float("inf")]


@given(num_rows=st.sampled_from([0, 1, 3, 6]), num_experts=st.sampled_from([1, 2, 3, 5, 8]),
       data=st.data(), renormalize=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), strided=st.booleans())
def test_route_topk_backends_agree(num_rows, num_experts, data, renormalize, dtype, strided):
    """Ids identical on both backends (ties to the lower id, non-finite rows -> 0..k-1), in
    [0, E), weights descending and equal up to rounding, NaN exactly where the reference has it."""
    k = data.draw(st.integers(1, num_experts), label="k")
    # Logits on a coarse grid (so ties happen and near-ties cannot), with non-finite specials.
    grid = st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.5, 3.0])
    cell = st.one_of(grid, st.sampled_from(_SPECIAL_LOGITS)) if data.draw(
        st.booleans(), label="specials") else grid
    values = data.draw(st.lists(st.lists(cell, min_size=num_experts, max_size=num_experts),
                                min_size=num_rows, max_size=num_rows), label="logits")
    logits = torch.tensor(values, dtype=dtype).reshape(num_rows, num_experts)
    if strided:
        wide = torch.zeros(num_rows, 2 * num_experts, dtype=dtype)
        wide[:, 1::2] = logits
        logits = wide[:, 1::2]
    w_ref, ids_ref = sk.route_topk(logits, k, renormalize=renormalize, backend="torch")
    w_tri, ids_tri = (t.cpu() for t in sk.route_topk(logits.to(TRITON_DEVICE), k,
                                                      renormalize=renormalize, backend="triton"))
    assert ids_ref.dtype == ids_tri.dtype == torch.int64
    assert torch.equal(ids_tri, ids_ref)
    assert ((ids_ref >= 0) & (ids_ref < num_experts)).all()
    # The softmax is NaN on a row with a NaN, a +inf (inf - inf) or only -inf; a -inf among
    # finite logits is an ordinary probability 0.
    lf = logits.float()
    bad = lf.isnan().any(1) | lf.isposinf().any(1) | lf.isneginf().all(1)
    finite_rows = ~bad
    assert torch.equal(ids_ref[bad], torch.arange(k).expand(int(bad.sum()), k))
    assert w_ref[bad].isnan().all() and w_tri[bad].isnan().all()
    torch.testing.assert_close(w_tri[finite_rows], w_ref[finite_rows], rtol=1e-5, atol=1e-6)
    assert (w_ref[finite_rows].diff(dim=1) <= 0).all()  # descending (all weights are >= 0)
    # Gradients through the weights agree where they are finite.
    if lf.isfinite().all() and num_rows:
        leaf = logits.detach().float().requires_grad_(True)
        dw = torch.randn(num_rows, k)
        (g_ref,) = torch.autograd.grad(sk.route_topk(leaf, k, renormalize=renormalize,
                                                     backend="torch")[0], leaf, dw)
        leaf_dev = leaf.detach().to(TRITON_DEVICE).requires_grad_(True)
        (g_tri,) = torch.autograd.grad(sk.route_topk(leaf_dev, k, renormalize=renormalize,
                                                     backend="triton")[0], leaf_dev,
                                       dw.to(TRITON_DEVICE))
        g_tri = g_tri.cpu()
        torch.testing.assert_close(g_tri, g_ref, rtol=1e-4, atol=1e-5)


@given(case=_expert_case(["torch"]), index_dtype=st.sampled_from([torch.int32, torch.int64]),
       impl=st.sampled_from(["torch", "csrc"]))
def test_routing_metadata_and_permutation_match_direct_formulas(case, index_dtype, impl):
    if impl == "csrc" and not sk.cuda_extension_available():
        impl = "torch"
    gen = _generator(case["seed"])
    e, r, n, k = case["num_experts"], case["num_routes"], case["tokens_per_route"], case["k"]
    weights, ids = _routing(gen, r, k, e, case["ids_kind"])
    meta = sk.build_routing_metadata(ids.to(index_dtype), e, tokens_per_route=n)
    flat = ids.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda p: (flat[p], p))
    counts = [flat.count(x) for x in range(e)]
    assert meta.sorted_pairs.tolist() == order
    assert meta.expert_counts.tolist() == counts
    assert meta.expert_offsets.tolist() == [sum(counts[:x]) for x in range(e + 1)]
    assert sorted(meta.pair_to_sorted.tolist()) == list(range(r * k))
    # permute then weighted unpermute is sum_j w_j x (float64 formula, float32 run).
    x = torch.randn(r * n, case["din"], generator=gen)
    xs = permute_tokens(x, meta, impl=impl)
    sources = torch.tensor([p // k for p in order], dtype=torch.long)
    din = x.shape[1]
    want_xs = x.reshape(r, n, din)[sources].reshape(r * k * n, din)
    assert torch.equal(xs, want_xs)
    y = unpermute_tokens(xs, meta, weights, impl=impl)
    want = (weights.double().sum(1)[:, None, None] * x.double().reshape(r, n, din)).reshape(r * n, din)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@given(case=_expert_case(["triton", "torch"]), d_hidden=st.sampled_from([None, 3]),
       lead=st.sampled_from([(0,), (1,), (2, 3), (5,)]), renormalize=st.booleans())
def test_moe_matches_its_routing_through_the_reference(case, d_hidden, lead, renormalize):
    torch.manual_seed(case["seed"])
    e, k, d = case["num_experts"], case["k"], case["din"]
    dev = _device(case["backend"])
    moe = sk.MoE(d, e, k, d_hidden=d_hidden, renormalize=renormalize, backend=case["backend"],
                 load_balance_coef=0.01, z_loss_coef=0.001).to(dev)
    x = torch.randn(*lead, d, device=dev, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert moe.aux_loss.isfinite()
    tokens = x.detach().reshape(-1, d)
    g, ids = sk.route_topk(moe.router(tokens), k, renormalize=renormalize, backend=case["backend"])
    p = {name: t.detach().cpu().double() for name, t in moe.named_parameters()}
    tokens, g, ids = tokens.cpu().double(), g.cpu().double(), ids.cpu()
    if d_hidden is None:
        want = ref.expert_linear(tokens, p["weight"], p.get("bias"), g, ids)
    else:
        want = ref.expert_mlp(tokens, p["w1"], p.get("b1"), p["w2"], p.get("b2"), g, ids)
    torch.testing.assert_close(y.detach().reshape(-1, d).cpu().double(), want, rtol=1e-4,
                               atol=1e-4)
    (y.sum() + moe.aux_loss).backward()
    assert x.grad.isfinite().all() and moe.router.weight.grad.isfinite().all()


@given(case=_expert_case(["triton", "torch"]), shared_cond=st.booleans())
def test_timestep_moe_matches_reference(case, shared_cond):
    torch.manual_seed(case["seed"])
    e, k, d = case["num_experts"], case["k"], case["din"]
    batch, tokens = max(case["num_routes"], 1), case["tokens_per_route"]
    moe = sk.TimestepMoE(d, e, k, d_cond=4, backend=case["backend"])
    with torch.no_grad():  # the experts start at zero (r == x): give them values to check
        moe.weight.normal_(0, d ** -0.5)
        moe.bias.normal_()
    dev = _device(case["backend"])
    moe = moe.to(dev)
    x = torch.randn(batch, tokens, d, device=dev)
    cond = torch.randn(1 if shared_cond else batch, 4, device=dev)
    r, routing = moe(x, cond)
    ids = routing.topk_ids.cpu()
    assert ((ids >= 0) & (ids < e)).all()
    want = ref.switch_modulation(x.cpu().double(), moe.weight.detach().cpu().double(),
                                 moe.bias.detach().cpu().double(),
                                 routing.topk_weights.detach().cpu().double(), ids)
    torch.testing.assert_close(r.detach().cpu().double(), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Bad input: a ValueError / TypeError naming the argument
# ------------------------------------------------------------------------------------------------

def _assert_named_error(call, name: str) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert re.search(rf"\b{re.escape(name)}\b", str(info.value)), (
        f"the error does not name {name!r}: {info.value}")


def _good_linear(gen, e, k, r, d, dout):
    weights, ids = _routing(gen, r, k, e, "distinct")
    return dict(x=torch.randn(r, d, generator=gen), weight=torch.randn(e, d, dout, generator=gen),
                bias=torch.randn(e, dout, generator=gen), topk_weights=weights, topk_ids=ids)


def _bad_id(draw, e):
    return draw(st.one_of(st.integers(e, e + 5), st.integers(-5, -1), st.just(2**40)))


_LINEAR_MUTATIONS = [
    ("x", lambda a, e, bad: a.update(x=a["x"][None])),
    ("x", lambda a, e, bad: a.update(x=a["x"].long())),
    ("x", lambda a, e, bad: a.update(x=a["x"].tolist())),
    ("weight", lambda a, e, bad: a.update(weight=a["weight"][:, :-1] if a["weight"].shape[1] > 1
                                          else a["weight"].repeat(1, 2, 1))),
    ("weight", lambda a, e, bad: a.update(weight=a["weight"].double())),
    ("weight", lambda a, e, bad: a.update(weight=a["weight"][:, :, :0])),
    ("bias", lambda a, e, bad: a.update(bias=a["bias"][:, None])),
    ("bias", lambda a, e, bad: a.update(bias=torch.zeros(e + 1, a["bias"].shape[1]))),
    ("topk_ids", lambda a, e, bad: a.update(topk_ids=a["topk_ids"].float())),
    ("topk_ids", lambda a, e, bad: a["topk_ids"].view(-1)[-1].fill_(bad)),
    ("topk_ids", lambda a, e, bad: a.update(topk_ids=torch.zeros(a["x"].shape[0], e + 1).long(),
                                            topk_weights=torch.ones(a["x"].shape[0], e + 1))),
    ("topk_weights", lambda a, e, bad: a.update(topk_weights=a["topk_weights"][:, :-1])),
    ("topk_weights", lambda a, e, bad: a.update(topk_weights=a["topk_weights"].long())),
]


@given(seed=st.integers(0, 2**31 - 1), e=st.sampled_from([2, 3, 5]), r=st.sampled_from([1, 4]),
       mutation=st.sampled_from(range(len(_LINEAR_MUTATIONS))), data=st.data(),
       backend=st.sampled_from(["torch", "triton", "cuda", "grouped_mm", "auto"]))
def test_expert_functions_name_the_bad_argument(seed, e, r, mutation, data, backend):
    gen = _generator(seed)
    k = data.draw(st.integers(1, e), label="k")
    args = _good_linear(gen, e, k, r, 3, 4)
    name, mutate = _LINEAR_MUTATIONS[mutation]
    mutate(args, e, _bad_id(data.draw, e))
    _assert_named_error(lambda: sk.expert_linear(**args, backend=backend), name)
    # The same arguments through expert_mlp (weight -> w1, bias -> b1; w2 [E, Dout, 2]).
    if name not in ("weight", "bias"):
        w2 = torch.randn(e, args["weight"].shape[2] if args["weight"].dim() == 3 else 4, 2)
        _assert_named_error(lambda: sk.expert_mlp(
            args["x"], args["weight"], args["bias"], w2, None, args["topk_weights"],
            args["topk_ids"], backend=backend), name)
    # ... and through switch_modulation with D x D experts (x [R, 1, 3]).
    if name in ("topk_ids", "topk_weights"):
        x3, w3 = torch.randn(r, 2, 3), torch.randn(e, 3, 3)
        _assert_named_error(lambda: sk.switch_modulation(
            x3, w3, None, args["topk_weights"], args["topk_ids"],
            backend="torch" if backend == "grouped_mm" else backend), name)


@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_other_arguments_are_named(seed, data):
    gen = _generator(seed)
    e, k, r = 3, 2, 4
    a = _good_linear(gen, e, k, r, 3, 4)
    meta = sk.build_routing_metadata(a["topk_ids"], e, tokens_per_route=1)
    cases = [
        ("tokens_per_route", lambda: sk.expert_linear(**a, tokens_per_route=data.draw(
            st.sampled_from([0, -1, 2, True, 1.0]), label="tokens_per_route"))),
        ("backend", lambda: sk.expert_linear(**a, backend="cutlass")),
        ("activation", lambda: sk.expert_mlp(a["x"], a["weight"], None, torch.randn(e, 4, 3), None,
                                             a["topk_weights"], a["topk_ids"], activation="tanh")),
        ("w2", lambda: sk.expert_mlp(a["x"], a["weight"], None, torch.randn(e, 5, 3), None,
                                     a["topk_weights"], a["topk_ids"])),
        ("b2", lambda: sk.expert_mlp(a["x"], a["weight"], None, torch.randn(e, 4, 3),
                                     torch.randn(e, 4), a["topk_weights"], a["topk_ids"])),
        ("logits", lambda: sk.route_topk(torch.randn(3), 1)),
        ("logits", lambda: sk.route_topk(torch.ones(3, 4, dtype=torch.int64), 1)),
        ("k", lambda: sk.route_topk(torch.randn(3, 4), data.draw(
            st.sampled_from([0, 5, -1, 2.0, True]), label="k"))),
        ("topk_ids", lambda: sk.build_routing_metadata(a["topk_ids"] + e, e)),
        ("num_experts", lambda: sk.build_routing_metadata(a["topk_ids"], 0)),
        ("x", lambda: permute_tokens(a["x"][:-1], meta)),
        ("meta", lambda: permute_tokens(a["x"], None)),
        ("h", lambda: unpermute_tokens(torch.randn(r * k + 1, 3), meta, a["topk_weights"])),
        ("topk_weights", lambda: unpermute_tokens(torch.randn(r * k, 3), meta,
                                                  a["topk_weights"][:, :1])),
        ("x", lambda: sk.switch_modulation(torch.randn(2, 3), torch.randn(e, 3, 3), None,
                                           a["topk_weights"], a["topk_ids"])),
        ("topk_ids", lambda: sk.switch_modulation(torch.randn(2, 2, 3), torch.randn(e, 3, 3), None,
                                                  a["topk_weights"], a["topk_ids"])),
    ]
    name, call = data.draw(st.sampled_from(cases), label="case")
    _assert_named_error(call, name)


@given(data=st.data())
def test_modules_name_the_bad_argument(data):
    cases = [
        ("d_model", lambda: sk.MoE(0, 2, 1)),
        ("num_experts", lambda: sk.MoE(4, True, 1)),
        ("k", lambda: sk.MoE(4, 2, 3)),
        ("k", lambda: sk.TimestepMoE(4, 2, 0)),
        ("backend", lambda: sk.MoE(4, 2, 1, backend="fast")),
        ("activation", lambda: sk.MoE(4, 2, 1, activation="tanh")),
        ("d_hidden", lambda: sk.MoE(4, 2, 1, d_hidden=0)),
        ("load_balance_coef", lambda: sk.MoE(4, 2, 1, load_balance_coef=float("nan"))),
        ("z_loss_coef", lambda: sk.MoE(4, 2, 1, z_loss_coef=-1.0)),
        ("d_cond", lambda: sk.TimestepMoE(4, 2, 1, d_cond=-3)),
        ("x", lambda: sk.MoE(4, 2, 1)(torch.randn(3, 5))),
        ("x", lambda: sk.MoE(4, 2, 1)(torch.randn(3, 4, dtype=torch.float64))),
        ("x", lambda: sk.MoE(4, 2, 1)(torch.ones(3, 4, dtype=torch.int32))),
        ("x", lambda: sk.TimestepMoE(4, 2, 1)(torch.randn(3, 4), torch.randn(3, 4))),
        ("cond", lambda: sk.TimestepMoE(4, 2, 1)(torch.randn(3, 2, 4), torch.randn(2, 4))),
        ("cond", lambda: sk.TimestepMoE(4, 2, 1)(torch.randn(3, 2, 4), torch.randn(3, 5))),
        ("cond", lambda: sk.TimestepMoE(4, 2, 1)(torch.randn(3, 2, 4), torch.randn(3, 4, 1))),
        ("cond", lambda: sk.TimestepMoE(4, 2, 1)(torch.randn(3, 2, 4),
                                                 torch.randn(3, 4, dtype=torch.float16))),
        ("cond", lambda: sk.TimestepMoE(4, 2, 1)(torch.randn(3, 2, 4))),
    ]
    name, call = data.draw(st.sampled_from(cases), label="case")
    _assert_named_error(call, name)
