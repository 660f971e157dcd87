"""Latent encoding command: an image folder -> a folder of scaled VAE latents for latent training.

    python -m switch_dit.encode_latents --data-path IMAGENET/train --vae sd-vae-ft-ema \
        --out latents256 --image-size 256 [--flip]
    torchrun --nproc_per_node 8 -m switch_dit.encode_latents ...   # each rank writes its own shards

Uses diffusers' AutoencoderKL from a folder on disk (`from_pretrained(dir, local_files_only=True)`):
nothing is downloaded; without diffusers or without the folder the command says so and stops.
Output: latents_RRR_SSSSS.npy (float16 [n, 4, S/8, S/8], already multiplied by the VAE scaling
factor, 0.18215 for the SD VAEs), labels_RRR_SSSSS.npy (int64 [n]) and meta.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

import numpy as np
import torch


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


def encode_folder(encode: Callable[[torch.Tensor], torch.Tensor], data_path: str, out: str,
                  image_size: int, batch_size: int = 32, flip: bool = False, scale_factor: float = 0.18215,
                  shard_size: int = 10_000, rank: int = 0, world_size: int = 1,
                  device: torch.device = torch.device("cpu"), extra_meta: Optional[dict] = None,
                  num_workers: int = 0) -> dict:
    """Encode every image of a class-per-sub-folder tree with `encode` ([B,3,S,S] in [-1,1] ->
    latents [B,C,S/8,S/8], unscaled); write shards and meta.json. Rank r handles items r::world."""
    from torch.utils.data import DataLoader, Subset

    from .data import ImageFolderDataset

    ds = ImageFolderDataset(data_path, image_size)
    os.makedirs(out, exist_ok=True)
    mine = Subset(ds, list(range(rank, len(ds), world_size)))
    loader = DataLoader(mine, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    buf_x, buf_y, shard, n = [], [], 0, 0

    def flush():
        nonlocal buf_x, buf_y, shard
        if not buf_x:
            return
        tag = f"{rank:03d}_{shard:05d}"
        np.save(os.path.join(out, f"latents_{tag}.npy"), np.concatenate(buf_x).astype(np.float16))
        np.save(os.path.join(out, f"labels_{tag}.npy"), np.concatenate(buf_y).astype(np.int64))
        buf_x, buf_y, shard = [], [], shard + 1

    with torch.no_grad():
        for x, y in loader:
            views = [x, x.flip(-1)] if flip else [x]
            for v in views:
                z = encode(v.to(device)).float() * scale_factor
                buf_x.append(z.cpu().numpy())
                buf_y.append(y.numpy())
                n += len(y)
            if sum(len(b) for b in buf_y) >= shard_size:
                flush()
    flush()
    meta = {"num_classes": ds.num_classes, "classes": ds.classes, "image_size": image_size,
            "scale_factor": scale_factor, "flip_copies": flip, **(extra_meta or {})}
    if rank == 0:
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
    return {"num_latents_rank": n, **meta}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="switch-dit-encode-latents", description=__doc__.split("\n")[0])
    p.add_argument("--data-path", required=True, help="image folder, one sub-folder per class")
    p.add_argument("--vae", required=True, help="AutoencoderKL folder on disk (diffusers format)")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--flip", action="store_true", help="also store horizontally flipped copies")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--sample-posterior", action="store_true",
                   help="encode a sample of the posterior instead of its mean")
    args = p.parse_args(argv)
    if args.image_size % 8:
        p.error(f"--image-size must be a multiple of 8 (the VAE downsamples 8x), got {args.image_size}")
    from . import distributed as dist_util

    info = dist_util.init_distributed()
    try:
        vae = load_vae(args.vae, info.device)
    except (FileNotFoundError, RuntimeError) as e:
        p.error(str(e))
    factor = float(getattr(vae.config, "scaling_factor", 0.18215))

    def encode(x):
        dist = vae.encode(x).latent_dist
        return dist.sample() if args.sample_posterior else dist.mean

    res = encode_folder(encode, args.data_path, args.out, args.image_size, args.batch_size,
                        args.flip, factor, rank=info.rank, world_size=info.world_size,
                        device=info.device, extra_meta={"vae": os.path.abspath(args.vae)},
                        num_workers=args.num_workers)
    dist_util.barrier()
    if info.is_main:
        print(json.dumps({"out": args.out, **{k: v for k, v in res.items() if k != "classes"}}))
    dist_util.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
