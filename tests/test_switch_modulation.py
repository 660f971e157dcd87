"""switch_modulation on the Triton kernels vs the reference: forward, every gradient, edge cases.

Numerics (flash-attention's rule): against a float64 truth, the fast path's error is at most twice
the reference's own error in the same dtype plus a small atol. On the CPU the kernels run through
the Triton interpreter (float32/float16); bfloat16 and the CUDA-graph capture are GPU-marked.
"""
import pytest
import torch

from switch_dit_kernels import reference as ref
from switch_dit_kernels import switch_modulation
from switch_dit_kernels.kernels.switch_modulation import (
    merge_experts, merge_experts_torch, switch_modulation_fwd, switch_modulation_fwd_torch,
)
from switch_dit_kernels.kernels.switch_modulation_bwd import (
    dw_tile, launch_dw, switch_modulation_bwd, switch_modulation_bwd_torch, unit_order,
)
from switch_dit_kernels.modulation_ops import switch_modulation_triton

EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def make_inputs(batch, tokens, dim, num_experts, k, *, dtype=torch.float32, bias=True, routing="random",
                device="cpu", gate_dtype=torch.float32):
    """Fresh random inputs. routing: "random" [B, k]; "shared" [1, k]; "same_rows" [B, k] identical
    rows; "unused" [B, k] drawn from experts {0, 2} only (the others serve no sample)."""
    x = torch.randn(batch, tokens, dim, device=device).to(dtype)
    weight = (torch.randn(num_experts, dim, dim, device=device) / dim ** 0.5).to(dtype)
    b = (0.5 * torch.randn(num_experts, dim, device=device)).to(dtype) if bias else None
    rows = 1 if routing == "shared" else batch
    logits = torch.randn(rows, num_experts, device=device)
    if routing == "unused":
        logits[:, [e for e in range(num_experts) if e not in (0, 2)]] = -1e4
    probs = torch.softmax(logits, -1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if routing == "same_rows":
        weights, ids = weights[:1].expand(batch, k).clone(), ids[:1].expand(batch, k).clone()
    return x, weight, b, weights.to(gate_dtype), ids


def grad_args(x, weight, b, weights):
    return [t for t in (x, weight, b, weights) if t is not None]


def forward_and_grads(fn, x, weight, b, weights, ids, grad_r):
    leaves = [t.detach().clone().requires_grad_(True) for t in grad_args(x, weight, b, weights)]
    xx, ww = leaves[0], leaves[1]
    bb = leaves[2] if b is not None else None
    gg = leaves[-1]
    r = fn(xx, ww, bb, gg, ids)
    grads = torch.autograd.grad(r, leaves, grad_r)
    return [r.detach()] + list(grads)


def as64(t):
    return t.double() if t is not None and t.is_floating_point() else t


def assert_close_rule(got, same, truth, dtype, name, atol_factor=2.0):
    """|got - truth| <= 2 |same - truth| + atol, elementwise maximum; atol scales with |truth|."""
    got, same, truth = got.double(), same.double(), truth.double()
    assert got.shape == truth.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - truth).abs().max().item()
    ref_err = (same - truth).abs().max().item()
    atol = atol_factor * EPS[dtype] * max(truth.abs().max().item(), 1e-3)
    assert err <= 2 * ref_err + atol, \
        f"{name}: error {err:.3e} vs reference {ref_err:.3e} (atol {atol:.1e})"


def check_against_reference(x, weight, b, weights, ids, dtype):
    grad_r = torch.randn(x.shape, device=x.device).to(dtype)
    got = forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)
    same = forward_and_grads(ref.switch_modulation, x, weight, b, weights, ids, grad_r)
    truth = forward_and_grads(ref.switch_modulation, as64(x), as64(weight), as64(b), as64(weights),
                              ids, as64(grad_r))
    names = ["r", "dx", "dweight"] + (["dbias"] if b is not None else []) + ["dtopk_weights"]
    for name, g_, s_, t_ in zip(names, got, same, truth):
        assert_close_rule(g_, s_, t_, dtype, name)
    assert got[0].dtype == dtype and got[-1].dtype == weights.dtype
    return got


# (B, N, D, E, k, bias, routing): the edge each case covers.
CASES = [
    (3, 37, 40, 3, 2, True, "random"),       # N=37 not a multiple of the tile, D=40 two N tiles
    (1, 24, 24, 3, 1, False, "random"),      # B = 1, k = 1, bias None, D=24 below one tile
    (3, 24, 37, 3, 3, True, "random"),       # k = E, odd D = 37
    (5, 16, 40, 8, 2, True, "random"),       # E = 8: several tuples, cross-split flushes
    (4, 24, 40, 5, 2, True, "unused"),       # experts 1, 3, 4 serve no sample: zero dW / db
    (5, 24, 40, 3, 2, True, "shared"),       # [1, k] one routing for the batch: M tiles straddle samples
    (4, 37, 24, 3, 2, True, "same_rows"),    # [B, k] rows that happen to be identical (one tuple)
    (3, 21, 40, 3, 2, False, "shared"),      # shared without bias; 63 rows: a partial last dW unit
]


@pytest.mark.parametrize("batch,tokens,dim,num_experts,k,bias,routing", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(batch, tokens, dim, num_experts, k, bias, routing, dtype):
    x, weight, b, weights, ids = make_inputs(batch, tokens, dim, num_experts, k, dtype=dtype,
                                             bias=bias, routing=routing)
    got = check_against_reference(x, weight, b, weights, ids, dtype)
    if routing == "unused":
        unused = [e for e in range(num_experts) if e not in (0, 2)]
        assert torch.equal(got[2][unused], torch.zeros_like(got[2][unused]))
        assert torch.equal(got[3][unused], torch.zeros_like(got[3][unused]))


def test_more_than_four_experts_per_sample():
    # k = E = 6 > 4 slots per dW launch: two launches (slots 0-3, 4-5), each with its own partials.
    x, weight, b, weights, ids = make_inputs(3, 16, 24, 6, 6)
    check_against_reference(x, weight, b, weights, ids, torch.float32)


def test_tuple_change_in_first_slot_only():
    # Sorted tuples (0,2),(0,2),(1,2) in one dW split: the run closes on a slot-0 change alone.
    x, weight, b, _, _ = make_inputs(5, 16, 24, 4, 2)
    ids = torch.tensor([[1, 2], [0, 2], [0, 2], [1, 2], [3, 0]])
    weights = torch.rand(5, 2)
    check_against_reference(x, weight, b, weights, ids, torch.float32)


def test_public_api_dispatches_to_triton():
    # functional.switch_modulation(backend="triton") reaches the switch_dit::switch_modulation op.
    x, weight, b, weights, ids = make_inputs(2, 16, 24, 3, 2)
    x.requires_grad_(True)
    r = switch_modulation(x, weight, b, weights, ids, backend="triton")
    assert r.grad_fn is not None and "switch_dit_switch_modulation" in type(r.grad_fn).__name__
    torch.testing.assert_close(r, ref.switch_modulation(x, weight, b, weights, ids))


@pytest.mark.parametrize("gate_dtype", [torch.float16, torch.float64])
def test_gate_weights_any_float_dtype(gate_dtype):
    # topk_weights in float16 / float64 with float32 x: used in float32, gradient in its own dtype.
    x, weight, b, weights, ids = make_inputs(3, 16, 24, 4, 2, gate_dtype=gate_dtype)
    grad_r = torch.randn_like(x)
    got = forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)
    want = forward_and_grads(ref.switch_modulation, x, weight, b, weights.float(), ids, grad_r)
    assert got[0].dtype == torch.float32 and got[-1].dtype == gate_dtype
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.float(), w_.float(), rtol=1e-3, atol=1e-4)


def test_repeated_expert_in_a_row():
    # A row naming one expert twice (not produced by topk, accepted by the checks): both slots add.
    x, weight, b, _, _ = make_inputs(2, 16, 24, 3, 2)
    ids = torch.tensor([[1, 1], [2, 0]])
    weights = torch.tensor([[0.6, 0.3], [0.5, 0.5]])
    grad_r = torch.randn_like(x)
    got = forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)
    want = forward_and_grads(ref.switch_modulation, x, weight, b, weights, ids, grad_r)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-5)


def test_empty_batch():
    # No tokens: nothing to launch; shapes and gradients still come back.
    x, weight, b, weights, ids = make_inputs(2, 0, 24, 3, 2)
    weight.requires_grad_(True)
    r = switch_modulation_triton(x, weight, b, weights, ids)
    assert r.shape == (2, 0, 24)
    (dw,) = torch.autograd.grad(r.sum(), [weight])
    assert torch.equal(dw, torch.zeros_like(weight))


def test_backward_is_deterministic():
    # Two backward passes give the same bits (no float atomics; fixed-order reductions).
    x, weight, b, weights, ids = make_inputs(5, 16, 40, 3, 2)
    grad_r = torch.randn_like(x)
    first = forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)
    second = forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_retain_graph_second_backward():
    # The first backward overwrites the saved y with u; a second one must recompute y.
    x, weight, b, weights, ids = make_inputs(2, 16, 24, 3, 2)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    r = switch_modulation_triton(x, weight, b, weights, ids)
    grad_r = torch.randn_like(r)
    first = torch.autograd.grad(r, [x, weight], grad_r, retain_graph=True)
    second = torch.autograd.grad(r, [x, weight], grad_r)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("routing", ["random", "shared"])
def test_recompute_keeps_no_y_and_gives_the_same_bits(routing):
    # recompute=True: the forward keeps no y on the autograd node, the backward recomputes it with
    # the same kernel, so the output and every gradient are bit-identical to the default path.
    x, weight, b, weights, ids = make_inputs(3, 20, 40, 4, 2, routing=routing)  # partial tiles
    grad_r = torch.randn_like(x)
    recompute = lambda *a: switch_modulation_triton(*a, recompute=True)
    for a, c in zip(forward_and_grads(recompute, x, weight, b, weights, ids, grad_r),
                    forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)):
        assert torch.equal(a, c)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight)]
    kept = switch_modulation_triton(leaves[0], leaves[1], b, weights, ids)
    lean = switch_modulation(leaves[0], leaves[1], b, weights, ids, backend="triton", recompute=True)
    assert kept.grad_fn.y is not None and lean.grad_fn.y is None


@pytest.mark.parametrize("which", ["x_only", "params_only"])
def test_partial_requires_grad(which):
    # Only x needs a gradient (no dW kernel), or only the parameters (u formed without dx).
    x, weight, b, weights, ids = make_inputs(3, 16, 24, 3, 2)
    leaves = [x] if which == "x_only" else [weight, b, weights]
    for t in leaves:
        t.requires_grad_(True)
    grad_r = torch.randn_like(x)
    got = torch.autograd.grad(switch_modulation_triton(x, weight, b, weights, ids), leaves, grad_r)
    want = torch.autograd.grad(ref.switch_modulation(x, weight, b, weights, ids), leaves, grad_r)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-5)


def test_inference_path_stores_no_grad():
    # Under no_grad the forward launches without saving y and returns a plain tensor.
    x, weight, b, weights, ids = make_inputs(3, 16, 24, 3, 2)
    weight.requires_grad_(True)
    with torch.no_grad():
        r = switch_modulation_triton(x, weight, b, weights, ids)
    assert r.grad_fn is None
    torch.testing.assert_close(r, ref.switch_modulation(x, weight, b, weights, ids).detach())


@pytest.mark.parametrize("routing", ["random", "shared"])
def test_poisoned_outputs_are_fully_written(routing):
    # Launch into NaN-filled buffers: an unwritten tile or slot would keep its NaN.
    x, weight, b, weights, ids = make_inputs(3, 37, 40, 3, 2, routing=routing)
    nan = float("nan")
    r = torch.full_like(x, nan)
    y = torch.full_like(x, nan)
    switch_modulation_fwd(x, weight, b, weights, ids, store_y=True, out=r, y_out=y)
    r_ref, y_ref = switch_modulation_fwd_torch(x, weight, b, weights, ids)
    torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)

    grad_r = torch.randn_like(x)
    dx = torch.full_like(x, nan)
    got = switch_modulation_bwd(grad_r, x, weight, b, weights, ids, y.clone(), dx_out=dx)
    want = switch_modulation_bwd_torch(grad_r, x, weight, b, weights, ids)
    for name, g_, w_ in zip(["dx", "dW", "db", "dg"], got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-4, msg=name)
    assert got[0] is dx

    # the dW kernel's per-sample outputs: dg partials [R, k, tiles]
    if routing == "random":
        batch, tokens, dim = x.shape
        u = (grad_r * x).reshape(-1, dim)
        k = ids.shape[1]
        bi, bj = dw_tile(k)
        tiles = -(-dim // bi) * -(-dim // bj)
        dgp = torch.full((batch, k, tiles), nan)
        g32, ids32 = weights.float().contiguous(), ids.int().contiguous()
        launch_dw(x.reshape(-1, dim), u, weight, g32, ids32, unit_order(ids32, 3), tokens, 2,
                  dgp=dgp)
        assert torch.isfinite(dgp).all()


def test_torch_references_match_autograd():
    # The closed-form backward reference equals autograd of the reference layer (float64).
    for routing in ("random", "shared"):
        x, weight, b, weights, ids = make_inputs(3, 8, 12, 4, 2, dtype=torch.float64, routing=routing)
        weights = weights.double()
        grad_r = torch.randn_like(x)
        want = forward_and_grads(ref.switch_modulation, x, weight, b, weights, ids, grad_r)
        r, _ = switch_modulation_fwd_torch(x, weight, b, weights, ids)
        dx, dw, db, dg = switch_modulation_bwd_torch(grad_r, x, weight, b, weights, ids)
        for g_, w_ in zip([r, dx, dw, db, dg], want):
            torch.testing.assert_close(g_.double(), w_, rtol=1e-9, atol=1e-9)


def test_merge_experts_matches_torch():
    weight = torch.randn(5, 37, 37)
    bias = torch.randn(5, 37)
    g = torch.tensor([0.5, 0.3, 0.2])
    ids = torch.tensor([4, 0, 2], dtype=torch.int32)
    wm, bm = merge_experts(weight, bias, g, ids)
    wm_ref, bm_ref = merge_experts_torch(weight, bias, g, ids)
    torch.testing.assert_close(wm, wm_ref)
    torch.testing.assert_close(bm, bm_ref)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_gpu_config_pruning(k):
    # The GPU autotuning space after pruning: non-empty, every config's pipelined loads fit in
    # shared memory (k expert chunks per stage), no tile wider than the padded problem.
    from switch_dit_kernels.kernels.switch_modulation import fwd_configs, prune_fwd_configs
    x = torch.empty(1, dtype=torch.bfloat16)
    kept = prune_fwd_configs(fwd_configs(interpreting=False), {"x_ptr": x, "N_u": 256, "D": 1152},
                             K_EXP=k, PREMERGED=False)
    assert kept
    for c in kept:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        assert c.num_stages * (bm * bk + k * bk * bn) * 2 <= 200 * 1024
    small = prune_fwd_configs(fwd_configs(interpreting=False), {"x_ptr": x, "N_u": 16, "D": 40},
                              K_EXP=k, PREMERGED=False)
    assert small and all(c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] == 64 for c in small)


def test_unit_order_sorts_expert_tuples():
    # Lexicographic, stable; the mixed-radix key and the repeated-sort fallback agree.
    ids = torch.tensor([[2, 0], [0, 1], [2, 0], [0, 2], [1, 0], [0, 1]])
    order = unit_order(ids, 3)
    assert torch.equal(order.long(), torch.tensor([1, 5, 3, 4, 0, 2]))
    assert torch.equal(unit_order(ids, 2 ** 40), order)  # E^k >= 2^62: k stable sorts


# ---------------------------------------------------------------------------------------------
# GPU: bfloat16 at a larger shape, and the CUDA-graph capture of a sampling step.
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("routing", ["random", "shared"])
def test_gpu_matches_reference_bf16(routing):
    # 256 tokens (the DiT-S/2 sequence), D=384, E=3, k=2; the shared path at B=8 (CFG pairs).
    x, weight, b, weights, ids = make_inputs(8, 256, 384, 3, 2, dtype=torch.bfloat16, routing=routing,
                                             device="cuda")
    check_against_reference(x, weight, b, weights, ids, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(6, 256, 384), (5, 197, 200)])   # DiT-S/2; odd N and D
@pytest.mark.parametrize("operand,prepass", [("auto", "auto"), ("a", "0"), ("b", "0"),
                                             ("b", "1")])
def test_gpu_merged_operand_and_prepass_bf16(monkeypatch, shape, operand, prepass):
    # the default (on sm_90: the pre-pass and the merged chunk as operand A) and the opt-outs
    # a GPU run times against it (benchmarks.decide)
    monkeypatch.setenv("SWITCH_DIT_SMOD_MERGED_OPERAND", operand)
    monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", prepass)
    x, weight, b, weights, ids = make_inputs(*shape, 3, 2, dtype=torch.bfloat16, device="cuda")
    check_against_reference(x, weight, b, weights, ids, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_odd_sizes_bf16():
    # N=197 (ViT-style token count, not a tile multiple), odd D=200, E=8 with unused experts.
    x, weight, b, weights, ids = make_inputs(6, 197, 200, 8, 2, dtype=torch.bfloat16, device="cuda")
    check_against_reference(x, weight, b, weights, ids, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_recompute_holds_one_activation_less():
    # What the autograd graph holds after the forward: y ([B, N, D] bf16) less with recompute.
    x, weight, b, weights, ids = make_inputs(8, 256, 384, 3, 2, dtype=torch.bfloat16, device="cuda")
    x.requires_grad_(True)
    weight.requires_grad_(True)

    def held(recompute):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        r = switch_modulation_triton(x, weight, b, weights, ids, recompute=recompute)
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - base, r

    (kept, r1), (lean, r2) = held(False), held(True)
    assert kept - lean == x.numel() * x.element_size()
    assert torch.equal(r1, r2)


@pytest.mark.gpu
def test_gpu_backward_deterministic_bf16():
    x, weight, b, weights, ids = make_inputs(16, 256, 384, 3, 2, dtype=torch.bfloat16, device="cuda")
    grad_r = torch.randn_like(x)
    first = forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)
    second = forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("routing", ["shared", "random"])
def test_cuda_graph_capture_and_replay(routing):
    # A sampling step: forward only, no host sync, captured once, replayed on new values copied
    # into the static buffers.
    x, weight, b, weights, ids = make_inputs(8, 256, 384, 3, 2, dtype=torch.bfloat16,
                                             routing=routing, device="cuda")
    static = [x.clone(), weights.clone(), ids.clone()]

    def step():
        with torch.no_grad():
            return switch_modulation(static[0], weight, b, static[1], static[2], backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and compilation happen outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    for _ in range(2):
        new_x, _, _, new_w, new_ids = make_inputs(8, 256, 384, 3, 2, dtype=torch.bfloat16,
                                                  routing=routing, device="cuda")
        static[0].copy_(new_x)
        static[1].copy_(new_w)
        static[2].copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        same = ref.switch_modulation(new_x, weight, b, new_w, new_ids)
        truth = ref.switch_modulation(as64(new_x), as64(weight), as64(b), as64(new_w), new_ids)
        assert_close_rule(static_out, same, truth, torch.bfloat16, "graph replay")


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-u-prepass"])
@pytest.mark.parametrize("where", ["x", "grad_r"])
def test_nan_in_one_sample_stays_in_its_experts(monkeypatch, backend, where):
    # Sample 0 uses experts {0, 1} only, the others {2, 3} or {3, 4} (E = 5 prime, k = 2). A NaN in
    # sample 0's x or incoming gradient reaches r / dx / d(gates) of sample 0 and dW / db of experts
    # 0 and 1, nothing else; the finite parts equal a run without the NaN. (The Triton backward
    # once put 0 * NaN into the bias gradient of experts sample 0 never used.)
    if backend == "triton-u-prepass":
        monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", "1")
        backend = "triton"
    x, weight, b, _, _ = make_inputs(3, 24, 40, 5, 2)
    ids = torch.tensor([[0, 1], [2, 3], [4, 3]])
    weights = torch.softmax(torch.randn(3, 2), -1)
    grad_r = torch.randn(x.shape)
    x_nan, grad_nan = x.clone(), grad_r.clone()
    (x_nan if where == "x" else grad_nan)[0, 5, 7] = float("nan")
    fn = (lambda *a: switch_modulation(*a, backend=backend))
    clean = forward_and_grads(fn, x, weight, b, weights, ids, grad_r)
    dirty = forward_and_grads(fn, x_nan, weight, b, weights, ids, grad_nan)
    r, dx, dw, db, dg = dirty
    assert torch.isnan(dw[:2]).any() and torch.isnan(db[:2]).any()  # the NaN did arrive
    for name, got, want in [("r", r[1:], clean[0][1:]), ("dx", dx[1:], clean[1][1:]),
                            ("dweight", dw[2:], clean[2][2:]), ("dbias", db[2:], clean[3][2:]),
                            ("dtopk_weights", dg[1:], clean[4][1:])]:
        assert torch.isfinite(got).all(), f"{backend}: NaN of sample 0 leaked into {name}"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


# The u pre-pass (SWITCH_DIT_SMOD_DX_PREPASS=1; the sm_90 default for k >= 2): u = dR * x,
# dR * (1 + y) and the per-unit sums of u in one elementwise pass, the dx GEMM then reads u as a
# plain operand.
PREPASS_CASES = [CASES[0], CASES[1], CASES[2], CASES[4], CASES[5], CASES[7]]


@pytest.mark.parametrize("batch,tokens,dim,num_experts,k,bias,routing", PREPASS_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_u_prepass_matches_reference(monkeypatch, batch, tokens, dim, num_experts, k, bias,
                                     routing, dtype):
    monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", "1")
    x, weight, b, weights, ids = make_inputs(batch, tokens, dim, num_experts, k, dtype=dtype,
                                             bias=bias, routing=routing)
    check_against_reference(x, weight, b, weights, ids, dtype)


@pytest.mark.parametrize("routing", ["random", "shared"])
def test_u_prepass_writes_every_output_and_is_deterministic(monkeypatch, routing):
    monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", "1")
    from switch_dit_kernels.kernels import switch_modulation_bwd as smb
    calls = []
    real = smb.launch_u_prepass
    monkeypatch.setattr(smb, "launch_u_prepass", lambda *a: calls.append(1) or real(*a))
    x, weight, b, weights, ids = make_inputs(3, 37, 40, 3, 2, routing=routing)
    _, y = switch_modulation_fwd_torch(x, weight, b, weights, ids)
    grad_r = torch.randn_like(x)
    want = switch_modulation_bwd_torch(grad_r, x, weight, b, weights, ids)
    runs = []
    for _ in range(2):
        dx = torch.full_like(x, float("nan"))
        got = switch_modulation_bwd(grad_r, x, weight, b, weights, ids, y.clone(), dx_out=dx)
        for name, g_, w_ in zip(["dx", "dW", "db", "dg"], got, want):
            torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-4, msg=name)
        runs.append(got)
    assert len(calls) == 2  # the pre-pass path ran
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("which", ["x_only", "params_only"])
def test_u_prepass_partial_requires_grad(monkeypatch, which):
    monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", "1")
    test_partial_requires_grad(which)


class LaunchSpy:
    """Stands in for an autotuned kernel: records each launch's constexpr keywords, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getattr__(self, name):  # .configs and the like
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def spy_kernels(monkeypatch):
    from switch_dit_kernels.kernels import switch_modulation as sm
    from switch_dit_kernels.kernels import switch_modulation_bwd as smb
    fwd = LaunchSpy(sm._switch_modulation_fwd_kernel)
    dx = LaunchSpy(smb._switch_modulation_dx_kernel)
    monkeypatch.setattr(sm, "_switch_modulation_fwd_kernel", fwd)
    monkeypatch.setattr(smb, "_switch_modulation_dx_kernel", dx)
    return fwd, dx


# The merged W~ chunk as the MMA's register operand (MERGED_AS_A, the default with k >= 2 experts
# merged on chip) against SWITCH_DIT_SMOD_MERGED_OPERAND=b (the previous orientation), with the
# fused u and with the pre-pass, so both loops and both epilogues are checked.
MERGED_CASES = [CASES[0], CASES[2], CASES[3], CASES[6]]


@pytest.mark.parametrize("batch,tokens,dim,num_experts,k,bias,routing", MERGED_CASES)
@pytest.mark.parametrize("operand,prepass", [("a", "0"), ("a", "1"), ("b", "0"), ("b", "1")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merged_operand_orientations_match_reference(monkeypatch, batch, tokens, dim, num_experts,
                                                     k, bias, routing, operand, prepass, dtype):
    monkeypatch.setenv("SWITCH_DIT_SMOD_MERGED_OPERAND", operand)
    monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", prepass)
    fwd, dx = spy_kernels(monkeypatch)
    x, weight, b, weights, ids = make_inputs(batch, tokens, dim, num_experts, k, dtype=dtype,
                                             bias=bias, routing=routing)
    check_against_reference(x, weight, b, weights, ids, dtype)
    # the knob reached both kernels (not a no-op), and u came from where it was asked
    assert [launch["MERGED_AS_A"] for launch in fwd.launches + dx.launches] == \
        [operand == "a"] * (len(fwd.launches) + len(dx.launches))
    assert dx.launches and all(launch["U_GIVEN"] == (prepass == "1") for launch in dx.launches)


@pytest.fixture
def on_hopper(monkeypatch):
    """The launch-time GPU generation read as sm_90 (the interpreter still runs the kernels)."""
    from switch_dit_kernels.kernels import tuning
    monkeypatch.setattr(tuning, "target_capability", lambda: 90)
    monkeypatch.delenv("SWITCH_DIT_SMOD_DX_PREPASS", raising=False)
    monkeypatch.delenv("SWITCH_DIT_SMOD_MERGED_OPERAND", raising=False)


@pytest.mark.parametrize("cc,k,routing,dtype,expect", [
    (90, 2, "random", torch.float16, True),      # sm_90, k >= 2 merged on chip: operand A
    (90, 2, "random", torch.float32, True),      # IEEE float32 (FMA dots) too
    (90, 1, "random", torch.float16, False),     # one expert chunk is loaded, not merged
    (90, 2, "shared", torch.float16, False),     # shared routing runs on the premerged W~
    (80, 2, "random", torch.float16, True),      # mma.sync
    (None, 2, "random", torch.float32, True),    # no GPU (the interpreter)
])
def test_merged_operand_default_per_generation(monkeypatch, cc, k, routing, dtype, expect):
    from switch_dit_kernels.kernels import tuning
    monkeypatch.setattr(tuning, "target_capability", lambda: cc)
    monkeypatch.delenv("SWITCH_DIT_SMOD_MERGED_OPERAND", raising=False)
    monkeypatch.delenv("SWITCH_DIT_SMOD_DX_PREPASS", raising=False)
    fwd, dx = spy_kernels(monkeypatch)
    x, weight, b, weights, ids = make_inputs(2, 16, 24, 3, k, routing=routing, dtype=dtype)
    check_against_reference(x, weight, b, weights, ids, dtype)
    assert fwd.launches and dx.launches
    assert all(launch["MERGED_AS_A"] is expect for launch in fwd.launches + dx.launches)


@pytest.mark.parametrize("tile", [(16, 32, 16), (32, 16, 32)])
@pytest.mark.parametrize("operand,prepass", [("a", "1"), ("a", "0"), ("b", "0")])
def test_non_square_tiles_match_reference(monkeypatch, tile, operand, prepass):
    # The interpreter's one config is square (32x32x16), so a BLOCK_M / BLOCK_N mix-up in the
    # transposed (MERGED_AS_A) loop or its epilogue would pass every other test here. One
    # non-square config each way; N = 37 and D = 40 leave partial tiles in both directions.
    import triton
    from switch_dit_kernels.kernels import switch_modulation as sm
    from switch_dit_kernels.kernels import switch_modulation_bwd as smb
    bm, bn, bk = tile
    config = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4,
                            num_stages=1)]
    monkeypatch.setattr(sm._switch_modulation_fwd_kernel, "configs", config)
    monkeypatch.setattr(smb._switch_modulation_dx_kernel, "configs", config)
    monkeypatch.setenv("SWITCH_DIT_SMOD_MERGED_OPERAND", operand)
    monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", prepass)
    x, weight, b, weights, ids = make_inputs(3, 37, 40, 3, 2)
    check_against_reference(x, weight, b, weights, ids, torch.float32)


@pytest.mark.parametrize("k,routing,prepass", [
    (2, "random", True),     # k >= 2 merged on chip: the dx would wait for every wgmma
    (3, "random", True),     # k = E
    (1, "random", False),    # one expert chunk: the fused u keeps an MMA in flight
    (2, "shared", False),    # shared routing: the premerged W~, one chunk
])
def test_u_prepass_is_the_sm90_default_where_the_dx_would_serialise(monkeypatch, on_hopper, k,
                                                                    routing, prepass):
    from switch_dit_kernels.kernels import switch_modulation_bwd as smb
    calls = []
    real = smb.launch_u_prepass
    monkeypatch.setattr(smb, "launch_u_prepass", lambda *a: calls.append(1) or real(*a))
    fwd, dx = spy_kernels(monkeypatch)
    # float16: a dtype whose dots issue wgmma on sm_90 (IEEE float32 would not; see below)
    x, weight, b, weights, ids = make_inputs(3, 21, 40, 3, k, routing=routing,
                                             dtype=torch.float16)
    check_against_reference(x, weight, b, weights, ids, torch.float16)
    assert bool(calls) is prepass
    assert all(launch["U_GIVEN"] is prepass for launch in dx.launches)
    # the sm_90 default: the merged chunk as operand A wherever experts are merged on chip
    merged = k >= 2 and routing != "shared"
    assert all(launch["MERGED_AS_A"] is merged for launch in fwd.launches + dx.launches)


def test_u_prepass_policy(monkeypatch):
    from switch_dit_kernels.kernels import switch_modulation_bwd as smb
    from switch_dit_kernels.kernels import tuning
    monkeypatch.delenv("SWITCH_DIT_SMOD_DX_PREPASS", raising=False)
    bf16, fp32 = torch.bfloat16, torch.float32
    for cc, want in [(None, False), (80, False), (90, True)]:
        monkeypatch.setattr(tuning, "target_capability", lambda cc=cc: cc)
        assert smb.u_prepass_enabled(2, bf16) is want, cc
        assert smb.u_prepass_enabled(2, torch.float16) is want, cc
        assert smb.u_prepass_enabled(1, bf16) is False
        # the opt-in Gluon dx keeps its MMA in flight with the fused u
        assert smb.u_prepass_enabled(2, bf16, gluon_dx=True) is False
        # IEEE float32 (torch's default) and float64 dots run on FMA / DMMA: no wgmma to keep
        assert smb.u_prepass_enabled(2, torch.float64) is False
        tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            assert smb.u_prepass_enabled(2, fp32) is False
            torch.backends.cuda.matmul.allow_tf32 = True
            assert smb.u_prepass_enabled(2, fp32) is want, cc     # TF32: wgmma
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", "0")
    assert smb.u_prepass_enabled(2, bf16) is False
    monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", "1")
    assert smb.u_prepass_enabled(1, fp32) is True
    monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", "yes")
    with pytest.raises(ValueError, match="SWITCH_DIT_SMOD_DX_PREPASS"):
        smb.u_prepass_enabled(2, bf16)


def test_bad_merged_operand_knob_names_itself(monkeypatch):
    monkeypatch.setenv("SWITCH_DIT_SMOD_MERGED_OPERAND", "c")
    x, weight, b, weights, ids = make_inputs(2, 16, 24, 3, 2)
    with pytest.raises(ValueError, match="SWITCH_DIT_SMOD_MERGED_OPERAND"):
        switch_modulation_triton(x, weight, b, weights, ids)


# ---------------------------------------------------------------------------------------------
# The dW kernel's flat (unit, row chunk) loop: one split holding many units (several tuple runs and
# unit boundaries inside one pipelined loop), every unit its own split, and uneven splits.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("splits", ["1", "3", "7"])
@pytest.mark.parametrize("num_experts,k", [(5, 1), (5, 2), (3, 3)])
def test_dw_splits_match_reference_and_repeat_bitwise(monkeypatch, splits, num_experts, k):
    # B = 7 samples of N = 37 rows (a partial last row chunk per unit), D = 40 (partial tiles);
    # E = 5 prime with k = 1, 2 and k = E = 3. Two runs give the same bits.
    # The split buffer is NaN-filled first: a slice the reduction reads but no flush wrote shows.
    from switch_dit_kernels.kernels import buffers
    monkeypatch.setattr(buffers, "POISON", True)
    monkeypatch.setenv("SWITCH_DIT_SMOD_DW_SPLITS", splits)
    x, weight, b, weights, ids = make_inputs(7, 37, 40, num_experts, k)
    grad_r = torch.randn_like(x)
    _, y = switch_modulation_fwd_torch(x, weight, b, weights, ids)
    truth = switch_modulation_bwd_torch(as64(grad_r), as64(x), as64(weight), as64(b),
                                        as64(weights), ids)
    same = switch_modulation_bwd_torch(grad_r, x, weight, b, weights, ids)
    runs = [switch_modulation_bwd(grad_r, x, weight, b, weights, ids, y.clone()) for _ in range(2)]
    for name, g_, s_, t_ in zip(["dx", "dW", "db", "dg"], runs[0], same, truth):
        assert_close_rule(g_, s_, t_, torch.float32, name)
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_dw_split_count_fills_the_gpu():
    # The H200's 132 SMs, k = 2 (128x64 tiles), E = 3, B*N = 65536 rows: XL (D=1152, 162 tiles)
    # runs 4 splits = 648 programs; S (D=384, 18 tiles) 7 splits = 126 programs, one per SM
    # (never 1 split = 18 programs). Few rows make the split buffer's reduction dominate: fewer.
    from switch_dit_kernels.kernels.switch_modulation_bwd import choose_splits
    assert choose_splits(162, 132, 16, 65536, 3) == 4
    assert choose_splits(18, 132, 16, 65536, 3) == 7
    assert choose_splits(18, 132, 16, 2048, 3) < 7
    assert choose_splits(18, 132, 1, 65536, 3) == 1  # the memory budget's limit holds
    for tiles in (1, 18, 100, 162, 1000):
        assert 1 <= choose_splits(tiles, 132, 16, 65536, 8) <= 16


@pytest.mark.parametrize("routing", ["random", "shared"])
def test_dx_epilogue_writes_the_sums_of_u(routing):
    # The dx kernel's epilogue forms u = dR * x and its column sums per M tile (the dW kernel no
    # longer sums u): per unit (sample; the whole batch when shared) they add up to u's row sums.
    # N = 37: a partial last M tile; D = 40: a partial N tile. Rows past a config's tiles stay 0.
    from switch_dit_kernels.kernels.switch_modulation_bwd import dx_usum_tiles, launch_dx
    from switch_dit_kernels.kernels.switch_modulation import prepare_routing
    x, weight, b, weights, ids = make_inputs(3, 37, 40, 5, 2, routing=routing)
    batch, tokens, dim = x.shape
    grad_r = torch.randn_like(x)
    _, y = switch_modulation_fwd_torch(x, weight, b, weights, ids)
    g, ids32 = prepare_routing(weights, ids)
    units, rows = (1, batch * tokens) if routing == "shared" else (batch, tokens)
    wm = merge_experts(weight, b, g.reshape(-1), ids32.reshape(-1))[0] if units == 1 else weight
    tiles = dx_usum_tiles(rows)
    part = torch.zeros(units * tiles, dim)
    u = y.clone().reshape(-1, dim)
    dx = torch.full((batch * tokens, dim), float("nan"))
    launch_dx(grad_r.reshape(-1, dim), x.reshape(-1, dim), wm, g, ids32, u, dx, rows,
              premerged=units == 1, store_u=True, usum_part=part)
    want_u = grad_r.reshape(-1, dim) * x.reshape(-1, dim)
    torch.testing.assert_close(u, want_u)
    torch.testing.assert_close(part.view(units, tiles, dim).sum(1),
                               want_u.view(units, rows, dim).double().sum(1).float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["random", "shared"])
def test_params_only_bias_sums_without_dx(routing):
    # No dx wanted: the pre-pass kernel forms u and its per-unit sums in one pass (the dx epilogue
    # does not run); the shared path sums its S virtual units. N = 37, D = 40, E = 5, k = 2.
    x, weight, b, weights, ids = make_inputs(3, 37, 40, 5, 2, routing=routing)
    grad_r = torch.randn_like(x)
    _, y = switch_modulation_fwd_torch(x, weight, b, weights, ids)
    got = switch_modulation_bwd(grad_r, x, weight, b, weights, ids, y.clone(), need_dx=False)
    truth = switch_modulation_bwd_torch(as64(grad_r), as64(x), as64(weight), as64(b),
                                        as64(weights), ids)
    same = switch_modulation_bwd_torch(grad_r, x, weight, b, weights, ids)
    assert got[0] is None
    for name, g_, s_, t_ in list(zip(["dx", "dW", "db", "dg"], got, same, truth))[1:]:
        assert_close_rule(g_, s_, t_, torch.float32, name)


def test_reduce_partials_reads_only_written_slices():
    # Slices a split never flushed hold NaN (unwritten memory): never read. Fixed order, cast once.
    from switch_dit_kernels.kernels.switch_modulation_bwd import reduce_partials
    partial = torch.randn(3, 4, 37, 37)
    used = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.int32)
    partial[used == 0] = float("nan")
    want = torch.where(used[:, :, None, None].bool(), partial.double(), 0.0).sum(0)
    for dtype in (torch.float32, torch.float16):
        got = reduce_partials(partial, used, dtype)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=1e-3, atol=1e-5)
    assert torch.equal(reduce_partials(partial, used, torch.float32)[3], torch.zeros(37, 37))


# ---------------------------------------------------------------------------------------------
# Autotuning reruns a kernel while it times it: kernels that overwrite an input must survive that.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("u_given", [False, True])
def test_dx_kernel_survives_autotuner_reruns(u_given):
    # A 2-config autotuner with the production kernel's restore_value / reset_to_zero, whose
    # "benchmark" runs each config three times (do_bench runs it dozens of times on a GPU). With
    # the u pre-pass the epilogue adds the GEMM to dx: without dx restored, every timing run added
    # it once more (dx = dR*(1+y) + 7 * u W~^T here).
    import triton
    from switch_dit_kernels.kernels import switch_modulation_bwd as bwd
    production = bwd._switch_modulation_dx_kernel
    runs = []

    def bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
            runs.append(1)
        return [1.0] * len(quantiles)

    configs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4,
                             num_stages=1),
               # BLOCK_M >= the production list's smallest: dx_usum_tiles sizes the sums for it
               triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4,
                             num_stages=1)]
    tuned = triton.autotune(configs=configs, key=["N_u", "D"], do_bench=bench,
                            restore_value=production.restore_value,
                            reset_to_zero=production.reset_to_zero)(production.fn)
    torch.manual_seed(0)
    batch, tokens, dim, num_experts, k = 2, 32, 32, 3, 2
    x = torch.randn(batch * tokens, dim)
    dr = torch.randn(batch * tokens, dim)
    weight = torch.randn(num_experts, dim, dim) * 0.1
    g = torch.rand(batch, k)
    ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(batch)]).to(torch.int32)
    y0 = dr * x if u_given else torch.randn(batch * tokens, dim)
    dx0 = torch.randn(batch * tokens, dim)     # u given: what the pre-pass wrote, dR * (1 + y)
    tiles = bwd.dx_usum_tiles(tokens)

    def run(kernel):
        y, dx = y0.clone(), dx0.clone()
        usum = None if u_given else torch.zeros(batch * tiles, dim)
        bwd._switch_modulation_dx_kernel = kernel
        try:
            bwd.launch_dx(dr, x, weight, g, ids, y, dx, tokens, premerged=False,
                          store_u=not u_given, u_given=u_given, usum_part=usum)
        finally:
            bwd._switch_modulation_dx_kernel = production
        return y, dx, usum

    once = run(production)                      # the interpreter's single config: no timing runs
    again = run(tuned)
    assert len(runs) == 6
    for a, b in zip(once, again):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_untuned_autotuners_time_nothing(monkeypatch):
    # SWITCH_DIT_AUTOTUNE=0: Triton would still time the one kept config (dozens of runs a key).
    from switch_dit_kernels.kernels import tuning
    calls = []
    monkeypatch.setattr(tuning, "autotune_mode", lambda: "off")
    assert tuning.bench_unless_untuned(lambda: calls.append(1), (0.5, 0.2, 0.8)) == [0.0] * 3
    assert calls == []
