"""Export command: a training checkpoint's EMA (or raw) weights -> one .safetensors file.

    python -m switch_dit.export --checkpoint results/demo --out model.safetensors
    python -m switch_dit.export --checkpoint results/run/ckpt_0400000.pt --out raw.safetensors --no-ema

The file holds the model's state dict only (no optimiser, no RNG: a fraction of the checkpoint's
size) and, as safetensors metadata, the run's resolved config (JSON), its step and which weights
were written. `switch_dit.models.load_pretrained(model, "model.safetensors")` and
`train --init-from model.safetensors` read it back.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional


def export_checkpoint(checkpoint: str, out: str, use_ema: bool = True) -> Dict[str, object]:
    """Write `checkpoint`'s (a file or results folder) weights to `out`; returns a small report."""
    from safetensors.torch import save_file

    from . import checkpoint as ckpt

    path = ckpt.checkpoint_file(checkpoint)
    st = ckpt.load_checkpoint(path)
    which = "ema" if use_ema else "model"
    # safetensors refuses shared or non-contiguous storage: give each tensor its own copy
    tensors = {k: v.detach().contiguous().clone() for k, v in st[which].items()}
    meta = {"format": "switch-dit", "weights": which, "step": str(int(st["step"])),
            "config": json.dumps(st["config"])}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=meta)
    return {"checkpoint": path, "out": out, "weights": which, "step": int(st["step"]),
            "tensors": len(tensors), "parameters": sum(v.numel() for v in tensors.values()),
            "bytes": os.path.getsize(out)}


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m switch_dit.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or results folder")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--no-ema", action="store_true", help="write the raw weights, not the EMA ones")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        p.error(f"--out {args.out!r}: expected a file name ending in .safetensors")
    from .checkpoint import CheckpointError

    try:
        report = export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)
    except CheckpointError as e:
        p.error(f"--checkpoint: {e}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
