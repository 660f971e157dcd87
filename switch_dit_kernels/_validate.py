"""Argument checks shared by every backend: a bad call raises a ValueError/TypeError naming the argument.

The checks read only shapes, dtypes and devices (never tensor values), so they cost no host sync.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, ndim: int, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """Raise TypeError/ValueError unless ``t`` is a tensor of rank ``ndim`` with a dtype in ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    """Raise ValueError if the given (non-None) tensors live on different devices."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_routing(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> None:
    """topk_weights [R, k] floating, topk_ids [R, k] int32/int64, 1 <= k <= num_experts."""
    check_tensor("topk_weights", topk_weights, 2)
    check_tensor("topk_ids", topk_ids, 2, INDEX_DTYPES)
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids "
                         f"{tuple(topk_ids.shape)} must have the same shape [R, k]")
    k = topk_ids.shape[1]
    if k < 1 or k > num_experts:
        raise ValueError(f"k (topk_ids.shape[1]) must be in [1, num_experts={num_experts}], got {k}")


def check_tokens_per_route(tokens_per_route, num_rows: int, num_routes: int) -> None:
    """T == R * tokens_per_route with tokens_per_route a positive int."""
    check_positive_int("tokens_per_route", tokens_per_route)
    if num_rows != num_routes * tokens_per_route:
        raise ValueError(f"x has {num_rows} rows but topk_ids has {num_routes} route units x "
                         f"tokens_per_route={tokens_per_route} = {num_routes * tokens_per_route}")


def check_expert_weight(name: str, weight: torch.Tensor, x: torch.Tensor, din: int,
                        dout: Optional[int] = None) -> None:
    """weight [E, din, dout] with x's dtype."""
    check_tensor(name, weight, 3)
    if weight.shape[1] == 0 or weight.shape[2] == 0:
        # An empty feature dimension makes every backend's tiling degenerate (a 0-wide GEMM):
        # refused here once instead of failing differently inside each backend.
        raise ValueError(f"{name} must have at least one input and one output feature, got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != din:
        raise ValueError(f"{name} must be [E, {din}, Dout] to match the input, got {tuple(weight.shape)}")
    if dout is not None and weight.shape[2] != dout:
        raise ValueError(f"{name} must be [E, {din}, {dout}], got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {weight.dtype} but x has {x.dtype}; cast one of them "
                        "(under torch.autocast the modules do this for you)")


def check_expert_bias(name: str, bias: Optional[torch.Tensor], weight: torch.Tensor) -> None:
    """bias None or [E, Dout] with the weight's dtype."""
    if bias is None:
        return
    check_tensor(name, bias, 2)
    expected = (weight.shape[0], weight.shape[2])
    if tuple(bias.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{name} has dtype {bias.dtype} but the weight has {weight.dtype}")


def check_expert_linear(x, weight, bias, topk_weights, topk_ids, tokens_per_route) -> None:
    """All checks of expert_linear(x[T, Din], weight[E, Din, Dout], bias[E, Dout]|None, ...)."""
    check_tensor("x", x, 2)
    check_expert_weight("weight", weight, x, x.shape[1])
    check_expert_bias("bias", bias, weight)
    check_routing(topk_weights, topk_ids, weight.shape[0])
    check_tokens_per_route(tokens_per_route, x.shape[0], topk_ids.shape[0])
    check_same_device(x=x, weight=weight, bias=bias, topk_weights=topk_weights, topk_ids=topk_ids)


ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")


def check_expert_mlp(x, w1, b1, w2, b2, topk_weights, topk_ids, activation, tokens_per_route) -> None:
    """All checks of expert_mlp: w1 [E, D, H] (or [E, D, 2H] gated), w2 [E, H, Dout]."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_tensor("x", x, 2)
    check_expert_weight("w1", w1, x, x.shape[1])
    check_expert_bias("b1", b1, w1)
    hidden = w1.shape[2]
    if activation in GATED_ACTIVATIONS:
        if hidden % 2:
            raise ValueError(f"w1 for the gated activation {activation!r} must be [E, D, 2H] with an "
                             f"even last dimension, got {tuple(w1.shape)}")
        hidden //= 2
    check_expert_weight("w2", w2, x, hidden)
    if w2.shape[0] != w1.shape[0]:
        raise ValueError(f"w1 has {w1.shape[0]} experts but w2 has {w2.shape[0]}")
    check_expert_bias("b2", b2, w2)
    check_routing(topk_weights, topk_ids, w1.shape[0])
    check_tokens_per_route(tokens_per_route, x.shape[0], topk_ids.shape[0])
    check_same_device(x=x, w1=w1, b1=b1, w2=w2, b2=b2, topk_weights=topk_weights, topk_ids=topk_ids)


def check_switch_modulation(x, weight, bias, topk_weights, topk_ids) -> None:
    """x [B, N, D], weight [E, D, D], bias [E, D]|None, topk_* [B, k] or [1, k] (shared by all samples)."""
    check_tensor("x", x, 3)
    check_expert_weight("weight", weight, x, x.shape[2], x.shape[2])
    check_expert_bias("bias", bias, weight)
    check_routing(topk_weights, topk_ids, weight.shape[0])
    if topk_ids.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"topk_ids must have one row per sample (B={x.shape[0]}) or a single row "
                         f"shared by all samples, got {topk_ids.shape[0]} rows")
    check_same_device(x=x, weight=weight, bias=bias, topk_weights=topk_weights, topk_ids=topk_ids)


def check_positive_int(name: str, value) -> None:
    """Raise ValueError unless ``value`` is an int >= 1 (bool is refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_topk_ids_values(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Refuse expert ids outside [0, num_experts): the one check here that reads tensor values.

    CPU tensors: a ValueError naming ``topk_ids`` (reading a CPU tensor costs no device sync).
    CUDA tensors: ``torch._assert_async`` -- no host synchronisation; a bad id fails the stream
    with a device-side assert (which ends the CUDA context) instead of letting a kernel read out
    of bounds. Called by the public functions and ops before any kernel launch.
    Skipped while torch.compile traces: reading the values there is a graph break, and every
    compiled path goes through a switch_dit op, whose real implementation runs this check.
    """
    if torch.compiler.is_compiling() or topk_ids.numel() == 0:
        return
    in_range = ((topk_ids >= 0) & (topk_ids < num_experts)).all()
    if topk_ids.device.type == "cpu":
        if not bool(in_range):
            bad = topk_ids[(topk_ids < 0) | (topk_ids >= num_experts)]
            raise ValueError(f"topk_ids must hold expert ids in [0, num_experts={num_experts}), "
                             f"got {bad[:4].tolist()}{' ...' if bad.numel() > 4 else ''}")
        return
    torch._assert_async(in_range, f"topk_ids must hold expert ids in [0, {num_experts})")
