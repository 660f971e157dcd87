"""Baselines as MoE layers are written today: the official Switch-DiT expert loop, its token-level
(Hugging Face Mixtral) twin, and torch._grouped_mm with PyTorch-side permutation.

These are what the kernels are measured against, so they follow the public code's structure, not
ours:

- `switch_modulation_loop`: the official Switch-DiT SMoE. For each expert e: the samples with e in
  their top-k (``torch.where``, a host sync as in the original), gather x of those samples, one
  nn.Linear (weight in nn.Linear's [Dout, Din] layout, so ``addmm`` with a transposed operand),
  scale by the gate, ``index_add_`` into the output; then r = x * (1 + y).
- `expert_mlp_loop`: Mixtral-style token loop with MLP experts (Linear -> GELU -> Linear, no bias).
- `switch_modulation_grouped_mm` / `expert_mlp_grouped_mm`: sort the (unit, slot) pairs by expert
  on the device (no host sync), gather, `torch._grouped_mm` over experts, scale, ``index_add_``.
  On CUDA torch._grouped_mm needs bfloat16 (and sm_80+/sm_90 depending on the torch version);
  `grouped_mm_unavailable` probes that once and says why not.

Shapes: x [B, N, D] (switch) or [T, D] (token MLP); topk_weights [B or T, k] float32; topk_ids
[B or T, k] int64. The loop baselines take nn.Linear-layout weights ([E, Dout, Din]); the
grouped_mm ones take the library's [E, Din, Dout].
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from switch_dit_kernels.reference import activation_fn


def _act(name: str, h: torch.Tensor) -> torch.Tensor:
    """The reference's activation; the baselines take the plain (ungated) ones only."""
    if name not in ("gelu_tanh", "gelu", "silu", "relu"):
        raise ValueError(f"activation must be gelu_tanh, gelu, silu or relu for the baselines, got {name!r}")
    return activation_fn(name, h)


def switch_modulation_loop(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                           topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Official Switch-DiT loop: r = x * (1 + sum_j g[b, j] * Linear_{e_bj}(x[b])).

    Args:
        x: [B, N, D].  weight_t: [E, D, D] in nn.Linear layout (y = x @ weight_t[e].T).
        bias: [E, D] or None.  topk_weights: [B, k] float.  topk_ids: [B, k] int.
    Returns:
        r: [B, N, D] in x's dtype.
    """
    num_experts = weight_t.shape[0]
    y = torch.zeros_like(x)
    # The gate weights enter in the activations' dtype, as in the Mixtral block the code follows.
    gates = topk_weights.to(x.dtype)
    for e in range(num_experts):
        sample_idx, slot = torch.where(topk_ids == e)
        if sample_idx.numel() == 0:
            continue
        out = F.linear(x[sample_idx], weight_t[e], None if bias is None else bias[e])
        y.index_add_(0, sample_idx, out * gates[sample_idx, slot][:, None, None])
    return x * (1 + y)


def expert_mlp_loop(x: torch.Tensor, w1_t: torch.Tensor, w2_t: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    activation: str = "gelu_tanh") -> torch.Tensor:
    """Mixtral-style token loop: y[t] = sum_j g[t, j] * W2_e act(W1_e x[t]) (no biases).

    Args:
        x: [T, D].  w1_t: [E, F, D], w2_t: [E, D, F] (nn.Linear layout).
        topk_weights: [T, k] float.  topk_ids: [T, k] int.
    Returns:
        y: [T, D] in x's dtype.
    """
    num_experts = w1_t.shape[0]
    y = torch.zeros(x.shape[0], w2_t.shape[1], dtype=x.dtype, device=x.device)
    expert_mask = F.one_hot(topk_ids, num_experts).permute(2, 1, 0)  # [E, k, T]
    for e in range(num_experts):
        slot, token = torch.where(expert_mask[e])
        if token.numel() == 0:
            continue
        h = _act(activation, F.linear(x[token], w1_t[e]))
        out = F.linear(h, w2_t[e]) * topk_weights[token, slot, None].to(x.dtype)
        y.index_add_(0, token, out)
    return y


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(torch, "_grouped_mm", None) or getattr(F, "grouped_mm", None)
    if fn is None:
        raise RuntimeError(f"torch {torch.__version__} has neither torch._grouped_mm nor "
                           "torch.nn.functional.grouped_mm")
    return fn(a, b, offs=offs)


def _sort_pairs(topk_ids: torch.Tensor, num_experts: int, rows_per_pair: int):
    """(order [R*k]: pairs by expert, unit [R*k]: their route unit, offs [E] int32 row ends)."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = (torch.cumsum(counts, 0) * rows_per_pair).to(torch.int32)
    return order, order // k, offs


def switch_modulation_grouped_mm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """r = x * (1 + y) with y from one torch._grouped_mm over the expert-sorted (sample, slot) pairs.

    Args:
        x: [B, N, D].  weight: [E, D, D] (the library's [E, Din, Dout]).  bias: [E, D] or None.
        topk_weights: [B, k].  topk_ids: [B, k] int64.
    """
    batch, tokens, dim = x.shape
    num_experts = weight.shape[0]
    order, unit, offs = _sort_pairs(topk_ids, num_experts, tokens)
    rows = x[unit].reshape(-1, dim)  # [B*k*N, D], each pair a contiguous run of N rows
    out = _grouped_mm(rows, weight, offs).view(-1, tokens, weight.shape[2])
    if bias is not None:
        out = out + bias[topk_ids.reshape(-1)[order]][:, None, :]
    out = out * topk_weights.reshape(-1)[order].to(x.dtype)[:, None, None]
    y = torch.zeros_like(x).index_add_(0, unit, out)
    return x * (1 + y)


def expert_mlp_grouped_mm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                          topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          activation: str = "gelu_tanh") -> torch.Tensor:
    """Token MLP experts by two torch._grouped_mm calls over the expert-sorted (token, slot) pairs.

    Args:
        x: [T, D].  w1: [E, D, F], w2: [E, F, D] (the library's layout).  topk_*: [T, k].
    """
    order, token, offs = _sort_pairs(topk_ids, w1.shape[0], 1)
    h = _act(activation, _grouped_mm(x[token], w1, offs))
    out = _grouped_mm(h, w2, offs) * topk_weights.reshape(-1)[order].to(x.dtype)[:, None]
    y = torch.zeros(x.shape[0], w2.shape[2], dtype=x.dtype, device=x.device)
    return y.index_add_(0, token, out)


@functools.lru_cache(maxsize=None)
def grouped_mm_unavailable(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """None when torch's grouped GEMM runs forward and backward here, else the reason (probed once)."""
    if getattr(torch, "_grouped_mm", None) is None and getattr(F, "grouped_mm", None) is None:
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device_type == "cuda" and dtype != torch.bfloat16:
        return "torch._grouped_mm on CUDA takes bfloat16 only"
    try:
        a = torch.randn(48, 32, device=device_type, dtype=dtype, requires_grad=True)
        b = torch.randn(3, 32, 16, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([16, 16, 48], device=device_type, dtype=torch.int32)  # an empty group
        out = _grouped_mm(a, b, offs)
        out.backward(torch.randn_like(out))
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        return f"torch._grouped_mm fails here: {type(exc).__name__}: {str(exc)[:200]}"
    return None
