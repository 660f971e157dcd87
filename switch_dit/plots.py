"""Figures: sample grids (PNG, optional row labels) and the timestep -> expert map of every block.

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


def label_rows(grid: np.ndarray, row_labels: Sequence[str], row_height: int, pad: int,
               margin: int = 0) -> np.ndarray:
    """Prefix a grid with a white left margin holding one text label per row (PIL's default font).

    grid: uint8 [H, W, C]; row r spans pixels pad + r * (row_height + pad) ... + row_height.
    """
    from PIL import Image, ImageDraw

    margin = margin or max(14, 8 * max(len(str(t)) for t in row_labels) + 8)
    c = grid.shape[-1]
    canvas = np.full((grid.shape[0], grid.shape[1] + margin, c), 255, dtype=np.uint8)
    canvas[:, margin:] = grid
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    draw = ImageDraw.Draw(img)
    fill = 0 if c == 1 else (0, 0, 0)
    for r, text in enumerate(row_labels):
        y = pad + r * (row_height + pad) + row_height // 2 - 5  # the default font is ~11 px high
        draw.text((3, y), str(text), fill=fill)
    out = np.asarray(img)
    return out[..., None] if out.ndim == 2 else out


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: Optional[int] = None,
              row_labels: Optional[Sequence[str]] = None) -> str:
    """Save [N, C, H, W] images in [-1, 1] as a PNG grid with `nrow` per row.

    row_labels: one text per grid row (e.g. the class of the row), drawn in a left margin.
    """
    from PIL import Image

    if scale is None:
        scale = max(1, 64 // images.shape[-1])  # small images drawn at >= 64 px per tile
    grid = image_grid(to_uint8(images), nrow=nrow, scale=scale)
    if row_labels is not None:
        rows = (images.shape[0] + nrow - 1) // nrow
        if len(row_labels) != rows:
            raise ValueError(f"row_labels: expected one label per grid row ({rows}), got "
                             f"{len(row_labels)}")
        grid = label_rows(grid, row_labels, row_height=images.shape[-2] * scale, pad=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def plot_expert_map(table: torch.Tensor, path: str, title: str = "",
                    block_labels: Optional[Sequence[str]] = None, k: Optional[int] = None) -> str:
    """The paper's expert-map figure: per block, gate probability of each expert over timesteps.

    table: [num_timesteps, depth, E] (model.expert_routing_table()); each panel shows E rows
    (y axis "expert") over the timestep axis, colour = gate probability in [0, 1]. With k (the
    model's top-k), white outlines mark where each expert is selected, and each row's tick label
    says whether that expert is shared by all timesteps ("shared"), selected at part of them
    ("switch NN%": the share of timesteps) or never ("unused"); see `expert_sharing`.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .models.switch_dit import expert_sharing

    tab = table.detach().float().cpu().numpy()
    if tab.ndim != 3:
        raise ValueError(f"routing table must be [num_timesteps, depth, E], got {tab.shape}")
    steps, depth, e = tab.shape
    if block_labels is not None and len(block_labels) != depth:
        raise ValueError(f"block_labels: expected {depth} labels, got {len(block_labels)}")
    sharing = expert_sharing(table, k) if k is not None else None
    fig, axes = plt.subplots(depth, 1, figsize=(8.5, 0.35 * depth * max(e, 2) + 1.4), sharex=True,
                             squeeze=False)
    im = None
    for b in range(depth):
        ax = axes[b, 0]
        im = ax.imshow(tab[:, b, :].T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                       interpolation="nearest", extent=(0, steps, e - 0.5, -0.5))
        ticks = [f"{j}" for j in range(e)]
        if sharing is not None:
            frac = sharing["fraction"][b]
            ticks = [f"{j} shared" if frac[j] == 1.0 else f"{j} unused" if frac[j] == 0.0
                     else f"{j} switch {100 * frac[j]:.0f}%" for j in range(e)]
            selected = np.zeros((e, steps))
            ids = np.argsort(-tab[:, b, :], axis=-1)[:, :k]            # [T, k]
            np.put_along_axis(selected.T, ids, 1.0, axis=-1)
            if 1 < k < e and steps > 1:  # nothing to outline when every expert is selected
                ax.contour(np.arange(steps) + 0.5, np.arange(e), selected, levels=[0.5],
                           colors="white", linewidths=0.8)
        ax.set_yticks(range(e))
        ax.set_yticklabels(ticks)
        ax.set_ylabel((block_labels[b] if block_labels else f"block {b}") + "\nexpert",
                      rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("timestep t (0 = clean data, T - 1 = pure noise)")
    fig.suptitle(title or "Switch-DiT timestep -> expert gate probability", fontsize=10)
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.02, label="gate probability")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
