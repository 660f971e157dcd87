"""Datasets and the resumable data order: bundled digits, an image folder, precomputed latents.

Every dataset yields (x, y): x float32 [C, H, W] in [-1, 1] for pixels (latents as stored), y int64.

- `DigitsDataset`: scikit-learn's 1,797 8x8 handwritten digits (10 classes), bundled with the
  package (no download), bilinearly upsampled to `image_size` (16 or 32), 1 channel.
- `ImageFolderDataset`: one sub-folder per class (sorted names = labels), RGB, centre crop + resize.
- `LatentDataset`: a folder written by `python -m switch_dit.encode_latents` (float16 shards of
  VAE posterior means and stds of each image and its flip, `labels_*.npy` [n] int64, memory-mapped,
  and `meta.json`); `draw_latents` draws a view and a fresh posterior sample per training step.

`ResumableDistributedSampler` is a DistributedSampler that can start in the middle of an epoch, so a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import bisect
import json
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def load_digits_array(image_size: int = 16) -> Tuple[np.ndarray, np.ndarray]:
    """The bundled digits as float32 [1797, 1, S, S] in [-1, 1] and int64 labels [1797].

    The same function feeds training and the evaluation classifier, so both see identical pixels.
    """
    from sklearn.datasets import load_digits  # the data ships inside scikit-learn: no download

    if not isinstance(image_size, int) or image_size < 8 or image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 (8, 16, 32, ...), got {image_size!r}")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).numpy()
    return x.astype(np.float32), d.target.astype(np.int64)


class DigitsDataset(Dataset):
    """The 1,797 bundled digits at `image_size`, 1 channel, 10 classes, held in memory."""

    num_classes = 10
    in_channels = 1

    def __init__(self, image_size: int = 16):
        x, y = load_digits_array(image_size)
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(y)
        self.image_size = image_size

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def center_crop_resize(img, size: int):
    """PIL image -> PIL RGB image of size x size: halve with a box filter while the short side is
    >= 2*size (cheap anti-aliasing), bicubic-resize the short side to `size`, crop the centre."""
    from PIL import Image

    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(max(size, round(s * scale)) for s in img.size), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_tensor(img) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W] in [-1, 1]."""
    a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def scan_image_folder(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """[(path, label)] and the sorted class names of a class-per-sub-folder image tree."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root!r} has no class sub-folders (expected root/<class>/*.png)")
    items = []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.join(dirpath, f), label))
    if not items:
        raise ValueError(f"image folder {root!r} holds no images with extensions {IMAGE_EXTENSIONS}")
    return items, classes


class ImageFolderDataset(Dataset):
    """Class-per-sub-folder RGB images, centre-cropped and resized to image_size, in [-1, 1]."""

    in_channels = 3

    def __init__(self, root: str, image_size: int):
        self.items, self.classes = scan_image_folder(root)
        self.num_classes = len(self.classes)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as img:
            x = pil_to_tensor(center_crop_resize(img, self.image_size))
        return x, torch.tensor(label, dtype=torch.int64)


def read_latent_meta(root: str) -> dict:
    path = os.path.join(root, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {root!r} is not a latent folder; write one with "
            "`python -m switch_dit.encode_latents --data-path IMAGES --vae VAE_DIR --out DIR`")
    with open(path) as f:
        return json.load(f)


class LatentDataset(Dataset):
    """Precomputed (already scaled) VAE latents, memory-mapped from .npy shards; float32 out.

    Two layouts (see `switch_dit.encode_latents`):
    - format 2 (meta "format": 2): `latents_*.npy` [n, V, C, h, w] posterior means of V views
      (V = 2: the image and its horizontal flip) and, when meta "posterior" is true, `stds_*.npy`
      [n, V, C, h, w] posterior standard deviations. An item is [V, S, C, h, w] with S = 2
      (mean, std) or 1 (mean only); `draw_latents` turns a batch of them into training latents.
    - format 1 (older folders): `latents_*.npy` [n, C, h, w], one fixed latent per item -> [C, h, w].
    """

    def __init__(self, root: str):
        self.meta = read_latent_meta(root)
        self.format = int(self.meta.get("format", 1))
        self.posterior = self.format >= 2 and bool(self.meta.get("posterior", False))
        shards = sorted(f for f in os.listdir(root) if f.startswith("latents_") and f.endswith(".npy"))
        if not shards:
            raise ValueError(f"latent folder {root!r} has no latents_*.npy shards")
        self.latents, self.stds, self.labels, self.ends = [], [], [], []
        want_dims = 5 if self.format >= 2 else 4
        total = 0
        for s in shards:
            lat = np.load(os.path.join(root, s), mmap_mode="r")
            lab = np.load(os.path.join(root, s.replace("latents_", "labels_")), mmap_mode="r")
            if lat.ndim != want_dims or lab.shape[0] != lat.shape[0]:
                layout = "[n, V, C, h, w]" if want_dims == 5 else "[n, C, h, w]"
                raise ValueError(f"shard {s} in {root!r}: latents {lat.shape} / labels {lab.shape} "
                                 f"do not match ({layout} and [n])")
            if self.posterior:
                std = np.load(os.path.join(root, s.replace("latents_", "stds_")), mmap_mode="r")
                if std.shape != lat.shape:
                    raise ValueError(f"shard {s} in {root!r}: stds {std.shape} != means {lat.shape}")
                self.stds.append(std)
            total += lat.shape[0]
            self.latents.append(lat)
            self.labels.append(lab)
            self.ends.append(total)
        c, h, w = self.latents[0].shape[-3:]
        self.views = int(self.latents[0].shape[1]) if self.format >= 2 else 1
        self.in_channels, self.image_size = int(c), int(h)
        self.num_classes = int(self.meta.get("num_classes", int(max(l.max() for l in self.labels)) + 1))

    def __len__(self) -> int:
        return self.ends[-1]

    def __getitem__(self, i: int):
        s = bisect.bisect_right(self.ends, i)
        j = i - (self.ends[s - 1] if s else 0)
        x = torch.from_numpy(np.array(self.latents[s][j], dtype=np.float32))
        if self.format >= 2:
            parts = [x, torch.from_numpy(np.array(self.stds[s][j], dtype=np.float32))] \
                if self.posterior else [x]
            x = torch.stack(parts, dim=1)                                   # [V, S, C, h, w]
        return x, torch.tensor(int(self.labels[s][j]), dtype=torch.int64)


def draw_latents(x: torch.Tensor, flip: bool = True, sample: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Training latents [B, C, h, w] from a batch of format-2 items x [B, V, S, C, h, w].

    Per sample: a view drawn uniformly when flip and V == 2 (the image or its horizontal flip, each
    encoded by the VAE: the official pipeline flips the image, then encodes), else view 0; then a
    fresh posterior sample mean + std * N(0, 1) when sample and S == 2 (the official code calls
    `latent_dist.sample()` every step), else the mean. Randomness from `generator` or the global RNG
    of x's device (which checkpoints capture, so resuming stays exact).
    """
    if x.dim() != 6:
        raise ValueError(f"x must be [B, V, S, C, h, w] (format-2 latents), got {tuple(x.shape)}")
    b, v = x.shape[:2]
    if flip and v == 2:
        view = (torch.rand(b, device=x.device, generator=generator) < 0.5).long()
    else:
        view = torch.zeros(b, dtype=torch.long, device=x.device)
    picked = x[torch.arange(b, device=x.device), view]                      # [B, S, C, h, w]
    mean = picked[:, 0]
    if sample and picked.shape[1] == 2:
        noise = torch.randn(mean.shape, device=x.device, dtype=mean.dtype, generator=generator)
        return mean + picked[:, 1] * noise
    return mean


def build_dataset(cfg) -> Dataset:
    """The dataset of a TrainConfig (checks that channels/classes/size agree with the config)."""
    if cfg.data == "digits":
        ds = DigitsDataset(cfg.image_size)
    elif cfg.data == "folder":
        ds = ImageFolderDataset(cfg.data_path, cfg.image_size)
    elif cfg.data == "latents":
        ds = LatentDataset(cfg.data_path)
    else:
        raise ValueError(f"unknown data kind {cfg.data!r}")
    return ds


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose iteration can start at `start_index` within the current epoch.

    Epoch e's order is the DistributedSampler's (a permutation seeded with seed + e, split across
    ranks), so the data order is a function of (seed, epoch, position) only: a resumed run calls
    set_epoch(e) and set_start_index(batches_done * local_batch) and sees the same remaining batches.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start_index = 0

    def set_start_index(self, start_index: int) -> None:
        self.start_index = int(start_index)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)


def infinite_batches(dataset, sampler: ResumableDistributedSampler, local_batch: int,
                     start_step: int, num_workers: int = 0, seed: int = 0,
                     pin_memory: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) batches of `local_batch` for steps start_step, start_step + 1, ...

    Batch s is batch (s mod B) of epoch (s div B), B = batches per epoch per rank (drop_last), so
    the stream depends on (seed, start_step) alone. Worker seeds come from a private generator
    seeded per epoch, never from the global RNG, whose state belongs to the training step.
    """
    from torch.utils.data import DataLoader

    per_epoch = sampler.num_samples // local_batch
    if per_epoch < 1:
        raise ValueError(f"the dataset has {len(dataset)} items: too few for a per-process batch of "
                         f"{local_batch} with {sampler.num_replicas} process(es)")
    epoch, pos = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start_index(pos * local_batch)
        g = torch.Generator()
        g.manual_seed(seed * 100_003 + epoch)
        loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, drop_last=True,
                            num_workers=num_workers, pin_memory=pin_memory, generator=g,
                            persistent_workers=False)
        yield from loader
        epoch, pos = epoch + 1, 0
