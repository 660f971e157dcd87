"""Timestep respacing: sample with a subset of the training steps (IDDPM's scheme).

A respaced diffusion keeps the alpha_bar of the chosen steps and recomputes
beta_i = 1 - alpha_bar[s_i] / alpha_bar[s_{i-1}], so the marginals q(x_t | x_0) are unchanged; its
``timestep_map`` gives the model the original timestep of each respaced step.
"""
from __future__ import annotations

from typing import List, Sequence, Set, Tuple, Union

import numpy as np


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int], int]) -> Set[int]:
    """The original steps to keep.

    section_counts: "ddimN" -> range(0, T, stride) with exactly N steps (stride searched from 1 up);
    otherwise an int, "N", "N1,N2,..." or a list of ints: split [0, T) into that many equal sections
    (the first T % sections get one extra step) and take N_i evenly spaced steps in section i,
    rounding; each section keeps its first and last step when N_i > 1, so the whole keeps 0 and
    T - 1.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {wanted} evenly strided steps of {num_timesteps}")
        counts = [int(c) for c in section_counts.split(",") if c.strip()]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("timestep_respacing names no steps")
    size, extra = divmod(num_timesteps, len(counts))
    kept: Set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 1 <= count <= section:
            raise ValueError(f"cannot take {count} steps from a section of {section}")
        stride = (section - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):  # accumulate (not stride * j): the same rounding as IDDPM's tables
            kept.add(start + round(position))
            position += stride
        start += section
    return kept


def respaced_betas(betas: np.ndarray, use_timesteps: Set[int]) -> Tuple[np.ndarray, List[int]]:
    """(betas of the kept steps [len(use_timesteps)] float64, timestep_map: original index of each)."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    new_betas, timestep_map, last = [], [], 1.0
    for i, ab in enumerate(alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1.0 - ab / last)
            timestep_map.append(i)
            last = ab
    return np.array(new_betas, dtype=np.float64), timestep_map
