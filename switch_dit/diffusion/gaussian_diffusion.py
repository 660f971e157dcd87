"""Gaussian diffusion: q(x_t | x_0), the posterior, epsilon-prediction training losses with the
learned-variance VB term (as in DiT / IDDPM), and DDPM / DDIM samplers.

Tensors: x [B, C, ...]; t [B] int64 indices into this diffusion's (possibly respaced) steps. The
samplers call ``model_fn(x, t_model, **model_kwargs)`` where t_model is the ORIGINAL timestep
(``timestep_map[t]``, identity without respacing). By default every step passes t_model as a 0-dim
int64 tensor shared by the whole batch (``shared_timestep=True``): all models in switch_dit accept
it and Switch-DiT then routes the batch with a single routing row (one GEMM per block). Pass
``shared_timestep=False`` for a model_fn that needs t as [B].
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .likelihood import discretized_gaussian_log_likelihood, normal_kl

LOSS_WEIGHTINGS = ("constant", "min_snr", "uw")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the first dimension: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.dim())))


def uniform_clusters(num_timesteps: int, num_clusters: int) -> Tuple[Tuple[int, int], ...]:
    """Equal-width timestep clusters [(lo, hi), ...] with cluster j = [int(T j / C), int(T (j+1) / C))."""
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or \
            not 1 <= num_clusters <= num_timesteps:
        raise ValueError(f"uw_clusters must be an int in [1, num_timesteps={num_timesteps}], "
                         f"got {num_clusters!r}")
    return tuple((int(num_timesteps / num_clusters * j), int(num_timesteps / num_clusters * (j + 1)))
                 for j in range(num_clusters))


class GaussianDiffusion:
    """Diffusion over ``len(betas)`` steps with an epsilon-predicting model.

    Args:
        betas: [T] float64 noise schedule.
        learn_sigma: the model outputs [epsilon | v] with 2C channels; the variance is
            exp(frac * log beta_t + (1 - frac) * log posterior_variance_t), frac = (v + 1) / 2,
            trained by the VB term (IDDPM's "learned range"). Else fixed: beta_t ("large", with
            beta_0 replaced by the posterior variance at t=1) or the posterior variance
            (``sigma_small``).
        loss_weighting: "constant", "min_snr" or "uw" (recorded here for `sample_timesteps` and as
            the default of `create_loss_weighting`; ``training_losses`` is always unweighted).
        min_snr_gamma: gamma of "min_snr".  uw_clusters: int C (equal-width clusters) or
            [(lo, hi), ...] for "uw".
        timestep_map: [T] original timestep of each step (set by respacing); None = identity.
    """

    def __init__(self, betas: np.ndarray, *, learn_sigma: bool = True, sigma_small: bool = False,
                 loss_weighting: str = "constant", min_snr_gamma: float = 5.0,
                 uw_clusters: Any = 8, timestep_map: Optional[Sequence[int]] = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be 1-D with values in (0, 1]")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
        self.num_timesteps = int(betas.shape[0])
        self.learn_sigma, self.sigma_small = learn_sigma, sigma_small
        self.loss_weighting, self.min_snr_gamma = loss_weighting, float(min_snr_gamma)
        if isinstance(uw_clusters, int) and not isinstance(uw_clusters, bool):
            if loss_weighting != "uw":  # unused: never let it reject a short (e.g. respaced) chain
                uw_clusters = max(1, min(uw_clusters, self.num_timesteps))
            self.uw_clusters = uniform_clusters(self.num_timesteps, uw_clusters)
        else:
            self.uw_clusters = tuple((int(lo), int(hi)) for lo, hi in uw_clusters)
            if not self.uw_clusters or any(not 0 <= lo < hi <= self.num_timesteps
                                           for lo, hi in self.uw_clusters):
                raise ValueError(f"uw_clusters must be an int or (lo, hi) pairs within "
                                 f"[0, {self.num_timesteps}], got {uw_clusters!r}")
        self.timestep_map = None if timestep_map is None else \
            torch.as_tensor(list(timestep_map), dtype=torch.long)

        alphas = 1.0 - betas
        ab = np.cumprod(alphas)
        ab_prev = np.append(1.0, ab[:-1])
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = betas, ab, ab_prev
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        # posterior variance is 0 at t = 0: clip its log with the t = 1 value.
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else \
            np.log(np.maximum(post_var, 1e-20))
        large_var = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas
        self._np_tables: Dict[str, np.ndarray] = {
            "sqrt_alphas_cumprod": np.sqrt(ab),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ab),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ab),
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ab),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ab - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * np.sqrt(ab_prev) / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
            "log_betas": np.log(betas),
            "fixed_variance": post_var if sigma_small else large_var,
            "fixed_log_variance": post_log_var if sigma_small else np.log(large_var),
        }
        self._device_tables: Dict[Tuple[str, torch.device], torch.Tensor] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def snr(self) -> np.ndarray:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per step: [T] float64."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Table ``name`` at t ([B] or 0-dim) as float32, shaped [B or 1, 1, ...] for ndim dims."""
        key = (name, t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(self._np_tables[name]).to(t.device)
            self._device_tables[key] = table
        return table[t].float().reshape(-1, *([1] * (ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timesteps the model sees for step indices t (identity without respacing)."""
        if self.timestep_map is None:
            return t
        key = ("__map__", t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = self.timestep_map.to(t.device)
        return table[t]

    # -- forward process -------------------------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0), broadcast to x_start's shape."""
        n = x_start.dim()
        mean = self._extract("sqrt_alphas_cumprod", t, n) * x_start
        var = self._extract("sqrt_one_minus_alphas_cumprod", t, n) ** 2
        log_var = self._extract("log_one_minus_alphas_cumprod", t, n)
        return mean, var.expand_as(x_start), log_var.expand_as(x_start)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise: [B, C, ...]."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise must have x_start's shape {tuple(x_start.shape)}, "
                             f"got {tuple(noise.shape)}")
        n = x_start.dim()
        return (self._extract("sqrt_alphas_cumprod", t, n) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, n) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance, clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.dim()
        mean = (self._extract("posterior_mean_coef1", t, n) * x_start
                + self._extract("posterior_mean_coef2", t, n) * x_t)
        var = self._extract("posterior_variance", t, n).expand_as(x_t)
        log_var = self._extract("posterior_log_variance_clipped", t, n).expand_as(x_t)
        return mean, var, log_var

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor,
                                eps: torch.Tensor) -> torch.Tensor:
        n = x_t.dim()
        return (self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, n) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor,
                                pred_xstart: torch.Tensor) -> torch.Tensor:
        n = x_t.dim()
        return ((self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, n))

    # -- reverse process -------------------------------------------------------------------------
    def p_mean_variance(self, model_fn: Optional[Callable], x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False, model_kwargs: Optional[dict] = None,
                        model_output: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): dict mean, variance, log_variance, pred_xstart, eps (x's shape).

        The model is called as model_fn(x, model_timesteps(t), **model_kwargs) unless
        ``model_output`` is given.
        """
        if model_output is None:
            model_output = model_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        channels = x.shape[1]
        expected = (x.shape[0], 2 * channels if self.learn_sigma else channels, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(f"model output must be {expected} (learn_sigma={self.learn_sigma}), "
                             f"got {tuple(model_output.shape)}")
        model_output = model_output.float()
        n = x.dim()
        if self.learn_sigma:
            eps, values = model_output.split(channels, dim=1)
            min_log = self._extract("posterior_log_variance_clipped", t, n)
            max_log = self._extract("log_betas", t, n)
            frac = (values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            var = torch.exp(log_var)
        else:
            eps = model_output
            var = self._extract("fixed_variance", t, n).expand_as(x)
            log_var = self._extract("fixed_log_variance", t, n).expand_as(x)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": var, "log_variance": log_var,
                "pred_xstart": pred_xstart, "eps": eps}

    def p_sample(self, model_fn: Callable, x: torch.Tensor, t: torch.Tensor,
                 clip_denoised: bool = False, model_kwargs: Optional[dict] = None,
                 generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """One ancestral (DDPM) step: dict sample, pred_xstart. No noise is added at t == 0."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, model_kwargs)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=out["mean"].dtype)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model_fn: Callable, x: torch.Tensor, t: torch.Tensor,
                    clip_denoised: bool = False, model_kwargs: Optional[dict] = None,
                    eta: float = 0.0, generator: Optional[torch.Generator] = None
                    ) -> Dict[str, torch.Tensor]:
        """One DDIM step (Song et al., 2021, eq. 12); eta = 0 is deterministic."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        n = x.dim()
        ab = self._extract("alphas_cumprod", t, n)
        ab_prev = self._extract("alphas_cumprod_prev", t, n)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        sample = out["pred_xstart"] * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
        if eta != 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=sample.dtype)
            nonzero = (t != 0).float().reshape(-1, *([1] * (n - 1)))
            sample = sample + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step: Callable, model_fn: Callable, shape: Sequence[int],
              noise: Optional[torch.Tensor], device: Optional[torch.device], progress: bool,
              shared_timestep: bool, generator: Optional[torch.Generator]
              ) -> Iterator[Dict[str, torch.Tensor]]:
        if device is None:
            device = _default_device(model_fn, noise)
        shape = tuple(shape)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
            x = noise.to(device)
        else:
            x = torch.randn(shape, generator=generator, device=device)
        # One device tensor of all steps: steps[i] is a 0-dim view, so no per-step host->device copy.
        steps = torch.arange(self.num_timesteps - 1, -1, -1, device=device)
        indices = range(self.num_timesteps)
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices)
        for i in indices:
            t = steps[i] if shared_timestep else steps[i].expand(shape[0])
            with torch.no_grad():
                out = step(model_fn, x, t)
            yield out
            x = out["sample"]

    def p_sample_loop_progressive(self, model_fn: Callable, shape: Sequence[int],
                                  noise: Optional[torch.Tensor] = None, clip_denoised: bool = False,
                                  model_kwargs: Optional[dict] = None,
                                  device: Optional[torch.device] = None, progress: bool = False,
                                  shared_timestep: bool = True,
                                  generator: Optional[torch.Generator] = None
                                  ) -> Iterator[Dict[str, torch.Tensor]]:
        """Yield each DDPM step's dict (sample, pred_xstart), from t = T - 1 down to 0."""
        def step(fn, x, t):
            return self.p_sample(fn, x, t, clip_denoised, model_kwargs, generator)
        return self._loop(step, model_fn, shape, noise, device, progress, shared_timestep, generator)

    def p_sample_loop(self, model_fn: Callable, shape: Sequence[int],
                      noise: Optional[torch.Tensor] = None, clip_denoised: bool = False,
                      model_kwargs: Optional[dict] = None, device: Optional[torch.device] = None,
                      progress: bool = False, shared_timestep: bool = True,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """DDPM ancestral sampling from noise [shape] (default: fresh N(0, I)) -> samples [shape]."""
        out = None
        for out in self.p_sample_loop_progressive(model_fn, shape, noise, clip_denoised,
                                                  model_kwargs, device, progress, shared_timestep,
                                                  generator):
            pass
        return out["sample"]

    def ddim_sample_loop_progressive(self, model_fn: Callable, shape: Sequence[int],
                                     noise: Optional[torch.Tensor] = None,
                                     clip_denoised: bool = False,
                                     model_kwargs: Optional[dict] = None,
                                     device: Optional[torch.device] = None, progress: bool = False,
                                     eta: float = 0.0, shared_timestep: bool = True,
                                     generator: Optional[torch.Generator] = None
                                     ) -> Iterator[Dict[str, torch.Tensor]]:
        """Yield each DDIM step's dict (sample, pred_xstart)."""
        def step(fn, x, t):
            return self.ddim_sample(fn, x, t, clip_denoised, model_kwargs, eta, generator)
        return self._loop(step, model_fn, shape, noise, device, progress, shared_timestep, generator)

    def ddim_sample_loop(self, model_fn: Callable, shape: Sequence[int],
                         noise: Optional[torch.Tensor] = None, clip_denoised: bool = False,
                         model_kwargs: Optional[dict] = None, device: Optional[torch.device] = None,
                         progress: bool = False, eta: float = 0.0, shared_timestep: bool = True,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """DDIM sampling over this diffusion's steps (respace for fewer) -> samples [shape]."""
        out = None
        for out in self.ddim_sample_loop_progressive(model_fn, shape, noise, clip_denoised,
                                                     model_kwargs, device, progress, eta,
                                                     shared_timestep, generator):
            pass
        return out["sample"]

    # -- training --------------------------------------------------------------------------------
    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """VB term in bits per dimension [B]: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
        the discretised decoder NLL of x_0 at t == 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=False, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"]))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(self, model: Callable, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Optional[dict] = None,
                        noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Unweighted per-sample losses, each [B] float32: "mse" = mean (noise - eps)^2; "vb" =
        the VB term in bits/dim with the epsilon prediction detached (so it trains only the
        variance, as in IDDPM/DiT), zeros without learn_sigma; "loss" = mse + vb.

        x_start [B, C, ...]; t [B] int64 step indices (the model gets model_timesteps(t)).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        channels = x_start.shape[1]
        expected = (x_start.shape[0], 2 * channels if self.learn_sigma else channels,
                    *x_start.shape[2:])
        if tuple(output.shape) != expected:
            raise ValueError(f"model output must be {expected} (learn_sigma={self.learn_sigma}), "
                             f"got {tuple(output.shape)}")
        output = output.float()
        if self.learn_sigma:
            eps, values = output.split(channels, dim=1)
            frozen = torch.cat([eps.detach(), values], dim=1)
            vb = self.vb_terms_bpd(frozen, x_start.float(), x_t.float(), t)
        else:
            eps, vb = output, output.new_zeros(output.shape[0])
        mse = mean_flat((noise.float() - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def sample_timesteps(self, batch_size: int, device: Any = None,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training timesteps [batch_size] int64 on device.

        "uw": stratified over the clusters, sample i drawn uniformly from cluster (i * C) // B
        (B / C per cluster when C divides B, as the official sampler). Otherwise uniform on [0, T).
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        gen_device = generator.device if generator is not None else device
        if self.loss_weighting != "uw":
            t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator,
                              device=gen_device)
            return t.to(device)
        # [C, 2], cached per device: a fresh torch.tensor(list, device="cuda") is a blocking copy.
        clusters = self._device_tables.get(("__clusters__", gen_device))
        if clusters is None:
            clusters = torch.tensor(self.uw_clusters, dtype=torch.long).to(gen_device)
            self._device_tables[("__clusters__", gen_device)] = clusters
        which = torch.arange(batch_size, device=gen_device) * len(self.uw_clusters) // batch_size
        lo, hi = clusters[which, 0], clusters[which, 1]
        u = torch.rand(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
        t = lo + torch.minimum((u * (hi - lo)).long(), hi - lo - 1)
        return t.to(device)


def _default_device(model_fn: Callable, noise: Optional[torch.Tensor]) -> torch.device:
    if noise is not None:
        return noise.device
    owner = getattr(model_fn, "__self__", model_fn)
    if isinstance(owner, nn.Module):
        param = next(owner.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")
