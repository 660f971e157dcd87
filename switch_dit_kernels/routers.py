"""Token routers of today's MoE models: softmax or sigmoid scores, correction bias, group-limited top-k.

One function, `route`, covers Switch/Mixtral/Qwen-MoE/OLMoE (softmax, top-k, renormalise or not)
and DeepSeek-V3 (sigmoid, a correction bias that steers the choice but not the weights,
group-limited top-k, a routed scaling factor). The plain softmax case goes to `route_topk` (the
fused Triton kernel on CUDA); the others are a few elementwise and top-k ops on [T, E], with no
host synchronisation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .functional import route_topk

SCORE_FUNCS = ("softmax", "sigmoid")


def check_router_args(num_experts: int, k: int, score_func: str, num_groups: int,
                      topk_groups: Optional[int], routed_scaling_factor: float) -> None:
    """ValueError naming the argument unless the router options fit together."""
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1 \
            or num_experts % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing num_experts={num_experts}, "
                         f"got {num_groups!r}")
    groups = num_groups if topk_groups is None else topk_groups
    if not isinstance(groups, int) or isinstance(groups, bool) or not 1 <= groups <= num_groups:
        raise ValueError(f"topk_groups must be an int in [1, num_groups={num_groups}], "
                         f"got {topk_groups!r}")
    eligible = groups * (num_experts // num_groups)
    if isinstance(k, int) and k > eligible:
        raise ValueError(f"k={k} exceeds the {eligible} experts in topk_groups={groups} of "
                         f"num_groups={num_groups} groups")
    if not isinstance(routed_scaling_factor, (int, float)) or isinstance(routed_scaling_factor, bool) \
            or not routed_scaling_factor > 0:
        raise ValueError(f"routed_scaling_factor must be a positive number, got "
                         f"{routed_scaling_factor!r}")


def route(logits: torch.Tensor, k: int, *, score_func: str = "softmax",
          correction_bias: Optional[torch.Tensor] = None, num_groups: int = 1,
          topk_groups: Optional[int] = None, renormalize: bool = False,
          routed_scaling_factor: float = 1.0, backend: str = "auto"
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route each row of ``logits`` to k experts.

    scores = softmax(logits) or sigmoid(logits) (float32). The choice ranks
    ``scores + correction_bias``; with ``num_groups`` > 1 the E experts form equal contiguous
    groups, a group's score is the sum of its two best choice scores (DeepSeek-V3; its best one
    when a group has one expert), and only the ``topk_groups`` best groups are eligible. The
    weights are the chosen experts' *scores* (the bias never enters them), divided by their sum
    when ``renormalize`` (sigmoid: plus 1e-20, as DeepSeek-V3), times ``routed_scaling_factor``.

    Args:
        logits: [T, E] floating.  k: 1 <= k <= E (and <= topk_groups * E / num_groups).
        correction_bias: [E] or None.  num_groups: divides E.  topk_groups: 1..num_groups.
    Returns:
        topk_weights [T, k] float32 (differentiable in logits), topk_ids [T, k] int64, and
        scores [T, E] float32.
    """
    num_experts = logits.shape[-1]
    check_router_args(num_experts, k, score_func, num_groups, topk_groups, routed_scaling_factor)
    if correction_bias is not None and tuple(correction_bias.shape) != (num_experts,):
        raise ValueError(f"correction_bias must have shape ({num_experts},), got "
                         f"{tuple(correction_bias.shape)}")
    grouped = num_groups > 1 and (topk_groups or num_groups) < num_groups
    plain = (score_func == "softmax" and correction_bias is None and not grouped)
    if plain:
        weights, ids = route_topk(logits, k, renormalize=renormalize, backend=backend)
        scores = torch.softmax(logits.float(), dim=-1)
        return (weights * routed_scaling_factor if routed_scaling_factor != 1.0 else weights,
                ids, scores)
    logits = logits.float()
    scores = torch.sigmoid(logits) if score_func == "sigmoid" else torch.softmax(logits, dim=-1)
    choice = scores.detach()
    if correction_bias is not None:
        choice = choice + correction_bias.detach().float()
    if grouped:
        group_size = num_experts // num_groups
        by_group = choice.view(-1, num_groups, group_size)
        group_scores = by_group.topk(min(2, group_size), dim=-1).values.sum(-1)  # [T, G]
        best_groups = group_scores.topk(topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        choice = by_group.masked_fill(~keep[..., None], float("-inf")).view(-1, num_experts)
    ids = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        denominator = weights.sum(-1, keepdim=True)
        weights = weights / (denominator + 1e-20 if score_func == "sigmoid" else denominator)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids, scores
