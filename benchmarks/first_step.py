"""First-call cost of a Switch-DiT training step: compilations and seconds, cold and warm.

Run as ``python benchmarks/compile_check.py --first-step [MODEL] [--batch B]`` (MODEL default
XL/2, B default 32: a global batch of 256 over 8 GPUs). What the first training step of
Switch-DiT-MODEL launches through Triton is the fused SMoE layer of each block
(`switch_modulation`, forward and backward: the fwd, dx and dW kernels); attention, MLP, the
gates and the prior loss are PyTorch. Every block has the same shapes, so the same autotune keys:
block 1 compiles, blocks 2..depth reuse it. Running the whole model on this CPU at XL/2 would spend
minutes in CPU matmuls the GPU does not compile, so this drives the calls one block makes
(`switch_modulation_triton`, bf16 as under the training's autocast, per-sample routing [B, k],
gates needing a gradient), then a second block to show it compiles nothing, on CPU tensors
through compile_check's stand-in driver (sm_90: Triton's own JIT, autotuner and pruners, no
launch). The keys and JIT specialisations are the real run's: B (a multiple of 16) enters only as
integer arguments the JIT specialises on by divisibility by 16, and the dW kernel's sample split
is the one a 132-SM H100/H200 gets.

Each measurement is a fresh process: SWITCH_DIT_AUTOTUNE=1 (the generation's list, timed) and 0
(one config per kernel), each from an empty TRITON_CACHE_DIR (cold), then again on the same
directory (warm: compiled kernels and, by default, the autotune choices on disk, as a second
torchrun rank or the next run finds them); for tuning, also warm with SWITCH_DIT_AUTOTUNE_CACHE=0
(compiled kernels reused, every config loaded and timed again). The stand-in driver's timings are
fake, so "tuning" here is its compilations, which dominate a first call on a GPU too (each config
is compiled before it is timed); a GPU adds its timing runs (milliseconds per config at these
shapes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

# compile_check's environment rules (no interpreter; the disk autotune cache only in a throwaway
# TRITON_CACHE_DIR named by FIRST_STEP_CACHE_ENV) apply: this module is imported from it.
FIRST_STEP_CACHE_ENV = "SWITCH_DIT_FIRST_STEP_CACHE"
SMS = 132  # H100/H200 SXM streaming multiprocessors (the stand-in driver reports the same)


# switch_dit.models.registry's SIZES and PATCHES (size -> depth, hidden size, heads), repeated here:
# the registry imports scipy (the prior loss), which the Triton 3.6 virtualenv lacks
# (tests/test_tuning_generations.py checks the two agree).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)


def model_shapes(model: str) -> dict:
    """depth, D, N (tokens per sample at the paper's 32x32 latents), E, k of "XL/2" or
    "SwitchDiT-XL/2"."""
    name = model.split("-", 1)[1] if model.startswith("SwitchDiT-") else model
    size, _, patch = name.partition("/")
    if size not in SIZES or not patch.isdigit() or int(patch) not in PATCHES:
        raise SystemExit(f"--first-step: unknown model {model!r}; e.g. XL/2, B/4, SwitchDiT-S/2")
    depth, dim, _ = SIZES[size]
    return dict(depth=depth, D=dim, N=(32 // int(patch)) ** 2, E=3, k=2)


def _cubins(cache_dir: str) -> int:
    return sum(name.endswith(".cubin") for _, _, files in os.walk(cache_dir) for name in files)


class _GpuSplits:
    """Make `switch_modulation_bwd.dw_splits` pick the sample split of a 132-SM GPU for CPU
    tensors (on the CPU it returns 2), so the dW kernel's integer arguments specialise as there."""

    def __init__(self):
        import importlib
        self.mod = importlib.import_module("switch_dit_kernels.kernels.switch_modulation_bwd")
        self.saved = {n: getattr(self.mod, n, None) for n in ("dw_splits", "_sm_count")}

    def __enter__(self):
        import torch
        original, mod = self.saved["dw_splits"], self.mod
        if original is None or self.saved["_sm_count"] is None:
            print("note: switch_modulation_bwd has no dw_splits/_sm_count: CPU split used")
            return self

        def gpu_splits(num_units, n_tiles, device, *args, **kwargs):
            return original(num_units, n_tiles, torch.device("cuda", 0), *args, **kwargs)
        mod.dw_splits = gpu_splits
        mod._sm_count = lambda index: SMS
        return self

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            if value is not None:
                setattr(self.mod, name, value)


def run_once(model: str, batch: int, fake_driver_cls) -> dict:
    """One process's measurement: the first two blocks' SMoE forward + backward."""
    import torch
    from triton.runtime.driver import driver

    from switch_dit_kernels.modulation_ops import switch_modulation_triton
    shape = model_shapes(model)
    dim, tokens, experts, k = shape["D"], shape["N"], shape["E"], shape["k"]
    cache_dir = os.environ.get("TRITON_CACHE_DIR", "")
    fake = fake_driver_cls(90)
    previous = getattr(driver, "_active", None)
    driver.set_active(fake)
    blocks = []
    try:
        with _GpuSplits():
            for _ in range(2):
                x = torch.randn(batch, tokens, dim, dtype=torch.bfloat16, requires_grad=True)
                w = torch.randn(experts, dim, dim, dtype=torch.bfloat16, requires_grad=True)
                b = torch.randn(experts, dim, dtype=torch.bfloat16, requires_grad=True)
                g = torch.rand(batch, k, requires_grad=True)
                ids = torch.stack([torch.randperm(experts)[:k] for _ in range(batch)])
                fake.compiled.clear()
                before = _cubins(cache_dir) if cache_dir else 0
                t0 = time.time()
                r = switch_modulation_triton(x, w, b, g, ids)
                r.backward(torch.ones_like(r))
                seconds = time.time() - t0
                per_kernel = {}
                for name, _ in fake.compiled:
                    per_kernel[name.lstrip("_")] = per_kernel.get(name.lstrip("_"), 0) + 1
                blocks.append(dict(seconds=round(seconds, 2), loaded=len(fake.compiled),
                                   compiled=(_cubins(cache_dir) - before) if cache_dir else -1,
                                   per_kernel=per_kernel))
    finally:
        driver.set_active(previous)
    return dict(model=model, batch=batch, blocks=blocks)


def run_matrix(model: str, batch: int, script: str) -> int:
    """Fresh processes: tuned and untuned, cold then warm; prints a table."""
    shape = model_shapes(model)
    print(f"first training step of Switch-DiT-{model}: SMoE fwd + bwd of one block at B={batch}, "
          f"N={shape['N']}, D={shape['D']}, E={shape['E']}, k={shape['k']}, bf16, sm_90 stand-in "
          f"driver (blocks 2-{shape['depth']} share its keys)")
    header = (f"{'SWITCH_DIT_AUTOTUNE':<20} {'cache':<34} {'binaries':>8} {'compiled':>8} "
              f"{'block 1 s':>9} {'block 2':>8} {'block 2 s':>9} {'process s':>9}  per kernel (binaries)")
    print(header)
    print("-" * len(header))
    rc = 0
    for tune in ("1", "0"):
        cache = tempfile.mkdtemp(prefix="switch-dit-first-step-")
        runs = [("cold (empty TRITON_CACHE_DIR)", {}), ("warm (kernels + autotune cache)", {})]
        if tune != "0":
            runs.append(("warm, SWITCH_DIT_AUTOTUNE_CACHE=0", {"SWITCH_DIT_AUTOTUNE_CACHE": "0"}))
        try:
            for label, extra in runs:
                env = dict(os.environ, TRITON_CACHE_DIR=cache, SWITCH_DIT_AUTOTUNE=tune,
                           **{FIRST_STEP_CACHE_ENV: cache})
                env.pop("SWITCH_DIT_AUTOTUNE_CACHE", None)  # this process set it to 0
                env.update(extra)
                t0 = time.time()
                proc = subprocess.run([sys.executable, script, "--first-step-run", model,
                                       "--batch", str(batch)], env=env, capture_output=True,
                                      text=True)
                wall = time.time() - t0
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode or not lines:
                    print(f"{tune:<20} {label:<34} FAILED (rc {proc.returncode}):\n"
                          f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                    rc = 1
                    continue
                first, second = json.loads(lines[-1])["blocks"]
                kernels = ", ".join(f"{n.replace('switch_modulation_', '')} {c}"
                                    for n, c in sorted(first["per_kernel"].items()))
                print(f"{tune:<20} {label:<34} {first['loaded']:>8} {first['compiled']:>8} "
                      f"{first['seconds']:>9.1f} {second['loaded']:>4} new {second['seconds']:>9.1f} "
                      f"{wall:>9.1f}  {kernels}",
                      flush=True)
                if second["loaded"]:
                    rc = 1
                    print(f"    block 2 loaded {second['loaded']} more kernels: keys differ "
                          f"between blocks")
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    print("binaries: kernels made ready for launch (compiled, or loaded from the cache); "
          "compiled: new cubins in the cache; block 1 s: seconds of the first block's fwd + bwd; "
          "block 2: kernels it made ready (0: same keys) and its seconds (the CPU tensor work "
          "alone: block 1 minus block 2 is the first call's cost); process s: the whole process "
          "(imports included)")
    return rc
