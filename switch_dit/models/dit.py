"""DiT: the Diffusion Transformer (Peebles & Xie, 2023), base class of Switch-DiT and DTR.

Timesteps: ``forward(x, t, y)`` takes t as a LongTensor [B] (one timestep per sample), or as a
Python int, a 0-dim tensor or a [1] tensor when every sample of the batch shares one timestep
(sampling, CFG). The shared form costs nothing here, but lets Switch-DiT route the whole batch with
one [1, k] routing row (one dense GEMM per block) without a host sync to discover that all t agree.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
import torch.nn as nn

from .layers import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, \
    sincos_pos_embed_2d

TimestepArg = Union[int, torch.Tensor]


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class DiT(nn.Module):
    """Diffusion Transformer with adaLN-Zero blocks.

    Args:
        input_size: latent height = width.  patch_size: p.  in_channels: C.
        hidden_size: D.  depth: blocks.  num_heads: attention heads.  mlp_ratio: MLP width / D.
        class_dropout_prob: label dropout (> 0 adds the null label ``num_classes`` used by CFG).
        num_classes: classes.  learn_sigma: output 2C channels (epsilon | variance interpolation).

    forward(x [B, C, H, W], t, y [B] long) -> [B, out_channels, H, W], in train and eval mode alike.
    """

    integer_timesteps = False  # DiT's embedder accepts fractional t; the subclasses index tables

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1, num_classes: int = 1000,
                 learn_sigma: bool = True):
        super().__init__()
        for name, value in (("input_size", input_size), ("patch_size", patch_size),
                            ("in_channels", in_channels), ("hidden_size", hidden_size),
                            ("depth", depth), ("num_heads", num_heads),
                            ("num_classes", num_classes)):
            _check_positive_int(name, value)
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob!r}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.mlp_ratio, self.num_classes, self.learn_sigma = mlp_ratio, num_classes, learn_sigma
        self.class_dropout_prob = class_dropout_prob
        self.out_channels = 2 * in_channels if learn_sigma else in_channels

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed, but a Parameter (requires_grad=False) as in DiT: it is in DiT's checkpoints and
        # in its parameter count (675,129,632 for DiT-XL/2 on 32x32 latents).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(self._make_block(i) for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def _make_block(self, index: int) -> nn.Module:
        return DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init: Xavier-uniform Linear weights and zero biases; patch projection like a
        Linear; N(0, 0.02) label table and timestep MLP weights; adaLN and output layers zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, self.x_embedder.grid_size)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight,
                  self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    # -- timesteps -------------------------------------------------------------------------------
    def _timesteps(self, t: TimestepArg, batch: int, device: torch.device) -> torch.Tensor:
        """Normalise t to a 1-D tensor of length batch ([B]) or 1 (shared by the batch)."""
        if isinstance(t, int) and not isinstance(t, bool):
            return torch.full((1,), t, dtype=torch.long, device=device)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a tensor [B], a 0-dim tensor or an int, got {type(t)}")
        if t.dim() == 0:
            t = t.reshape(1)
        if t.dim() != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"t must be [B={batch}], [1], 0-dim or an int, got shape {tuple(t.shape)}")
        if self.integer_timesteps and (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{type(self).__name__} looks up per-timestep tables: t must be an "
                            f"integer tensor, got {t.dtype}")
        return t

    def _timestep_context(self, t: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        """(timestep embedding [len(t), D], per-forward context handed to `_run_block`)."""
        return self.t_embedder(t), None

    def _run_block(self, index: int, block: nn.Module, x: torch.Tensor, c: torch.Tensor,
                   t: torch.Tensor, context: Any) -> torch.Tensor:
        return block(x, c)

    # -- forward ---------------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, p * p * C] -> image [B, C, H, W]."""
        p, c, g = self.patch_size, self.out_channels, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: TimestepArg, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] | [1] | 0-dim | int, y [B] long -> [B, out_channels, H, W]."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or \
                x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(f"x must be [B, {self.in_channels}, {self.input_size}, "
                             f"{self.input_size}], got {tuple(x.shape)}")
        t = self._timesteps(t, x.shape[0], x.device)
        t_emb, context = self._timestep_context(t)
        tokens = self.x_embedder(x) + self.pos_embed
        c = t_emb + self.y_embedder(y, self.training, force_drop_ids)  # [1 or B, D] + [B, D]
        for i, block in enumerate(self.blocks):
            tokens = self._run_block(i, block, tokens, c, t, context)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, x: torch.Tensor, t: TimestepArg, y: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance on the batch [cond half; uncond half] (uncond y = num_classes).

        The first half of x is run twice (with its labels and with the null label) and the
        epsilon channels (all ``in_channels`` of them) become uncond + s * (cond - uncond) in both
        halves; the variance channels pass through. DiT's reference guides only the first 3 of its
        4 latent channels "for exact reproducibility"; guiding all channels is the standard form.
        Returns [B, out_channels, H, W].
        """
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = eps.split(eps.shape[0] // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    def auxiliary_loss(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """Extra training loss of the latest forward; DiT has none."""
        return None

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, patch_size={self.patch_size}, "
                f"in_channels={self.in_channels}, hidden_size={self.hidden_size}, "
                f"depth={self.depth}, num_heads={self.num_heads}, num_classes={self.num_classes}, "
                f"learn_sigma={self.learn_sigma}")
