"""Latent encoding command: an image folder -> VAE posteriors of each image and its flip, scaled.

    python -m switch_dit.encode_latents --data-path IMAGENET/train --vae sd-vae-ft-ema \
        --out latents256 --image-size 256 [--store mean] [--no-flip]
    torchrun --nproc_per_node 8 -m switch_dit.encode_latents ...   # each rank writes its own shards

Uses diffusers' AutoencoderKL from a folder on disk (`from_pretrained(dir, local_files_only=True)`):
nothing is downloaded; without diffusers or without the folder the command says so and stops.

The official Switch-DiT / DiT training encodes every batch afresh: a random horizontal flip of the
image, then `vae.encode(x).latent_dist.sample()`. Storing the posterior reproduces that at a
fraction of the cost: for each image and its horizontal flip (V = 2 views) the posterior mean and
standard deviation, so training draws a view and a fresh sample mean + std * eps every step
(`switch_dit.data.draw_latents`). Output (format 2): latents_RRR_SSSSS.npy (float16 [n, V, 4, S/8,
S/8] means, already multiplied by the VAE scaling factor, 0.18215 for the SD VAEs),
stds_RRR_SSSSS.npy (the same shape, scaled alike; not written with --store mean), labels_RRR_SSSSS.npy
(int64 [n]) and meta.json ("format": 2, "posterior", "views"). --store mean keeps only the means
(half the disk; training then uses the mean, as the earlier versions of this command did).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Tuple

import numpy as np
import torch

STORE_MODES = ("posterior", "mean")


def load_vae(path: str, device: torch.device):
    """diffusers.AutoencoderKL from a local folder, eval mode, on `device`."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(
            f"VAE folder {path!r} not found: download an AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema) "
            "to disk beforehand and pass its folder; nothing is downloaded at run time")
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise RuntimeError("encoding/decoding latents needs diffusers: pip install diffusers "
                           "(or pip install -e '.[latents]')") from None
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    return vae.to(device).eval().requires_grad_(False)


def encode_folder(encode: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]], data_path: str,
                  out: str, image_size: int, batch_size: int = 32, flip: bool = True,
                  store: str = "posterior", scale_factor: float = 0.18215, shard_size: int = 10_000,
                  rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"),
                  extra_meta: Optional[dict] = None, num_workers: int = 0,
                  progress: bool = True) -> dict:
    """Encode every image of a class-per-sub-folder tree and write format-2 shards and meta.json.

    encode: images [B, 3, S, S] in [-1, 1] -> (posterior mean, posterior std), each [B, C, S/8,
    S/8], unscaled. flip: also encode each image's horizontal flip (view 1). store: "posterior"
    (means and stds) or "mean". Rank r handles items r::world_size.
    """
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from .data import ImageFolderDataset

    if store not in STORE_MODES:
        raise ValueError(f"store must be one of {STORE_MODES}, got {store!r}")
    ds = ImageFolderDataset(data_path, image_size)
    os.makedirs(out, exist_ok=True)
    mine = Subset(ds, list(range(rank, len(ds), world_size)))
    loader = DataLoader(mine, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    buf_mean, buf_std, buf_y, shard, n = [], [], [], 0, 0

    def flush():
        nonlocal buf_mean, buf_std, buf_y, shard
        if not buf_y:
            return
        tag = f"{rank:03d}_{shard:05d}"
        np.save(os.path.join(out, f"latents_{tag}.npy"), np.concatenate(buf_mean).astype(np.float16))
        if store == "posterior":
            np.save(os.path.join(out, f"stds_{tag}.npy"), np.concatenate(buf_std).astype(np.float16))
        np.save(os.path.join(out, f"labels_{tag}.npy"), np.concatenate(buf_y).astype(np.int64))
        buf_mean, buf_std, buf_y, shard = [], [], [], shard + 1

    bar = tqdm(total=len(mine), desc=f"encode latents (rank {rank})" if world_size > 1
               else "encode latents", unit="img", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for x, y in loader:
            views = [x, x.flip(-1)] if flip else [x]
            means, stds = [], []
            for v in views:
                mean, std = encode(v.to(device))
                means.append(mean.float() * scale_factor)
                if store == "posterior":  # --store mean keeps no stds: no device -> host copy
                    stds.append(std.float() * scale_factor)
            buf_mean.append(torch.stack(means, dim=1).cpu().numpy())         # [B, V, C, h, w]
            if stds:
                buf_std.append(torch.stack(stds, dim=1).cpu().numpy())
            buf_y.append(y.numpy())
            n += len(y)
            bar.update(len(y))
            if sum(len(b) for b in buf_y) >= shard_size:
                flush()
    flush()
    bar.close()
    meta = {"format": 2, "posterior": store == "posterior", "views": 2 if flip else 1,
            "num_classes": ds.num_classes, "classes": ds.classes, "image_size": image_size,
            "scale_factor": scale_factor, **(extra_meta or {})}
    if rank == 0:
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
    return {"num_images_rank": n, **meta}


def vae_posterior(vae) -> Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """images -> (posterior mean, posterior std) of a diffusers AutoencoderKL."""
    def encode(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(x).latent_dist
        return dist.mean, dist.std
    return encode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="switch-dit-encode-latents", description=__doc__.split("\n")[0])
    p.add_argument("--data-path", required=True, help="image folder, one sub-folder per class")
    p.add_argument("--vae", required=True, help="AutoencoderKL folder on disk (diffusers format)")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-flip", action="store_true",
                   help="do not also encode each image's horizontal flip (halves the work; "
                        "training then sees no flips)")
    p.add_argument("--store", default="posterior", choices=STORE_MODES,
                   help="posterior: mean and std, training samples afresh each step (the official "
                        "recipe); mean: the posterior mean only")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if args.image_size % 8:
        p.error(f"--image-size must be a multiple of 8 (the VAE downsamples 8x), got {args.image_size}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not os.path.isdir(args.data_path):
        p.error(f"--data-path {args.data_path!r}: no such folder")
    from . import distributed as dist_util

    info = dist_util.init_distributed()
    try:
        vae = load_vae(args.vae, info.device)
    except (FileNotFoundError, RuntimeError) as e:
        p.error(str(e))
    factor = float(getattr(vae.config, "scaling_factor", 0.18215))
    res = encode_folder(vae_posterior(vae), args.data_path, args.out, args.image_size,
                        args.batch_size, flip=not args.no_flip, store=args.store,
                        scale_factor=factor, rank=info.rank, world_size=info.world_size,
                        device=info.device, extra_meta={"vae": os.path.abspath(args.vae)},
                        num_workers=args.num_workers, progress=info.is_main and not args.no_progress)
    dist_util.barrier()
    if info.is_main:
        print(json.dumps({"out": args.out, **{k: v for k, v in res.items() if k != "classes"}}))
    dist_util.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
