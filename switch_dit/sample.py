"""Sampling command: a PNG grid (a row per class), an optional .npz for FID tools, the expert map.

    python -m switch_dit.sample --checkpoint results/digits-SwitchDiT-S-2/latest.pt --out grid.png
    python -m switch_dit.sample --checkpoint CK --out grid.png --sampler ddpm --num-sampling-steps 250 \
        --cfg-scale 4.0 --num-samples 1000 --npz samples.npz --expert-map experts.png

EMA weights by default (--no-ema for the raw ones). The .npz holds "samples" uint8 [N, H, W, C] and
"labels" int64 [N] (ADM / torch-fidelity convention). Latent models decode with the AutoencoderKL
given by --vae (or the one recorded in the checkpoint), from disk only.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import cli
from .config import TrainConfig


@dataclass
class Loaded:
    model: nn.Module
    config: TrainConfig
    step: int
    device: torch.device
    amp_dtype: Optional[torch.dtype]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available")
    return torch.device(device)


def load_for_sampling(path: str, use_ema: bool = True, device: str = "auto",
                      backend: Optional[str] = None) -> Loaded:
    """Rebuild the checkpoint's model from its stored config and load EMA (or raw) weights."""
    from .train import build_model, resolve_precision

    st = ckpt.load_checkpoint(path)
    cfg = TrainConfig.from_dict(st["config"])
    if backend is not None:
        cfg.backend = backend
    dev = pick_device(device)
    if dev.type == "cpu" and cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)  # the thread count the run was trained with
    model = build_model(cfg)
    model.load_state_dict(st["ema" if use_ema else "model"])
    model.to(dev).eval().requires_grad_(False)
    return Loaded(model, cfg, int(st["step"]), dev, resolve_precision(cfg.precision, dev))


@torch.no_grad()
def generate(ld: Loaded, labels: Sequence[int], num_sampling_steps: int = 50, cfg_scale: float = 1.0,
             sampler: str = "ddim", seed: int = 0, batch_size: int = 256, progress: bool = False,
             vae=None) -> torch.Tensor:
    """Samples [N, C, H, W] float32 on the CPU, one per label; pixels in [-1, 1].

    Latent models are decoded with `vae` (an AutoencoderKL) when given, else returned as latents.
    Deterministic for a given seed: all noise comes from a private generator on the device.
    progress: one tqdm bar on stderr over every denoising step of every batch.
    """
    from .train import build_diffusion

    cfg, model, dev = ld.config, ld.model, ld.device
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if not 1 <= num_sampling_steps <= cfg.diffusion_steps:
        raise ValueError(f"num_sampling_steps must be in [1, {cfg.diffusion_steps}], got {num_sampling_steps}")
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1.0, got {cfg_scale}")
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes):
        raise ValueError(f"labels must be in [0, {cfg.num_classes}), got {labels.min()}..{labels.max()}")
    diffusion = build_diffusion(cfg, timestep_respacing=str(num_sampling_steps))
    loop = (diffusion.ddim_sample_loop_progressive if sampler == "ddim"
            else diffusion.p_sample_loop_progressive)
    from tqdm import tqdm

    num_batches = -(-len(labels) // batch_size)
    bar = tqdm(total=num_batches * num_sampling_steps, disable=not progress, unit="step",
               desc=f"sampling {len(labels)} ({sampler}, {num_sampling_steps} steps)",
               dynamic_ncols=True)
    gen = torch.Generator(device=dev).manual_seed(seed)
    amp = (torch.autocast(dev.type, dtype=ld.amp_dtype) if ld.amp_dtype is not None
           else contextlib.nullcontext())
    out = []
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size].to(dev)
        z = torch.randn((len(y),) + shape, generator=gen, device=dev)
        if cfg_scale > 1.0:
            z = torch.cat([z, z])
            y = torch.cat([y, torch.full_like(y, cfg.num_classes)])  # uncond label = num_classes
            kwargs, fn = dict(y=y, cfg_scale=cfg_scale), model.forward_with_cfg
        else:
            kwargs, fn = dict(y=y), model.forward
        with amp:
            # shared_timestep: the loops hand the model one timestep for the whole batch, so
            # Switch-DiT routes it with one routing row (one dense GEMM per SMoE layer).
            for step_out in loop(fn, z.shape, noise=z, clip_denoised=False, model_kwargs=kwargs,
                                 device=dev, progress=False, shared_timestep=True, generator=gen):
                bar.update(1)
            x = step_out["sample"]
        if cfg_scale > 1.0:
            x, _ = x.chunk(2)
        x = x.float()
        if cfg.data == "latents":
            if vae is not None:
                x = vae.decode(x / cfg.latent_scale / _vae_factor(cfg)).sample.float().clamp(-1, 1)
        else:
            x = x.clamp(-1, 1)
        out.append(x.cpu())
    bar.close()
    return torch.cat(out) if out else torch.empty((0,) + shape)


def _vae_factor(cfg: TrainConfig) -> float:
    """The scale the latents were stored with (encode_latents writes it in meta.json)."""
    if cfg.data_path:
        try:
            from .data import read_latent_meta
            return float(read_latent_meta(cfg.data_path).get("scale_factor", 0.18215))
        except FileNotFoundError:
            pass
    return 0.18215


def grid_labels(num_classes: int, per_class: int, max_classes: int = 16) -> np.ndarray:
    """Labels for a grid with one row per class: [0]*per_class + [1]*per_class + ..."""
    n = min(num_classes, max_classes)
    classes = np.linspace(0, num_classes - 1, n).round().astype(np.int64) if num_classes > n \
        else np.arange(num_classes)
    return np.repeat(classes, per_class)


FID_LABELS = ("balanced", "random")


def fid_labels(num_samples: int, num_classes: int, mode: str = "balanced", seed: int = 0) -> np.ndarray:
    """int64 [num_samples] class labels for FID samples: "balanced" = i mod num_classes (each class
    equally often, lower variance); "random" = uniform draws (the official DiT / Switch-DiT
    sample_ddp.py), from a numpy generator seeded with `seed`."""
    if mode == "balanced":
        return np.arange(num_samples, dtype=np.int64) % num_classes
    if mode == "random":
        return np.random.default_rng(seed).integers(0, num_classes, num_samples, dtype=np.int64)
    raise ValueError(f"mode must be one of {FID_LABELS}, got {mode!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switch-dit-sample", description=__doc__.split("\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint file or a results folder")
    p.add_argument("--out", default=None, help="PNG grid path (a row per class)")
    p.add_argument("--per-class", type=cli.positive_int, default=10, help="grid columns")
    cli.add_sampling_arguments(p)
    p.add_argument("--num-samples", type=cli.non_negative_int, default=0,
                   help="with --npz: how many samples")
    p.add_argument("--npz", default=None, help="write uint8 samples + labels here (for FID tools)")
    p.add_argument("--npz-labels", choices=FID_LABELS, default="balanced",
                   help="labels of the --npz samples: balanced = every class equally often (i mod C); "
                        "random = uniform draws seeded by --seed, as the official sample_ddp.py")
    p.add_argument("--expert-map", default=None, help="PNG heatmap of timestep -> expert gates")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=cli.positive_int, default=256,
                   help="samples per forward pass (CFG doubles it)")
    p.add_argument("--no-ema", action="store_true", help="sample the raw weights, not the EMA")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="SMoE kernels; default: the run's")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available")
    p.add_argument("--vae", default=None, help="AutoencoderKL folder (latent models)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is also off when stderr is not a terminal)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.out or args.npz or args.expert_map):
        parser.error("nothing to do: give --out, --npz and/or --expert-map")
    if args.npz and args.num_samples < 1:
        parser.error("--npz needs --num-samples N (N >= 1)")
    # Every output is checked before the (possibly hours-long) sampling starts.
    for flag, value in (("--out", args.out), ("--npz", args.npz), ("--expert-map", args.expert_map)):
        cli.check_output_file(parser, flag, value)
    if args.npz and not args.npz.endswith(".npz"):
        args.npz += ".npz"  # np.savez appends it anyway; the report must name the real file
        cli.check_output_file(parser, "--npz", args.npz)
    cli.check_device(parser, args.device)
    cli.check_backend(parser, args.backend, args.device)
    path = ckpt.checkpoint_file(args.checkpoint)
    try:
        ld = load_for_sampling(path, use_ema=not args.no_ema, device=args.device, backend=args.backend)
    except ckpt.CheckpointError as e:
        parser.error(str(e))
    cfg = ld.config
    steps = args.num_sampling_steps or cfg.sample_steps
    scale = cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale
    sampler = args.sampler or cfg.sampler
    if steps > cfg.diffusion_steps:
        parser.error(f"--num-sampling-steps {steps}: the model was trained with "
                     f"{cfg.diffusion_steps} diffusion steps; use at most that many")
    if args.expert_map and not hasattr(ld.model, "expert_routing_table"):
        parser.error(f"--expert-map: {cfg.model} has no timestep routing (Switch-DiT only)")
    progress = cli.show_progress(args.quiet)
    vae = None
    if cfg.data == "latents" and (args.out or args.npz):
        vae_path = args.vae or cfg.vae_path
        if not vae_path:
            parser.error("a latent model needs --vae DIR (AutoencoderKL weights on disk) to make images")
        from .encode_latents import load_vae
        vae = load_vae(vae_path, ld.device)
    kw = dict(num_sampling_steps=steps, cfg_scale=scale, sampler=sampler, seed=args.seed,
              batch_size=args.batch_size, vae=vae)
    report = {"checkpoint": path, "step": ld.step, "ema": not args.no_ema, "sampler": sampler,
              "num_sampling_steps": steps, "cfg_scale": scale}
    if args.out:
        labels = grid_labels(cfg.num_classes, args.per_class)
        x = generate(ld, labels, progress=progress, **kw)
        from .plots import save_grid
        report["grid"] = save_grid(x, args.out, nrow=args.per_class,
                                   row_labels=[str(c) for c in labels[::args.per_class]])
    if args.npz:
        labels = fid_labels(args.num_samples, cfg.num_classes, args.npz_labels, args.seed)
        x = generate(ld, labels, progress=progress, **kw)
        from .plots import to_uint8
        os.makedirs(os.path.dirname(os.path.abspath(args.npz)), exist_ok=True)
        np.savez(args.npz, samples=to_uint8(x), labels=labels)
        report["npz"] = args.npz
    if args.expert_map:
        from .plots import plot_expert_map
        report["expert_map"] = plot_expert_map(ld.model.expert_routing_table(), args.expert_map,
                                               title=f"{cfg.model} step {ld.step}: gate probability",
                                               k=ld.model.k)
    import json
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
