"""DiT building blocks: embedders, attention, MLP, the adaLN-Zero block and the final layer.

Semantics follow DiT (Peebles & Xie, 2023); module and parameter names match DiT's public checkpoints
(``x_embedder.proj``, ``t_embedder.mlp.0``, ``blocks.i.attn.qkv``, ``blocks.i.mlp.fc1``,
``blocks.i.adaLN_modulation.1``, ``final_layer.linear`` ...) so their state dicts load here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps t [M] -> [M, dim] float32: [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timesteps t [M] -> [M, D]: 256 sinusoidal frequencies, then Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_frequencies(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels y [B] -> [B, D], with label dropout for classifier-free guidance.

    With ``dropout_prob > 0`` the table has one extra row, index ``num_classes``: the "null" label of
    the unconditional branch. In training mode each label is replaced by it with that probability.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, train: bool,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids == 1, self.num_classes, labels)
        elif train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> tokens [B, (H/p) * (W/p), D] by a stride-p p x p convolution."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size ({input_size}) must be a multiple of patch_size "
                             f"({patch_size})")
        self.patch_size = (patch_size, patch_size)
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention [B, N, D] -> [B, N, D] (fused QKV with bias, SDPA kernel)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Token MLP [.., D] -> [.., D]: fc1 (D -> H), tanh-GELU, fc2 (H -> D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: x [B, N, D], c [B, D] -> [B, N, D].

    ``forward(x, c)`` is DiT's block. ``forward_routed(x, r, c)`` runs the same block on a routed
    input r = x * m (Switch-DiT's SMoE output, DTR's channel mask) and keeps x as the skip:

        a = g_msa * attn(adaLN(r));  h = r + a;  f = g_mlp * mlp(adaLN(h));  out = x + a + f

    i.e. out = x + (the block's two residual updates computed from r). This equals the official
    Switch-DiT/DTR form ``(h + f) + (1 - m) * x``; with m == 1 (r == x) it is DiT's block exactly.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def _updates(self, r: torch.Tensor, c: torch.Tensor):
        """(a, h, f): the attention update a of r, h = r + a, and the MLP update f of h."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        a = gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(r), shift_msa, scale_msa))
        h = r + a
        return a, h, gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        _, h, f = self._updates(x, c)
        return h + f

    def forward_routed(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # r may come back in the autocast dtype; keep the residual stream in x's dtype.
        a, _, f = self._updates(r.to(x.dtype), c)
        # (x + a) + f: one [B, N, D] pass fewer than (h + f) + (x - r), and with r == x the very
        # additions of `forward` (Switch-DiT at initialisation is DiT to the bit).
        return (x + a) + f


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then Linear: [B, N, D] -> [B, N, p * p * out_channels]."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [grid_size**2, dim] float32 (MAE/DiT convention).

    Tokens are row-major (row i, column j at i * grid_size + j). The first dim/2 channels encode the
    column j, the last dim/2 the row i; each half is [sin(pos * w) | cos(pos * w)] with
    w_m = 10000 ** (-m / (dim / 4)), m < dim / 4.
    """
    if dim % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos table, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()
