"""The opt-in Gluon (sm_90) forward/dx of switch_modulation: when it applies, how it is wired, and,
on an H100/H200, its results against the float64 reference and the Triton twin.

The CPU interpreter cannot run Gluon, so on the CPU this file checks the gating (which calls take
the Gluon path), the tile/shared-memory arithmetic and the dispatch; `make compile-check` reads the
compiled sm_90 code (MMA kept in flight, no C7515, no spills). The GPU-marked tests are what makes
the path trustworthy: they run in benchmarks/gpu_check.sh's tests_gluon stage, first.
"""
import os

import pytest
import torch

from switch_dit_kernels.kernels import switch_modulation as smod
from switch_dit_kernels.kernels import switch_modulation_bwd as smod_bwd
from switch_dit_kernels.kernels import switch_modulation_gluon as sg
from switch_dit_kernels.modulation_ops import switch_modulation_triton

from test_switch_modulation import check_against_reference, forward_and_grads, make_inputs


@pytest.fixture
def gluon_on(monkeypatch):
    """SWITCH_DIT_SMOD_GLUON=1, counting the Gluon launches (a test must see the path it tests)."""
    monkeypatch.setenv("SWITCH_DIT_SMOD_GLUON", "1")
    calls = {"fwd": 0, "dx": 0}
    fwd, dx = sg.launch_fwd_gluon, sg.launch_dx_gluon

    def count_fwd(*args, **kwargs):
        calls["fwd"] += 1
        return fwd(*args, **kwargs)

    def count_dx(*args, **kwargs):
        calls["dx"] += 1
        return dx(*args, **kwargs)

    monkeypatch.setattr(sg, "launch_fwd_gluon", count_fwd)
    monkeypatch.setattr(sg, "launch_dx_gluon", count_dx)
    return calls


# ---------------------------------------------------------------------------------------------
# CPU: gating, tiles, dispatch.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k_loads", [1, 2, 3, 4])
@pytest.mark.parametrize("forms_u", [False, True])
def test_tiles_fit_and_keep_the_pipeline(k_loads, forms_u):
    bm, bn, bk, warps, stages = sg.gluon_tile(k_loads, forms_u)
    assert stages >= 3  # the copies run STAGES - 2 steps ahead of the merge
    assert sg.gluon_smem_bytes(bm, bn, bk, stages, k_loads, forms_u) <= 200 * 1024
    assert bm * bn <= 64 * 32 * warps  # at most 64 fp32 accumulators a thread (no spill)


def test_smem_count_matches_the_allocations():
    # k=2 forward at 128x128x64, 3 stages: ring 3 x (x 16 KB + 2 experts 32 KB) + 2 merged 16 KB
    assert sg.gluon_smem_bytes(128, 128, 64, 3, 2, False) == (3 * (16 + 32) + 32) * 1024
    # dx forming u adds a dR chunk per stage and two u buffers
    assert sg.gluon_smem_bytes(128, 128, 32, 4, 2, True) == (4 * (16 + 16) + 16 + 16) * 1024


def test_too_many_experts_per_step_has_no_tile():
    with pytest.raises(ValueError, match="Triton kernel"):
        sg.gluon_tile(8, True)


def test_off_by_default_and_off_the_gpu(monkeypatch):
    x = torch.zeros(2, 4, 16, dtype=torch.bfloat16)
    real_device_check = sg._is_sm90
    monkeypatch.delenv("SWITCH_DIT_SMOD_GLUON", raising=False)
    monkeypatch.setattr(sg, "gluon_supported", lambda: True)
    monkeypatch.setattr(sg, "_is_sm90", lambda t: True)
    assert not sg.gluon_enabled(x)                      # opt-in only
    monkeypatch.setenv("SWITCH_DIT_SMOD_GLUON", "1")
    assert sg.gluon_enabled(x)
    assert not sg.gluon_enabled(x.float())              # fp32: IEEE dots, not wgmma
    monkeypatch.setattr(sg, "_is_sm90", real_device_check)
    assert not sg.gluon_enabled(x)                      # CPU tensors: not a Hopper GPU
    monkeypatch.setattr(sg, "_is_sm90", lambda t: True)
    monkeypatch.setattr(sg, "gluon_supported", lambda: False)
    assert not sg.gluon_enabled(x)                      # another Triton's Gluon API


def test_real_device_check_refuses_cpu_tensors():
    assert not sg._is_sm90(torch.zeros(1))


def test_applies_only_to_aligned_calls(monkeypatch):
    monkeypatch.setenv("SWITCH_DIT_SMOD_GLUON", "1")
    monkeypatch.setattr(sg, "gluon_supported", lambda: True)
    monkeypatch.setattr(sg, "_is_sm90", lambda t: True)
    x = torch.zeros(2, 4, 48, dtype=torch.bfloat16)
    assert sg.gluon_applies(2, True, x, x)
    assert not sg.gluon_applies(8, True, x, x)          # no tile fits: the Triton kernel runs
    # k = 6: the forward's ring fits, the dx ring (dR chunks, u buffers too) does not
    assert sg.gluon_applies(6, False, x) and not sg.gluon_applies(6, True, x)
    odd = torch.zeros(2, 4, 40, dtype=torch.bfloat16)   # D % 16 != 0: no divisibility hint
    assert not sg.gluon_applies(2, True, odd)
    base = torch.zeros(2 * 4 * 48 + 1, dtype=torch.bfloat16)
    shifted = base[1:].view(2, 4, 48)                   # 2-byte offset: no 16-byte cp.async
    assert not sg.gluon_applies(2, True, x, shifted)
    assert not sg.gluon_applies(2, True, x, x.half())   # copied into x-typed shared buffers


def test_tile_override(monkeypatch):
    monkeypatch.setenv("SWITCH_DIT_SMOD_GLUON_TILE", "64,3")
    assert sg.gluon_tile(2, False)[2:] == (64, 8, 3)
    with pytest.raises(ValueError, match="SWITCH_DIT_SMOD_GLUON_TILE"):
        sg.gluon_tile(2, True)                          # 64,3 does not fit dx with k = 2
    monkeypatch.setenv("SWITCH_DIT_SMOD_GLUON_TILE", "256,64,32,6")
    assert sg.gluon_tile(2, False) == (256, 64, 32, 8, 6)
    monkeypatch.setenv("SWITCH_DIT_SMOD_GLUON_TILE", "64,128,64,4")
    assert sg.gluon_tile(1, False) == (64, 128, 64, 4, 4)   # one warpgroup for 64 rows
    for bad in ("64", "64,2", "48,4", "a,b", "96,64,32,4", "256,64,32", "256,64,32,2"):
        monkeypatch.setenv("SWITCH_DIT_SMOD_GLUON_TILE", bad)
        with pytest.raises(ValueError, match="SWITCH_DIT_SMOD_GLUON_TILE"):
            sg.gluon_tile(1, False)


def test_gluon_dx_keeps_the_fused_u_on_sm90(monkeypatch):
    # On sm_90 the backward forms u in a pre-pass for k >= 2 (the Triton dx would wait for every
    # wgmma), but not where the Gluon dx runs: its own ring keeps the MMA in flight with the
    # fused u, and a pre-pass would only add two x-sized round trips.
    from switch_dit_kernels.kernels import tuning
    monkeypatch.setattr(tuning, "target_capability", lambda: 90)
    monkeypatch.delenv("SWITCH_DIT_SMOD_DX_PREPASS", raising=False)
    dx_calls, prepass_calls = [], []
    monkeypatch.setattr(sg, "gluon_applies", lambda k_loads, forms_u, *tensors: True)
    monkeypatch.setattr(sg, "launch_dx_gluon", lambda *a, **kw: dx_calls.append(kw))
    real = smod_bwd.launch_u_prepass
    monkeypatch.setattr(smod_bwd, "launch_u_prepass",
                        lambda *a: prepass_calls.append(1) or real(*a))
    # float16: the dtype matters (IEEE float32 dots are FMA: no pre-pass there either way)
    x, weight, b, weights, ids = make_inputs(3, 8, 16, 3, 2, dtype=torch.float16)
    smod_bwd.switch_modulation_bwd(torch.randn_like(x), x, weight, b, weights, ids,
                                   torch.randn_like(x))
    assert len(dx_calls) == 1 and not dx_calls[0]["u_given"] and not prepass_calls
    # the same call without the Gluon dx takes the pre-pass
    monkeypatch.setattr(sg, "gluon_applies", lambda k_loads, forms_u, *tensors: False)
    smod_bwd.switch_modulation_bwd(torch.randn_like(x), x, weight, b, weights, ids,
                                   torch.randn_like(x))
    assert prepass_calls and len(dx_calls) == 1


@pytest.mark.parametrize("shared", [False, True])
def test_launchers_route_to_gluon_with_the_same_arguments(monkeypatch, shared):
    # The forward and dx launchers hand the Gluon twin exactly what the Triton kernel would get.
    seen = []
    monkeypatch.setattr(sg, "gluon_applies", lambda k_loads, forms_u, *tensors: True)
    monkeypatch.setattr(sg, "launch_fwd_gluon", lambda *a, **kw: seen.append(("fwd", a, kw)))
    monkeypatch.setattr(sg, "launch_dx_gluon", lambda *a, **kw: seen.append(("dx", a, kw)))
    x, weight, b, weights, ids = make_inputs(3, 8, 16, 3, 2, routing="shared" if shared else "random")
    r, y, _ = smod.switch_modulation_fwd(x, weight, b, weights, ids, store_y=True)
    assert [s[0] for s in seen] == ["fwd"] and seen[0][2] == {"premerged": shared}
    args = seen[0][1]
    assert args[0].shape == (24, 16) and args[5] == (24 if shared else 8)
    assert args[6].data_ptr() == r.data_ptr() and args[7].data_ptr() == y.data_ptr()
    smod_bwd.switch_modulation_bwd(torch.randn_like(x), x, weight, b, weights, ids, y,
                                   need_params=False)
    assert [s[0] for s in seen] == ["fwd", "dx"]
    assert seen[1][2]["premerged"] == shared and not seen[1][2]["store_u"]
    assert not seen[1][2]["u_given"] and seen[1][2]["usum_part"] is None
    # a training backward with a bias: u over y and the column sums of u from the dx epilogue
    seen.clear()
    r, y, _ = smod.switch_modulation_fwd(x, weight, b, weights, ids, store_y=True)
    smod_bwd.switch_modulation_bwd(torch.randn_like(x), x, weight, b, weights, ids, y)
    kw = seen[1][2]
    assert kw["store_u"] and kw["usum_part"] is not None and kw["usum_part"].dtype == torch.float32
    assert kw["usum_tiles"] * 128 >= seen[1][1][7]       # rows_per_unit: the Gluon M tiles fit


def test_compiles_with_mma_in_flight_for_sm90():
    # Only where this Triton is the one the kernels are written for (3.6, as `make compile-check`).
    if not sg.gluon_supported():
        pytest.skip("Gluon kernels are read under Triton 3.6 (make compile-check)")
    import re
    from triton.backends.compiler import GPUTarget  # noqa: F401 - presence check
    compile_check = pytest.importorskip("benchmarks.compile_check")
    spec = compile_check._gluon_specs()[0]
    fn = compile_check.resolve(spec)[0]
    for variant in spec.variants:
        r = compile_check.compile_one(fn, spec, variant, "bf16", 90, {}, variant.warps, 1, True)
        assert r.ok, r.error
        assert r.mma == "wgmma" and r.pipe == "ok", (variant.name, r.pipe_why)
        assert r.spill == 0
        assert re.search(r"wait_group .*1", r.pipe_why)


# ---------------------------------------------------------------------------------------------
# GPU (H100/H200): results against the float64 reference and the Triton twin.
# ---------------------------------------------------------------------------------------------
def _needs_sm90():
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("the Gluon kernels target sm_90 (H100/H200)")
    if not sg.gluon_supported():
        pytest.skip("Gluon kernels are written for Triton 3.6")


# (B, N, D, E, k, bias, routing): the edge each case covers.
GPU_CASES = [
    (4, 256, 1152, 3, 2, True, "random"),   # Switch-DiT-XL/2's layer: 18 K steps, 9 N tiles
    (6, 256, 384, 3, 2, True, "random"),    # S/2's D=384: 6 K steps, 3 N tiles
    (3, 37, 48, 5, 3, True, "random"),      # N=37 partial M tile; D=48 < BLOCK_K (K tail); E prime
    (5, 200, 144, 3, 1, False, "random"),   # k=1 (no merge, acc scaled by g); D=144: K tail of 16
    (4, 130, 256, 5, 4, True, "random"),    # k=4: BLOCK_K 32; N=130 two M tiles, one of 2 rows
    (8, 256, 384, 3, 2, True, "shared"),    # one routing row: premerged W~, a dense GEMM
    (4, 64, 256, 3, 2, True, "unused"),     # experts 1, 3, 4... serve no sample
    (2, 40, 32, 3, 1, True, "random"),      # D=32: 1 K step while the ring prefetches more (masked)
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gluon_matches_reference(gluon_on, case, dtype):
    _needs_sm90()
    batch, tokens, dim, experts, k, bias, routing = case
    x, weight, b, weights, ids = make_inputs(batch, tokens, dim, experts, k, dtype=dtype, bias=bias,
                                             routing=routing, device="cuda")
    check_against_reference(x, weight, b, weights, ids, dtype)
    assert gluon_on["fwd"] >= 1 and gluon_on["dx"] >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("tile", ["64,3", "256,64,32,6", "64,128,64,4"])
@pytest.mark.parametrize("case", [(4, 256, 384, 3, 2, True, "random"),
                                  (3, 37, 48, 5, 3, True, "random")])
def test_gpu_gluon_alternative_tiles(gluon_on, monkeypatch, tile, case):
    # The SWITCH_DIT_SMOD_GLUON_TILE shapes the benchmarks time (BLOCK_M 256 and 64, BLOCK_K 64
    # at 3 stages); where one does not fit a kernel, that kernel falls back to Triton.
    _needs_sm90()
    monkeypatch.setenv("SWITCH_DIT_SMOD_GLUON_TILE", tile)
    batch, tokens, dim, experts, k, bias, routing = case
    x, weight, b, weights, ids = make_inputs(batch, tokens, dim, experts, k, dtype=torch.bfloat16,
                                             bias=bias, routing=routing, device="cuda")
    check_against_reference(x, weight, b, weights, ids, torch.bfloat16)
    assert gluon_on["fwd"] >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("routing", ["random", "shared"])
def test_gpu_gluon_writes_every_output_element(gluon_on, routing):
    # Launch into NaN-filled buffers: an unwritten tile (a partial M tile, the K/N tails) keeps
    # its NaN. N=37 and D=48: one partial M tile per sample, D below BLOCK_K. (The numerics are
    # held to the 2x-PyTorch rule by test_gpu_gluon_matches_reference; here bf16-level agreement.)
    _needs_sm90()
    from switch_dit_kernels.kernels.switch_modulation_bwd import switch_modulation_bwd_torch
    x, weight, b, weights, ids = make_inputs(3, 37, 48, 3, 2, dtype=torch.bfloat16,
                                             routing=routing, device="cuda")
    nan = float("nan")
    r, y = torch.full_like(x, nan), torch.full_like(x, nan)
    smod.switch_modulation_fwd(x, weight, b, weights, ids, store_y=True, out=r, y_out=y)
    r_ref, y_ref = smod.switch_modulation_fwd_torch(x, weight, b, weights, ids)
    torch.testing.assert_close(r, r_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    grad_r = torch.randn_like(x)
    dx = torch.full_like(x, nan)
    got = smod_bwd.switch_modulation_bwd(grad_r, x, weight, b, weights, ids, y.clone(), dx_out=dx)
    want = switch_modulation_bwd_torch(grad_r, x, weight, b, weights, ids)
    for name, g_, w_ in zip(["dx", "dW", "db", "dg"], got, want):
        assert torch.isfinite(g_).all(), name
        torch.testing.assert_close(g_.float(), w_.float(), rtol=5e-2, atol=5e-2, msg=name)
    assert gluon_on["fwd"] == 1 and gluon_on["dx"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("routing", ["random", "shared"])
def test_gpu_gluon_with_u_prepass(gluon_on, monkeypatch, routing):
    _needs_sm90()
    monkeypatch.setenv("SWITCH_DIT_SMOD_DX_PREPASS", "1")
    x, weight, b, weights, ids = make_inputs(4, 256, 384, 3, 2, dtype=torch.bfloat16,
                                             routing=routing, device="cuda")
    check_against_reference(x, weight, b, weights, ids, torch.bfloat16)
    assert gluon_on["dx"] >= 1


@pytest.mark.gpu
def test_gpu_gluon_agrees_with_triton_and_is_deterministic(gluon_on, monkeypatch):
    _needs_sm90()
    x, weight, b, weights, ids = make_inputs(8, 256, 1152, 3, 2, dtype=torch.bfloat16,
                                             device="cuda")
    grad_r = torch.randn_like(x)
    first = forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)
    second = forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    monkeypatch.setenv("SWITCH_DIT_SMOD_GLUON", "0")
    triton_twin = forward_and_grads(switch_modulation_triton, x, weight, b, weights, ids, grad_r)
    # Same fp32 merge and one cast, fp32 accumulation: only the summation order of the K steps
    # may differ (wgmma instruction order), a few bf16 ulps at most.
    for name, a, c in zip(["r", "dx"], first[:2], triton_twin[:2]):
        err = (a.float() - c.float()).abs().max().item()
        assert err <= 4 * 2.0 ** -7 * c.float().abs().max().item(), f"{name}: {err}"
    assert os.environ["SWITCH_DIT_SMOD_GLUON"] == "0"
