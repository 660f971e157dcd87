"""Routing metadata: which (route unit, slot) pairs each expert serves, built on the device.

A route unit owns ``tokens_per_route`` (N) contiguous rows of x; token-choice MoE has N = 1,
Switch-DiT's timestep routing has N = tokens per sample. The metadata sorts the R*k (unit, slot)
pairs by expert, so each expert's rows form one contiguous run in "sorted row space" of
R*k*N rows: sorted position s covers rows [s*N, (s+1)*N) and reads x rows
[(pair // k) * N, (pair // k + 1) * N) with pair = sorted_pairs[s].

Everything is built with device ops (sort, scatter_add, cumsum): no ``.item()``, ``.tolist()``,
``.cpu()``, nor ``bincount`` (which syncs to size its output), so the hot path never waits on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _validate


@dataclass(frozen=True)
class RoutingMetadata:
    """Expert-sorted view of a routing decision.

    Attributes:
        num_experts: E.
        k: experts per route unit.
        tokens_per_route: N, rows per route unit.
        expert_counts: [E] int32, number of (unit, slot) pairs routed to each expert.
        expert_offsets: [E + 1] int32, exclusive prefix sum of ``expert_counts`` (pairs, not rows).
        sorted_pairs: [R*k] int32, flat pair index r*k + j, ordered by expert (stable, so by r
            within an expert).
        pair_to_sorted: [R*k] int32, inverse permutation: the sorted position of pair r*k + j.
    """

    num_experts: int
    k: int
    tokens_per_route: int
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_pairs: torch.Tensor
    pair_to_sorted: torch.Tensor

    @property
    def num_routes(self) -> int:
        """R, the number of route units."""
        return self.sorted_pairs.numel() // self.k

    @property
    def num_sorted_rows(self) -> int:
        """R*k*N, rows of the expert-sorted intermediate."""
        return self.sorted_pairs.numel() * self.tokens_per_route

    def sorted_row_sources(self) -> torch.Tensor:
        """[R*k*N] int64: for each sorted row, the row of x it reads (materialised; used by the
        reference-style permutation paths, the Triton kernels compute it on the fly)."""
        n = self.tokens_per_route
        unit = self.sorted_pairs.long() // self.k
        return (unit[:, None] * n + torch.arange(n, device=unit.device)).reshape(-1)


def build_routing_metadata(topk_ids: torch.Tensor, num_experts: int, *,
                           tokens_per_route: int = 1, check_ids: bool = True) -> RoutingMetadata:
    """Sort the R*k (unit, slot) pairs of ``topk_ids`` [R, k] by expert, on the device, no host sync.

    Args:
        topk_ids: [R, k] int32/int64 expert ids in [0, num_experts) (CPU: a ValueError otherwise;
            CUDA: a device-side assert, no host sync).
        num_experts: E >= 1.  tokens_per_route: N >= 1 rows of x per route unit.
        check_ids: read the ids to refuse bad ones (3-4 small kernels on CUDA); the package's own
            layers pass False because their front door (or op) has checked them already.
    """
    _validate.check_tensor("topk_ids", topk_ids, 2, _validate.INDEX_DTYPES)
    _validate.check_positive_int("num_experts", num_experts)
    _validate.check_positive_int("tokens_per_route", tokens_per_route)
    if topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have k >= 1 columns, got shape {tuple(topk_ids.shape)}")
    if check_ids:
        _validate.check_topk_ids_values(topk_ids, num_experts)
    num_routes, k = topk_ids.shape
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    # Stable sort keeps pairs of one expert in unit order, which makes the grouped GEMM's reads of
    # x ascend within an expert (better locality) and the result deterministic.
    _, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    pair_to_sorted = torch.empty_like(order)
    pair_to_sorted.scatter_(0, order, torch.arange(order.numel(), device=device))
    return RoutingMetadata(num_experts=num_experts, k=k, tokens_per_route=tokens_per_route,
                           expert_counts=counts, expert_offsets=offsets,
                           sorted_pairs=order.to(torch.int32),
                           pair_to_sorted=pair_to_sorted.to(torch.int32))
