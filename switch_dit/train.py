"""Training loop: DiT / DTR / Switch-DiT, one process or DDP under torchrun, exactly resumable.

    python -m switch_dit.train                                   # the digits preset, CPU, minutes
    python -m switch_dit.train --model DiT-S/2 --max-steps 500   # a baseline, same recipe
    torchrun --nproc_per_node 8 -m switch_dit.train --preset latent256-XL --data-path LATENTS
    python -m switch_dit.train --resume auto --results-dir results/run   # continue where it stopped

AdamW (the paper's lr 1e-4, betas 0.9/0.999, no weight decay unless a preset says otherwise), EMA
of the weights, bf16/fp16 autocast (a GradScaler for fp16), optional global-norm gradient clipping
(off in the latent256 presets, as in the official code), optional torch.compile, optional
pretrained initial weights (--init-from). Loss = weighting(diffusion loss per sample, t) + the
model's auxiliary loss (the Switch-DiT diffusion prior loss; none for DiT/DTR).

Exact resume: a checkpoint holds model, EMA, optimiser, scaler, loss-weighting parameters, step, the
RNG states of every rank and the resolved config; the data order is a function of (seed, step)
(see data.infinite_batches), so stopping at step s and resuming gives bit-identical weights.

Outputs in --results-dir: config.json, log.jsonl (step, loss, prior_loss, lr, images_per_sec,
grad_norm per --log-every steps; Switch-DiT adds experts_shared / experts_switching, the mean number
of experts per block selected at every timestep / at some but not all), ckpt_XXXXXXX.pt and latest.pt.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import cli
from . import distributed as dist_util
from .config import (DATA_KINDS, LATENT_SAMPLING, PRECISIONS, PRESETS, RESUMABLE_OVERRIDES,
                     TrainConfig, default_results_dir, get_preset)
from .diffusion.gaussian_diffusion import LOSS_WEIGHTINGS
from .diffusion.schedules import SCHEDULES

# ----- model / diffusion construction (shared with sample.py) -----------------------------------


def is_switch_model(name: str) -> bool:
    return name.lower().replace("-", "").startswith("switchdit")


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model a config describes (on the CPU, float32)."""
    from .models import create_model

    kw: Dict[str, Any] = dict(input_size=cfg.image_size, in_channels=cfg.in_channels,
                              num_classes=cfg.num_classes, learn_sigma=cfg.learn_sigma,
                              class_dropout_prob=cfg.class_dropout_prob)
    if cfg.diffusion_steps != 1000:  # the gate/prior tables of Switch-DiT and DTR have a row per t
        kw["num_timesteps"] = cfg.diffusion_steps
    for name in ("depth", "hidden_size", "num_heads", "mlp_ratio"):
        if getattr(cfg, name) is not None:
            kw[name] = getattr(cfg, name)
    if is_switch_model(cfg.model):
        kw["backend"] = cfg.backend
        kw["moe_recompute"] = cfg.moe_recompute
        if cfg.num_experts is not None:
            kw["num_experts"] = cfg.num_experts
        if cfg.k is not None:
            kw["k"] = cfg.k
    return create_model(cfg.model, **kw)


def build_diffusion(cfg: TrainConfig, timestep_respacing: str = ""):
    from .diffusion import create_diffusion

    return create_diffusion(timestep_respacing=timestep_respacing, noise_schedule=cfg.noise_schedule,
                            learn_sigma=cfg.learn_sigma, diffusion_steps=cfg.diffusion_steps,
                            loss_weighting=cfg.loss_weighting)


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype (None = float32, no autocast)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_backend(backend: str, device: torch.device) -> str:
    """Fail fast (before any training) when the kernel backend cannot run on `device`."""
    from switch_dit_kernels import resolve_backend

    return resolve_backend(backend, torch.empty(0, device=device))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers copied."""
    ema_p = [p for p in ema.parameters()]
    mod_p = [p.detach() for p in model.parameters()]
    torch._foreach_mul_(ema_p, decay)
    torch._foreach_add_(ema_p, mod_p, alpha=1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def ema_decay_at(cfg: TrainConfig, updates_done: int) -> float:
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1.0 + updates_done) / (10.0 + updates_done))
    return cfg.ema_decay


UW_LR = 0.025  # learning rate of the "uw" loss weighting's log-variances (official Switch-DiT code)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps > 0:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr


# ----- the trainer -----------------------------------------------------------------------------


class Trainer:
    """Holds everything a step touches; `state_dict()` is the checkpoint (minus RNG, added by save)."""

    def __init__(self, cfg: TrainConfig, info: dist_util.DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.step = 0
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(cfg).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = build_diffusion(cfg)
        from .diffusion import create_loss_weighting

        self.weighting = create_loss_weighting(cfg.loss_weighting, self.diffusion).to(self.device)
        groups = [{"params": list(self.model.parameters()), "base_lr": cfg.lr}]
        w_params = list(self.weighting.parameters())
        if w_params:  # "uw": its log-variances train in their own group (official recipe)
            groups.append({"params": w_params, "base_lr": UW_LR, "lr": UW_LR, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                     eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.forward_model: nn.Module = self.model
        if cfg.compile:
            self.forward_model = torch.compile(self.model)
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DDP(self.forward_model, device_ids=ids)

    # --- checkpoint state ---
    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "loss_weighting": self.weighting.state_dict(), "step": self.step,
                "config": self.cfg.to_dict(), "world_size": self.info.world_size}

    def load_state_dict(self, st: Dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if st.get("loss_weighting") is not None:
            self.weighting.load_state_dict(st["loss_weighting"])
        self.step = int(st["step"])

    # --- one optimiser step ---
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if x.dim() == 6:  # stored VAE posteriors of each image and its flip: the official recipe
            from .data import draw_latents

            x = draw_latents(x, flip=cfg.hflip, sample=cfg.latent_sampling == "sample")
        elif cfg.hflip:  # pixels, or older latent folders holding one latent per image
            flip = torch.rand(x.shape[0], device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = x * cfg.latent_scale
        factor = lr_at(cfg, self.step) / cfg.lr
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.model.train()
        t = self.diffusion.sample_timesteps(x.shape[0], self.device)
        with self.autocast():
            terms = self.diffusion.training_losses(self.forward_model, x, t, model_kwargs=dict(y=y))
            aux = self.model.auxiliary_loss(t) if hasattr(self.model, "auxiliary_loss") else None
        main = self.weighting(terms, t)  # the dict: min-SNR weights the mse term only
        loss = main + aux.float() if aux is not None else main
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.info.enabled:
            # DDP averages the model's gradients; parameters outside it (a learnable loss weighting)
            # are averaged here, else the ranks would drift apart.
            for p in self.weighting.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(self.info.world_size)
        self.scaler.unscale_(self.opt)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        update_ema(self.ema, self.model, ema_decay_at(cfg, self.step))
        self.step += 1
        zero = torch.zeros((), device=self.device)
        return {"loss": main.detach(), "prior_loss": aux.detach().float() if aux is not None else zero,
                "grad_norm": grad_norm.detach().float()}


# ----- run -------------------------------------------------------------------------------------


def _truncate_log(path: str, step: int) -> None:
    """Drop log lines past `step` (written by a run that died after its last checkpoint)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError):
                continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def save_training_state(tr: Trainer) -> Optional[str]:
    """Gather every rank's RNG state, write the checkpoint on rank 0; returns its path there."""
    rngs = dist_util.all_gather_object(ckpt.capture_rng_state())
    path = None
    if tr.info.is_main:
        state = tr.state_dict()
        state["rng"] = rngs
        path = ckpt.write_training_checkpoint(state, tr.cfg.results_dir, tr.step,
                                              keep=tr.cfg.keep_checkpoints)
    dist_util.barrier()
    return path


def train(cfg: TrainConfig, resume: Optional[str] = None, info: Optional[dist_util.DistInfo] = None,
          progress: bool = True, dataset=None) -> Dict[str, Any]:
    """Train until cfg.max_steps; returns {"trainer", "results_dir", "step", "last_log", "checkpoint"}.
    dataset: `build_dataset(cfg)` when the caller already built it (the CLI's checks do)."""
    from .data import ResumableDistributedSampler, build_dataset, infinite_batches

    info = info or dist_util.DistInfo()
    cfg.results_dir = cfg.results_dir or default_results_dir(cfg)
    cfg.validate()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if is_switch_model(cfg.model):
        check_backend(cfg.backend, info.device)
    dataset = dataset if dataset is not None else build_dataset(cfg)
    too_small = batch_size_problem(len(dataset), cfg.global_batch_size, info.world_size)
    if too_small:  # checked before the results folder is made (also: not divisible)
        raise ValueError(too_small)
    local_batch = cfg.global_batch_size // info.world_size
    for name in ("in_channels", "num_classes"):
        have, want = getattr(dataset, name), getattr(cfg, name)
        if have != want:
            if resume:
                raise ValueError(f"the data has {name}={have} but the checkpoint's config says {want}")
            setattr(cfg, name, have)  # a fresh run: the data decides
    if cfg.data == "latents":
        cfg.image_size = dataset.image_size
        cfg.vae_path = cfg.vae_path or dataset.meta.get("vae")

    if not resume and os.path.exists(os.path.join(cfg.results_dir, ckpt.LATEST)):
        raise FileExistsError(
            f"{cfg.results_dir} already holds a training run ({ckpt.LATEST}); resume it with "
            "--resume auto or pick another --results-dir (nothing was overwritten)")
    tr = Trainer(cfg, info)
    if cfg.init_from and not resume:
        from .models import load_pretrained

        load_pretrained(tr.model, cfg.init_from, verbose=info.is_main)
        tr.ema.load_state_dict(tr.model.state_dict())  # the EMA starts from the loaded weights
    log_path = os.path.join(cfg.results_dir, "log.jsonl")
    if resume:
        st = ckpt.load_checkpoint(resume, map_location=info.device)
        tr.load_state_dict(st)
        rngs = st.get("rng") or []
        if len(rngs) == info.world_size:
            ckpt.restore_rng_state(rngs[info.rank])
        elif rngs:
            if info.is_main:
                print(f"[switch-dit] resuming {len(rngs)}-process state on {info.world_size} "
                      "processes: the run continues but is not bit-identical", file=sys.stderr)
            ckpt.restore_rng_state(rngs[0])
            torch.manual_seed(cfg.seed * info.world_size + info.rank + tr.step)
        del st
    else:
        torch.manual_seed(cfg.seed * info.world_size + info.rank)
        import numpy as np
        import random
        np.random.seed(cfg.seed * info.world_size + info.rank)
        random.seed(cfg.seed * info.world_size + info.rank)
    if info.is_main:
        os.makedirs(cfg.results_dir, exist_ok=True)
        for path in ckpt.remove_stale_temp_files(cfg.results_dir):
            print(f"[switch-dit] removed {path}, left by a checkpoint write that was interrupted",
                  file=sys.stderr)
        with open(os.path.join(cfg.results_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        if resume:
            _truncate_log(log_path, tr.step)
        elif os.path.exists(log_path):
            os.unlink(log_path)
    dist_util.barrier()

    sampler = ResumableDistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=True)
    batches = infinite_batches(dataset, sampler, local_batch, tr.step, num_workers=cfg.num_workers,
                               seed=cfg.seed, pin_memory=info.device.type == "cuda")
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=tr.step, desc=f"train {cfg.model}", dynamic_ncols=True)
    acc = {k: torch.zeros((), device=info.device) for k in ("loss", "prior_loss", "grad_norm")}
    n_acc, t0, last_log, last_ckpt = 0, time.perf_counter(), None, None
    while tr.step < cfg.max_steps:
        x, y = next(batches)
        out = tr.train_step(x, y)
        for k in acc:
            acc[k] += out[k]
        n_acc += 1
        if bar is not None:
            bar.update(1)
        if tr.step % cfg.log_every == 0 or tr.step == cfg.max_steps:
            vals = {k: dist_util.all_reduce_mean(v / n_acc).item() for k, v in acc.items()}
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            last_log = {"step": tr.step, "loss": vals["loss"], "prior_loss": vals["prior_loss"],
                        "lr": lr_at(cfg, tr.step - 1),
                        "images_per_sec": n_acc * cfg.global_batch_size / max(dt, 1e-9),
                        "grad_norm": vals["grad_norm"]}
            if info.is_main and hasattr(tr.model, "expert_sharing"):
                # the paper's expert-map statistic as numbers: experts per block selected at every
                # timestep (shared) and at some but not all (switching with t)
                sharing = tr.model.expert_sharing()
                last_log["experts_shared"] = sharing["shared_mean"]
                last_log["experts_switching"] = sharing["switching_mean"]
            # (an inf grad norm alone is an fp16 overflow step the GradScaler skipped)
            if not (math.isfinite(vals["loss"]) and math.isfinite(vals["prior_loss"])):
                raise FloatingPointError(f"non-finite loss at step {tr.step}: {last_log}")
            if info.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(last_log) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{vals['loss']:.4f}", prior=f"{vals['prior_loss']:.4f}")
            for k in acc:
                acc[k].zero_()
            n_acc, t0 = 0, time.perf_counter()
        if tr.step % cfg.ckpt_every == 0 or tr.step == cfg.max_steps:
            last_ckpt = save_training_state(tr)
    if bar is not None:
        bar.close()
    return {"trainer": tr, "results_dir": cfg.results_dir, "step": tr.step, "last_log": last_log,
            "checkpoint": os.path.join(cfg.results_dir, ckpt.LATEST)}


# ----- command line ----------------------------------------------------------------------------

# flag -> (config field, parser type); every default is None so only what the user typed
# overrides. Numeric types carry their range (a bad value is a usage error naming the flag).
_FLAGS = {
    "--model": ("model", str), "--max-steps": ("max_steps", cli.positive_int),
    "--results-dir": ("results_dir", str), "--backend": ("backend", str),
    "--seed": ("seed", cli.seed_int), "--data": ("data", str), "--data-path": ("data_path", str),
    "--image-size": ("image_size", cli.positive_int),
    "--global-batch-size": ("global_batch_size", cli.positive_int),
    "--lr": ("lr", cli.positive_float), "--weight-decay": ("weight_decay", cli.non_negative_float),
    "--warmup-steps": ("warmup_steps", cli.non_negative_int),
    "--grad-clip": ("grad_clip", cli.non_negative_float),
    "--ema-decay": ("ema_decay", cli.float_in_range(0.0, 1.0, high_inclusive=False)),
    "--precision": ("precision", str), "--log-every": ("log_every", cli.positive_int),
    "--ckpt-every": ("ckpt_every", cli.positive_int),
    "--keep-checkpoints": ("keep_checkpoints", cli.non_negative_int),
    "--num-workers": ("num_workers", cli.non_negative_int),
    "--threads": ("num_threads", cli.non_negative_int), "--depth": ("depth", cli.positive_int),
    "--hidden-size": ("hidden_size", cli.positive_int),
    "--num-heads": ("num_heads", cli.positive_int),
    "--num-experts": ("num_experts", cli.positive_int), "--k": ("k", cli.positive_int),
    "--loss-weighting": ("loss_weighting", str), "--noise-schedule": ("noise_schedule", str),
    "--diffusion-steps": ("diffusion_steps", cli.positive_int), "--vae": ("vae_path", str),
    "--init-from": ("init_from", str), "--latent-sampling": ("latent_sampling", str),
}
_CHOICES = {"--backend": ("auto", "triton", "torch"), "--data": DATA_KINDS,
            "--precision": PRECISIONS, "--loss-weighting": LOSS_WEIGHTINGS,
            "--noise-schedule": SCHEDULES, "--latent-sampling": LATENT_SAMPLING}
_HELP = {
    "--model": "{DiT,SwitchDiT,DTR}-{S,B,L,XL}/{2,4,8}, e.g. SwitchDiT-S/2, DiT-S/2 (the preset's "
               "size overrides still apply)",
    "--max-steps": "total optimiser steps (digits: a few CPU minutes)",
    "--results-dir": "default: results/<preset>-<model>",
    "--backend": "SMoE kernels: auto = triton on CUDA (or TRITON_INTERPRET=1), torch otherwise",
    "--lr": "AdamW learning rate (paper: 1e-4; the digits preset uses more because it runs only "
            "2K steps: with 1e-4 its samples are still blobs after a few minutes)",
    "--data": "digits (bundled), folder (class per sub-folder) or latents (encode_latents output)",
    "--grad-clip": "max global gradient norm, 0 = off",
    "--ema-decay": "in [0, 1); paper 0.9999; digits uses warm-up",
    "--vae": "AutoencoderKL folder used to decode latent samples (sampling only)",
    "--threads": "torch CPU threads (0 = torch's default; the digits preset uses 1)",
    "--loss-weighting": "per-timestep loss weighting: constant, min_snr (Min-SNR-5) or uw "
                        "(learned uncertainty weights, the official Switch-DiT recipe)",
    "--init-from": "start a fresh run from these weights: a switch-dit checkpoint or results folder "
                   "(EMA weights), an exported .safetensors, a DiT state dict (DiT-XL-2-256x256.pt; "
                   "into Switch-DiT: identity experts) or an official Switch-DiT/DTR checkpoint",
    "--latent-sampling": "posterior latents: sample = mean + std * eps each step (official), "
                         "mean = the posterior mean",
}


def _preset_values(field_name: str) -> str:
    """"[presets: digits: 2000; latent256-*: 400000]": what each preset sets `field_name` to."""
    # None means "the model's own value" for the size knobs, "not set" for everything else.
    unset = "the model's" if field_name in _MODEL_SIZE_FIELDS else "none"
    values = {name: getattr(make(), field_name) for name, make in PRESETS.items()}
    values = {n: unset if v is None else v for n, v in values.items()}
    if len(set(map(repr, values.values()))) == 1:
        return f"[every preset: {next(iter(values.values()))}]".replace("%", "%%")
    latent = {n: v for n, v in values.items() if n.startswith("latent256-")}
    parts = [f"{n}: {v}" for n, v in values.items() if n not in latent]
    if latent and len(set(map(repr, latent.values()))) == 1:
        parts.append(f"latent256-*: {next(iter(latent.values()))}")
    else:
        parts += [f"{n}: {v}" for n, v in latent.items()]
    return f"[presets: {'; '.join(parts)}]".replace("%", "%%")


_MODEL_SIZE_FIELDS = {"depth", "hidden_size", "num_heads", "mlp_ratio", "num_experts", "k"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switch-dit-train", description=__doc__.split("\n")[0],
                                formatter_class=cli.HelpFormatter)
    digits = get_preset("digits")
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS),
                   help=f"digits: bundled {digits.image_size}x{digits.image_size} digits, a "
                        f"sized-down {digits.model} (depth {digits.depth}, width "
                        f"{digits.hidden_size}) for CPUs; latent256-*: the paper's ImageNet-256 "
                        "latent setting")
    p.add_argument("--resume", default=None,
                   help="checkpoint file, results folder, or 'auto' (= RESULTS_DIR/latest.pt if any)")
    for flag, (field_name, typ) in _FLAGS.items():
        help_text = _HELP.get(flag, f"overrides the preset's {field_name}")
        if field_name != "results_dir":
            help_text += " " + _preset_values(field_name)
        p.add_argument(flag, dest=field_name, type=typ, default=None, choices=_CHOICES.get(flag),
                       help=help_text)
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the model")
    p.add_argument("--moe-recompute", dest="moe_recompute", action="store_true", default=None,
                   help="Switch-DiT: recompute the SMoE expert output in the backward instead of "
                        "keeping it (less activation memory, one more D x D GEMM per block)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bar (it is also off when stderr is not a terminal)")
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(config, resume path) from the parsed flags: preset + overrides, or the checkpoint's config."""
    overrides = {f: getattr(args, f) for f, _ in
                 list(_FLAGS.values()) + [("compile", bool), ("moe_recompute", bool)]
                 if getattr(args, f) is not None}
    cfg = get_preset(args.preset)
    results_dir = overrides.get("results_dir") or default_results_dir(
        TrainConfig(**{**cfg.to_dict(), **overrides}))
    resume = ckpt.resolve_resume_path(args.resume, results_dir)
    if resume and not os.path.exists(resume):
        parser.error(f"--resume {args.resume!r}: no checkpoint there ({resume})")
    if resume:
        try:  # a lazy peek at config and step; train() loads and verifies everything
            st = ckpt.load_checkpoint(resume, verify=False, mmap=True)
        except ckpt.CheckpointError as e:
            parser.error(f"{e}. Nothing was overwritten; pass an older step checkpoint from "
                         f"{os.path.dirname(resume) or '.'} with --resume, or drop --resume")
        cfg = TrainConfig.from_dict(st["config"])
        bad = {k: v for k, v in overrides.items()
               if k not in RESUMABLE_OVERRIDES and v != getattr(cfg, k)}
        if bad:
            parser.error(f"cannot change {sorted(bad)} when resuming {resume} (the checkpoint's "
                         f"config is used; only {sorted(RESUMABLE_OVERRIDES)} may change)")
        for k, v in overrides.items():
            setattr(cfg, k, v)
        if "results_dir" not in overrides:
            cfg.results_dir = os.path.dirname(os.path.abspath(resume))
        if cfg.max_steps <= int(st["step"]):
            parser.error(f"{resume} is already at step {st['step']} >= --max-steps {cfg.max_steps}")
        return cfg, resume
    elif args.resume and args.resume != "auto":
        parser.error(f"--resume {args.resume!r}: no checkpoint there")
    if os.path.exists(os.path.join(results_dir, ckpt.LATEST)):
        parser.error(f"{results_dir} already holds a training run ({ckpt.LATEST}); continue it with "
                     "--resume auto, or pick another --results-dir (nothing was overwritten)")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.results_dir = results_dir
    if cfg.init_from and not os.path.exists(cfg.init_from):
        parser.error(f"--init-from {cfg.init_from!r}: no such file or folder")
    try:
        cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    return cfg, None


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage errors the parser's types cannot see, before any config, data or model exists."""
    if args.model is not None:
        from .models import MODELS

        if args.model not in MODELS:
            parser.error(f"--model {args.model!r} is not a model; choose "
                         "{DiT,SwitchDiT,DTR}-{S,B,L,XL}/{2,4,8}, e.g. SwitchDiT-S/2")
    cli.check_device(parser, args.device)


def check_data(cfg: TrainConfig, world_size: int):
    """(why the run's data cannot feed it (missing folder, fewer items than a batch) or None,
    the dataset or None): `train` reuses the dataset instead of scanning the data again."""
    from .data import build_dataset

    try:
        dataset = build_dataset(cfg)
    except (OSError, ValueError) as e:
        flag = f"--data-path {cfg.data_path}" if cfg.data_path else f"--data {cfg.data}"
        return f"{flag}: {e}", None
    return batch_size_problem(len(dataset), cfg.global_batch_size, world_size), dataset


def batch_size_problem(num_items: int, global_batch_size: int, world_size: int) -> Optional[str]:
    """The data loader drops the last partial batch of each process: an epoch needs at least one
    full per-process batch, else training would wait forever for the first batch."""
    if global_batch_size % world_size:
        return (f"--global-batch-size {global_batch_size} is not divisible by the {world_size} "
                "processes")
    if num_items // world_size < global_batch_size // world_size:
        most = (num_items // world_size) * world_size
        return (f"the dataset has {num_items} items, fewer than one batch "
                f"(--global-batch-size {global_batch_size}"
                f"{f' over {world_size} processes' if world_size > 1 else ''}): "
                f"lower --global-batch-size to at most {most}")
    return None


def model_problem(cfg: TrainConfig) -> Optional[str]:
    """Why the model or diffusion of `cfg` cannot be built (num_heads not dividing hidden_size,
    k > num_experts, too few diffusion steps, ...), or None. The model is built on the meta
    device: no memory, a fraction of a second even for XL."""
    try:
        with torch.device("meta"):
            build_model(cfg)
        build_diffusion(cfg)
    except (ValueError, TypeError) as e:
        return f"{cfg.model} with these settings: {e}"
    return None


def check_run(cfg: TrainConfig, args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Usage errors of the resolved run (results folder, kernel backend, data), before anything is
    built or written, so a mistake leaves no half-made results folder. Returns the dataset."""
    cli.check_output_dir(parser, "--results-dir", cfg.results_dir)
    if args.backend is not None and is_switch_model(cfg.model):
        cli.check_backend(parser, cfg.backend, args.device)
    why = model_problem(cfg)
    if why:
        parser.error(why)
    why, dataset = check_data(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if why:
        parser.error(why)
    return dataset


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(args, parser)
    cfg, resume = resolve_config(args, parser)
    dataset = check_run(cfg, args, parser)
    info = dist_util.init_distributed(args.device)
    from .models import PretrainedMismatch

    finished = False
    try:
        try:
            out = train(cfg, resume=resume, info=info, progress=cli.show_progress(args.no_progress),
                        dataset=dataset)
        except PretrainedMismatch as e:  # raised before anything is written
            parser.error(f"--init-from {cfg.init_from!r}: {e}")
        if info.is_main:
            print(json.dumps({"results_dir": out["results_dir"], "step": out["step"],
                              "checkpoint": out["checkpoint"], "last_log": out["last_log"]}))
        finished = True
    finally:
        # After a finished run every rank meets at a barrier, then the group is destroyed:
        # exiting with a live process group aborted one 2-process torchrun run in 12
        # ("terminate called without an active exception"). After an error there is no barrier
        # (the other ranks may never reach it).
        dist_util.cleanup(synchronize=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
