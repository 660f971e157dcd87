"""transformers' MoE parameter layouts -> `MoE`: constructor arguments from a config, weights from a state dict.

Reads plain attributes and tensors only, so it needs no transformers import. Covered model types
(``config.model_type``) and their sparse MoE blocks:
    mixtral      softmax top-k, always renormalised
    qwen2_moe    softmax top-k, renormalised when norm_topk_prob; a sigmoid-gated shared expert
    qwen3_moe    softmax top-k, renormalised when norm_topk_prob
    olmoe        softmax top-k, renormalised when norm_topk_prob
    deepseek_v3  sigmoid + e_score_correction_bias, group-limited top-k (n_group, topk_group),
                 renormalised when norm_topk_prob, times routed_scaling_factor; n_shared_experts
                 ungated shared experts; router logits in float32
Experts are SwiGLU MLPs without biases (hidden_act "silu"; "gelu_pytorch_tanh" -> "geglu").
HF stores gate_up_proj as [E, 2I, D] (first I rows the gate) and down_proj as [E, D, I], the
kernels' w1 / w2 are [E, D, 2I] / [E, I, D]: loading copies each transposed once.
"""
from __future__ import annotations

from typing import Dict

import torch

_SOFTMAX_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu",
               "gelu_new": "geglu"}


def moe_kwargs_from_hf_config(config) -> Dict:
    """`MoE` keyword arguments for the sparse MoE block of ``config`` (see the module docstring)."""
    model_type = getattr(config, "model_type", None)
    act = getattr(config, "hidden_act", "silu")
    if act not in _GATED_ACTS:
        raise ValueError(f"config.hidden_act={act!r} has no gated expert activation here; "
                         f"supported: {sorted(_GATED_ACTS)}")
    common = dict(d_model=config.hidden_size, k=config.num_experts_per_tok,
                  activation=_GATED_ACTS[act], bias=False)
    if model_type == "mixtral":
        return dict(common, num_experts=config.num_local_experts,
                    d_hidden=config.intermediate_size, renormalize=True)
    if model_type in ("qwen2_moe", "qwen3_moe", "olmoe"):
        inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        kwargs = dict(common, num_experts=config.num_experts, d_hidden=inter,
                      renormalize=bool(getattr(config, "norm_topk_prob", False)))
        if model_type == "qwen2_moe":
            kwargs.update(shared_expert_hidden=config.shared_expert_intermediate_size,
                          shared_expert_gate=True)
        return kwargs
    if model_type == "deepseek_v3":
        num_experts = getattr(config, "n_routed_experts", None) or config.num_local_experts
        shared = getattr(config, "n_shared_experts", 0) or 0
        return dict(common, num_experts=num_experts, d_hidden=config.moe_intermediate_size,
                    score_func="sigmoid", correction_bias=True, num_groups=config.n_group,
                    topk_groups=config.topk_group, renormalize=bool(config.norm_topk_prob),
                    routed_scaling_factor=float(config.routed_scaling_factor),
                    shared_expert_hidden=(config.moe_intermediate_size * shared) or None,
                    router_float32=True)
    raise ValueError(f"config.model_type must be one of {_SOFTMAX_TYPES + ('deepseek_v3',)}, "
                     f"got {model_type!r}")


def _hf_names(moe) -> Dict[str, str]:
    """HF state-dict key (after the prefix) -> this MoE's, for the parts ``moe`` has."""
    names = {"gate.weight": "router.weight"}
    if moe.router.bias is not None:
        names["gate.bias"] = "router.bias"
    if moe.e_score_correction_bias is not None:
        names["gate.e_score_correction_bias"] = "e_score_correction_bias"
    if moe.d_hidden is None:
        raise ValueError("load_hf_state_dict needs MLP experts (d_hidden set); HF experts are "
                         "MLPs")
    gated = moe.activation in ("swiglu", "geglu")
    names["experts.gate_up_proj" if gated else "experts.up_proj"] = "w1"
    names["experts.down_proj"] = "w2"
    if moe.b1 is not None:
        names["experts.gate_up_proj_bias" if gated else "experts.up_proj_bias"] = "b1"
        names["experts.down_proj_bias"] = "b2"
    if moe.shared_expert is not None:
        for part in (("gate_proj", "up_proj", "down_proj") if gated else ("up_proj", "down_proj")):
            names[f"shared_expert.{part}.weight"] = f"shared_expert.{part}.weight"
    if moe.shared_expert_gate is not None:
        names["shared_expert_gate.weight"] = "shared_expert_gate.weight"
    return names


def load_hf_moe_state_dict(moe, state_dict, prefix: str = "") -> None:
    """Copy an HF sparse MoE block's ``state_dict`` (keys after ``prefix``) into ``moe``.

    DeepSeek-V3's ``shared_experts.*`` keys are read as ``shared_expert.*``. Expert weights are
    transposed from HF's [E, out, in]. ValueError names missing keys, unused keys and shapes
    that do not match.
    """
    found = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith("shared_experts."):
            name = "shared_expert." + name[len("shared_experts."):]
        found[name] = value
    names = _hf_names(moe)
    missing = sorted(set(names) - set(found))
    unused = sorted(set(found) - set(names))
    if missing or unused:
        raise ValueError(f"HF MoE state dict (prefix {prefix!r}) does not match this MoE: "
                         f"missing {missing}, unused {unused}")
    targets = dict(moe.named_parameters())
    targets.update(dict(moe.named_buffers()))
    with torch.no_grad():
        for hf_name, name in names.items():
            value = found[hf_name]
            if name in ("w1", "w2"):
                value = value.transpose(1, 2)
            target = targets[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{prefix}{hf_name} has shape {tuple(found[hf_name].shape)}, "
                                 f"which does not give {name} {tuple(target.shape)}")
            target.copy_(value)
