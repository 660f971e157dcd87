"""Gaussian diffusion: `create_diffusion` (schedules, respacing, losses, samplers) and
`create_loss_weighting` (constant, min-SNR-gamma, uncertainty weighting)."""
from __future__ import annotations

from typing import Any, Sequence, Union

from .gaussian_diffusion import LOSS_WEIGHTINGS, GaussianDiffusion, mean_flat, uniform_clusters
from .loss_weighting import (ConstantWeighting, MinSNRWeighting, UncertaintyWeighting,
                             create_loss_weighting)
from .respace import respaced_betas, space_timesteps
from .schedules import SCHEDULES, get_named_beta_schedule


def create_diffusion(timestep_respacing: Union[str, Sequence[int], int, None] = "",
                     noise_schedule: str = "linear", learn_sigma: bool = True,
                     diffusion_steps: int = 1000, loss_weighting: str = "constant",
                     min_snr_gamma: float = 5.0, uw_clusters: Any = 8,
                     sigma_small: bool = False) -> GaussianDiffusion:
    """A `GaussianDiffusion` over ``diffusion_steps`` steps of ``noise_schedule``.

    timestep_respacing: "" or None = all steps (training); "250", "10,20" or "ddim50" = a respaced
        diffusion for sampling whose model calls see the original timesteps.
    learn_sigma: the model predicts [epsilon | variance interpolation] (2C channels), trained by
        the VB term; else fixed variances (``sigma_small`` picks the posterior variance).
    loss_weighting, min_snr_gamma, uw_clusters: see `create_loss_weighting` / `sample_timesteps`.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    kwargs = dict(learn_sigma=learn_sigma, sigma_small=sigma_small, loss_weighting=loss_weighting,
                  min_snr_gamma=min_snr_gamma, uw_clusters=uw_clusters)
    if timestep_respacing is None or timestep_respacing == "":
        return GaussianDiffusion(betas, **kwargs)
    kept = space_timesteps(diffusion_steps, timestep_respacing)
    new_betas, timestep_map = respaced_betas(betas, kept)
    # A respaced diffusion is for sampling; its clusters (if any) count respaced steps.
    count = uw_clusters if isinstance(uw_clusters, int) else len(tuple(uw_clusters))
    kwargs["uw_clusters"] = max(1, min(count, len(kept)))
    return GaussianDiffusion(new_betas, timestep_map=timestep_map, **kwargs)


__all__ = ["ConstantWeighting", "GaussianDiffusion", "LOSS_WEIGHTINGS", "MinSNRWeighting",
           "SCHEDULES", "UncertaintyWeighting", "create_diffusion", "create_loss_weighting",
           "get_named_beta_schedule", "mean_flat", "respaced_betas", "space_timesteps",
           "uniform_clusters"]
