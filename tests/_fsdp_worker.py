"""Worker of tests/test_fsdp.py: one rank of a gloo (CPU) FSDP2 run, results saved for the test."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from switch_dit.fsdp import shard_model
from switch_dit.models import SwitchDiT
from switch_dit_kernels import MoE

BATCH = 4


def build_case(case: str):
    """(model, inputs for the full batch, dy, dtype) of a case, identical for every caller."""
    torch.manual_seed(0)
    if case.startswith("moe"):
        dtype = torch.float64 if case == "moe_torch" else torch.float32
        model = MoE(24, 5, 2, d_hidden=40, activation="swiglu", bias=False,
                    backend="torch" if case == "moe_torch" else "triton", score_func="sigmoid",
                    correction_bias=True, shared_expert_hidden=16, renormalize=True)
        inputs = (torch.randn(BATCH, 9, 24),)
    else:
        dtype = torch.float64
        model = SwitchDiT(input_size=8, patch_size=2, in_channels=4, depth=2, hidden_size=32,
                          num_heads=2, num_classes=10, class_dropout_prob=0.0, num_experts=3,
                          k=2, num_timesteps=50, prior_loss_weight=0.0, backend="torch")
        inputs = (torch.randn(BATCH, 4, 8, 8), torch.randint(0, 50, (BATCH,)),
                  torch.randint(0, 10, (BATCH,)))
    with torch.no_grad():  # no zero-initialised parts: every parameter gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
        if getattr(model, "e_score_correction_bias", None) is not None:
            model.e_score_correction_bias.normal_(0, 0.1)
    model = model.to(dtype)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    out_shape = model(*inputs).shape
    dy = torch.randn(out_shape, dtype=dtype)
    return model, inputs, dy


def run_rank(rank: int, world: int, init_file: str, out_dir: str, cases) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        for case in cases:
            model, inputs, dy = build_case(case)
            shard_model(model)
            rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            out = model(*(x[rows] for x in inputs))
            (out * dy[rows]).sum().backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()
                     if p.grad is not None}
            sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
            torch.save({"out": out.detach(), "grads": grads, "sharded": sharded},
                       os.path.join(out_dir, f"{case}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
