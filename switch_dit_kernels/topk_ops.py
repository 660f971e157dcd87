"""Triton router forward and its closed-form backward: gradients flow from topk_weights to the logits."""
from __future__ import annotations

import torch


def route_topk_forward(logits: torch.Tensor, k: int, renormalize: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax + top-k kernel: logits [R, E] -> (weights [R, k] float32, ids [R, k] int64)."""
    from .kernels.topk_softmax import topk_softmax
    return topk_softmax(logits, k, renormalize)


def route_topk_backward(grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor,
                        renormalize: bool) -> torch.Tensor:
    """d(logits) [R, E] (logits' dtype) of weights = softmax(logits)[ids] (/ their sum).

    Plain differentiable torch ops (an [R, E] elementwise job: a kernel would save nothing), so
    second-order gradients through the router are exact and torch.compile traces it.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    selected = probs.gather(1, ids)
    grad_selected = grad_weights.float()
    if renormalize:
        # The terms of autograd's division backward in its order: the same bits as the reference.
        total = selected.sum(-1, keepdim=True)
        grad_selected = (grad_selected / total
                         + (-grad_selected * selected / (total * total)).sum(-1, keepdim=True))
    grad_probs = torch.zeros_like(probs).scatter_add(1, ids, grad_selected)
    grad_logits = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
    return grad_logits.to(logits.dtype)


def route_topk_triton(logits: torch.Tensor, k: int, *, renormalize: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax + top-k through the ``switch_dit::route_topk`` op: logits [R, E] ->
    (weights [R, k] float32, ids [R, k] int64)."""
    from .ops import route_topk_op
    return route_topk_op(logits, k, renormalize)
