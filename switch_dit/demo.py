"""The main job on a fresh CPU machine: train Switch-DiT on the bundled digits, sample, evaluate.

    make demo                      # = python -m switch_dit.demo
    python -m switch_dit.demo --max-steps 300 --results-dir results/quick

Trains the `digits` preset (a sized-down Switch-DiT-S/4 on 16x16 digits, a few CPU minutes), then
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

from . import cli


def main(argv=None) -> int:
    from .config import get_preset

    preset = get_preset("digits")
    p = argparse.ArgumentParser(prog="switch-dit-demo", description=__doc__.split("\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--results-dir", default="results/demo",
                   help="checkpoints, log, grid, expert map and metrics")
    p.add_argument("--model", default=preset.model,
                   help=f"the digits preset's {preset.model} (depth {preset.depth}, width "
                        f"{preset.hidden_size}) or another registry name, e.g. DiT-S/4")
    p.add_argument("--max-steps", type=cli.positive_int, default=preset.max_steps,
                   help="training steps")
    p.add_argument("--num-eval-samples", type=cli.int_in_range(2), default=500,
                   help="samples scored by the digits classifier")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="training and sampling seed")
    p.add_argument("--fresh", action="store_true", help="delete the results folder and retrain")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bars (they are also off when stderr is not a terminal)")
    args = p.parse_args(argv)
    from .models import MODELS

    if args.model not in MODELS:
        p.error(f"--model {args.model!r} is not a model; choose {{DiT,SwitchDiT,DTR}}-"
                f"{{S,B,L,XL}}/{{2,4,8}}, e.g. {preset.model}")
    cli.check_output_dir(p, "--results-dir", args.results_dir)
    progress = cli.show_progress(args.no_progress)

    from . import checkpoint as ckpt
    from .evaluate import evaluate_checkpoint
    from .plots import plot_expert_map, save_grid
    from .sample import generate, grid_labels, load_for_sampling
    from .train import train

    cfg = preset
    cfg.model, cfg.max_steps = args.model, args.max_steps
    cfg.seed, cfg.results_dir = args.seed, args.results_dir
    out_dir = args.results_dir
    if args.fresh and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    print(f"[demo] torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
          f"CUDA: {torch.cuda.is_available()}")
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
        else:
            p.error(f"{out_dir} holds a {st['config'].get('model')} run; use --fresh or another "
                    "--results-dir")
        del st
    if not reused:
        start = f"resuming {latest} from step {done} " if resume else ""
        print(f"[demo] training {cfg.model} (depth {cfg.depth}, width {cfg.hidden_size}) on the "
              f"bundled digits at {cfg.image_size}x{cfg.image_size} {start}to step {cfg.max_steps}"
              f" -> {out_dir}")
    if resume or not os.path.exists(latest):
        if resume:
            from .config import TrainConfig
            saved = TrainConfig.from_dict(ckpt.load_checkpoint(resume)["config"])
            saved.max_steps, saved.results_dir = cfg.max_steps, out_dir
            cfg = saved
        train(cfg, resume=resume, progress=progress)
    t_train = time.perf_counter() - t0

    t1 = time.perf_counter()
    ld = load_for_sampling(latest, use_ema=True, device="cpu")
    c = ld.config
    x = generate(ld, grid_labels(c.num_classes, 10), num_sampling_steps=c.sample_steps,
                 cfg_scale=c.cfg_scale, sampler=c.sampler, seed=args.seed, progress=progress)
    grid = save_grid(x, os.path.join(out_dir, "grid.png"), nrow=10,
                     row_labels=[str(i) for i in range(c.num_classes)])
    expert_map = None
    if hasattr(ld.model, "expert_routing_table"):
        expert_map = plot_expert_map(ld.model.expert_routing_table(),
                                     os.path.join(out_dir, "expert_map.png"),
                                     title=f"{c.model} on digits, step {ld.step}: gate probability",
                                     k=ld.model.k)
    metrics = evaluate_checkpoint(latest, num_samples=args.num_eval_samples, seed=args.seed,
                                  device="cpu", progress=progress)
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
