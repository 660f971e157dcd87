"""Beta schedules: "linear" (Ho et al., 2020, scaled to any step count) and "cosine" (Nichol &
Dhariwal, 2021)."""
from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "cosine")


def betas_for_alpha_bar(num_steps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """beta_i = min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta): [num_steps] float64."""
    return np.array([min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Betas [num_steps] float64 of schedule ``name``.

    linear: evenly from 1e-4 to 0.02, both scaled by 1000 / num_steps (DDPM's at 1000 steps).
    cosine: alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2, betas clipped at 0.999.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"diffusion_steps must be a positive int, got {num_steps!r}")
    if name == "linear":
        if num_steps <= 20:  # beta_end = 20 / num_steps must stay < 1 (alpha_bar > 0)
            raise ValueError(f"the linear schedule needs diffusion_steps > 20, got {num_steps}")
        scale = 1000.0 / num_steps
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            num_steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"noise_schedule must be one of {SCHEDULES}, got {name!r}")
