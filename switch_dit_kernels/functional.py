"""Public functional API: argument checks, then dispatch to the reference or a fast backend.

Backends (see `backend.resolve_backend`):
    "torch"      -> `switch_dit_kernels.reference` (plain PyTorch, autograd as usual)
    "triton"     -> the Triton kernels behind the ``switch_dit::*`` torch.library ops (`ops.py`)
    "cuda"       -> the optional csrc permutation + per-expert torch GEMMs (expert_linear/expert_mlp)
    "grouped_mm" -> permutation + torch._grouped_mm (bf16, sm_90+)
    "auto"       -> "triton" for CUDA tensors (or under TRITON_INTERPRET=1), else "torch"
Fast-path modules are imported lazily, so importing this package needs neither Triton nor the
compiled extension; the ``switch_dit::*`` ops are registered on import (`ops.py` imports no
Triton), so ``torch.ops.switch_dit`` is there for exported or saved graphs.

torch.compile: the "triton" backend always runs through the ``switch_dit::*`` torch.library ops
(`ops.py`), and under torch.compile so does "torch" (the reference's data-dependent sizes stay
inside the op); eagerly "torch" is plain autograd through `reference`. These functions are what
torch.compile traces: argument checks read shapes and dtypes only, and the backend is resolved
without tracing into importlib (`_resolve_traceable`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _validate, ops, reference
from .backend import BACKENDS, resolve_backend, triton_available, triton_interpreting


# Whether the `triton` package can be found: a find_spec at import (Triton itself is not imported),
# so that traced code reads a constant instead of tracing into importlib.
_TRITON_INSTALLED = triton_available()


def _resolve_traceable(backend: str, *tensors: torch.Tensor) -> str:
    """`resolve_backend`, traceable: under torch.compile "auto" and "triton" are settled from the
    device, TRITON_INTERPRET and an import-time constant (no importlib lookup in the graph)."""
    if not torch.compiler.is_compiling():
        return resolve_backend(backend, *tensors)
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    triton_usable = _TRITON_INSTALLED and (on_cuda or triton_interpreting())
    if backend == "auto":
        return "triton" if triton_usable else "torch"
    if backend not in BACKENDS or (backend == "triton" and not triton_usable):
        return resolve_backend(backend, *tensors)  # raises its error naming what is missing
    return backend


def _torch_via_op() -> bool:
    """The torch backend goes through the ops only while compiling (see the module docstring)."""
    return torch.compiler.is_compiling()


def _resolve(backend: str, x: torch.Tensor) -> str:
    """resolve_backend, except that an empty batch goes to the reference: there is nothing to
    compute, and an empty view (x[:0, ::2]) or an empty gradient (expanded, stride 0) keeps
    strides through .contiguous() that the kernel launchers assert on."""
    impl = _resolve_traceable(backend, x)
    return "torch" if x.shape[0] == 0 else impl


def route_topk(logits: torch.Tensor, k: int, *, renormalize: bool = False, backend: str = "auto"
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in float32, then the top-k.

    Args:
        logits: [R, E] floating.  k: 1 <= k <= E.  renormalize: divide the k weights by their sum.
    Returns:
        topk_weights [R, k] float32 (descending), topk_ids [R, k] int64 in [0, E). Ties go to
        the lower id. A row whose softmax is NaN (a NaN or +inf logit, or all -inf) gets ids
        0..k-1 and NaN weights, on every backend (see `reference.route_topk`).
        Not differentiable through the Triton backend's ids; weights are differentiable on "torch".
    """
    _validate.check_tensor("logits", logits, 2)
    num_experts = logits.shape[1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an int in [1, E={num_experts}], got {k!r}")
    impl = _resolve_traceable(backend, logits)
    if impl == "triton":
        from .topk_ops import route_topk_triton
        return route_topk_triton(logits, k, renormalize=renormalize)
    return reference.route_topk(logits, k, renormalize=renormalize)


def expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                  tokens_per_route: int = 1, backend: str = "auto") -> torch.Tensor:
    """Top-k mixture of linear experts: y[t] = sum_j g[r, j] * (x[t] @ W[e_rj] + b[e_rj]).

    Args:
        x: [T, Din] float32/float16/bfloat16, T = R * tokens_per_route, a route unit's rows contiguous.
        weight: [E, Din, Dout], x's dtype.  bias: [E, Dout] or None.
        topk_weights: [R, k] floating (any float dtype; used in float32).  topk_ids: [R, k] int32/int64
            in [0, E): others raise a ValueError (CPU) or a device-side assert (CUDA, no sync).
        tokens_per_route: rows per route unit (1: token routing; N: one route per sample).
    Returns:
        y: [T, Dout] in x's dtype. Differentiable in x, weight, bias and topk_weights.
    """
    _validate.check_expert_linear(x, weight, bias, topk_weights, topk_ids, tokens_per_route)
    impl = _resolve(backend, x)
    if impl == "triton" or (impl == "torch" and _torch_via_op()):
        return ops.expert_linear_op(x, weight, bias, topk_weights, topk_ids, tokens_per_route, impl)
    # The ops check the ids inside (also under torch.compile); the other paths here.
    _validate.check_topk_ids_values(topk_ids, weight.shape[0])
    if impl in ("cuda", "grouped_mm"):
        from .permute_ops import expert_linear_permuted
        return expert_linear_permuted(x, weight, bias, topk_weights, topk_ids,
                                      tokens_per_route=tokens_per_route, impl=impl)
    return reference.expert_linear(x, weight, bias, topk_weights, topk_ids,
                                   tokens_per_route=tokens_per_route)


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
               b2: Optional[torch.Tensor], topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
               activation: str = "gelu_tanh", tokens_per_route: int = 1, backend: str = "auto"
               ) -> torch.Tensor:
    """Top-k mixture of two-layer MLP experts: y = sum_j g * (act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]).

    Args:
        x: [T, D].  w1: [E, D, H], or [E, D, 2H] for "swiglu"/"geglu" (first H columns the gate
            half, last H the up half: h = act(gate) * up).  b1: [E, H or 2H] or None.
        w2: [E, H, Dout].  b2: [E, Dout] or None.  topk_weights / topk_ids: [R, k].
        activation: "gelu_tanh", "gelu", "silu", "relu", "swiglu", "geglu".
    Returns:
        y: [T, Dout] in x's dtype. Differentiable in x, w1, b1, w2, b2 and topk_weights.
    """
    _validate.check_expert_mlp(x, w1, b1, w2, b2, topk_weights, topk_ids, activation,
                               tokens_per_route)
    impl = _resolve(backend, x)
    if impl == "triton" or (impl == "torch" and _torch_via_op()):
        return ops.expert_mlp_op(x, w1, b1, w2, b2, topk_weights, topk_ids, activation,
                                 tokens_per_route, impl)
    # The ops check the ids inside (also under torch.compile); the other paths here.
    _validate.check_topk_ids_values(topk_ids, w1.shape[0])
    if impl in ("cuda", "grouped_mm"):
        from .permute_ops import expert_mlp_permuted
        return expert_mlp_permuted(x, w1, b1, w2, b2, topk_weights, topk_ids,
                                   activation=activation, tokens_per_route=tokens_per_route,
                                   impl=impl)
    return reference.expert_mlp(x, w1, b1, w2, b2, topk_weights, topk_ids,
                                activation=activation, tokens_per_route=tokens_per_route)


def switch_modulation(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                      backend: str = "auto", recompute: bool = False) -> torch.Tensor:
    """Switch-DiT's SMoE modulation: r = x * (1 + sum_j g[b, j] * (x[b] @ W[e_bj] + bias[e_bj])).

    All N tokens of sample b share its k experts, so the Triton path merges them into one weight
    W~_b = sum_j g_j W_ej on chip and costs about one dense Linear(D, D).

    Args:
        x: [B, N, D].  weight: [E, D, D], x's dtype.  bias: [E, D] or None.
        topk_weights: [B, k] floating.  topk_ids: [B, k] int32/int64. A single row ([1, k]) is
            shared by every sample (sampling, CFG pairs): the batch is then one dense GEMM.
        recompute: memory for time, on the Triton path (other backends ignore it): by default
            training keeps the expert output y ([B, N, D], x's dtype) from forward to backward
            besides x; with recompute=True the backward computes y again, one more GEMM of the
            forward's cost, and the layer keeps only x (in bf16, 2 of Switch-DiT's ~58 bytes
            per token and channel saved per block).
    Returns:
        r: [B, N, D] in x's dtype. Differentiable in x, weight, bias and topk_weights.
    """
    _validate.check_switch_modulation(x, weight, bias, topk_weights, topk_ids)
    impl = _resolve_traceable(backend, x)
    if impl == "triton" and (x.dtype == torch.float64 or x.numel() == 0):
        impl = "torch"  # no fp64 tl.dot path we test; an empty x has nothing to launch
    if impl == "triton" or (impl == "torch" and _torch_via_op()):
        return ops.switch_modulation_op(x, weight, bias, topk_weights, topk_ids, impl, recompute)
    # The ops check the ids inside (also under torch.compile); the other paths here.
    _validate.check_topk_ids_values(topk_ids, weight.shape[0])
    if impl in ("cuda", "grouped_mm"):
        batch, tokens, dim = x.shape
        rows_per_route = tokens if topk_ids.shape[0] == batch else batch * tokens
        y = expert_linear(x.reshape(batch * tokens, dim), weight, bias, topk_weights, topk_ids,
                          tokens_per_route=rows_per_route, backend=impl)
        return x * (1 + y.reshape(batch, tokens, dim))
    return reference.switch_modulation(x, weight, bias, topk_weights, topk_ids)
