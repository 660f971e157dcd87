"""The main job on a fresh CPU machine: train Switch-DiT on the bundled digits, sample, evaluate.

    make demo                      # = python -m switch_dit.demo
    python -m switch_dit.demo --max-steps 300 --results-dir results/quick

Trains the `digits` preset (a sized-down Switch-DiT-S/2 on 16x16 digits, a few CPU minutes), then
writes a 10x10 sample grid (a row per digit class, EMA weights), the timestep -> expert routing
heatmap, and the digits metrics (accuracy under a classifier trained on real digits, digits-FD),
and prints where they are. Re-running reuses a finished checkpoint in the results folder
(--fresh retrains).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="switch-dit-demo", description=__doc__.split("\n")[0])
    p.add_argument("--results-dir", default="results/demo")
    p.add_argument("--model", default=None, help="default: the digits preset's SwitchDiT-S/2")
    p.add_argument("--max-steps", type=int, default=None, help="default: the digits preset's")
    p.add_argument("--num-eval-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete the results folder and retrain")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be >= 1")

    from . import checkpoint as ckpt
    from .config import get_preset
    from .evaluate import evaluate_checkpoint
    from .plots import plot_expert_map, save_grid
    from .sample import generate, grid_labels, load_for_sampling
    from .train import train

    cfg = get_preset("digits")
    if args.model:
        cfg.model = args.model
    if args.max_steps:
        cfg.max_steps = args.max_steps
    cfg.seed, cfg.results_dir = args.seed, args.results_dir
    out_dir = args.results_dir
    if args.fresh and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    print(f"[demo] torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
          f"CUDA: {torch.cuda.is_available()}")
    print(f"[demo] training {cfg.model} (depth {cfg.depth}, width {cfg.hidden_size}) on the bundled "
          f"digits at {cfg.image_size}x{cfg.image_size} for {cfg.max_steps} steps -> {out_dir}")
    latest = os.path.join(out_dir, ckpt.LATEST)
    t0 = time.perf_counter()
    resume, reused = None, False
    if os.path.exists(latest):
        try:
            st = ckpt.load_checkpoint(latest)
        except ckpt.CheckpointError as e:
            p.error(f"{e}; --fresh deletes {out_dir} and retrains")
        done = int(st["step"])
        same = st["config"].get("model") == cfg.model
        if same and done >= cfg.max_steps:
            reused = True
            print(f"[demo] reusing the finished checkpoint {latest} (step {done}; --fresh retrains)")
        elif same:
            resume = latest
            print(f"[demo] resuming {latest} from step {done}")
        else:
            p.error(f"{out_dir} holds a {st['config'].get('model')} run; use --fresh or another "
                    "--results-dir")
        del st
    if resume or not os.path.exists(latest):
        if resume:
            from .config import TrainConfig
            saved = TrainConfig.from_dict(ckpt.load_checkpoint(resume)["config"])
            saved.max_steps, saved.results_dir = cfg.max_steps, out_dir
            cfg = saved
        train(cfg, resume=resume, progress=not args.no_progress)
    t_train = time.perf_counter() - t0

    t1 = time.perf_counter()
    ld = load_for_sampling(latest, use_ema=True, device="cpu")
    c = ld.config
    x = generate(ld, grid_labels(c.num_classes, 10), num_sampling_steps=c.sample_steps,
                 cfg_scale=c.cfg_scale, sampler=c.sampler, seed=args.seed)
    grid = save_grid(x, os.path.join(out_dir, "grid.png"), nrow=10,
                     row_labels=[str(i) for i in range(c.num_classes)])
    expert_map = None
    if hasattr(ld.model, "expert_routing_table"):
        expert_map = plot_expert_map(ld.model.expert_routing_table(),
                                     os.path.join(out_dir, "expert_map.png"),
                                     title=f"{c.model} on digits, step {ld.step}: gate probability",
                                     k=ld.model.k)
    metrics = evaluate_checkpoint(latest, num_samples=args.num_eval_samples, seed=args.seed,
                                  device="cpu")
    t_eval = time.perf_counter() - t1
    metrics.update({"train_seconds": round(t_train, 1), "sample_eval_seconds": round(t_eval, 1)})
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    print()
    trained = "reused" if reused else f"trained for {t_train:.0f} s"
    print(f"[demo] {c.model}, {ld.step} steps ({trained}); sampled + evaluated in {t_eval:.0f} s "
          f"({c.sampler}, {c.sample_steps} steps, cfg {c.cfg_scale})")
    print(f"[demo] sample grid (row = digit 0..9): {grid}")
    if expert_map:
        print(f"[demo] expert routing heatmap:       {expert_map}")
    print(f"[demo] training log:                 {os.path.join(out_dir, 'log.jsonl')}")
    print(f"[demo] metrics:                      {os.path.join(out_dir, 'metrics.json')}")
    print(f"[demo]   accuracy of generated digits under a real-digit classifier: "
          f"{metrics['accuracy']:.3f} (the classifier scores {metrics['classifier_real_test_accuracy']:.3f} "
          "on held-out real digits)")
    print(f"[demo]   digits-FD: {metrics['digits_fd']:.2f} over {metrics['num_samples']} samples "
          f"(held-out real digits score {metrics['fd_real_holdout']:.2f}; lower is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
