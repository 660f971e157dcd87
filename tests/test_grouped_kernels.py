"""Grouped-GEMM kernels (grouped_gemm, weight_grad, combine) vs their *_torch twins, launched on
NaN-poisoned output buffers so that any element a kernel fails to write shows up."""
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_testing import make_routing
from switch_dit_kernels import build_routing_metadata
from switch_dit_kernels.kernels.combine import combine, combine_torch, gate_grad, gate_grad_torch
from switch_dit_kernels.kernels.grouped_gemm import grouped_gemm, grouped_gemm_torch
from switch_dit_kernels.kernels.weight_grad import weight_grad, weight_grad_torch

NAN = float("nan")
# The launchers are called directly (no backend dispatch), so their tensors must be where Triton
# runs: the CPU through the interpreter (CI), else the GPU (gpu_check.sh runs this file on a CUDA
# machine, where conftest leaves TRITON_INTERPRET unset and a CPU pointer would be rejected).
DEVICE = ("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
          else "cpu")


def routing(num_routes, k, tokens_per_route, num_experts, pattern):
    _, ids = make_routing(num_routes, k, num_experts, pattern, DEVICE)
    return build_routing_metadata(ids, num_experts, tokens_per_route=tokens_per_route)


def randn(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=DEVICE)


def rand(*shape):
    return torch.rand(shape, device=DEVICE)


def poisoned(*shape, dtype=torch.float32):
    return torch.full(shape, NAN, dtype=dtype, device=DEVICE)


# (R, k, N, E, pattern): "sparse" routing over E = 6 leaves experts 0, 2, 4 without rows (empty
# experts before and between used ones; the last expert is used, so its tiles are the grid's
# last); N = 3 makes pair runs shorter than a tile. (Empty trailing experts and prime E are covered
# by the expert_linear / expert_mlp tests.)
META_ARGS = (9, 2, 3, 6, "sparse")

# Modes of the grouped GEMM, as the autograd layer uses them:
#   (gather, transpose_w, activation, backward activation, scale, scatter, bias)
GEMM_MODES = {
    "fwd-gather-bias": (True, False, None, False, False, False, True),    # expert_linear forward
    "fwd-act-gelu": (True, False, "gelu", False, False, False, True),      # MLP layer 1 (+ pre)
    "fwd-act-swiglu": (True, False, "swiglu", False, False, False, False),  # gated layer 1
    "dx-transposed-scaled": (True, True, None, False, True, False, False),  # dX rows (g * dY) W^T
    "bwd-act-geglu": (True, True, "geglu", True, True, False, False),     # dH -> d(pre), gated
    "bwd-act-relu": (True, True, "relu", True, True, False, False),       # dH -> d(pre)
    "sorted-scatter-k1": (False, False, None, False, True, True, True),   # k = 1 forward of layer 2
}


@pytest.mark.parametrize("mode", list(GEMM_MODES))
def test_grouped_gemm_modes(mode):
    gather, transpose_w, act, act_bwd, use_scale, scatter, use_bias = GEMM_MODES[mode]
    meta = routing(19, 1, 1, 5, "random") if scatter else routing(*META_ARGS)
    num_tokens = meta.num_routes * meta.tokens_per_route
    k_dim, w_cols = 37, 40  # odd K: a partial K step; 40 columns: a partial column tile
    a = randn(num_tokens if gather else meta.num_sorted_rows, k_dim)
    w_shape = (meta.num_experts,) + ((w_cols, k_dim) if transpose_w else (k_dim, w_cols))
    w = randn(*w_shape) / k_dim ** 0.5
    bias = randn(meta.num_experts, w_cols) if use_bias else None
    scale = rand(meta.sorted_pairs.numel()) if use_scale else None
    gated = act in ("swiglu", "geglu")
    pre = None
    if act_bwd:
        pre = randn(meta.num_sorted_rows, 2 * w_cols if gated else w_cols)
    kw = dict(bias=bias, gather=gather, transpose_w=transpose_w, activation=act, scale=scale,
              scatter=scatter, act_input=pre)
    want = grouped_gemm_torch(a, w, meta, store_pre=act is not None and not act_bwd, **kw)
    want_out, want_pre = want if isinstance(want, tuple) else (want, None)
    out = poisoned(*want_out.shape)
    pre_out = poisoned(*want_pre.shape) if want_pre is not None else None
    got = grouped_gemm(a, w, meta, store_pre=want_pre is not None, out=out, pre_out=pre_out, **kw)
    got_out = got[0] if isinstance(got, tuple) else got
    assert got_out is out
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    if want_pre is not None:
        torch.testing.assert_close(pre_out, want_pre, rtol=1e-5, atol=1e-5)


def test_grouped_gemm_float16_sorted_input():
    # float16 operands (fp32 accumulation), A already in sorted order, tokens_per_route = 24.
    meta = routing(2, 2, 24, 3, "random")
    a = randn(meta.num_sorted_rows, 24, dtype=torch.float16)
    w = (randn(3, 24, 24) / 5).half()
    out = poisoned(meta.num_sorted_rows, 24, dtype=torch.float16)
    grouped_gemm(a, w, meta, out=out)
    torch.testing.assert_close(out, grouped_gemm_torch(a, w, meta), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("gather_a,gather_b,use_scale,split,k_dim,n_out", [
    (True, True, True, 3, 37, 24),   # expert_linear: x^T (g * dY), both read through the index
    (False, True, True, 1, 37, 24),  # MLP dW2: h^T (g * dY), h already sorted
    (True, False, False, 2, 37, 24),  # MLP dW1: x^T d(pre)
    (True, False, True, 1, 70, 80),  # sorted dO with a scale; 3 x 3 tiles of dW[e] in groups of
                                     # 2 K tiles (the last group partial): every tile written once
])
def test_weight_grad(gather_a, gather_b, use_scale, split, k_dim, n_out):
    # split > 1 cuts each expert's rows into chunks (some empty for experts with few rows) whose
    # float32 partials are summed in a fixed order.
    meta = routing(*META_ARGS)
    num_tokens = meta.num_routes * meta.tokens_per_route
    a = randn(num_tokens if gather_a else meta.num_sorted_rows, k_dim)
    b = randn(num_tokens if gather_b else meta.num_sorted_rows, n_out)
    scale = rand(meta.sorted_pairs.numel()) if use_scale else None
    want_dw, want_db = weight_grad_torch(a, b, meta, gather_a=gather_a, gather_b=gather_b,
                                         scale=scale, with_bias=True)
    out, bias_out = poisoned(6, k_dim, n_out), poisoned(6, n_out)
    dw, db = weight_grad(a, b, meta, gather_a=gather_a, gather_b=gather_b, scale=scale,
                         with_bias=True, split=split, out=out, bias_out=bias_out)
    assert dw is out and db is bias_out
    torch.testing.assert_close(dw, want_dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, want_db, rtol=1e-5, atol=1e-5)
    assert (dw[0::2] == 0).all() and (db[0::2] == 0).all()  # experts without rows: exact zeros
    dw2, db2 = weight_grad(a, b, meta, gather_a=gather_a, gather_b=gather_b, scale=scale,
                           with_bias=True, split=split)
    assert torch.equal(dw, dw2) and torch.equal(db, db2)  # deterministic


@pytest.mark.parametrize("tokens_per_route,k", [(1, 3), (5, 2), (24, 1)])
def test_combine_and_gate_grad(tokens_per_route, k):
    # N = 1 (token routing), N = 5 and N = 24 (runs shorter / longer than a 16-row block).
    meta = routing(7, k, tokens_per_route, 5, "random")
    num_tokens = meta.num_routes * tokens_per_route
    h = randn(meta.num_sorted_rows, 37)
    gate = rand(meta.sorted_pairs.numel())
    out = poisoned(num_tokens, 37)
    combine(h, meta, gate, out=out)
    torch.testing.assert_close(out, combine_torch(h, meta, gate), rtol=1e-5, atol=1e-6)
    out_ng = poisoned(num_tokens, 37)
    combine(h, meta, None, out=out_ng)
    torch.testing.assert_close(out_ng, combine_torch(h, meta, None), rtol=1e-5, atol=1e-6)
    dy = randn(num_tokens, 37)
    dots = poisoned(meta.num_sorted_rows)
    dg = gate_grad(dy, h, meta, out=dots)
    assert dg.shape == (7, k) and dg.dtype == torch.float32
    torch.testing.assert_close(dg, gate_grad_torch(dy, h, meta), rtol=1e-5, atol=1e-5)


_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    import triton.language as tl
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        print("NO_CUDA_BACKEND")
        raise SystemExit(0)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from switch_dit_kernels.kernels import combine, grouped_gemm, weight_grad

    def build(fn, ints, ptrs, const, warps=8, stages=3):
        sig = {}
        for name in fn.arg_names:
            if name in const:
                sig[name] = "constexpr"
            elif name in ptrs:
                sig[name] = ptrs[name]
            else:
                sig[name] = "i32"
        # What the JIT would specialise at run time for multiples of 16.
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*") or n in ints}
        idx = {(fn.arg_names.index(n),): v for n, v in const.items()}
        src = ASTSource(fn=fn, signature=sig, constexprs=idx, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))

    bf = "*bf16"
    g = grouped_gemm._grouped_gemm_body
    gp = dict(a_ptr=bf, w_ptr=bf, bias_ptr=bf, scale_ptr="*fp32", pre_ptr=bf, out_ptr=bf,
              offsets_ptr="*i32", sorted_pairs_ptr="*i32")
    gi = {"K", "N_OUT", "stride_am", "stride_we", "stride_be", "stride_pre", "stride_om"}
    base = dict(GATHER_A=True, SCATTER_OUT=False, HAS_BIAS=True, HAS_SCALE=False, ACT=0,
                GATED=False, STORE_PRE=False, ACT_BWD=False, PRECISION="tf32", ACC=tl.float32,
                EVEN_K=True,
                EVEN_N=True, BLOCK_E=16, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    variants = [
        dict(stride_wn=1),                                                   # forward
        dict(stride_wn=1, ACT=1, GATED=True, STORE_PRE=True, EVEN_K=False, EVEN_N=False),
        dict(stride_wk=1, ACT=3, GATED=True, ACT_BWD=True, HAS_SCALE=True, HAS_BIAS=False),
        dict(stride_wk=1, GATHER_A=False, SCATTER_OUT=True, HAS_SCALE=True, ACT=2, ACT_BWD=True),
    ]
    for v in variants:
        k = build(g, gi, gp, {**base, **v})
        # The weight tiles must be pipelined (cp.async), not loaded synchronously.
        assert k.asm["ttgir"].count("async_copy_global_to_local") >= 2, v
    w = weight_grad._weight_grad_body
    build(w, {"K", "N_OUT", "stride_am", "stride_bm", "stride_dw_split", "stride_db_split"},
          dict(a_ptr=bf, b_ptr=bf, dw_ptr="*fp32", db_ptr="*fp32",
               offsets_ptr="*i32", sorted_pairs_ptr="*i32"),
          dict(GATHER_A=True, GATHER_B=True, HAS_DB=True, PRECISION="tf32",
               ACC=tl.float32, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_K=8))
    build(weight_grad._scale_sorted_rows_kernel, {"N_OUT", "stride_bm"},
          dict(b_ptr=bf, scale_ptr="*fp32", out_ptr=bf, sorted_pairs_ptr="*i32"),
          dict(GATHER_B=True, ACC=tl.float32, BLOCK_R=32, BLOCK_N=128), warps=4)
    build(combine._combine_kernel, {"D", "stride_h", "stride_y"},
          dict(h_ptr=bf, gate_ptr="*fp32", pair_to_sorted_ptr="*i32", y_ptr=bf),
          dict(HAS_GATE=True, ACC=tl.float32, BLOCK_T=16, BLOCK_D=256), warps=4)
    build(combine._pair_row_dot_kernel, {"D", "stride_dy", "stride_h"},
          dict(dy_ptr=bf, h_ptr=bf, pair_to_sorted_ptr="*i32", out_ptr="*fp32"),
          dict(ACC=tl.float32, BLOCK_Q=16, BLOCK_D=256), warps=4)
    print("compiled")
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    # The interpreter never runs Triton's compiler; this compiles the main kernel variants for an
    # H100/H200 (sm_90) without a GPU, in a process without TRITON_INTERPRET, so code-generation
    # errors (and unpipelined weight loads) fail here instead of on the GPU machines.
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource / GPUTarget API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    if "NO_CUDA_BACKEND" in proc.stdout:
        pytest.skip("Triton's CUDA backend is not available here")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


def test_nan_in_one_token_stays_in_its_experts():
    # Token routing (N = 1, k = 2, E = 5): a NaN in token 0's x and dY rows reaches dW / db of the
    # two experts token 0 uses, token 0's combined output and its gate gradients, nothing else.
    meta = routing(11, 2, 1, 5, "random")
    x, dy = randn(11, 24), randn(11, 16)
    scale = rand(meta.sorted_pairs.numel())
    x_nan, dy_nan = x.clone(), dy.clone()
    x_nan[0, 3] = NAN
    dy_nan[0, 5] = NAN
    used = set()
    sorted_rows = meta.sorted_row_sources().tolist()
    offsets = meta.expert_offsets.tolist()
    for e in range(5):
        if 0 in sorted_rows[offsets[e]:offsets[e + 1]]:
            used.add(e)
    assert len(used) == 2
    free = [e for e in range(5) if e not in used]
    dw, db = weight_grad(x_nan, dy_nan, meta, gather_a=True, gather_b=True, scale=scale,
                         with_bias=True, split=2)
    dw_c, db_c = weight_grad(x, dy, meta, gather_a=True, gather_b=True, scale=scale,
                             with_bias=True, split=2)
    assert torch.isnan(dw[sorted(used)]).any()
    torch.testing.assert_close(dw[free], dw_c[free], rtol=0, atol=0)
    torch.testing.assert_close(db[free], db_c[free], rtol=0, atol=0)
    h = randn(meta.num_sorted_rows, 16)
    h_nan = h.clone()
    h_nan[sorted_rows.index(0)] = NAN  # one of token 0's expert rows
    y, y_c = combine(h_nan, meta, scale), combine(h, meta, scale)
    torch.testing.assert_close(y[1:], y_c[1:], rtol=0, atol=0)
    dg, dg_c = gate_grad(dy_nan, h_nan, meta), gate_grad(dy, h, meta)
    torch.testing.assert_close(dg[1:], dg_c[1:], rtol=0, atol=0)


def test_autotune_keys_hold_every_kernel_constexpr():
    # A constexpr missing from an autotuner's key lets one variant (e.g. PREMERGED, STORE_Y) reuse
    # the config timed for another. Every constexpr of each tuned kernel is either in the key or
    # set by the configs; ACC follows the dtype, which Triton adds to the key itself.
    import triton
    from switch_dit_kernels.kernels import grouped_gemm as gg, switch_modulation as sm
    from switch_dit_kernels.kernels import switch_modulation_bwd as smb, weight_grad as wg
    tuned = [gg._kernel(), wg._kernel(), sm._switch_modulation_fwd_kernel,
             smb._switch_modulation_dx_kernel, smb._switch_modulation_dw_kernel]
    for tuner in tuned:
        assert isinstance(tuner, triton.runtime.autotuner.Autotuner)
        fn = tuner.fn
        while hasattr(fn, "fn"):  # Heuristics / JITFunction / the interpreter's wrapper
            fn = fn.fn
        by_config = {name for c in tuner.configs for name in c.kwargs}
        constexprs = {name for name, p in inspect.signature(fn).parameters.items()
                      if "constexpr" in str(p.annotation)}
        assert "BLOCK_M" in constexprs or "BLOCK_I" in constexprs, fn.__name__
        missing = constexprs - set(tuner.keys) - by_config - {"ACC"}
        assert not missing, f"{fn.__name__}: constexprs {sorted(missing)} not in the autotune key"


def test_autotune_cache_switch(monkeypatch):
    # Persistent autotune results (Triton's cache_results) on GPUs by default, off with
    # SWITCH_DIT_AUTOTUNE_CACHE=0 and always off in the interpreter (nothing is timed there).
    from switch_dit_kernels.kernels import tuning
    assert not tuning.autotune_cache_enabled() or not tuning.triton_interpreting()
    monkeypatch.setattr(tuning, "triton_interpreting", lambda: False)
    monkeypatch.delenv("SWITCH_DIT_AUTOTUNE_CACHE", raising=False)
    assert tuning.autotune_cache_enabled()
    monkeypatch.setenv("SWITCH_DIT_AUTOTUNE_CACHE", "0")
    assert not tuning.autotune_cache_enabled()
    monkeypatch.setattr(tuning, "triton_interpreting", lambda: True)
    monkeypatch.delenv("SWITCH_DIT_AUTOTUNE_CACHE", raising=False)
    assert not tuning.autotune_cache_enabled()


@pytest.mark.parametrize("split", [1, 2])
def test_weight_grad_with_no_routed_rows(split):
    # T = 0: no sorted rows (sorted_pairs is empty). The kernel's loop always runs one (masked)
    # step, which would read sorted_pairs[0]; the launcher writes the zeros itself instead.
    ids = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    meta = build_routing_metadata(ids, 3, tokens_per_route=1)
    out, bias_out = poisoned(3, 24, 16), poisoned(3, 16)
    dw, db = weight_grad(randn(0, 24), randn(0, 16), meta, gather_a=True, gather_b=True,
                         scale=rand(0), with_bias=True, split=split, out=out, bias_out=bias_out)
    assert torch.equal(dw, torch.zeros(3, 24, 16, device=DEVICE))
    assert torch.equal(db, torch.zeros(3, 16, device=DEVICE))
