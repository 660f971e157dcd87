"""Training-step benchmark: DiT against Switch-DiT (reference loop backend and fused kernels).

Usage (from the repository root):

    python -m benchmarks.train_step                          # S/2 and B/2 at batch 256, XL/2 at 64
    python -m benchmarks.train_step --json out/train_step.json --models S/2,XL/2
    python -m benchmarks.train_step --quick --device cpu     # a tiny smoke run of the code path

One step = sample t, forward under bf16 autocast, the diffusion loss
(`diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))["loss"].mean()`), backward, AdamW
(lr 1e-4, no weight decay, torch's default foreach implementation). No EMA, no gradient clipping:
the same work for every model. Inputs are random latents x [B, 4, 32, 32] (256 px images through the
SD VAE: N = 256 tokens at patch 2) and random labels.

Variants per model size:
  DiT                     the baseline
  SwitchDiT[torch]        Switch-DiT, SMoE layers on the reference backend (the official loop's way)
  SwitchDiT[triton]       Switch-DiT, SMoE layers on the fused Triton `switch_modulation`
  ...+prior               "everything the official step does": also the diffusion prior loss
                          (`model.auxiliary_loss(t)`; its bipartite matching is solved on the host
                          from a copy queued at the start of the forward). The gate of every block
                          on all 1,000 timesteps is part of every Switch-DiT forward of this code
                          base (one batched GEMM), so it is in all variants.
  SwitchDiT[triton,recompute]+prior   moe_recompute=True: the SMoE layers keep no expert output for
                          the backward and recompute it (memory for one more GEMM a block)
  SwitchDiT[triton,gluon]+prior       SWITCH_DIT_SMOD_GLUON=1: the opt-in sm_90 Gluon forward/dx of
                          the SMoE layers (elsewhere it falls back to the Triton kernels)

Numbers per row: ms = median wall-clock step time (synchronised, time.perf_counter) over the timed
steps after the warm-up steps (p20_ms/p80_ms the 20th/80th percentiles); images_per_s = batch / step
time; peak_gib = torch.cuda.max_memory_allocated over the timed steps (weights, gradients, AdamW
state and activations); ratio_to_dit = ms / the DiT step of the same size and batch,
peak_ratio_to_dit = peak_gib / DiT's. A variant that
fails (model missing, out of memory, kernel error) gives a row with "error"; the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import List, Optional, Sequence

import torch

from benchmarks import common

# (model size, batch) in order of importance: a run cut short keeps S/2 and XL/2.
DEFAULT_MODELS = [("S/2", 256), ("XL/2", 64), ("B/2", 256)]
# (variant, family, backend, prior loss), most important first: a run cut short by its time
# budget keeps the baseline, the full fused step and its recompute form; the reference-backend rows
# reproduce what ANCHORS.md already measured for the official loop.
VARIANTS = [
    ("DiT", "DiT", None, False),
    ("SwitchDiT[triton]+prior", "SwitchDiT", "triton", True),
    ("SwitchDiT[triton,recompute]+prior", "SwitchDiT", "triton", True),
    ("SwitchDiT[triton]", "SwitchDiT", "triton", False),
    ("SwitchDiT[torch]+prior", "SwitchDiT", "torch", True),
    ("SwitchDiT[torch]", "SwitchDiT", "torch", False),
    # last: the opt-in Gluon kernels have not run on a GPU before; a fault must not cost the rest
    ("SwitchDiT[triton,gluon]+prior", "SwitchDiT", "triton", True),
]
# Model options of a variant beyond its family and backend.
VARIANT_OPTIONS = {"SwitchDiT[triton,recompute]+prior": {"moe_recompute": True}}
# Environment knobs of a variant (opt-in kernel paths, read at every launch).
VARIANT_ENV = {"SwitchDiT[triton,gluon]+prior": {"SWITCH_DIT_SMOD_GLUON": "1"}}


def _row(env: dict, model: str, batch: int, variant: str, backend: Optional[str], prior: bool,
         precision: str, **fields) -> dict:
    row = {"benchmark": "train_step", "model": model, "batch": batch, "variant": variant,
           "backend": backend, "prior_loss": prior, "precision": precision, "ms": None, "p20_ms": None, "p80_ms": None,
           "images_per_s": None, "peak_gib": None, "ratio_to_dit": None,
           "peak_ratio_to_dit": None, "steps": None,
           "error": None, "device": env["device"], "torch": env["torch"], "triton": env["triton"]}
    row.update(fields)
    return row


def _skip_reason(backend: Optional[str], device: torch.device) -> Optional[str]:
    if backend == "triton":
        from switch_dit_kernels.backend import triton_available, triton_interpreting
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not triton_interpreting():
            return "the Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    return None


def _build(family: str, size: str, backend: Optional[str], device: torch.device, input_size: int,
           options: Optional[dict] = None):
    from switch_dit.models import create_model
    kwargs = dict(input_size=input_size, in_channels=4, num_classes=1000, **(options or {}))
    if backend is not None:
        kwargs["backend"] = backend
    torch.manual_seed(0)
    try:  # build the weights on the device directly (an XL/2 initialised on the CPU takes seconds)
        with torch.device(device):
            model = create_model(f"{family}-{size}", **kwargs)
        return model.to(device)
    except (RuntimeError, TypeError, NotImplementedError):
        return create_model(f"{family}-{size}", **kwargs).to(device)


def measure_step(family: str, size: str, batch: int, backend: Optional[str], prior: bool,
                 device: torch.device, *, amp_dtype: Optional[torch.dtype], warmup: int, steps: int,
                 input_size: int, options: Optional[dict] = None) -> dict:
    """Build model, diffusion and optimiser; run warmup + steps training steps; return the numbers."""
    from switch_dit.diffusion import create_diffusion
    model = _build(family, size, backend, device, input_size, options)
    model.train()
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 4, input_size, input_size, device=device, generator=gen)
    y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    if prior and not hasattr(model, "auxiliary_loss"):
        raise RuntimeError(f"{family}-{size} has no auxiliary_loss(t) (the diffusion prior loss)")

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        with autocast:
            loss = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))["loss"].float().mean()
            if prior:
                aux = model.auxiliary_loss(t)
                if aux is not None:
                    loss = loss + aux.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):  # compilation, autotuning, AdamW state allocation
        step()
    common.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        common.synchronize(device)
        start = time.perf_counter()
        step()
        common.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / common.GIB if device.type == "cuda" else None
    times.sort()
    ms = statistics.median(times)
    return dict(ms=ms, p20_ms=common._quantile(times, 0.2), p80_ms=common._quantile(times, 0.8),
                images_per_s=batch / (ms * 1e-3), peak_gib=peak, steps=steps,
                params_m=sum(p.numel() for p in model.parameters()) / 1e6)


TABLE_COLUMNS = [("model", "model", ""), ("batch", "batch", ""), ("variant", "variant", ""),
                 ("ms", "ms", ".1f"), ("p20", "p20_ms", ".1f"), ("p80", "p80_ms", ".1f"),
                 ("img/s", "images_per_s", ".0f"), ("peak GiB", "peak_gib", ".1f"),
                 ("x DiT", "ratio_to_dit", ".2f"), ("mem x DiT", "peak_ratio_to_dit", ".2f"),
                 ("error", "error", "")]


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    """Run the benchmark; returns the rows (also printed, and written to --json)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--quick", action="store_true",
                   help="S/2 at batch 2 on 8x8 latents, 1 warm-up + 2 timed steps (a smoke run)")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after every row)")
    p.add_argument("--models", default=None,
                   help="comma-separated SIZE/PATCH[:BATCH], e.g. S/2:256,XL/2:64 (default: S/2:256, "
                        "XL/2:64, B/2:256)")
    p.add_argument("--variants", default=None, help="comma-separated subset of "
                   + ", ".join(v[0] for v in VARIANTS))
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="autocast dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8; quick 2)")
    p.add_argument("--input-size", type=int, default=None, help="latent size (default 32; quick 8)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time budget: variants not started in time are recorded as skipped")
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    with common.cpu_threads(device, 1 if args.quick else None):  # see common.cpu_threads
        return _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> List[dict]:
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    if args.models:
        models = []
        for spec in args.models.split(","):
            size, _, batch = spec.partition(":")
            models.append((size, int(batch) if batch else dict(DEFAULT_MODELS).get(size, 64)))
    else:
        models = [("S/2", 2)] if args.quick else DEFAULT_MODELS
    variants = VARIANTS
    if args.variants:
        wanted = args.variants.split(",")
        unknown = [w for w in wanted if w not in [v[0] for v in VARIANTS]]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}")
        variants = [v for v in VARIANTS if v[0] in wanted]
    # Two warm-up steps: the first compiles and autotunes, the second allocates AdamW's state (and
    # moves the zero-initialised experts off zero, which a GEMM would otherwise run faster on).
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (2 if args.quick else 8)
    input_size = args.input_size or (8 if args.quick else 32)

    env = common.environment(device)
    config = {"precision": precision, "warmup": warmup, "steps": steps, "input_size": input_size,
              "models": models, "variants": [v[0] for v in variants], "optimizer": "AdamW(lr=1e-4)"}
    print(f"# train_step on {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{precision} autocast | {env['date']}", flush=True)
    rows: List[dict] = []
    deadline = common.Deadline(args.budget_s)

    def emit(row: dict) -> None:
        rows.append(row)
        print(common.format_table([row], TABLE_COLUMNS).splitlines()[-1], flush=True)
        if args.json:
            common.write_json(args.json, "train_step", env, rows, config)

    for size, batch in models:
        dit_ms = dit_peak = None
        for variant, family, backend, prior in variants:
            meta = dict(model=size, batch=batch, variant=variant, backend=backend, prior=prior,
                        precision=precision)
            reason = _skip_reason(backend, device)
            if reason is None and deadline.expired():
                reason = "time budget of the run spent"
            if reason is not None:
                emit(_row(env, **meta, error=f"skipped: {reason}"))
                continue
            try:
                with common.environ(VARIANT_ENV.get(variant)):
                    result = measure_step(family, size, batch, backend, prior, device,
                                          amp_dtype=amp_dtype, warmup=warmup, steps=steps,
                                          input_size=input_size,
                                          options=VARIANT_OPTIONS.get(variant))
                if variant == "DiT":
                    dit_ms, dit_peak = result["ms"], result["peak_gib"]
                result["ratio_to_dit"] = result["ms"] / dit_ms if dit_ms else None
                result["peak_ratio_to_dit"] = (result["peak_gib"] / dit_peak
                                               if dit_peak and result["peak_gib"] else None)
                emit(_row(env, **meta, **result))
            except Exception as exc:  # noqa: BLE001 - record, go on with the next variant
                emit(_row(env, **meta, error=common.format_error(exc)))
            common.free_memory(device)
    return common.report(rows, TABLE_COLUMNS, args.json, "train_step", env, config)


if __name__ == "__main__":
    main()
