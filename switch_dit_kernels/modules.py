"""nn.Modules: `MoE` (token-choice top-k MoE) and `TimestepMoE` (Switch-DiT's timestep-gated SMoE)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import ACTIVATIONS, FLOAT_DTYPES
from .backend import BACKENDS
from .functional import expert_linear, expert_mlp, switch_modulation
from .reference import activation_fn
from .routers import check_router_args, route


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts run in: autocast's when it is on for x's device, else x's own.

    Custom autograd Functions do not see autocast, so the modules cast inputs and weights here.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _check_input_dtype(name: str, t, module: nn.Module, param: torch.Tensor) -> None:
    """``t`` a floating tensor in ``param``'s dtype, unless autocast is on for its device (then
    the layers run in autocast's dtype whatever the input's)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.dtype != param.dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(f"{name} has dtype {t.dtype} but {type(module).__name__}'s parameters are "
                        f"{param.dtype}: pass {name} in {param.dtype}, convert the module "
                        f"(module.to({t.dtype})), or run under torch.autocast")


def _check_int(name: str, value, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_layer_args(d_model, num_experts, k, backend: str) -> None:
    """The arguments both layers take: positive ints, k <= num_experts, a known backend."""
    _check_int("d_model", d_model)
    _check_int("num_experts", num_experts)
    _check_int("k", k)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class MoE(nn.Module):
    """Dropless token-choice top-k Mixture of Experts, a drop-in replacement for an MLP.

    Args:
        d_model: input and output width D.
        num_experts: E.  k: experts per token (1 <= k <= E).
        d_hidden: None for single linear experts D -> D; else MLP experts D -> H -> D.
        activation: for MLP experts: "gelu_tanh", "gelu", "silu", "relu", "swiglu", "geglu".
        bias: expert biases.  renormalize: divide each token's k weights by their sum.
        backend: "auto", "torch", "triton", "cuda", "grouped_mm".
        load_balance_coef, z_loss_coef: weights of the Switch-Transformer load-balancing loss and
            the router z-loss in ``self.aux_loss`` (0 = off; the raw values are always recorded).

    Router options (defaults: Switch/Mixtral's softmax top-k; see `routers.route`):
        score_func: "softmax" or "sigmoid" (DeepSeek-V3).  router_bias: a bias in the router.
        correction_bias: a buffer ``e_score_correction_bias`` [E] added to the scores for the
            choice only (DeepSeek-V3's load balancing without an aux loss).
        num_groups, topk_groups: group-limited top-k (experts in num_groups equal groups, only
            the topk_groups best groups eligible).  routed_scaling_factor: multiplies the weights.
        shared_expert_hidden: width of an always-on shared expert (same activation, no biases;
            DeepSeek-V3: moe_intermediate_size * n_shared_experts) added to the output, or None.
        shared_expert_gate: scale the shared expert by sigmoid(Linear(D, 1)(x)) (Qwen2-MoE).
        router_float32: compute the router logits in float32 whatever x's dtype (DeepSeek-V3
            does; with bf16 inputs the choice then matches HF's).
    HF checkpoints: `MoE.from_hf_config` and `load_hf_state_dict` (HF's parameter layouts).

    Shapes: forward(x [..., D]) -> [..., D]. After each forward, ``self.aux_loss`` (scalar tensor),
    ``self.load_balance_loss`` and ``self.z_loss`` hold the auxiliary losses of that call.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, d_hidden: Optional[int] = None,
                 activation: str = "gelu_tanh", bias: bool = True, renormalize: bool = False,
                 backend: str = "auto", load_balance_coef: float = 0.0, z_loss_coef: float = 0.0,
                 score_func: str = "softmax", router_bias: bool = False,
                 correction_bias: bool = False, num_groups: int = 1,
                 topk_groups: Optional[int] = None, routed_scaling_factor: float = 1.0,
                 shared_expert_hidden: Optional[int] = None, shared_expert_gate: bool = False,
                 router_float32: bool = False):
        super().__init__()
        _check_layer_args(d_model, num_experts, k, backend)
        if d_hidden is not None:
            _check_int("d_hidden", d_hidden)
        check_router_args(num_experts, k, score_func, num_groups, topk_groups,
                          routed_scaling_factor)
        if shared_expert_hidden is not None:
            _check_int("shared_expert_hidden", shared_expert_hidden)
        elif shared_expert_gate:
            raise ValueError("shared_expert_gate=True needs shared_expert_hidden (the shared "
                             "expert's width)")
        for name, coef in (("load_balance_coef", load_balance_coef), ("z_loss_coef", z_loss_coef)):
            if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not (
                    math.isfinite(coef) and coef >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {coef!r}")
        # Checked even for linear experts (which ignore it), so a typo never waits for d_hidden.
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.d_hidden, self.activation = d_hidden, activation
        self.renormalize, self.backend = renormalize, backend
        self.load_balance_coef, self.z_loss_coef = load_balance_coef, z_loss_coef
        self.score_func, self.num_groups, self.topk_groups = score_func, num_groups, topk_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.router = nn.Linear(d_model, num_experts, bias=router_bias)
        self.router_float32 = bool(router_float32)
        # Steers the choice only, updated outside the optimiser (DeepSeek-V3): a buffer.
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(num_experts) if correction_bias else None)
        if d_hidden is None:
            self.weight = nn.Parameter(torch.empty(num_experts, d_model, d_model))
            self.bias = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        else:
            gated = activation in ("swiglu", "geglu")
            self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_hidden * (2 if gated else 1)))
            self.b1 = nn.Parameter(torch.zeros(num_experts, self.w1.shape[2])) if bias else None
            self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
            self.b2 = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.shared_expert = (SharedExpert(d_model, shared_expert_hidden, activation)
                              if shared_expert_hidden is not None else None)
        self.shared_expert_gate = (nn.Linear(d_model, 1, bias=False) if shared_expert_gate
                                   else None)
        self.reset_parameters()
        self.aux_loss = self.load_balance_loss = self.z_loss = None

    def reset_parameters(self) -> None:
        """nn.Linear's default init per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for name in ("weight", "w1", "w2"):
            w = getattr(self, name, None)
            if w is not None:
                nn.init.uniform_(w, -1 / math.sqrt(w.shape[1]), 1 / math.sqrt(w.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The experts' dtype, not the router's: a float32 router inside a bf16 MoE is how HF
        # checkpoints keep DeepSeek-V3's gate (router_float32).
        _check_input_dtype("x", x, self, self.weight if self.d_hidden is None else self.w1)
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got {tuple(x.shape)}")
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)
        if self.router_float32:
            bias = self.router.bias.float() if self.router.bias is not None else None
            logits = F.linear(tokens.float(), self.router.weight.float(), bias)
        else:
            logits = self.router(tokens)
        topk_weights, topk_ids, scores = route(
            logits, self.k, score_func=self.score_func,
            correction_bias=self.e_score_correction_bias, num_groups=self.num_groups,
            topk_groups=self.topk_groups, renormalize=self.renormalize,
            routed_scaling_factor=self.routed_scaling_factor, backend=self.backend)
        self._record_aux_losses(logits, topk_ids, scores)
        dtype = _compute_dtype(tokens)
        xc = tokens.to(dtype)
        cast = lambda p: None if p is None else p.to(dtype)
        if self.d_hidden is None:
            y = expert_linear(xc, cast(self.weight), cast(self.bias), topk_weights, topk_ids,
                              backend=self.backend)
        else:
            y = expert_mlp(xc, cast(self.w1), cast(self.b1), cast(self.w2), cast(self.b2),
                           topk_weights, topk_ids, activation=self.activation, backend=self.backend)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            y = y + shared.to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    @classmethod
    def from_hf_config(cls, config, **overrides) -> "MoE":
        """An MoE shaped like the sparse MoE block of a transformers config (mixtral, qwen2_moe,
        qwen3_moe, olmoe, deepseek_v3); ``overrides`` (e.g. backend) win. Load the block's
        weights with `load_hf_state_dict`. Reads attributes only: needs no transformers."""
        from .integrations.hf_layout import moe_kwargs_from_hf_config
        return cls(**{**moe_kwargs_from_hf_config(config), **overrides})

    def load_hf_state_dict(self, state_dict, prefix: str = "") -> None:
        """Copy a transformers sparse MoE block's parameters (``block.state_dict()``, keys
        ``gate.weight``, ``experts.gate_up_proj`` [E, 2I, D], ``experts.down_proj`` [E, D, I],
        ``gate.e_score_correction_bias``, ``shared_expert(s).*``, ``shared_expert_gate.weight``,
        after ``prefix``) into this module; ValueError naming any missing or unused key."""
        from .integrations.hf_layout import load_hf_moe_state_dict
        load_hf_moe_state_dict(self, state_dict, prefix)

    def _record_aux_losses(self, logits: torch.Tensor, topk_ids: torch.Tensor,
                           scores: Optional[torch.Tensor] = None) -> None:
        """Switch Transformer load balance E * sum_e f_e P_e (f: share of the T*k assignments,
        P: mean router probability; sigmoid scores normalised per token) and z-loss
        mean(logsumexp(logits)^2)."""
        logits = logits.float()
        if scores is None:
            probs = torch.softmax(logits, dim=-1)
        elif self.score_func == "sigmoid":
            probs = scores / scores.sum(-1, keepdim=True)
        else:  # the router's own softmax(logits.float()): the same bits, computed once
            probs = scores
        counts = torch.zeros(self.num_experts, device=logits.device, dtype=torch.float32)
        counts.scatter_add_(0, topk_ids.reshape(-1).long(),
                            torch.ones(topk_ids.numel(), device=logits.device))
        fraction = counts / max(topk_ids.numel(), 1)
        # Means over the tokens as sums / max(T, 1): 0 on an empty batch, where mean() would give
        # NaN and poison a summed training loss; sums of nothing keep the graph connected.
        num_tokens = max(logits.shape[0], 1)
        mean_probs = probs.sum(0) / num_tokens
        self.load_balance_loss = self.num_experts * (fraction * mean_probs).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).pow(2).sum() / num_tokens
        self.aux_loss = self.load_balance_coef * self.load_balance_loss + self.z_loss_coef * self.z_loss

    def extra_repr(self) -> str:
        extra = "" if self.score_func == "softmax" else f", score_func={self.score_func!r}"
        if self.num_groups > 1:
            extra += f", num_groups={self.num_groups}, topk_groups={self.topk_groups}"
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
                f"d_hidden={self.d_hidden}, activation={self.activation!r}, "
                f"backend={self.backend!r}{extra}")


class SharedExpert(nn.Module):
    """An always-on expert: Linear(D, H) -> act -> Linear(H, D) without biases; gated activations
    ("swiglu", "geglu") use HF's ``gate_proj`` / ``up_proj`` / ``down_proj``, the others
    ``up_proj`` / ``down_proj``. forward(x [T, D]) -> [T, D]."""

    def __init__(self, d_model: int, d_hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        if activation in ("swiglu", "geglu"):
            self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(x)
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * up)
        if self.activation == "geglu":
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * up)
        return self.down_proj(activation_fn(self.activation, up))


@dataclass
class TimestepRouting:
    """One routing decision per sample (or per timestep of a table).

    probs: [B, E] float32 gate probabilities.  topk_weights: [B, k] float32 (not renormalised).
    topk_ids: [B, k] int64.
    """

    probs: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor

    def index(self, rows: torch.Tensor) -> "TimestepRouting":
        """Select rows (e.g. the batch's timesteps from a table over all timesteps)."""
        return TimestepRouting(self.probs[rows], self.topk_weights[rows], self.topk_ids[rows])


class TimestepMoE(nn.Module):
    """Switch-DiT's sparse MoE: a timestep-gated mixture of Linear(D, D) experts that modulates x.

    The gate is SiLU -> Linear(d_cond, E) on a conditioning (timestep) embedding; softmax, then top-k
    without renormalisation. All N tokens of a sample share its k experts. The experts are
    zero-initialised, so at initialisation r == x and a Switch-DiT block computes what a DiT block does.

    Args:
        d_model: D.  num_experts: E.  k: experts per sample.  d_cond: embedding width (default D).
        backend: "auto" (fused Triton `switch_modulation` on CUDA), "torch", "triton", "cuda",
            "grouped_mm".
        recompute: keep no expert output from forward to backward, compute it again there (one
            more D x D GEMM per layer, one x-sized activation less; Triton path only).

    forward(x [B, N, D], cond [B, d_cond] | None, *, routing=None) -> (r [B, N, D], TimestepRouting)
    with r = x * (1 + sum_j g_j (x W_ej + b_ej)). Pass ``routing`` (e.g. rows of a table computed by
    `route` over all timesteps) to skip the gate.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, d_cond: Optional[int] = None,
                 backend: str = "auto", recompute: bool = False):
        super().__init__()
        _check_layer_args(d_model, num_experts, k, backend)
        d_cond = d_model if d_cond is None else d_cond
        _check_int("d_cond", d_cond)
        self.d_model, self.num_experts, self.k, self.d_cond = d_model, num_experts, k, d_cond
        self.backend, self.recompute = backend, bool(recompute)
        self.gate = nn.Sequential(nn.SiLU(), nn.Linear(d_cond, num_experts))
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model, d_model))  # [E, Din, Dout]
        self.bias = nn.Parameter(torch.zeros(num_experts, d_model))

    def gate_probs(self, cond: torch.Tensor) -> torch.Tensor:
        """Gate probabilities softmax(Linear(SiLU(cond))) in float32: cond [M, d_cond] -> [M, E].

        cond: floating, the gate's dtype (any under autocast).
        """
        _check_input_dtype("cond", cond, self, self.gate[1].weight)
        if cond.dim() != 2 or cond.shape[-1] != self.d_cond:
            raise ValueError(f"cond must be [M, d_cond={self.d_cond}], got {tuple(cond.shape)}")
        return torch.softmax(self.gate(cond).float(), dim=-1)

    def route(self, cond: torch.Tensor) -> TimestepRouting:
        """Routing of each row of cond [M, d_cond]: probabilities and their top-k (weights keep grad)."""
        probs = self.gate_probs(cond)
        topk_weights, topk_ids = torch.topk(probs, self.k, dim=-1)
        return TimestepRouting(probs, topk_weights, topk_ids)

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None, *,
                routing: Optional[TimestepRouting] = None) -> Tuple[torch.Tensor, TimestepRouting]:
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x must be a floating torch.Tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, N, d_model={self.d_model}], got {tuple(x.shape)}")
        if routing is None:
            if cond is None:
                raise ValueError("TimestepMoE.forward needs cond [B, d_cond] or a precomputed routing")
            rows_ok = not isinstance(cond, torch.Tensor) or cond.dim() != 2 or \
                cond.shape[0] in (1, x.shape[0])
            if not rows_ok:  # type, rank and width are gate_probs' to check
                raise ValueError(f"cond must have one row per sample (B={x.shape[0]}) or a single "
                                 f"row shared by all samples, got shape {tuple(cond.shape)}")
            routing = self.route(cond)
        dtype = _compute_dtype(x)
        r = switch_modulation(x.to(dtype), self.weight.to(dtype), self.bias.to(dtype),
                              routing.topk_weights, routing.topk_ids, backend=self.backend,
                              recompute=self.recompute)
        return r, routing

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
                f"d_cond={self.d_cond}, backend={self.backend!r}, recompute={self.recompute}")
