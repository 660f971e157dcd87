"""Evaluation: the Frechet distance, the digits classifier metrics, and train -> sample -> evaluate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from _train_helpers import one_thread  # noqa: F401  (fixture)
from _train_helpers import tiny_config
from switch_dit.data import load_digits_array
from switch_dit.evaluate import digits_evaluator, frechet_distance, gaussian_stats
from switch_dit.evaluate import main as evaluate_main
from switch_dit.sample import main as sample_main
from switch_dit.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [1, 5, 37])  # scalar case, small, odd size
def test_frechet_distance_matches_scipy(dim):
    rng = np.random.default_rng(dim)
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form_1d_and_singular():
    # 1-D Gaussians: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                            np.array([[9.0]])) == pytest.approx(4.0 + 1.0)
    # rank-deficient covariances (dead features / fewer samples than features) stay finite, >= 0
    x = np.random.default_rng(0).normal(size=(5, 20))
    mu, s = gaussian_stats(x)
    fd = frechet_distance(mu, s, mu + 1.0, s)
    assert np.isfinite(fd) and fd == pytest.approx(20.0, rel=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_digits_metrics_separate_real_from_noise():
    ev = digits_evaluator(8)
    assert ev.real_test_accuracy > 0.9
    x, y = load_digits_array(8)
    idx = np.random.default_rng(0).permutation(len(x))[:500]
    real = ev.evaluate(x[idx], y[idx])
    noise = ev.evaluate(np.random.default_rng(1).uniform(-1, 1, size=(500, 1, 8, 8)), y[idx])
    assert real["accuracy"] > 0.9 and noise["accuracy"] < 0.3
    assert real["digits_fd"] < 5 * real["fd_real_holdout"] + 1.0
    assert noise["digits_fd"] > 20 * real["digits_fd"]
    # wrong labels are scored as wrong
    assert ev.evaluate(x[idx], (y[idx] + 1) % 10)["accuracy"] < 0.1
    with pytest.raises(ValueError, match="digits samples"):
        ev.evaluate(np.zeros((4, 3, 8, 8)))


def test_digits_train_sample_evaluate_end_to_end(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", max_steps=3, ckpt_every=3, sample_steps=4)
    train(cfg, progress=False)
    ck = str(tmp_path / "run" / "latest.pt")
    grid, npz, emap = tmp_path / "grid.png", tmp_path / "s.npz", tmp_path / "map.png"
    assert sample_main(["--checkpoint", str(tmp_path / "run"), "--out", str(grid), "--per-class",
                        "3", "--num-samples", "20", "--npz", str(npz), "--expert-map", str(emap),
                        "--backend", "torch"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ema"] is True and report["num_sampling_steps"] == 4
    # 10 rows (a row per class) x 3 columns of 8x8 digits drawn at 8x scale with 1 px padding,
    # after a left margin with the row labels (the class)
    with Image.open(grid) as im:
        assert im.size[1] == 10 * 65 + 1 and 3 * 65 + 1 < im.size[0] <= 3 * 65 + 1 + 40
    data = np.load(npz)
    assert data["samples"].shape == (20, 8, 8, 1) and data["samples"].dtype == np.uint8
    assert data["labels"].tolist() == [i % 10 for i in range(20)]
    with Image.open(emap) as im:
        assert im.size[0] > 100
    # evaluate from the checkpoint and from the npz
    out = tmp_path / "m.json"
    assert evaluate_main(["--checkpoint", ck, "--num-samples", "20", "--num-sampling-steps", "3",
                          "--backend", "torch", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert 0.0 <= m["accuracy"] <= 1.0 and np.isfinite(m["digits_fd"]) and m["digits_fd"] >= 0
    assert m["num_samples"] == 20 and m["step"] == 3
    capsys.readouterr()
    assert evaluate_main(["--npz", str(npz)]) == 0
    m2 = json.loads(capsys.readouterr().out)
    assert m2["num_samples"] == 20 and 0.0 <= m2["accuracy"] <= 1.0


def test_sampling_is_deterministic_and_uses_ema(tmp_path):
    from switch_dit.sample import generate, load_for_sampling

    cfg = tiny_config(tmp_path / "run", max_steps=2, ckpt_every=2)
    train(cfg, progress=False)
    ck = str(tmp_path / "run" / "latest.pt")
    ema, raw = load_for_sampling(ck), load_for_sampling(ck, use_ema=False)
    a = generate(ema, [0, 1, 2], num_sampling_steps=3, cfg_scale=2.0, seed=5)
    b = generate(ema, [0, 1, 2], num_sampling_steps=3, cfg_scale=2.0, seed=5)
    c = generate(raw, [0, 1, 2], num_sampling_steps=3, cfg_scale=2.0, seed=5)
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    d = generate(ema, [0, 1, 2], num_sampling_steps=3, sampler="ddpm", seed=5)
    assert d.shape == a.shape and torch.isfinite(d).all()
    with pytest.raises(ValueError, match="labels"):
        generate(ema, [10], num_sampling_steps=3)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(ema, [1], num_sampling_steps=3, cfg_scale=0.5)


def test_fid_without_its_package_or_weights_is_a_clear_error(tmp_path, capsys):
    import importlib.util

    from switch_dit.plots import to_uint8

    npz = tmp_path / "s.npz"
    np.savez(npz, samples=to_uint8(torch.zeros(4, 3, 8, 8)), labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--npz", str(npz), "--real-dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    if importlib.util.find_spec("torch_fidelity") is not None:
        assert "Inception weights on disk" in err
    elif importlib.util.find_spec("cleanfid") is None:
        assert "pip install torch-fidelity" in err
