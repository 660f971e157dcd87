"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the models and `switch_dit_kernels.MoE`.

`MoE` shards as any module: ``fully_shard(moe)`` (its forward reads only its own parameters).
Switch-DiT needs one rule: its root forward computes every block's gate table at once
(`SwitchDiT.compute_gate_tables`, one GEMM over all gates) before any block runs, so the gates,
and the `TimestepMoE` holding them, stay in the root's group; each block's attention, MLP and
adaLN modulation (~(4 + 8 + 6) D^2 of a block's (18 + E) D^2 + ... parameters) get groups of
their own, unsharded only while that block runs.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # torch < 2.6
        raise ImportError("FSDP2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from exc
    return fully_shard


def shard_model(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Apply ``fully_shard`` to ``model`` in place and return it (now an FSDPModule).

    DiT / DTR / Switch-DiT: each block's ``attn``, ``mlp`` and ``adaLN_modulation`` are groups of
    their own, everything else (embedders, gates, Switch-DiT's experts, final layer) the root's.
    A `switch_dit_kernels.MoE` anywhere inside becomes a group of its own. ``fsdp_kwargs``
    (mesh, mp_policy, reshard_after_forward, ...) go to every ``fully_shard`` call. Needs an
    initialised process group.
    """
    from switch_dit_kernels import MoE

    fully_shard = _fully_shard()
    for module in list(model.modules()):
        if isinstance(module, MoE) and module is not model:
            fully_shard(module, **fsdp_kwargs)
    for block in getattr(model, "blocks", ()):
        for name in ("adaLN_modulation", "attn", "mlp"):
            part = getattr(block, name, None)
            if isinstance(part, nn.Module) and any(p.requires_grad for p in part.parameters()):
                fully_shard(part, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model
