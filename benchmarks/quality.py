"""Sample quality of DiT, DTR and Switch-DiT over several seeds on the bundled digits (not a test).

The paper's comparison at small scale: one model size, the same data, steps, batch, learning rate,
seeds and sampling settings for all three; scored by accuracy under a classifier trained on real
digits and digits-FD (see switch_dit.evaluate). Each model trains once per seed; the report gives
mean and standard deviation over seeds and a paired comparison (same seed = same data order, same
initial noise for sampling) of Switch-DiT against each baseline. Runs on a CPU:

    python -m benchmarks.quality        # 3 models x 5 seeds x 700 steps: 15 runs of ~2 min on 2 cores
    python -m benchmarks.quality --steps 2000 --seeds 0 --batch-size 64 --hidden-size 96 \
        --lr 1e-3 --ema-decay 0.999 --num-samples 500    # the earlier 1-seed setting

Writes benchmarks/results/quality_cpu.json (machine, settings, per-run results, per-model mean/std,
paired differences) and prints markdown tables. Progress: one bar over all runs, one per training.
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
from typing import Dict, List, Optional


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


def mean_std(values: List[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = list(values)
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_comparison(runs: List[dict], model: str, baseline: str, metric: str,
                      higher_is_better: bool) -> Optional[dict]:
    """`model` minus `baseline` on `metric`, seed by seed (only seeds both ran).

    Returns the per-seed differences, their mean and std, how many seeds favour `model`, and a
    two-sided paired t-test p-value (scipy; None for fewer than 2 seeds or identical differences).
    None when no seed has both runs yet.
    """
    by_seed = {(r["model"], r["seed"]): r[metric] for r in runs}
    seeds = sorted(s for (m, s) in by_seed if m == model and (baseline, s) in by_seed)
    if not seeds:
        return None
    diffs = [by_seed[(model, s)] - by_seed[(baseline, s)] for s in seeds]
    better = sum(1 for d in diffs if (d > 0 if higher_is_better else d < 0))
    p_value = None
    if len(diffs) > 1 and statistics.pstdev(diffs) > 0:
        from scipy.stats import ttest_rel

        p_value = float(ttest_rel([by_seed[(model, s)] for s in seeds],
                                  [by_seed[(baseline, s)] for s in seeds]).pvalue)
    return {"model": model, "baseline": baseline, "metric": metric, "seeds": seeds,
            "differences": diffs, **{f"difference_{k}": v for k, v in mean_std(diffs).items()},
            "seeds_model_better": better, "higher_is_better": higher_is_better,
            "paired_t_p_value": p_value}


def summarise(report: dict, models: List[str]) -> None:
    runs = report["runs"]
    summary = []
    for model in models:
        mine = [r for r in runs if r["model"] == model]
        if not mine:
            continue
        acc, fd = mean_std(r["accuracy"] for r in mine), mean_std(r["digits_fd"] for r in mine)
        summary.append({"model": model, "params": mine[0]["params"], "seeds": [r["seed"] for r in mine],
                        "accuracy_mean": acc["mean"], "accuracy_std": acc["std"],
                        "digits_fd_mean": fd["mean"], "digits_fd_std": fd["std"],
                        "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in mine)})
    report["summary"] = summary
    switch = [m for m in models if m.lower().startswith("switchdit")]
    paired = [paired_comparison(runs, s, b, metric, hib)
              for s in switch for b in models if b not in switch
              for metric, hib in (("accuracy", True), ("digits_fd", False))]
    report["paired"] = [c for c in paired if c is not None]


def print_tables(report: dict) -> None:
    a = report["settings"]
    ref = report["runs"][0]
    print(f"\n{a['steps']} steps, batch {a['batch_size']}, lr {a['lr']}, {a['image_size']}x"
          f"{a['image_size']} digits, depth {a['depth']}, width {a['hidden_size']}, seeds {a['seeds']}; "
          f"{a['num_samples']} samples, {a['sampler']} {a['sampling_steps']} steps, cfg "
          f"{a['cfg_scale']}; real held-out digits-FD {ref['fd_real_holdout']:.2f}")
    print("| model | params | accuracy (mean +- std) | digits-FD (mean +- std) | train s |")
    print("|---|---|---|---|---|")
    for s in report["summary"]:
        print(f"| {s['model']} | {s['params'] / 1e6:.2f}M | {s['accuracy_mean']:.3f} +- "
              f"{s['accuracy_std']:.3f} | {s['digits_fd_mean']:.2f} +- {s['digits_fd_std']:.2f} | "
              f"{s['train_seconds_mean']:.0f} |")
    print("\n| paired (same seed) | metric | mean difference +- std | seeds better | paired t p |")
    print("|---|---|---|---|---|")
    for c in report["paired"]:
        p = "-" if c["paired_t_p_value"] is None else f"{c['paired_t_p_value']:.3f}"
        print(f"| {c['model']} - {c['baseline']} | {c['metric']} | {c['difference_mean']:+.3f} +- "
              f"{c['difference_std']:.3f} | {c['seeds_model_better']}/{len(c['seeds'])} | {p} |")


def write_report(report: dict, args: argparse.Namespace) -> None:
    summarise(report, args.models)
    report["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, args.out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["DiT-S/2", "DTR-S/2", "SwitchDiT-S/2"])
    # Sized so that 15 runs fit in about half an hour on 2 CPU cores shared with other jobs: 700
    # steps of batch 32 at width 64 (the 1-seed comparison ran 2,000 steps of 64 at width 96 with
    # lr 1e-3 / EMA 0.999, which at 800 steps left every model near chance, accuracy 0.15-0.17);
    # a higher lr and a shorter EMA horizon (0.995: ~200 steps) make the short run learn.
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--image-size", type=int, default=8, help="8 = the digits' native resolution")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--num-samples", type=int, default=300)
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a CPU shared with other jobs)")
    p.add_argument("--results-dir", default="results/quality")
    p.add_argument("--out", default="benchmarks/results/quality_cpu.json")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (log lines only)")
    args = p.parse_args(argv)
    for name in ("steps", "num_samples", "sampling_steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")

    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    from switch_dit.config import get_preset
    from switch_dit.evaluate import evaluate_checkpoint
    from switch_dit.train import train

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "results_dir", "no_progress")}
    report = {"machine": machine_info(), "settings": settings, "runs": [], "complete": False}
    t_all = time.perf_counter()
    plan = [(seed, model) for seed in args.seeds for model in args.models]
    overall = tqdm(total=len(plan), desc="quality runs", unit="run", position=0,
                   disable=args.no_progress, dynamic_ncols=True)
    for seed, model in plan:
        cfg = get_preset("digits")
        cfg.model, cfg.seed, cfg.max_steps = model, seed, args.steps
        cfg.image_size, cfg.depth = args.image_size, args.depth
        cfg.hidden_size, cfg.num_heads = args.hidden_size, args.num_heads
        cfg.global_batch_size, cfg.lr, cfg.ema_decay = args.batch_size, args.lr, args.ema_decay
        cfg.ckpt_every = args.steps
        cfg.log_every = max(1, args.steps // 20)
        cfg.results_dir = os.path.join(args.results_dir, f"{model.replace('/', '-')}-seed{seed}")
        shutil.rmtree(cfg.results_dir, ignore_errors=True)  # a benchmark always starts fresh
        overall.set_postfix_str(f"{model} seed {seed}")
        tqdm.write(f"[quality] {model} seed {seed}: {args.steps} steps")
        t0 = time.perf_counter()
        out = train(cfg, progress=not args.no_progress)
        t_train = time.perf_counter() - t0
        params = sum(q.numel() for q in out["trainer"].model.parameters())
        del out
        t1 = time.perf_counter()
        m = evaluate_checkpoint(os.path.join(cfg.results_dir, "latest.pt"),
                                num_samples=args.num_samples, num_sampling_steps=args.sampling_steps,
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
        for key in ("experts_shared", "experts_switching"):  # Switch-DiT's gate statistic
            if key in last:
                run[key] = last[key]
        report["runs"].append(run)
        write_report(report, args)  # after every run: an interrupted benchmark keeps what it did
        overall.update(1)
        tqdm.write(f"[quality]   acc {run['accuracy']:.3f}  digits-FD {run['digits_fd']:.2f}  "
                   f"train {t_train:.0f} s")
    overall.close()
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report["complete"] = True
    write_report(report, args)
    print_tables(report)
    print(f"{report['total_seconds'] / 60:.1f} min in all; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
