"""transformers experts backend: run HF MoE models' experts on switch_dit_kernels' `expert_mlp`.

transformers (>= 5) dispatches the forward of every experts class decorated with
``@use_experts_implementation`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and ~60 more)
through ``ALL_EXPERTS_FUNCTIONS[config._experts_implementation]``, called as
``fn(experts_module, hidden_states [T, D], top_k_index [T, k], top_k_weights [T, k]) -> [T, D]``.

    from switch_dit_kernels.integrations.transformers import register
    name = register()                      # "switch_dit"
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation=name)
    # or, on a model already built: model.set_experts_implementation(name)

How HF's layout maps onto the kernels (no copies; the kernels read HF's tensors through strides):
    gate_up_proj [E, 2I, D] (is_transposed=False) -> w1 = gate_up_proj.transpose(1, 2) [E, D, 2I]
    gate_up_proj [E, D, 2I] (is_transposed=True)  -> w1 = gate_up_proj
    down_proj    [E, D, I] / [E, I, D]            -> w2 [E, I, D] likewise
    gate_up_proj_bias, down_proj_bias             -> b1, b2;  up_proj (has_gate=False) -> w1
HF's concatenated gate/up (first I columns gate, last I up) is exactly `expert_mlp`'s gated
layout; act_fn SiLU -> "swiglu", tanh-GELU -> "geglu" (ungated: "silu", "relu", "gelu",
"gelu_tanh"). What the kernels do not compute is refused with a NotImplementedError naming it:
interleaved gate/up columns, a model's own ``_apply_gate`` (GPT-OSS's clamped SwiGLU
``(clamp(up) + 1) * gate * sigmoid(alpha * gate)``, with expert biases), a norm after each expert,
and activations other than the above (e.g. relu2, gated exact GELU).

Expert ids equal to E (transformers' marker for a token whose expert lives on another rank under
expert parallelism; eager skips them) are mapped to expert 0 with weight 0 through ``torch.where``:
they add nothing to the output and their routing weight gets a zero gradient, as in eager, at the
cost of computing those rows on expert 0. The kernels themselves refuse ids outside [0, E).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..backend import BACKENDS
from ..functional import expert_mlp

DEFAULT_NAME = "switch_dit"


class UnsupportedExpertsError(NotImplementedError):
    """An HF experts module whose math `expert_mlp` does not compute; the message says what."""


@dataclass
class ExpertWeights:
    """HF experts' parameters as `expert_mlp` arguments (views of HF's tensors, never copies).

    w1: [E, D, H] or [E, D, 2H] (gated).  b1: [E, H or 2H] or None.  w2: [E, H, D].
    b2: [E, D] or None.  activation: `expert_mlp`'s name.
    """

    w1: torch.Tensor
    b1: Optional[torch.Tensor]
    w2: torch.Tensor
    b2: Optional[torch.Tensor]
    activation: str


def _activation_kind(act_fn) -> Optional[str]:
    """"silu", "relu", "gelu" (erf) or "gelu_tanh" for the activation modules the kernels compute,
    None for any other."""
    from transformers import activations as hf_act

    if isinstance(act_fn, (torch.nn.SiLU, hf_act.SiLUActivation)):
        return "silu"
    if type(act_fn) is torch.nn.ReLU:
        return "relu"
    if type(act_fn) is hf_act.GELUActivation:
        return "gelu"
    if type(act_fn) is torch.nn.GELU:
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    # All four are 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), gelu_fast with the constant
    # rounded to 0.7978845608 (relative difference < 1e-10).
    tanh_gelus = (hf_act.GELUTanh, hf_act.NewGELUActivation, hf_act.FastGELUActivation,
                  hf_act.AccurateGELUActivation)
    if type(act_fn) in tanh_gelus:
        return "gelu_tanh"
    return None


_GATED = {"silu": "swiglu", "gelu_tanh": "geglu"}


def unsupported_reason(experts: torch.nn.Module) -> Optional[str]:
    """None when `expert_mlp` computes this HF experts module's math, else what is missing."""
    from transformers.integrations import moe as hf_moe

    cls = type(experts).__name__
    if getattr(experts, "has_post_expert_norm", False):
        return f"{cls} applies a norm after each expert (has_post_expert_norm=True)"
    has_gate = getattr(experts, "has_gate", True)
    if has_gate:
        custom_gate = getattr(type(experts), "_apply_gate", hf_moe._default_apply_gate)
        if custom_gate is not hf_moe._default_apply_gate:
            if hasattr(experts, "limit") and hasattr(experts, "alpha"):  # GPT-OSS and its kin
                return (f"{cls} uses a clamped SwiGLU ((clamp(up, -limit, limit) + 1) * g * "
                        f"sigmoid(alpha * g), g = clamp(gate, max=limit), limit={experts.limit}, "
                        f"alpha={experts.alpha}) on interleaved gate/up columns; expert_mlp has "
                        "no clamped activation")
            limit = getattr(experts, "swiglu_limit", None)
            if limit is not None:  # DeepSeek-V4, GLM-5-Next, HY-V4, MiniMax-M3: clamped gates
                return (f"{cls}._apply_gate clamps the gate and up halves (swiglu_limit={limit}); "
                        "expert_mlp has no clamped activation")
            return f"{cls} defines its own gate function {cls}._apply_gate"
        if not getattr(experts, "is_concatenated", True):
            return f"{cls} interleaves gate and up columns (is_concatenated=False)"
    act = getattr(experts, "act_fn", None)
    kind = _activation_kind(act) if act is not None else None
    if kind is None or (has_gate and kind not in _GATED):
        what = "gated " if has_gate else ""
        return (f"{cls} uses the {what}activation {type(act).__name__}; expert_mlp computes "
                + ("SiLU and tanh-GELU gates (swiglu, geglu)" if has_gate
                   else "silu, relu, gelu and gelu_tanh"))
    for name in (("gate_up_proj" if has_gate else "up_proj"), "down_proj"):
        weight = getattr(experts, name, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
            return f"{cls} has no 3-D {name} parameter"
        if not weight.dtype.is_floating_point or weight.element_size() < 2:
            return (f"{cls}.{name} has dtype {weight.dtype}; expert_mlp needs float16, bfloat16 "
                    "or float32 weights (quantised experts are not supported)")
    return None


def expert_weights(experts: torch.nn.Module) -> ExpertWeights:
    """Views of an HF experts module's weights in `expert_mlp`'s layout (no copy).

    Raises UnsupportedExpertsError when the kernels do not compute the module's math.
    """
    reason = unsupported_reason(experts)
    if reason is not None:
        raise UnsupportedExpertsError(
            f"switch_dit_kernels cannot run {type(experts).__name__}: {reason}. "
            "Use experts_implementation='eager' or 'grouped_mm' for this model.")
    has_gate = getattr(experts, "has_gate", True)
    up = experts.gate_up_proj if has_gate else experts.up_proj
    down = experts.down_proj
    if not getattr(experts, "is_transposed", False):  # [E, out, in] as nn.Linear stores it
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    bias_up = bias_down = None
    if getattr(experts, "has_bias", False):
        bias_up = experts.gate_up_proj_bias if has_gate else experts.up_proj_bias
        bias_down = experts.down_proj_bias
    kind = _activation_kind(experts.act_fn)
    return ExpertWeights(up, bias_up, down, bias_down, _GATED[kind] if has_gate else kind)


def mask_foreign_experts(top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                         num_experts: int):
    """Ids outside [0, E) (E: another rank's expert) -> id 0 with weight 0, without a host sync.

    torch.where (not a multiply) so that the masked slots pass a zero gradient to the router and
    a NaN/inf weight there cannot leak. Returns (ids [T, k], weights [T, k]).
    """
    local = (top_k_index >= 0) & (top_k_index < num_experts)
    ids = torch.where(local, top_k_index, 0)
    weights = torch.where(local, top_k_weights, 0.0)
    return ids, weights


def _compute_dtype(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """autocast's dtype when it is on (custom autograd Functions do not see autocast), else the
    weights' (as transformers' grouped_mm path casts the input to the weights' dtype)."""
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def experts_forward(experts: torch.nn.Module, hidden_states: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
                    backend: str = "auto") -> torch.Tensor:
    """The experts forward transformers calls: hidden_states [T, D] (or [..., D]),
    top_k_index [T, k] int, top_k_weights [T, k] floating -> [T, D] in hidden_states' dtype."""
    weights = expert_weights(experts)
    shape = hidden_states.shape
    tokens = hidden_states.reshape(-1, shape[-1])
    ids, gates = mask_foreign_experts(top_k_index.reshape(tokens.shape[0], -1),
                                      top_k_weights.reshape(tokens.shape[0], -1),
                                      weights.w1.shape[0])
    dtype = _compute_dtype(tokens, weights.w1)
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
    y = expert_mlp(cast(tokens), cast(weights.w1), cast(weights.b1), cast(weights.w2),
                   cast(weights.b2), gates, ids, activation=weights.activation, backend=backend)
    return y.to(hidden_states.dtype).reshape(shape)


def register(name: str = DEFAULT_NAME, *, backend: str = "auto") -> str:
    """Register switch_dit_kernels as transformers experts implementation ``name``; returns it.

    Then ``from_pretrained(..., experts_implementation=name)`` or
    ``model.set_experts_implementation(name)`` runs the experts of every model built on
    ``@use_experts_implementation`` through `expert_mlp` with ``backend`` ("auto": the Triton
    kernels on CUDA, the PyTorch reference on the CPU). Registering a name again replaces it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if name == "eager":
        raise ValueError("name must not be 'eager' (transformers' own loop over experts)")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as exc:
        raise ImportError("switch_dit_kernels.integrations.transformers needs transformers >= 5 "
                          "(pip install 'transformers>=5'), which has the experts hook "
                          "transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS") from exc

    def switch_dit_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
        return experts_forward(experts, hidden_states, top_k_index, top_k_weights,
                               backend=backend)

    switch_dit_experts_forward.__qualname__ = f"switch_dit_experts_forward[{name}, {backend}]"
    ALL_EXPERTS_FUNCTIONS.register(name, switch_dit_experts_forward)
    return name
