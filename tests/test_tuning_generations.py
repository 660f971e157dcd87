"""Autotune config lists per GPU generation: the pruners pick the launch-time GPU's curated list.

The capability lookup (`tuning.target_capability`) is monkeypatched: these run on the CPU, where
the pruners never see a GPU, and the interpreter is switched off in `tuning` only so the GPU config
lists are built (nothing is launched).
"""
from types import SimpleNamespace

import pytest
import torch

from switch_dit_kernels.kernels import grouped_gemm, switch_modulation, tuning, weight_grad
from switch_dit_kernels.kernels.switch_modulation import SMOD_CURATED, SMOD_SPACE

GENERATIONS = {90: "hopper", 80: "ampere", 86: "ampere", 89: "ampere", 75: "default",
               100: "default", None: "default"}
# (curated lists, whole space) of each kernel family
FAMILIES = {
    "gemm": (tuning.GEMM_CURATED, tuning.GEMM_SPACE),
    "weight_grad": (tuning.WEIGHT_GRAD_CURATED, tuning.WEIGHT_GRAD_SPACE),
    "smod": (SMOD_CURATED, SMOD_SPACE),
}


@pytest.fixture
def gpu(monkeypatch):
    """use(cc): behave as a GPU process launching on compute capability ``cc`` (None: no GPU)."""
    monkeypatch.setattr(tuning, "triton_interpreting", lambda: False)
    monkeypatch.delenv("SWITCH_DIT_AUTOTUNE", raising=False)
    monkeypatch.delenv("SWITCH_DIT_SMOD_AUTOTUNE", raising=False)

    def use(cc):
        monkeypatch.setattr(tuning, "target_capability", lambda: cc)
    return use


def points(configs):
    return [tuning.config_point(c) for c in configs]


def prune(family, dtype=torch.bfloat16, *, dx=False, rows=256, dim=1152, **kwargs):
    """The kernel family's pruner on its whole config list for a Switch-DiT-XL-sized launch."""
    x = torch.empty(0, dtype=dtype)
    if family == "gemm":
        return tuning.prune_gemm_configs(tuning.grouped_gemm_configs(),
                                         {"a_ptr": x, "K": dim, "N_OUT": dim}, **kwargs)
    if family == "weight_grad":
        return tuning.prune_weight_grad_configs(tuning.weight_grad_configs(),
                                                {"a_ptr": x, "K": dim, "N_OUT": dim}, **kwargs)
    named = {"x_ptr": x, "N_u": rows, "D": dim, **({"dr_ptr": x} if dx else {})}
    return switch_modulation.prune_fwd_configs(switch_modulation.fwd_configs(interpreting=False),
                                               named, **{"K_EXP": 2, **kwargs})


@pytest.mark.parametrize("cc", sorted(GENERATIONS, key=str))
def test_generation_of_capability(cc):
    assert tuning.generation(cc) == GENERATIONS[cc]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_curated_lists_are_short_subsets_of_the_space(family):
    curated, space = FAMILIES[family]
    assert set(curated) == {"hopper", "ampere"}
    for gen, pts in curated.items():
        assert 2 <= len(pts) <= 6, (family, gen)
        assert len(set(pts)) == len(pts), (family, gen)
        missing = [p for p in pts if p not in space]  # for_generation would drop them silently
        assert not missing, (family, gen, missing)


@pytest.mark.parametrize("cc", [90, 80, 89])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruner_keeps_the_generation_list(gpu, family, cc):
    # The plain XL launch (bf16, D = 1152, N = 256, k = 2): every curated config of the generation
    # fits it (shared memory of that GPU, registers), so the pruner keeps exactly the list, in its
    # order; the sm_89 budget (96 KB) drops the one switch_modulation config over it.
    gpu(cc)
    curated = FAMILIES[family][0][GENERATIONS[cc]]
    kept = points(prune(family))
    if family == "smod" and cc == 89:
        assert kept == [p for p in curated if p != (128, 64, 64, 4, 4)]
    else:
        assert kept == list(curated)


@pytest.mark.parametrize("cc", [90, 80, 86, 89])
def test_every_kept_config_passes_the_constraints(gpu, cc):
    # Over the launch variants and dtypes: whatever the pruner keeps is from the generation's list
    # and within that GPU's shared memory and the register rules.
    gpu(cc)
    limit = {90: 220, 80: 160, 86: 96, 89: 96}[cc] * 1024
    gen = GENERATIONS[cc]
    for dtype in (torch.bfloat16, torch.float32):
        elt = torch.empty(0, dtype=dtype).element_size()
        for kw in (dict(), dict(GATED=True, ACT=3, STORE_PRE=True), dict(ACT=2, STORE_PRE=True),
                   dict(GATHER_A=False), dict(SCATTER_OUT=True)):
            gated = kw.get("GATED", False)
            acc = 64 if (gated or kw.get("ACT") or kw.get("STORE_PRE")) else 128
            kept = prune("gemm", dtype, **kw)
            for c in kept:
                bm, bn, bk, warps, stages = tuning.config_point(c)
                # or the pruner's fallback where nothing listed fits: the smallest listed tile
                # with fewer stages (fp32 gated on sm_86/89)
                assert tuning.config_point(c) in tuning.GEMM_CURATED[gen] or (
                    len(kept) == 1 and (bm, bn, bk, warps) == (64, 64, 64, 4)), (kw, c)
                assert (bm * bk + (1 + gated) * bk * bn) * elt * stages <= limit
                assert bm * bn * (1 + gated) <= acc * 32 * warps
        for c in prune("weight_grad", dtype):
            bm, bn, bk, warps, stages = tuning.config_point(c)
            assert tuning.config_point(c) in tuning.WEIGHT_GRAD_CURATED[gen]
            assert (bk * bm + bm * bn) * elt * stages <= limit and bk * bn <= 128 * 32 * warps
        for k in (1, 2, 4):
            for dx in (False, True):
                for c in prune("smod", dtype, dx=dx, K_EXP=k):
                    bm, bn, bk, warps, stages = tuning.config_point(c)
                    # 64x64x32 w4 with 1-2 stages: the pruner's own fallback where no tile of any
                    # list fits (fp32, k = 4, dx), built to fit
                    assert tuning.config_point(c) in SMOD_CURATED[gen] or \
                        ((bm, bn, bk, warps) == (64, 64, 32, 4) and stages <= 2)
                    loads = 1 if k == 1 else k
                    assert stages * ((1 + dx) * bm * bk + loads * bk * bn) * elt <= min(limit,
                                                                                        200 * 1024)
                    assert bm * bn <= 64 * 32 * warps


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_generations_keep_the_whole_list(gpu, family):
    # No list of their own (Blackwell, Turing, no GPU): the pruner filters the whole space as before.
    gpu(100)
    blackwell = points(prune(family))
    gpu(None)
    assert points(prune(family)) == blackwell
    space = FAMILIES[family][1]
    assert set(blackwell) <= set(space)
    assert len(blackwell) > len(FAMILIES[family][0]["hopper"]) or family == "weight_grad"


@pytest.mark.parametrize("cc", [90, 80])
def test_untuned_keeps_the_first_that_fits(gpu, monkeypatch, cc):
    gpu(cc)
    monkeypatch.setenv("SWITCH_DIT_AUTOTUNE", "0")
    gen = GENERATIONS[cc]
    for family, (curated, _) in FAMILIES.items():
        assert points(prune(family)) == [curated[gen][0]], family
    if cc == 90:
        # gated: the 64-values-a-thread tile; float32 gated: the small fallback (shared memory)
        assert points(prune("gemm", GATED=True, ACT=3, STORE_PRE=True)) == [(128, 64, 64, 8, 4)]
        assert points(prune("gemm", torch.float32, GATED=True, ACT=3, STORE_PRE=True)) == \
            [(64, 64, 64, 4, 3)]


def test_full_mode_ignores_the_generation_list(gpu, monkeypatch):
    gpu(90)
    monkeypatch.setenv("SWITCH_DIT_AUTOTUNE", "full")
    assert tuning.autotune_mode() == "full"
    kept = points(prune("gemm"))
    assert (128, 128, 32, 4, 4) in kept and len(kept) > len(tuning.GEMM_CURATED["hopper"])
    # switch_modulation's space grows to all 48 points + the 256-row tile
    space = switch_modulation.fwd_configs(interpreting=False)
    assert len(space) == 49
    assert len(prune("smod")) > len(SMOD_CURATED["hopper"])


def test_interpreter_uses_its_single_small_config(monkeypatch):
    # Under TRITON_INTERPRET=1 (this test process on a CPU): one config per kernel, so Triton never
    # calls the pruner (nothing timed), whatever the knobs say.
    if not tuning.triton_interpreting():
        pytest.skip("runs under the interpreter")
    monkeypatch.setenv("SWITCH_DIT_AUTOTUNE", "full")
    assert tuning.autotune_mode() == "off" and not tuning.autotuning_enabled()
    for configs in (tuning.grouped_gemm_configs(), tuning.weight_grad_configs(),
                    switch_modulation.fwd_configs()):
        assert len(configs) == 1 and configs[0].kwargs["BLOCK_M"] <= 32
    for kernel in (grouped_gemm._kernel(), weight_grad._kernel(),
                   switch_modulation._switch_modulation_fwd_kernel):
        assert len(kernel.configs) == 1


def test_target_capability_reads_the_active_driver():
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    previous = getattr(driver, "_active", None)

    def active(target):
        def get():
            if isinstance(target, Exception):
                raise target
            return target
        driver.set_active(SimpleNamespace(get_current_target=get))
    try:
        active(GPUTarget("cuda", 90, 32))
        assert tuning.target_capability() == 90
        active(GPUTarget("cuda", 80, 32))
        assert tuning.target_capability() == 80
        active(GPUTarget("hip", "gfx942", 64))
        assert tuning.target_capability() is None
        active(RuntimeError("0 active drivers"))  # a CPU machine
        assert tuning.target_capability() is None
    finally:
        driver.set_active(previous)


def test_first_step_shapes_match_the_model_registry():
    # benchmarks/first_step.py repeats the registry's sizes (the Triton 3.6 venv has no scipy).
    from benchmarks import first_step
    from switch_dit.models.registry import PATCHES, SIZES
    assert first_step.SIZES == SIZES and tuple(first_step.PATCHES) == tuple(PATCHES)
    assert first_step.model_shapes("XL/2") == dict(depth=28, D=1152, N=256, E=3, k=2)
    assert first_step.model_shapes("SwitchDiT-S/4")["N"] == 64
    with pytest.raises(SystemExit):
        first_step.model_shapes("XXL/2")


# ------------------------------------------------------------------------------------------------
# python -m switch_dit_kernels.warmup
# ------------------------------------------------------------------------------------------------
def test_warmup_refuses_without_a_gpu(monkeypatch, capsys):
    from switch_dit_kernels import warmup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert warmup.main(["switch_modulation"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "no CUDA GPU" in err


@pytest.mark.parametrize("op", ["switch_modulation", "expert_linear", "expert_mlp"])
def test_warmup_runs_forward_and_backward_on_the_triton_path(monkeypatch, op):
    # On the interpreter at tiny shapes: the public function is called with backend="triton" at
    # the given shapes and its backward runs (each leaf gets a gradient).
    from switch_dit_kernels import functional, warmup
    if not tuning.triton_interpreting():
        pytest.skip("interpreter test")
    seen = []
    real = getattr(functional, op)

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(functional, op, spy)
    if op == "switch_modulation":
        warmup.warm_switch_modulation(2, 16, 32, 3, 2, dtype=torch.float32, device="cpu")
        assert seen[0][0][0].shape == (2, 16, 32) and seen[0][0][1].shape == (3, 32, 32)
    elif op == "expert_linear":
        warmup.warm_expert_linear(24, 32, 40, 5, 2, dtype=torch.float32, device="cpu")
        assert seen[0][0][0].shape == (24, 32) and seen[0][0][1].shape == (5, 32, 40)
    else:
        warmup.warm_expert_mlp(24, 32, 48, 5, 2, activation="swiglu", dtype=torch.float32,
                               device="cpu")
        assert seen[0][0][1].shape == (5, 32, 96) and seen[0][0][3].shape == (5, 48, 32)
    args, kwargs = seen[0]
    assert kwargs["backend"] == "triton"
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    assert leaves and all(a.grad is not None and torch.isfinite(a.grad).all() for a in leaves)
