"""Loss weightings over timesteps: constant, min-SNR-gamma and uncertainty weighting ("uw").

Each is an nn.Module: ``weighting(losses, t) -> scalar``, where t [B] holds the step indices and
``losses`` is either the dict returned by ``training_losses`` (keys "mse", "vb", "loss") or a tensor
[B] of per-sample losses. What is weighted:

- "constant": mean_b loss_b (loss = mse + vb).
- "min_snr":  mean_b (w_b * mse_b + vb_b), w = min(SNR_t, gamma) / SNR_t with
  SNR_t = alpha_bar_t / (1 - alpha_bar_t): the epsilon-prediction form of Min-SNR-gamma
  (Hang et al., 2023), on the mse term only, the VB term unweighted, as the official Switch-DiT
  code. Given only a tensor, the weight multiplies the whole per-sample loss.
- "uw": uncertainty weighting of timestep clusters (Kendall et al., 2018; the official "uw"):
  with l_c = (mean loss of the batch's samples in cluster c) / C and a learnable log-variance s_c,
  sum over clusters present in the batch of 0.5 * (exp(-s_c) * l_c + s_c). Its ``loss_scale`` [C]
  (s, zero-initialised) is trained with the model (the official recipe: its own AdamW group, lr
  0.025, no weight decay) and saved with checkpoints. At initialisation this is 0.5 * constant.
"""
from __future__ import annotations

from typing import Any, Mapping, Union

import torch
import torch.nn as nn

from .gaussian_diffusion import LOSS_WEIGHTINGS, GaussianDiffusion

Losses = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def _total(losses: Losses) -> torch.Tensor:
    return losses["loss"] if isinstance(losses, Mapping) else losses


class ConstantWeighting(nn.Module):
    """mean_b loss_b."""

    def forward(self, losses: Losses, t: torch.Tensor) -> torch.Tensor:
        return _total(losses).mean()


class MinSNRWeighting(nn.Module):
    """mean_b (min(SNR_t, gamma) / SNR_t * mse_b + vb_b); see the module docstring."""

    def __init__(self, diffusion: GaussianDiffusion, gamma: float = 5.0):
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        self.gamma = float(gamma)
        snr = torch.from_numpy(diffusion.snr())
        self.register_buffer("weights", (snr.clamp(max=self.gamma) / snr).float(), persistent=False)

    def forward(self, losses: Losses, t: torch.Tensor) -> torch.Tensor:
        w = self.weights[t]
        if isinstance(losses, Mapping):
            return (w * losses["mse"] + losses["vb"]).mean()
        return (w * losses).mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


class UncertaintyWeighting(nn.Module):
    """sum_c present 0.5 * (exp(-s_c) * mean_{b in c} loss_b / C + s_c); see the module docstring."""

    def __init__(self, diffusion: GaussianDiffusion):
        super().__init__()
        clusters = diffusion.uw_clusters
        self.num_clusters = len(clusters)
        self.loss_scale = nn.Parameter(torch.zeros(self.num_clusters))
        # cluster of t = number of cluster starts <= t, minus one.
        self.register_buffer("starts", torch.tensor([lo for lo, _ in clusters[1:]], dtype=torch.long),
                             persistent=False)

    def loss_weights(self) -> torch.Tensor:
        """Current per-cluster weights 0.5 * exp(-s) [C] (for logging)."""
        return 0.5 * torch.exp(-self.loss_scale.detach())

    def forward(self, losses: Losses, t: torch.Tensor) -> torch.Tensor:
        loss = _total(losses)
        cluster = torch.bucketize(t, self.starts, right=True)
        sums = loss.new_zeros(self.num_clusters).index_add(0, cluster, loss)
        counts = loss.new_zeros(self.num_clusters).index_add(0, cluster, torch.ones_like(loss))
        present = (counts > 0).to(loss.dtype)
        per_cluster = sums / counts.clamp(min=1) / self.num_clusters
        s = self.loss_scale.to(loss.dtype)
        return (present * 0.5 * (torch.exp(-s) * per_cluster + s)).sum()

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}"


def create_loss_weighting(kind: Any, diffusion: GaussianDiffusion, **opts: Any) -> nn.Module:
    """The weighting module ``kind`` ("constant", "min_snr", "uw"; None = diffusion.loss_weighting).

    opts: ``gamma`` for "min_snr" (default diffusion.min_snr_gamma). "uw" uses the diffusion's
    clusters (``create_diffusion(uw_clusters=...)``) and has learnable parameters.
    """
    kind = diffusion.loss_weighting if kind is None else kind
    if kind not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {kind!r}")
    allowed = {"constant": set(), "min_snr": {"gamma"}, "uw": set()}[kind]
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for loss weighting {kind!r}")
    if kind == "constant":
        return ConstantWeighting()
    if kind == "min_snr":
        return MinSNRWeighting(diffusion, opts.get("gamma", diffusion.min_snr_gamma))
    return UncertaintyWeighting(diffusion)
