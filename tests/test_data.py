"""Data: bundled digits, resumable data order, image folders, latent folders and their encoder."""
from __future__ import annotations

import json
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from switch_dit.data import (DigitsDataset, ImageFolderDataset, LatentDataset,
                             ResumableDistributedSampler, center_crop_resize, infinite_batches,
                             load_digits_array)


@pytest.mark.parametrize("size", [8, 16, 32])  # native, the demo's, the larger preset option
def test_digits_bundled_shapes_and_range(size):
    x, y = load_digits_array(size)
    assert x.shape == (1797, 1, size, size) and x.dtype == np.float32
    assert y.shape == (1797,) and sorted(set(y.tolist())) == list(range(10))
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() > 0.9  # the full range is used
    ds = DigitsDataset(size)
    xi, yi = ds[5]
    assert xi.shape == (1, size, size) and yi.dtype == torch.int64
    assert ds.num_classes == 10 and ds.in_channels == 1


def test_digits_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        load_digits_array(12)  # not a multiple of 8


def _stream(ds, start, n, world=1, rank=0, batch=16, seed=3):
    sampler = ResumableDistributedSampler(ds, num_replicas=world, rank=rank, seed=seed)
    it = infinite_batches(ds, sampler, batch, start_step=start, seed=seed)
    return [b for b in itertools.islice(it, n)]


def test_resumed_data_order_matches_uninterrupted():
    # 1797 digits, batch 16 -> 112 batches per epoch: start at 110 and cross the epoch boundary.
    ds = DigitsDataset(8)
    full = _stream(ds, 0, 116)
    resumed = _stream(ds, 110, 6)
    for a, b in zip(full[110:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # epochs are reshuffled: epoch 1 starts with a different batch than epoch 0
    assert not torch.equal(full[0][1], full[112][1])
    # the global RNG is not consumed by the data stream (it belongs to the training step)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _stream(ds, 111, 3)
    assert torch.equal(before, torch.get_rng_state())


def test_two_ranks_see_disjoint_data():
    ds = DigitsDataset(8)
    r0 = _stream(ds, 0, 3, world=2, rank=0, batch=8)
    r1 = _stream(ds, 0, 3, world=2, rank=1, batch=8)
    f0 = {tuple(x.flatten().tolist()) for b in r0 for x in b[0]}
    f1 = {tuple(x.flatten().tolist()) for b in r1 for x in b[0]}
    assert len(f0 & f1) <= 2  # digits has a few exact duplicate images; indices are disjoint


def test_too_small_dataset_for_batch():
    ds = torch.utils.data.TensorDataset(torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))
    sampler = ResumableDistributedSampler(ds)
    with pytest.raises(ValueError, match="too few"):
        next(infinite_batches(ds, sampler, 8, 0))


def _write_images(root, sizes_by_class):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, sizes in sizes_by_class.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / cls / f"{i}.png")
    (root / sorted(sizes_by_class)[0] / "notes.txt").write_text("ignored")


def test_image_folder_dataset(tmp_path):
    # odd and non-square sizes; a class with one image; a non-image file that is skipped
    _write_images(tmp_path, {"cat": [(40, 24), (17, 33)], "dog": [(64, 64)]})
    ds = ImageFolderDataset(str(tmp_path), 16)
    assert len(ds) == 3 and ds.classes == ["cat", "dog"] and ds.num_classes == 2
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert [int(ds[i][1]) for i in range(3)] == [0, 0, 1]


def test_center_crop_keeps_the_centre():
    from PIL import Image

    a = np.zeros((20, 60, 3), dtype=np.uint8)
    a[:, 20:40] = 255  # a white square band in the middle of a wide image
    out = np.asarray(center_crop_resize(Image.fromarray(a), 10))
    assert out.shape == (10, 10, 3) and out.mean() > 250


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "missing"), 16)
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(str(tmp_path), 16)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(str(tmp_path), 16)


def test_encode_folder_then_latent_dataset(tmp_path):
    # A stand-in encoder (8x average pool, 4 channels; std = |mean| / 4 + 0.01) exercises sharding,
    # flips, the stored posterior and metadata without diffusers; tests/test_latents.py runs a
    # real (tiny, random) AutoencoderKL through the command.
    from switch_dit.encode_latents import encode_folder

    _write_images(tmp_path / "img", {"a": [(32, 32)] * 3, "b": [(48, 40)] * 2})

    def encode(x):
        mean = F.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4]
        return mean, mean.abs() / 4 + 0.01

    meta = encode_folder(encode, str(tmp_path / "img"), str(tmp_path / "lat"), 32, batch_size=2,
                         flip=True, scale_factor=0.5, shard_size=4, progress=False)
    assert meta["num_images_rank"] == 5 and meta["num_classes"] == 2 and meta["views"] == 2
    ds = LatentDataset(str(tmp_path / "lat"))
    assert len(ds) == 5 and ds.in_channels == 4 and ds.image_size == 4 and ds.num_classes == 2
    assert ds.posterior and ds.views == 2
    img = ImageFolderDataset(str(tmp_path / "img"), 32)
    for i in (0, 4):
        x, y = ds[i]
        assert x.shape == (2, 2, 4, 4, 4) and int(y) == int(img[i][1])
        for view, image in enumerate((img[i][0], img[i][0].flip(-1))):
            mean, std = encode(image[None])
            assert torch.allclose(x[view, 0], mean[0] * 0.5, atol=2e-3)  # float16 storage
            assert torch.allclose(x[view, 1], std[0] * 0.5, atol=2e-3)
    assert json.loads((tmp_path / "lat" / "meta.json").read_text())["scale_factor"] == 0.5
    # the mean-only store: no stds files, items [V, 1, C, h, w]
    encode_folder(encode, str(tmp_path / "img"), str(tmp_path / "mean"), 32, batch_size=2,
                  flip=False, store="mean", progress=False)
    dm = LatentDataset(str(tmp_path / "mean"))
    assert not dm.posterior and dm.views == 1 and dm[0][0].shape == (1, 1, 4, 4, 4)
    assert not list((tmp_path / "mean").glob("stds_*"))
    with pytest.raises(ValueError, match="store"):
        encode_folder(encode, str(tmp_path / "img"), str(tmp_path / "x"), 32, store="median")


def test_latent_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="encode_latents"):
        LatentDataset(str(tmp_path))
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="no latents"):
        LatentDataset(str(tmp_path))


def test_load_vae_without_weights_is_a_clear_error(tmp_path):
    from switch_dit.encode_latents import load_vae

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_vae(str(tmp_path / "no-vae"), torch.device("cpu"))
