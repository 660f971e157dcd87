"""Activation memory a training forward keeps for the backward: DiT against Switch-DiT, per block.

Usage (from the repository root; no GPU needed, the sizes of saved tensors do not depend on it):

    python -m benchmarks.saved_activations                       # -> a table
    python -m benchmarks.saved_activations --json out/saved_activations.json

What is counted: every tensor autograd saves during a forward under bf16 autocast (through
``torch.autograd.graph.saved_tensors_hooks``) plus tensors that custom autograd Functions keep on
their node as attributes (``switch_modulation`` keeps y there, because its backward overwrites
it), each storage once, parameters excluded. The forward runs at two batch sizes; the difference
divided by the extra tokens x hidden size x depth is the bytes a block keeps per token and channel,
free of everything that does not grow with the batch (the gate table of all timesteps, weights).
Multiply by B * N * D * depth for a model's activation memory; on a GPU the peak adds the
allocator's transient buffers on top. The Triton variants run through the interpreter on the CPU
(TRITON_INTERPRET=1 is set here when no GPU is visible): small sizes, the counts are exact.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import argparse  # noqa: E402
from typing import List, Optional, Sequence  # noqa: E402

from benchmarks import common  # noqa: E402

# (variant, family, model options)
VARIANTS = [
    ("DiT", "DiT", {}),
    ("SwitchDiT[torch]", "SwitchDiT", {"backend": "torch"}),
    ("SwitchDiT[triton]", "SwitchDiT", {"backend": "triton"}),
    ("SwitchDiT[triton,recompute]", "SwitchDiT", {"backend": "triton", "moe_recompute": True}),
]
TABLE_COLUMNS = [("variant", "variant", ""), ("bytes/token/channel/block", "bytes_per_token_channel", ".1f"),
                 ("x DiT", "ratio_to_dit", ".3f"), ("error", "error", "")]


def _storages(tensors) -> dict:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def kept_bytes(model: torch.nn.Module, batch: int, input_size: int, device: torch.device) -> int:
    """Bytes of activations a training forward of `model` keeps for its backward."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_channels, input_size, input_size, generator=gen).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    saved: List[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, t, y)
    # Tensors custom Functions keep on their autograd node (ctx attributes), found by a graph walk.
    stack, seen_nodes = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        saved.extend(v for v in getattr(node, "__dict__", {}).values() if isinstance(v, torch.Tensor))
        stack.extend(next_node for next_node, _ in node.next_functions)
    storages = _storages(saved)
    for key in _storages(model.parameters()):
        storages.pop(key, None)
    return sum(storages.values())


def measure(family: str, options: dict, *, depth: int, hidden_size: int, num_heads: int,
            input_size: int, batches: Sequence[int], device: torch.device) -> float:
    """Bytes one block keeps per token and channel (marginal in the batch size)."""
    from switch_dit.models import create_model
    torch.manual_seed(0)
    model = create_model(f"{family}-S/2", input_size=input_size, in_channels=4, num_classes=10,
                         depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                         **options).to(device).train()
    small, large = (kept_bytes(model, b, input_size, device) for b in batches)
    tokens = (input_size // 2) ** 2
    return (large - small) / ((batches[1] - batches[0]) * tokens * hidden_size * depth)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.saved_activations",
                                description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--input-size", type=int, default=16, help="latent size (patch 2: N = (size/2)^2)")
    p.add_argument("--batches", default="4,8", help="the two batch sizes whose difference is taken")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    if len(batches) != 2 or batches[1] <= batches[0]:
        raise SystemExit("--batches: two increasing batch sizes, e.g. 4,8")
    env = common.environment(device)
    config = {"depth": args.depth, "hidden_size": args.hidden_size, "num_heads": args.num_heads,
              "input_size": args.input_size, "batches": batches, "precision": "bf16 autocast"}
    rows, dit = [], None
    for variant, family, options in VARIANTS:
        row = {"benchmark": "saved_activations", "variant": variant, "bytes_per_token_channel": None,
               "ratio_to_dit": None, "error": None, "device": env["device"], "torch": env["torch"]}
        try:
            value = measure(family, options, depth=args.depth, hidden_size=args.hidden_size,
                            num_heads=args.num_heads, input_size=args.input_size, batches=batches,
                            device=device)
            dit = value if variant == "DiT" else dit
            row.update(bytes_per_token_channel=value, ratio_to_dit=value / dit if dit else None)
        except Exception as exc:  # noqa: BLE001 - record it, go on with the next variant
            row["error"] = common.format_error(exc)
        rows.append(row)
    print(f"# saved activations on {env['device']} | torch {env['torch']} | {env['date']} | "
          f"bf16 autocast, D={args.hidden_size}, depth {args.depth}, batches {batches}")
    return common.report(rows, TABLE_COLUMNS, args.json, "saved_activations", env, config)


if __name__ == "__main__":
    main()
