"""Sample quality of DiT, DTR and Switch-DiT trained alike on the bundled digits (not a test).

The paper's comparison at small scale: one model size, the same data, steps, batch, learning rate,
seeds and sampling settings for all three; scored by accuracy under a classifier trained on real
digits and digits-FD (see switch_dit.evaluate). Runs on a CPU:

    python -m benchmarks.quality                       # defaults below, ~25 min on 2 busy cores
    python -m benchmarks.quality --steps 2000 --seeds 0 1 2 --image-size 16

Writes benchmarks/results/quality_cpu.json (machine, settings, per-run and per-model mean results)
and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.is_available(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["DiT-S/2", "DTR-S/2", "SwitchDiT-S/2"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--image-size", type=int, default=8, help="8 = the digits' native resolution")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=96)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a CPU shared with other jobs)")
    p.add_argument("--results-dir", default="results/quality")
    p.add_argument("--out", default="benchmarks/results/quality_cpu.json")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from switch_dit.config import get_preset
    from switch_dit.evaluate import evaluate_checkpoint
    from switch_dit.train import train

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "results_dir")}
    report = {"machine": machine_info(), "settings": settings, "runs": []}
    t_all = time.perf_counter()
    for seed in args.seeds:
        for model in args.models:
            cfg = get_preset("digits")
            cfg.model, cfg.seed, cfg.max_steps = model, seed, args.steps
            cfg.image_size, cfg.depth = args.image_size, args.depth
            cfg.hidden_size, cfg.num_heads = args.hidden_size, args.num_heads
            cfg.global_batch_size, cfg.lr = args.batch_size, args.lr
            cfg.ckpt_every = args.steps
            cfg.log_every = max(1, args.steps // 20)
            cfg.results_dir = os.path.join(args.results_dir, f"{model.replace('/', '-')}-seed{seed}")
            shutil.rmtree(cfg.results_dir, ignore_errors=True)  # a benchmark always starts fresh
            print(f"[quality] {model} seed {seed}: {args.steps} steps", flush=True)
            t0 = time.perf_counter()
            out = train(cfg, progress=False)
            t_train = time.perf_counter() - t0
            params = sum(p.numel() for p in out["trainer"].model.parameters())
            del out
            t1 = time.perf_counter()
            m = evaluate_checkpoint(os.path.join(cfg.results_dir, "latest.pt"),
                                    num_samples=args.num_samples,
                                    num_sampling_steps=args.sampling_steps,
                                    cfg_scale=args.cfg_scale, sampler=args.sampler, seed=seed,
                                    device="cpu")
            with open(os.path.join(cfg.results_dir, "log.jsonl")) as f:
                last = [json.loads(line) for line in f][-1]
            run = {"model": model, "seed": seed, "params": params, "steps": args.steps,
                   "train_seconds": round(t_train, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
                   "final_loss": last["loss"], "final_prior_loss": last["prior_loss"],
                   "accuracy": m["accuracy"], "digits_fd": m["digits_fd"],
                   "fd_real_holdout": m["fd_real_holdout"],
                   "classifier_real_test_accuracy": m["classifier_real_test_accuracy"]}
            report["runs"].append(run)
            print(f"[quality]   acc {run['accuracy']:.3f}  digits-FD {run['digits_fd']:.2f}  "
                  f"train {t_train:.0f} s", flush=True)
    summary = []
    for model in args.models:
        runs = [r for r in report["runs"] if r["model"] == model]
        summary.append({"model": model, "params": runs[0]["params"],
                        "accuracy_mean": statistics.fmean(r["accuracy"] for r in runs),
                        "digits_fd_mean": statistics.fmean(r["digits_fd"] for r in runs),
                        "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in runs),
                        "seeds": [r["seed"] for r in runs]})
    report["summary"] = summary
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    ref = report["runs"][0]
    print(f"\n{args.steps} steps, batch {args.batch_size}, lr {args.lr}, {args.image_size}x"
          f"{args.image_size} digits, depth {args.depth}, width {args.hidden_size}, seeds {args.seeds}; "
          f"{args.num_samples} samples, {args.sampler} {args.sampling_steps} steps, cfg "
          f"{args.cfg_scale}; real held-out digits-FD {ref['fd_real_holdout']:.2f}")
    print("| model | params | accuracy | digits-FD | train s |")
    print("|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['model']} | {s['params'] / 1e6:.2f}M | {s['accuracy_mean']:.3f} | "
              f"{s['digits_fd_mean']:.2f} | {s['train_seconds_mean']:.0f} |")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
