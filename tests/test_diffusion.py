"""Gaussian diffusion: schedules, q_sample and the posterior against closed forms, training losses,
DDPM/DDIM samplers with respacing, timestep sampling and the loss weightings."""
import math

import numpy as np
import pytest
import torch

from switch_dit.diffusion import (create_diffusion, create_loss_weighting, get_named_beta_schedule,
                                  space_timesteps)
from switch_dit.diffusion.likelihood import normal_kl


def alpha_bar(betas, t):
    """prod_{s <= t} (1 - beta_s) in Python floats."""
    return math.prod(1.0 - b for b in betas[: t + 1])


def test_schedules():
    lin = get_named_beta_schedule("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    lin500 = get_named_beta_schedule("linear", 500)  # scaled by 1000 / 500
    assert lin500[0] == pytest.approx(2e-4) and lin500[-1] == pytest.approx(0.04)
    cos = get_named_beta_schedule("cosine", 1000)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):  # unclipped steps: alpha_bar follows the cosine exactly
        assert alpha_bar(cos, t) == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert cos.max() <= 0.999 and cos[-1] == 0.999
    with pytest.raises(ValueError, match="noise_schedule"):
        get_named_beta_schedule("quadratic", 10)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_and_posterior_closed_forms(schedule):
    diffusion = create_diffusion(noise_schedule=schedule, diffusion_steps=100)
    betas = diffusion.betas.tolist()
    x0 = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    xt_in = torch.randn_like(x0)
    t = torch.tensor([0, 1, 37, 98, 99])  # both ends
    xt = diffusion.q_sample(x0, t, noise)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt_in, t)
    q_mean, q_var, _ = diffusion.q_mean_variance(x0, t)
    for i, ti in enumerate(t.tolist()):
        ab = alpha_bar(betas, ti)
        ref = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        torch.testing.assert_close(xt[i].double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q_mean[i].double(), math.sqrt(ab) * x0[i], rtol=1e-5, atol=1e-6)
        assert q_var[i].flatten()[0].item() == pytest.approx(1 - ab, rel=1e-5)
        # Bayes: q(x_{t-1} | x_0) = N(sqrt(ab') x0, 1 - ab'), q(x_t | x_{t-1}) = N(sqrt(a) x, beta).
        ab_prev = alpha_bar(betas, ti - 1) if ti > 0 else 1.0
        a, beta = 1 - betas[ti], betas[ti]
        if ti == 0:  # x_{t-1} = x_0 exactly
            torch.testing.assert_close(mean[i].double(), x0[i], rtol=1e-5, atol=1e-6)
            assert var[i].abs().max().item() < 1e-12
            continue
        precision = 1 / (1 - ab_prev) + a / beta
        ref_mean = (math.sqrt(ab_prev) * x0[i] / (1 - ab_prev) + math.sqrt(a) * xt_in[i] / beta) / precision
        torch.testing.assert_close(mean[i].double(), ref_mean, rtol=1e-5, atol=1e-6)
        assert var[i].flatten()[0].item() == pytest.approx(1 / precision, rel=1e-5)
        assert log_var[i].flatten()[0].item() == pytest.approx(math.log(1 / precision), rel=1e-5)


def test_normal_kl_against_torch_distributions():
    m1, m2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    l1, l2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), ref)


class ConstantModel(torch.nn.Module):
    """Returns a learnable [B, 2C, H, W] output; records the timesteps it is called with."""

    def __init__(self, shape):
        super().__init__()
        self.out = torch.nn.Parameter(torch.randn(shape))
        self.seen = []

    def forward(self, x, t, **kwargs):
        self.seen.append(t)
        return self.out * 1.0


def test_training_losses():
    diffusion = create_diffusion(diffusion_steps=50, noise_schedule="cosine")
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 25, 49])
    model = ConstantModel((4, 6, 4, 4))
    losses = diffusion.training_losses(model, x0, t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"}
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in losses.values())
    eps = model.out[:, :3].detach()
    torch.testing.assert_close(losses["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert (losses["vb"] > 0).all()
    # The VB term trains only the variance channels (epsilon detached, as in DiT).
    grad = torch.autograd.grad(losses["vb"].sum(), model.out)[0]
    assert grad[:, :3].abs().sum() == 0 and grad[:, 3:].abs().sum() > 0
    fixed = create_diffusion(diffusion_steps=50, learn_sigma=False)
    losses = fixed.training_losses(lambda x, t: model.out[:, :3], x0, t, noise=noise)
    assert torch.equal(losses["vb"], torch.zeros(4)) and torch.equal(losses["loss"], losses["mse"])
    with pytest.raises(ValueError, match="model output must be"):
        diffusion.training_losses(lambda x, t: model.out[:, :3], x0, t)


def oracle(base, x0):
    """The exact epsilon for data concentrated at x0, evaluated at the ORIGINAL timestep."""
    ab = torch.from_numpy(base.alphas_cumprod)

    def model_fn(x, t, **kwargs):
        a = ab[t].float().reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # v = 0: mid variance
    return model_fn


@pytest.mark.parametrize("respacing", ["", "10", "ddim7", "3,4"])
def test_samplers_recover_point_mass_data(respacing):
    # With the exact epsilon of a point mass at x0, DDIM (eta = 0) and DDPM both end at x0.
    base = create_diffusion(diffusion_steps=40)
    diffusion = create_diffusion(respacing, diffusion_steps=40)
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    noise = torch.randn(3, 2, 4, 4)
    model_fn = oracle(base, x0)
    shape = (3, 2, 4, 4)
    for loop in (diffusion.ddim_sample_loop_progressive, diffusion.p_sample_loop_progressive):
        steps = list(loop(model_fn, shape, noise=noise))
        assert len(steps) == diffusion.num_timesteps
        torch.testing.assert_close(steps[-1]["sample"], x0, rtol=1e-3, atol=1e-4)
        # every step's x0 prediction is exact too (while float32 can resolve it): this is what a
        # wrong respaced -> original timestep map would break
        for i, out in zip(range(diffusion.num_timesteps - 1, -1, -1), steps):
            if diffusion.alphas_cumprod[i] > 0.05:
                torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-3, atol=1e-3)


def test_ddim_eta_zero_is_deterministic_and_shared_timestep_equivalent():
    diffusion = create_diffusion("ddim5", diffusion_steps=50)
    torch.manual_seed(0)
    model = ConstantModel((2, 4, 3, 3))
    noise = torch.randn(2, 2, 3, 3)
    torch.manual_seed(1)
    first = diffusion.ddim_sample_loop(model, (2, 2, 3, 3), noise=noise, eta=0.0)
    torch.manual_seed(2)
    second = diffusion.ddim_sample_loop(model, (2, 2, 3, 3), noise=noise, eta=0.0)
    per_sample = diffusion.ddim_sample_loop(model, (2, 2, 3, 3), noise=noise,
                                            shared_timestep=False)
    assert torch.equal(first, second) and torch.equal(first, per_sample)
    stochastic = diffusion.ddim_sample_loop(model, (2, 2, 3, 3), noise=noise, eta=1.0)
    assert not torch.equal(first, stochastic)
    # the model saw 0-dim original timesteps (shared), then [B] ones
    assert model.seen[0].dim() == 0 and model.seen[0].item() == 40
    assert model.seen[10].shape == (2,) and model.seen[10].tolist() == [40, 40]


def test_ddpm_sampler_uses_noise_and_generator():
    diffusion = create_diffusion("4", diffusion_steps=30)
    model = ConstantModel((2, 4, 3, 3))
    noise = torch.randn(2, 2, 3, 3)
    a = diffusion.p_sample_loop(model, (2, 2, 3, 3), noise=noise,
                                generator=torch.Generator().manual_seed(3))
    b = diffusion.p_sample_loop(model, (2, 2, 3, 3), noise=noise,
                                generator=torch.Generator().manual_seed(3))
    c = diffusion.p_sample_loop(model, (2, 2, 3, 3), noise=noise,
                                generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()


def test_respacing():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and min(kept) == 0 and max(kept) == 999  # both endpoints
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    sections = space_timesteps(100, "10,5")  # [0, 50) with 10 steps, [50, 100) with 5
    assert len(sections) == 15 and {0, 49, 50, 99} <= sections
    assert space_timesteps(10, [10]) == set(range(10))
    with pytest.raises(ValueError):
        space_timesteps(10, "20")
    base = create_diffusion(diffusion_steps=1000, noise_schedule="cosine")
    spaced = create_diffusion("25", diffusion_steps=1000, noise_schedule="cosine")
    mapping = spaced.timestep_map.tolist()
    assert spaced.num_timesteps == 25 and mapping[0] == 0 and mapping[-1] == 999
    assert mapping == sorted(mapping)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[mapping], rtol=1e-9)
    assert spaced.model_timesteps(torch.tensor([0, 24])).tolist() == [0, 999]
    assert base.model_timesteps(torch.tensor(7)).item() == 7


def test_sample_timesteps():
    uniform = create_diffusion(diffusion_steps=100)
    t = uniform.sample_timesteps(500, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (500,) and t.min() >= 0 and t.max() < 100
    assert len(t.unique()) > 90
    uw = create_diffusion(diffusion_steps=100, loss_weighting="uw", uw_clusters=8)
    assert uw.uw_clusters[0] == (0, 12) and uw.uw_clusters[-1] == (87, 100)
    for batch in (16, 13, 5):  # divisible, not divisible, fewer samples than clusters
        t = uw.sample_timesteps(batch, "cpu", generator=torch.Generator().manual_seed(batch))
        for i, ti in enumerate(t.tolist()):
            lo, hi = uw.uw_clusters[i * 8 // batch]
            assert lo <= ti < hi
    custom = create_diffusion(diffusion_steps=30, loss_weighting="uw", uw_clusters=[(0, 2), (2, 30)])
    t = custom.sample_timesteps(6, "cpu")
    assert (t[:3] < 2).all() and (t[3:] >= 2).all()


def loss_dict(batch):
    mse, vb = torch.rand(batch) + 0.1, torch.rand(batch)
    return {"mse": mse, "vb": vb, "loss": mse + vb}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_loss_weightings(schedule):
    diffusion = create_diffusion(diffusion_steps=100, noise_schedule=schedule, loss_weighting="uw",
                                 uw_clusters=4, min_snr_gamma=5.0)
    t = torch.tensor([0, 1, 30, 50, 99, 99, 10])  # both ends, an uneven cluster split
    losses = loss_dict(7)
    # constant
    constant = create_loss_weighting("constant", diffusion)
    assert torch.equal(constant(losses, t), losses["loss"].mean())
    assert torch.equal(constant(losses["loss"], t), losses["loss"].mean())
    # min-SNR-gamma: w = min(snr, 5) / snr on the mse only
    min_snr = create_loss_weighting("min_snr", diffusion)
    snr = diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod)
    w = torch.tensor([min(snr[i], 5.0) / snr[i] for i in t.tolist()], dtype=torch.float32)
    assert 0 < w.min() and w.max() == 1.0
    value = min_snr(losses, t)
    assert value.dim() == 0 and torch.isfinite(value)
    torch.testing.assert_close(value, (w * losses["mse"] + losses["vb"]).mean())
    torch.testing.assert_close(min_snr(losses["loss"], t), (w * losses["loss"]).mean())
    assert create_loss_weighting("min_snr", diffusion, gamma=1.0).gamma == 1.0
    # uncertainty weighting: clusters [0,25) [25,50) [50,75) [75,100)
    uw = create_loss_weighting(None, diffusion)  # the diffusion's kind
    assert [n for n, _ in uw.named_parameters()] == ["loss_scale"]
    assert list(uw.state_dict()) == ["loss_scale"]
    with torch.no_grad():
        uw.loss_scale.copy_(torch.tensor([0.5, -1.0, 2.0, 0.3]))
    value = uw(losses, t)
    loss = losses["loss"]
    members = [[0, 1, 6], [2], [3], [4, 5]]
    expected = sum(0.5 * (math.exp(-s) * loss[m].mean().item() / 4 + s)
                   for s, m in zip([0.5, -1.0, 2.0, 0.3], members))
    assert value.dim() == 0 and value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    assert torch.isfinite(uw.loss_scale.grad).all() and (uw.loss_scale.grad != 0).all()
    # a cluster absent from the batch contributes nothing (and gets no gradient)
    uw.loss_scale.grad = None
    uw(losses["loss"][:2], t[:2]).backward()
    assert (uw.loss_scale.grad[1:] == 0).all() and uw.loss_scale.grad[0] != 0
    # fresh uw = 0.5 * constant
    fresh = create_loss_weighting("uw", create_diffusion(diffusion_steps=100, uw_clusters=4))
    t4 = torch.tensor([3, 30, 60, 90])
    torch.testing.assert_close(fresh(losses["loss"][:4], t4), 0.5 * losses["loss"][:4].mean())


def test_loss_weighting_and_diffusion_bad_arguments():
    diffusion = create_diffusion(diffusion_steps=30)
    with pytest.raises(ValueError, match="loss weighting"):
        create_loss_weighting("p2", diffusion)
    with pytest.raises(TypeError, match="unknown option"):
        create_loss_weighting("uw", diffusion, gamma=3.0)
    with pytest.raises(ValueError, match="loss_weighting"):
        create_diffusion(loss_weighting="snr")
    with pytest.raises(ValueError, match="uw_clusters"):
        create_diffusion(diffusion_steps=30, loss_weighting="uw", uw_clusters=31)
    with pytest.raises(ValueError, match="diffusion_steps"):
        create_diffusion(diffusion_steps=0)
    with pytest.raises(ValueError, match="linear schedule needs"):
        create_diffusion(diffusion_steps=20)
    assert create_diffusion(diffusion_steps=10, noise_schedule="cosine").num_timesteps == 10
