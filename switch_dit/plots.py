"""Figures: sample grids (PNG) and the timestep -> expert routing heatmap of every block.

Both write files only; matplotlib is imported lazily with the Agg backend (no display needed).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] float in [-1, 1] -> uint8 [N, H, W, C] in [0, 255]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, nrow: int, pad: int = 1, scale: int = 1,
               pad_value: int = 255) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] tile image.

    `nrow` images per row; `scale` repeats pixels (nearest) so 16x16 digits are visible.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got {images.shape}")
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    return grid


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: Optional[int] = None) -> str:
    """Save [N, C, H, W] images in [-1, 1] as a PNG grid with `nrow` per row."""
    from PIL import Image

    if scale is None:
        scale = max(1, 64 // images.shape[-1])  # small images drawn at >= 64 px per tile
    grid = image_grid(to_uint8(images), nrow=nrow, scale=scale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def plot_expert_map(table: torch.Tensor, path: str, title: str = "",
                    block_labels: Optional[Sequence[str]] = None) -> str:
    """Heatmap of gate probabilities, one panel per block.

    table: [num_timesteps, depth, E] (model.expert_routing_table()); each panel shows E rows
    (experts) over the timestep axis, colour = gate probability in [0, 1].
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tab = table.detach().float().cpu().numpy()
    if tab.ndim != 3:
        raise ValueError(f"routing table must be [num_timesteps, depth, E], got {tab.shape}")
    steps, depth, e = tab.shape
    fig, axes = plt.subplots(depth, 1, figsize=(8, 0.35 * depth * max(e, 2) + 1.2), sharex=True,
                             squeeze=False)
    im = None
    for b in range(depth):
        ax = axes[b, 0]
        im = ax.imshow(tab[:, b, :].T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                       interpolation="nearest", extent=(0, steps, e - 0.5, -0.5))
        ax.set_yticks(range(e))
        ax.set_ylabel(block_labels[b] if block_labels else f"block {b}", rotation=0, ha="right",
                      va="center", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("timestep t")
    fig.suptitle(title or "Switch-DiT timestep -> expert gate probability (rows: experts)", fontsize=10)
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.02, label="gate probability")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
