"""Switch-DiT: DiT whose blocks are modulated by a timestep-gated sparse Mixture of Experts.

Each block owns a `TimestepMoE` (``blocks.i.moe``): a gate SiLU -> Linear(D, E) on the timestep
embedding, top-k of its softmax, and zero-initialised Linear(D, D) experts giving m = 1 + y and
r = x * m. The block runs DiT's attention and MLP on r and keeps x as the skip
(`DiTBlock.forward_routed`), which equals the official ``h + (1 - m) * x``. At initialisation
m == 1 and the model computes exactly what DiT computes; DiT's state-dict keys keep their meaning,
so a DiT checkpoint warm-starts a Switch-DiT with ``load_state_dict(sd, strict=False)`` (only the
``blocks.i.moe.*`` keys are missing).

The gate sees only t. Every forward evaluates the timestep embedder on all ``num_timesteps``
timesteps and the gates of all blocks in one batched GEMM: a table [T, depth, E]. The batch uses
rows t of it (embedding and routing), and the training forward keeps it for the diffusion prior
loss (`auxiliary_loss`), so nothing is computed twice. Without grad (sampling, evaluation) the table
is cached and reused across calls until a parameter it depends on changes (keyed on each
parameter's ``data_ptr()`` and ``_version``, which in-place optimiser/EMA updates and
``load_state_dict`` bump). No host sync in forward.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from switch_dit_kernels import TimestepMoE, TimestepRouting

from ..prior import PendingPriorMatch, diffusion_prior_loss, diffusion_prior_mask
from .dit import DiT
from .layers import DiTBlock


def expert_sharing(probs: torch.Tensor, k: int) -> Dict[str, Any]:
    """Which experts each block shares across all timesteps and which switch with t.

    probs: gate probabilities [T, depth, E] (`SwitchDiT.expert_routing_table()`); an expert is
    *selected* at t when it is among the top-k of that row. Per block b (lists of length depth):
      shared[b]     experts selected at every timestep (the paper's shared experts),
      switching[b]  experts selected at some timesteps but not all (timestep-specific ones),
      unused[b]     experts never selected,
      fraction[b]   [E] share of the T timesteps at which each expert is selected,
      switches[b]   how many times the selected set changes along t = 0..T-1.
    Plus the scalars logged during training: shared_mean and switching_mean (mean counts per block).
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be [num_timesteps, depth, E], got {tuple(probs.shape)}")
    steps, depth, e = probs.shape
    if not 1 <= k <= e:
        raise ValueError(f"k must be in [1, E={e}], got {k}")
    ids = torch.topk(probs.detach().float().cpu(), k, dim=-1).indices           # [T, depth, k]
    selected = torch.zeros(steps, depth, e, dtype=torch.bool).scatter_(-1, ids, True)
    fraction = selected.float().mean(0)                                         # [depth, E]
    changes = (selected[1:] != selected[:-1]).any(-1).sum(0)                    # [depth]
    shared = [[j for j in range(e) if fraction[b, j] == 1.0] for b in range(depth)]
    unused = [[j for j in range(e) if fraction[b, j] == 0.0] for b in range(depth)]
    switching = [[j for j in range(e) if 0.0 < fraction[b, j] < 1.0] for b in range(depth)]
    return {"shared": shared, "switching": switching, "unused": unused,
            "fraction": fraction.tolist(), "switches": changes.tolist(),
            "shared_mean": sum(map(len, shared)) / depth,
            "switching_mean": sum(map(len, switching)) / depth}


class GateTables(NamedTuple):
    """Per-timestep quantities of every block: t_emb [T, D]; probs [T, depth, E] float32;
    topk_weights [T, depth, k] float32; topk_ids [T, depth, k] int64."""

    t_emb: torch.Tensor
    probs: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor


class _Scratch:
    """Per-forward state that must not be copied or pickled (deepcopy for EMA, torch.save)."""

    def __init__(self):
        self.cache_key: Optional[tuple] = None
        self.cache: Optional[GateTables] = None
        self.last_probs: Optional[torch.Tensor] = None
        self.pending_match: Optional[PendingPriorMatch] = None  # of last_probs

    def __deepcopy__(self, memo) -> "_Scratch":
        return _Scratch()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class SwitchDiTBlock(DiTBlock):
    """DiT block + `TimestepMoE`: forward(x [B, N, D], c [B, D], routing) -> [B, N, D].

    ``routing`` holds [B, k] or [1, k] rows (one row = shared by the whole batch: one GEMM).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, num_experts: int,
                 k: int, backend: str, recompute: bool = False):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.moe = TimestepMoE(hidden_size, num_experts, k, backend=backend, recompute=recompute)

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                routing: Optional[TimestepRouting] = None) -> torch.Tensor:
        if routing is None:  # plain DiT block (used by forward_routed)
            return super().forward(x, c)
        r, _ = self.moe(x, routing=routing)
        return self.forward_routed(x, r, c)


class SwitchDiT(DiT):
    """Switch Diffusion Transformer (Park et al., ECCV 2024).

    Args (beyond `DiT`'s):
        num_experts: E (default 3).  k: experts per timestep (default 2).
        num_timesteps: T, rows of the gate table; t must lie in [0, T) (default 1000).
        prior_loss_weight: lambda of the diffusion prior loss (default 1.0; 0 disables it).
        prior_alpha: exponent of the prior's sliding window (default 4.0).
        backend: `TimestepMoE` backend ("auto", "torch", "triton", "cuda", "grouped_mm").
        moe_recompute: the SMoE layers recompute their expert output in the backward instead of
            keeping it (`TimestepMoE`'s recompute: less activation memory, one more GEMM a block).
    """

    integer_timesteps = True

    def __init__(self, *, num_experts: int = 3, k: int = 2, num_timesteps: int = 1000,
                 prior_loss_weight: float = 1.0, prior_alpha: float = 4.0, backend: str = "auto",
                 moe_recompute: bool = False, **dit_kwargs: Any):
        for name, value in (("num_experts", num_experts), ("k", k),
                            ("num_timesteps", num_timesteps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
        if prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {prior_loss_weight!r}")
        self.num_experts, self.k, self.backend = num_experts, k, backend
        self.moe_recompute = bool(moe_recompute)
        self.num_timesteps, self.prior_loss_weight = num_timesteps, float(prior_loss_weight)
        super().__init__(**dit_kwargs)
        self._scratch = _Scratch()
        # Fixed and rebuilt from the arguments: not persistent, so DiT <-> Switch-DiT state dicts
        # differ only by the experts and gates.
        device = self.pos_embed.device  # follows a `with torch.device(...)` construction
        self.register_buffer("prior_mask", diffusion_prior_mask(
            num_timesteps, self.depth, num_experts, k, alpha=prior_alpha).to(device),
            persistent=False)
        self.register_buffer("timestep_ids", torch.arange(num_timesteps, device=device),
                             persistent=False)

    def _make_block(self, index: int) -> nn.Module:
        return SwitchDiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self.num_experts,
                              self.k, self.backend, self.moe_recompute)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init (the gates get Xavier-uniform weights, zero biases, as Linear layers do in
        DiT), experts zero: at initialisation every m == 1."""
        super().initialize_weights()
        for block in self.blocks:
            nn.init.zeros_(block.moe.weight)
            nn.init.zeros_(block.moe.bias)

    # -- gate tables -----------------------------------------------------------------------------
    def _gate_parameters(self) -> List[torch.Tensor]:
        params = list(self.t_embedder.parameters())
        for block in self.blocks:
            params.extend(block.moe.gate.parameters())
        return params

    def compute_gate_tables(self) -> GateTables:
        """Evaluate the timestep embedder on all T timesteps and all gates in one GEMM.

        Same numbers as ``block.moe.route(t_emb)`` block by block: softmax(Linear(SiLU(t_emb)))
        in float32, then top-k (weights not renormalised), differentiable as autograd allows.
        """
        t_emb = self.t_embedder(self.timestep_ids)                       # [T, D]
        linears = [block.moe.gate[-1] for block in self.blocks]
        weight = torch.cat([lin.weight for lin in linears], dim=0)      # [depth * E, D]
        bias = torch.cat([lin.bias for lin in linears], dim=0)
        logits = F.linear(F.silu(t_emb), weight, bias)
        probs = torch.softmax(logits.float().view(-1, self.depth, self.num_experts), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.k, dim=-1)
        return GateTables(t_emb, probs, topk_weights, topk_ids)

    def gate_tables(self) -> GateTables:
        """Fresh tables when grad is enabled (training); cached ones otherwise."""
        if torch.is_grad_enabled():
            return self.compute_gate_tables()
        device = self.timestep_ids.device
        autocast = torch.is_autocast_enabled(device.type)
        key = (device, autocast, torch.get_autocast_dtype(device.type) if autocast else None,
               tuple((p.data_ptr(), p._version) for p in self._gate_parameters()))
        scratch = self._scratch
        if scratch.cache is None or scratch.cache_key != key:
            scratch.cache, scratch.cache_key = self.compute_gate_tables(), key
        return scratch.cache

    def _timestep_context(self, t: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        tables = self.gate_tables()
        scratch = self._scratch
        scratch.last_probs = tables.probs
        # A training forward is followed by `auxiliary_loss`: queue its matching's device work and
        # host copy now, at the start of the forward, so the prior loss waits for nothing. Not
        # inside torch.compile (pinned buffers and CUDA events are eager work): auxiliary_loss,
        # which runs eagerly, then starts the matching itself.
        training_with_prior = (torch.is_grad_enabled() and self.prior_loss_weight > 0
                               and not torch.compiler.is_compiling())
        scratch.pending_match = (PendingPriorMatch(tables.probs, self.prior_mask, self.k)
                                 if training_with_prior else None)
        return tables.t_emb[t], tables

    def _run_block(self, index: int, block: nn.Module, x: torch.Tensor, c: torch.Tensor,
                   t: torch.Tensor, tables: GateTables) -> torch.Tensor:
        # t has 1 row when the batch shares a timestep: a [1, k] routing row (the one-GEMM path).
        routing = TimestepRouting(tables.probs[t, index], tables.topk_weights[t, index],
                                  tables.topk_ids[t, index])
        return block(x, c, routing)

    # -- prior loss and analysis -----------------------------------------------------------------
    def auxiliary_loss(self, t: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
        """lambda * diffusion prior loss (`switch_dit.prior.diffusion_prior_loss`) for the batch's
        timesteps t [B], on the gate table of the latest forward (with its graph when that
        forward had grad: add the result to the loss before ``backward``). Its gradient reaches
        the gates and the timestep embedder only. The bipartite matching's cost matrix was queued
        for the host by that forward (`switch_dit.prior.PendingPriorMatch`): this waits for that
        copy only, not for the forward. Returns None when prior_loss_weight == 0.
        """
        if self.prior_loss_weight == 0:
            return None
        scratch = self._scratch
        probs, match = scratch.last_probs, scratch.pending_match
        if probs is None:
            probs = self.gate_tables().probs
        if match is None:
            match = PendingPriorMatch(probs, self.prior_mask, self.k)
        return diffusion_prior_loss(probs, t.reshape(-1), self.prior_mask, self.k,
                                    weight=self.prior_loss_weight, generator=generator,
                                    match=match)

    @torch.no_grad()
    def expert_routing_table(self) -> torch.Tensor:
        """Gate probabilities of every timestep and block: [num_timesteps, depth, E] float32."""
        return self.gate_tables().probs.float().clone()

    @torch.no_grad()
    def expert_sharing(self) -> Dict[str, Any]:
        """`expert_sharing` of this model's gate table: per block, the experts shared across all
        timesteps and those that switch with t."""
        return expert_sharing(self.expert_routing_table(), self.k)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_experts={self.num_experts}, k={self.k}, "
                f"num_timesteps={self.num_timesteps}, prior_loss_weight={self.prior_loss_weight}")
