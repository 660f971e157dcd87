"""Training presets: the resolved configuration of a run, stored inside every checkpoint.

A preset fills every field of `TrainConfig`; command-line flags override single fields. The
resolved config (a plain dict of str/int/float/bool/None) goes into each checkpoint, so sampling,
evaluation and resuming rebuild exactly the model and data pipeline that were trained.

Presets:
    digits          the bundled scikit-learn 8x8 digits upsampled to 16x16, pixel space, a sized-down
                    Switch-DiT-S/4 (depth 4, width 96, 16 tokens) that trains in a few minutes on
                    2 CPU cores. It uses lr 2e-3 (not the paper's 1e-4) and EMA 0.999 with warm-up
                    because it runs 2,000 steps, not 400K. One CPU thread: for a model this
                    small a second OpenMP thread gained nothing and, on a machine with other
                    work, made a step 30x slower (0.09 s -> 2.7 s measured on 2 shared cores). Measured on 2 shared CPU cores (one
                    thread, EMA, 200 samples, DDIM 25, cfg 2): class accuracy of the samples 0.47
                    after 1,000 steps, 0.97 after 2,000; with lr 1e-3 it was 0.52 after 2,000.
    latent256-S/B/L/XL   the paper's ImageNet 256x256 setting on precomputed VAE latents (32x32x4,
                    patch 2 -> 256 tokens): AdamW lr 1e-4, no weight decay, global batch 256,
                    EMA 0.9999, 400K steps, linear noise schedule, no gradient clipping, a fresh
                    posterior sample and a random flip of each latent every step (as the official
                    code); bf16 autocast on GPUs (--precision fp16 = the official fp16 + GradScaler).
                    README "Differences from the official code" lists what still differs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

DATA_KINDS = ("digits", "folder", "latents")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAMPLERS = ("ddpm", "ddim")
LATENT_SAMPLING = ("sample", "mean")


@dataclass
class TrainConfig:
    """Every knob of a training run (defaults = the paper's ImageNet-256 latent setting)."""
    preset: str = "latent256-XL"
    # model
    model: str = "SwitchDiT-XL/2"
    depth: Optional[int] = None          # None: the registry size of `model`
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    num_experts: Optional[int] = None    # Switch-DiT only; None: the model's default
    k: Optional[int] = None
    backend: str = "auto"                # kernel backend of the Switch-DiT SMoE layers
    moe_recompute: bool = False          # SMoE layers recompute their expert output in backward
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    # data
    data: str = "latents"                # "digits" | "folder" | "latents"
    data_path: Optional[str] = None
    image_size: int = 32                 # spatial size the model sees (latent size for latents)
    in_channels: int = 4
    num_classes: int = 1000
    hflip: bool = True                   # random horizontal flips (never for digits)
    latent_scale: float = 1.0            # latents on disk are already multiplied by the VAE factor
    # latents stored as posteriors (encode_latents, format 2): "sample" draws mean + std * eps each
    # step (the official recipe: latent_dist.sample()), "mean" uses the posterior mean
    latent_sampling: str = "sample"
    init_from: Optional[str] = None      # pretrained weights for a fresh run (models.load_pretrained)
    # diffusion
    diffusion_steps: int = 1000
    # "linear" as DiT and the official Switch-DiT example script (its config's default is "cosine")
    noise_schedule: str = "linear"
    loss_weighting: str = "constant"
    # optimisation
    global_batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    # max global grad norm; 0 disables clipping (the norm is still logged). Official Switch-DiT and
    # DiT do not clip: 0 for the latent256 presets, 1.0 for the short high-lr digits runs
    grad_clip: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False             # decay_t = min(ema_decay, (1 + t) / (10 + t))
    max_steps: int = 400_000
    precision: str = "auto"              # auto: bf16 on CUDA with bf16 support, fp32 otherwise
    compile: bool = False
    # bookkeeping
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_checkpoints: int = 0            # step checkpoints kept besides latest.pt (0 = all)
    num_workers: int = 4
    num_threads: int = 0                 # torch CPU threads; 0 = torch's default
    seed: int = 0
    results_dir: Optional[str] = None
    # sampling defaults used by the demo / evaluation
    sample_steps: int = 250
    sampler: str = "ddpm"
    cfg_scale: float = 1.5
    vae_path: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the field for impossible values; return self."""
        def bad(name, why):
            raise ValueError(f"config {name}={getattr(self, name)!r}: {why}")
        if self.data not in DATA_KINDS:
            bad("data", f"must be one of {DATA_KINDS}")
        if self.data in ("folder", "latents") and not self.data_path:
            bad("data_path", f"data={self.data!r} needs --data-path")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {PRECISIONS}")
        if self.latent_sampling not in LATENT_SAMPLING:
            bad("latent_sampling", f"must be one of {LATENT_SAMPLING}")
        if self.sampler not in SAMPLERS:
            bad("sampler", f"must be one of {SAMPLERS}")
        if self.backend not in ("auto", "torch", "triton", "cuda", "grouped_mm"):
            bad("backend", "must be auto, torch, triton, cuda or grouped_mm")
        for name in ("global_batch_size", "max_steps", "log_every", "ckpt_every", "image_size",
                     "in_channels", "diffusion_steps", "sample_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer")
        if self.num_classes < 1:
            bad("num_classes", "must be >= 1 (class-conditional models)")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            bad("ema_decay", "must be in [0, 1)")
        if self.grad_clip < 0:
            bad("grad_clip", "must be >= 0 (0 disables clipping)")
        for name in ("num_workers", "keep_checkpoints", "warmup_steps", "num_threads"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.cfg_scale < 1.0:
            bad("cfg_scale", "must be >= 1.0 (1.0 = no guidance)")
        return self


def _digits() -> TrainConfig:
    return TrainConfig(
        preset="digits", model="SwitchDiT-S/4", depth=4, hidden_size=96, num_heads=4,
        data="digits", image_size=16, in_channels=1, num_classes=10, hflip=False,
        global_batch_size=64, lr=2e-3, grad_clip=1.0, ema_decay=0.999, ema_warmup=True,
        warmup_steps=50, max_steps=2000, precision="fp32", log_every=20, ckpt_every=500,
        keep_checkpoints=2, num_workers=0, num_threads=1, sample_steps=25, sampler="ddim",
        cfg_scale=2.0)


def _latent256(size: str) -> TrainConfig:
    return TrainConfig(preset=f"latent256-{size}", model=f"SwitchDiT-{size}/2")


PRESETS = {"digits": _digits, **{f"latent256-{s}": (lambda s=s: _latent256(s))
                                  for s in ("S", "B", "L", "XL")}}


def get_preset(name: str) -> TrainConfig:
    """A fresh TrainConfig of the preset `name` (ValueError listing the presets otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def default_results_dir(cfg: TrainConfig) -> str:
    return "results/" + f"{cfg.preset}-{cfg.model}".replace("/", "-")


# Fields a resumed run may change (they do not alter what is computed, only where and how often it
# is written, how far it goes, or how the same maths is executed).
RESUMABLE_OVERRIDES = frozenset({"max_steps", "results_dir", "log_every", "ckpt_every",
                                 "keep_checkpoints", "num_workers", "num_threads", "backend",
                                 "moe_recompute", "compile", "init_from"})
