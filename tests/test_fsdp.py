"""FSDP2 (fully_shard) on MoE and Switch-DiT: two gloo ranks on the CPU equal one process.

Each rank runs half of the batch; FSDP2 averages the gradients over the two ranks, so
2 x (the gathered gradient) must equal the one-process gradient of the whole batch.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _fsdp_worker import build_case, run_rank

CASES = ("moe_torch", "moe_triton", "switch_dit")
WORLD = 2


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    out_dir = tmp_path_factory.mktemp("fsdp")
    mp.spawn(run_rank, args=(WORLD, str(out_dir / "init"), str(out_dir), CASES), nprocs=WORLD,
             join=True)
    return {case: [torch.load(os.path.join(out_dir, f"{case}_rank{r}.pt")) for r in range(WORLD)]
            for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_fully_shard_matches_one_process(case, fsdp_results):
    model, inputs, dy = build_case(case)
    out = model(*inputs)
    (out * dy).sum().backward()
    ranks = fsdp_results[case]
    assert all(r["sharded"] for r in ranks), "every parameter should be a sharded DTensor"
    tol = dict(rtol=1e-9, atol=1e-10) if out.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), **tol)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ranks[0]["grads"]) == set(grads) and len(grads) > 5
    for name, grad in grads.items():
        for r in ranks:  # every rank gathers the same full gradient
            torch.testing.assert_close(WORLD * r["grads"][name], grad, **tol, msg=name)
