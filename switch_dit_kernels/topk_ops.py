"""Autograd wrapper of the fused Triton router: gradients flow from topk_weights to the logits."""
from __future__ import annotations

import torch


def _selected_weights(logits: torch.Tensor, ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """topk_weights as a differentiable function of logits for fixed ids: softmax(logits)[ids]."""
    weights = torch.softmax(logits.float(), dim=-1).gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights


class _RouteTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, renormalize):
        from .kernels.topk_softmax import topk_softmax
        weights, ids = topk_softmax(logits, k, renormalize)
        ctx.save_for_backward(logits, ids)
        ctx.renormalize = renormalize
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_weights, _grad_ids):
        logits, ids = ctx.saved_tensors
        # The backward is an [R, E] elementwise job: recomputing the softmax in PyTorch costs
        # as much as a dedicated kernel would and keeps one source of truth for the math.
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(True)
            weights = _selected_weights(leaf, ids, ctx.renormalize)
            (grad_logits,) = torch.autograd.grad(weights, leaf, grad_weights)
        return grad_logits, None, None


def route_topk_triton(logits: torch.Tensor, k: int, *, renormalize: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax + top-k: logits [R, E] -> (weights [R, k] float32, ids [R, k] int64)."""
    return _RouteTopK.apply(logits, k, renormalize)
