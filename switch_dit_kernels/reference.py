"""Plain-PyTorch reference of the public MoE functions: the oracle for tests and the CPU path.

Every function here has exactly the signature and semantics of its counterpart in
`switch_dit_kernels.functional` (minus ``backend``) and is differentiable through ordinary autograd.
They loop over experts, as the official Switch-DiT code does: gather the rows routed to expert e,
one matmul, index_add back. This syncs with the host (``nonzero``) and is meant for correctness and
small CPU workloads, not speed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def route_topk(logits: torch.Tensor, k: int, *, renormalize: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) then top-k of router logits, ties and NaNs resolved deterministically.

    Args:
        logits: [R, E] any floating dtype.
        k: experts per route unit, 1 <= k <= E.
        renormalize: divide the k weights by their sum.
    Returns:
        topk_weights [R, k] float32 in descending order, topk_ids [R, k] int64 in [0, E).

    Selection rule (every backend): descending probability, equal probabilities in ascending
    expert id. A row whose softmax is NaN -- any NaN logit, a +inf logit (inf - inf) or all
    logits -inf -- has NaN probabilities everywhere; NaN ranks below every number, so such a row
    gets ids 0..k-1 and NaN weights: the NaN propagates to the layer's output instead of hiding
    behind a plausible routing, and the ids stay valid for the expert kernels.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    # torch.topk breaks ties in no documented order (it returns [2, 3] for a zero row of E = 4):
    # a stable descending sort keeps equal keys in id order. NaN -> -1 ranks it below every
    # probability (all >= 0).
    rank_key = torch.nan_to_num(probs.detach(), nan=-1.0)
    ids = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _expert_apply(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  tokens_per_route: int, num_experts: int, expert_fn, out_features: int
                  ) -> torch.Tensor:
    """y[r, n] = sum_j topk_weights[r, j] * expert_fn(topk_ids[r, j], x[r, n]) by a loop over experts.

    x: [T, Din] viewed as [R, N, Din]; expert_fn(e, rows[M, Din]) -> [M, out_features].
    """
    num_routes = topk_ids.shape[0]
    if num_routes == 0:
        # An empty batch: keep the graph, so backward gives every input a (zero) gradient.
        return expert_fn(0, x) * topk_weights.sum().to(x.dtype)
    xu = x.reshape(num_routes, tokens_per_route, x.shape[-1])
    y = x.new_zeros(num_routes, tokens_per_route, out_features)
    for e in range(num_experts):
        route_idx, slot = (topk_ids == e).nonzero(as_tuple=True)
        if route_idx.numel() == 0:
            continue
        gate = topk_weights[route_idx, slot].to(x.dtype)
        rows = xu[route_idx].reshape(-1, x.shape[-1])
        out = expert_fn(e, rows).reshape(route_idx.numel(), tokens_per_route, out_features)
        y = y.index_add(0, route_idx, out * gate[:, None, None])
    return y.reshape(x.shape[0], out_features)


def expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                  tokens_per_route: int = 1) -> torch.Tensor:
    """y[t] = sum_j g[r, j] * (x[t] @ weight[e_rj] + bias[e_rj]), r = t // tokens_per_route.

    Args:
        x: [T, Din], T = R * tokens_per_route, rows of one route unit contiguous.
        weight: [E, Din, Dout], x's dtype.  bias: [E, Dout] or None.
        topk_weights: [R, k] floating.  topk_ids: [R, k] int32/int64.
    Returns:
        y: [T, Dout] in x's dtype.
    """
    def linear(e, rows):
        out = rows @ weight[e]
        return out + bias[e] if bias is not None else out
    return _expert_apply(x, topk_weights, topk_ids, tokens_per_route, weight.shape[0], linear,
                         weight.shape[2])


def activation_fn(name: str, h: torch.Tensor) -> torch.Tensor:
    """Apply activation ``name``; for gated swiglu/geglu, h is [M, 2H] = [gate | up] -> [M, H]."""
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "gelu":
        return F.gelu(h)
    if name == "silu":
        return F.silu(h)
    if name == "relu":
        return F.relu(h)
    gate, up = h.chunk(2, dim=-1)
    if name == "swiglu":
        return F.silu(gate) * up
    if name == "geglu":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {name!r}")


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
               b2: Optional[torch.Tensor], topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
               activation: str = "gelu_tanh", tokens_per_route: int = 1) -> torch.Tensor:
    """y[t] = sum_j g[r, j] * (act(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e]).

    Args:
        x: [T, D].  w1: [E, D, H], or [E, D, 2H] for swiglu/geglu (first H columns the gate half,
            last H the up half; geglu uses tanh-GELU).  b1: [E, H or 2H] or None.
        w2: [E, H, Dout].  b2: [E, Dout] or None.  topk_*: [R, k].
    Returns:
        y: [T, Dout] in x's dtype.
    """
    def mlp(e, rows):
        h = rows @ w1[e]
        if b1 is not None:
            h = h + b1[e]
        out = activation_fn(activation, h) @ w2[e]
        return out + b2[e] if b2 is not None else out
    return _expert_apply(x, topk_weights, topk_ids, tokens_per_route, w1.shape[0], mlp,
                         w2.shape[2])


def switch_modulation(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Switch-DiT's SMoE modulation r = x * (1 + sum_j g[b, j] * (x[b] @ weight[e_bj] + bias[e_bj])).

    Args:
        x: [B, N, D].  weight: [E, D, D].  bias: [E, D] or None.
        topk_*: [B, k] (one route per sample) or [1, k] (one route shared by the whole batch).
    Returns:
        r: [B, N, D] in x's dtype.
    """
    batch, tokens, dim = x.shape
    rows_per_route = tokens if topk_ids.shape[0] == batch else batch * tokens
    y = expert_linear(x.reshape(batch * tokens, dim), weight, bias, topk_weights, topk_ids,
                      tokens_per_route=rows_per_route)
    return x * (1 + y.reshape(batch, tokens, dim))
