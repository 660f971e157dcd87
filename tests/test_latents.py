"""Latents as in the official pipeline: a tiny random diffusers AutoencoderKL (built from a config,
offline) through encode_latents; the stored posterior of each image and its flip; a fresh view and
sample every training step (`draw_latents`), the mean mode as an option."""
import json

import numpy as np
import pytest
import torch

from switch_dit.data import LatentDataset, draw_latents

diffusers = pytest.importorskip("diffusers")


def _tiny_vae(path):
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    # 4 encoder blocks = 3 downsamplings: 8x, as the SD VAEs; 8 channels keep it instant
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                        sample_size=16)
    vae.save_pretrained(str(path))
    return vae.eval()


def _write_images(root, n_per_class=3, size=16):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i}.png")


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    from switch_dit.encode_latents import main

    root = tmp_path_factory.mktemp("lat")
    vae = _tiny_vae(root / "vae")
    _write_images(root / "img")
    assert main(["--data-path", str(root / "img"), "--vae", str(root / "vae"), "--out",
                 str(root / "out"), "--image-size", "16", "--batch-size", "4", "--num-workers", "0",
                 "--no-progress"]) == 0
    return root, vae


def test_encode_latents_stores_posterior_of_image_and_flip(encoded):
    from switch_dit.data import ImageFolderDataset

    root, vae = encoded
    meta = json.loads((root / "out" / "meta.json").read_text())
    assert meta["format"] == 2 and meta["posterior"] and meta["views"] == 2
    factor = vae.config.scaling_factor
    ds = LatentDataset(str(root / "out"))
    img = ImageFolderDataset(str(root / "img"), 16)
    assert len(ds) == 6 and ds.image_size == 2 and ds.in_channels == 4
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (2, 2, 4, 2, 2) and int(y) == int(img[i][1])
        with torch.no_grad():
            for view, image in enumerate((img[i][0], img[i][0].flip(-1))):
                dist = vae.encode(image[None]).latent_dist
                # float16 storage: relative error ~5e-4
                torch.testing.assert_close(x[view, 0], dist.mean[0] * factor, rtol=2e-3, atol=1e-4)
                torch.testing.assert_close(x[view, 1], dist.std[0] * factor, rtol=2e-3, atol=1e-4)
    assert not torch.equal(ds[0][0][0, 0], ds[0][0][1, 0])   # the flip is a different latent


def test_draw_latents_views_samples_and_mean():
    torch.manual_seed(0)
    b, c = 4000, 3
    mean = torch.randn(b, 2, c, 2, 2)
    std = torch.rand(b, 2, c, 2, 2) + 0.1
    x = torch.stack([mean, std], dim=2)                        # [B, V, S, C, h, w]
    z = draw_latents(x, flip=True, sample=True)
    eps0 = (z - mean[:, 0]) / std[:, 0]
    eps1 = (z - mean[:, 1]) / std[:, 1]
    # each sample came from one view: whichever standardises to the smaller residual
    from0 = eps0.flatten(1).abs().amax(1) < eps1.flatten(1).abs().amax(1)
    assert 0.45 < from0.float().mean() < 0.55                 # both views, about half each
    eps = torch.where(from0[:, None, None, None], eps0, eps1)
    assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02  # N(0, 1) noise
    z2 = draw_latents(x, flip=True, sample=True)
    assert not torch.equal(z, z2)                              # fresh every call
    # no flip: view 0 only; mean mode: exactly the mean
    assert torch.equal(draw_latents(x, flip=False, sample=False), mean[:, 0])
    m = draw_latents(x, flip=True, sample=False)
    is0 = (m == mean[:, 0]).flatten(1).all(1)
    is1 = (m == mean[:, 1]).flatten(1).all(1)
    assert (is0 | is1).all() and is0.any() and is1.any()
    # a mean-only store (S = 1) ignores sample=True
    assert torch.equal(draw_latents(x[:, :, :1], flip=False, sample=True), mean[:, 0])
    with pytest.raises(ValueError, match="B, V, S, C, h, w"):
        draw_latents(mean)


@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_training_step_draws_latents(encoded, tmp_path, mode):
    from _train_helpers import tiny_config
    from switch_dit import distributed as dist_util
    from switch_dit.train import Trainer, train

    root, _ = encoded
    ds = LatentDataset(str(root / "out"))
    cfg = tiny_config(tmp_path / "run", model="DiT-S/2", data="latents", data_path=str(root / "out"),
                      image_size=2, in_channels=4, num_classes=2, hflip=True, latent_sampling=mode,
                      global_batch_size=6, max_steps=2, ckpt_every=2)
    cfg.validate()
    tr = Trainer(cfg, dist_util.DistInfo())
    seen = []
    original = tr.diffusion.training_losses

    def spy(model, x_start, t, model_kwargs=None):
        seen.append(x_start.detach().clone())
        return original(model, x_start, t, model_kwargs=model_kwargs)

    tr.diffusion.training_losses = spy
    x = torch.stack([ds[i][0] for i in range(6)])
    y = torch.stack([ds[i][1] for i in range(6)])
    tr.train_step(x, y)
    tr.train_step(x, y)
    means = x[:, :, 0]                                         # [B, V, C, h, w]
    for z in seen:
        exact = [(z == means[:, v]).flatten(1).all(1) for v in range(2)]
        if mode == "mean":
            assert (exact[0] | exact[1]).all()                 # a view's mean, unchanged
        else:
            assert not (exact[0] | exact[1]).any()             # a fresh sample, never the mean
    if mode == "sample":
        assert not torch.equal(seen[0], seen[1])
    # and a whole run on the folder
    out = train(cfg, progress=False)
    assert out["step"] == 2


def test_latent256_presets_follow_the_official_recipe():
    from switch_dit.config import PRESETS, get_preset
    from switch_dit.train import resolve_precision

    for name in PRESETS:
        cfg = get_preset(name)
        if not name.startswith("latent256"):
            assert cfg.grad_clip == 1.0          # the short high-lr digits runs keep clipping
            continue
        # official Switch-DiT / DiT: no clipping, linear schedule (DiT; Switch-DiT's example
        # script), flips and a fresh posterior sample each step, AdamW 1e-4, EMA 0.9999
        assert cfg.grad_clip == 0.0 and cfg.noise_schedule == "linear"
        assert cfg.hflip and cfg.latent_sampling == "sample" and cfg.data == "latents"
        assert (cfg.lr, cfg.weight_decay, cfg.ema_decay, cfg.global_batch_size) == \
            (1e-4, 0.0, 0.9999, 256)
    # --precision fp16 is the official mixed precision: fp16 autocast with a GradScaler
    assert resolve_precision("fp16", torch.device("cpu")) == torch.float16
    bad = get_preset("latent256-S")
    bad.data_path, bad.latent_sampling = "/x", "median"
    with pytest.raises(ValueError, match="latent_sampling"):
        bad.validate()


def test_fid_labels_balanced_and_random():
    from switch_dit.sample import fid_labels

    assert fid_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    r = fid_labels(5000, 10, "random", seed=1)
    assert r.dtype == np.int64 and r.min() == 0 and r.max() == 9
    counts = np.bincount(r, minlength=10)
    assert counts.std() > 0 and abs(counts.mean() - 500) < 1e-9 and counts.min() > 400
    assert np.array_equal(r, fid_labels(5000, 10, "random", seed=1))
    assert not np.array_equal(r, fid_labels(5000, 10, "random", seed=2))
    with pytest.raises(ValueError, match="mode"):
        fid_labels(3, 3, "stratified")


def test_resume_on_posterior_latents_is_bit_identical(encoded, tmp_path):
    # the view and the posterior sample come from the training RNG, which checkpoints restore
    from _train_helpers import assert_tree_equal, tiny_config
    from switch_dit import checkpoint as ckpt
    from switch_dit.train import train

    root, _ = encoded

    def cfg(run, steps):
        return tiny_config(tmp_path / run, model="DiT-S/2", data="latents",
                           data_path=str(root / "out"), image_size=2, in_channels=4, num_classes=2,
                           global_batch_size=2, max_steps=steps, ckpt_every=2)

    train(cfg("a", 4), progress=False)
    train(cfg("b", 2), progress=False)
    torch.manual_seed(999)                                  # must not matter
    train(cfg("b", 4), resume=str(tmp_path / "b" / "latest.pt"), progress=False)
    a = ckpt.load_checkpoint(str(tmp_path / "a" / "latest.pt"))
    b = ckpt.load_checkpoint(str(tmp_path / "b" / "latest.pt"))
    for key in ("model", "ema", "opt"):
        assert_tree_equal(a[key], b[key], key)
