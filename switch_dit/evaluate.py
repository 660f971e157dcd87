"""Sample quality: digits accuracy and digits-FD for the bundled data, FID for user images.

digits: a scikit-learn MLP classifier (one hidden layer of 128 ReLU units, fixed seed) is trained on
80% of the real digits at the training resolution; generated samples are scored by
  - accuracy: the share the classifier assigns to the class they were conditioned on,
  - digits-FD: the Frechet distance between Gaussians fitted to the classifier's hidden features
    of all 1,797 real digits and of the samples (the FID recipe with a tiny in-domain network).
The report also gives the classifier's held-out accuracy on real digits and the FD of the 20%
held-out real digits against all real digits ("fd_real_holdout"): the floor the metric reaches at
that sample count.

User images: FID through torch-fidelity (or clean-fid) when it is installed and the Inception
weights are on disk; nothing is downloaded.

    python -m switch_dit.evaluate --checkpoint results/digits-.../latest.pt
    python -m switch_dit.evaluate --npz samples.npz              # samples written by sample.py
    python -m switch_dit.evaluate --npz samples.npz --real-dir IMAGES --inception-weights FILE
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Dict, Optional, Tuple

import numpy as np

from . import cli


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) in float64.

    Tr (S1 S2)^1/2 = Tr (S1^1/2 S2 S1^1/2)^1/2, a symmetric PSD matrix: its square root comes from
    an eigendecomposition with negative round-off eigenvalues clipped to 0, so singular covariances
    (dead ReLU features, fewer samples than features) need no ridge and give no complex parts.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mean/covariance shapes differ: {mu1.shape} vs {mu2.shape}, "
                         f"{s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def gaussian_stats(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need [N >= 2, F] features, got {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


class DigitsEvaluator:
    """The fixed digits classifier at one resolution, its real-data statistics and the metrics."""

    def __init__(self, image_size: int = 16, seed: int = 0):
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        from .data import load_digits_array

        x, y = load_digits_array(image_size)
        self.image_size = image_size
        flat = x.reshape(len(x), -1)
        xtr, xte, ytr, yte = train_test_split(flat, y, test_size=0.2, random_state=seed, stratify=y)
        self.clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=400,
                                 random_state=seed)
        import warnings
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        # One BLAS thread: these matrices are tiny, and on a busy machine OpenBLAS's spinning
        # threads made the fit 10x slower (48 s vs 4 s measured on 2 shared cores).
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter is harmless here
            self.clf.fit(xtr, ytr)
        self.real_test_accuracy = float(self.clf.score(xte, yte))
        self.mu_real, self.sigma_real = gaussian_stats(self.features(flat))
        mu_te, s_te = gaussian_stats(self.features(xte))
        self.fd_real_holdout = frechet_distance(mu_te, s_te, self.mu_real, self.sigma_real)
        self.num_real_holdout = len(xte)

    def _flat(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 4 and images.shape[1] != 1 and images.shape[-1] == 1:
            images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        expect = (1, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expect:
            raise ValueError(f"digits samples must be [N, 1, {self.image_size}, {self.image_size}] "
                             f"(or NHWC), got {images.shape}")
        return np.clip(images, -1, 1).reshape(len(images), -1)

    def features(self, flat: np.ndarray) -> np.ndarray:
        """The classifier's hidden ReLU layer: relu(x W1 + b1), [N, 128]."""
        return np.maximum(flat @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def evaluate(self, images: np.ndarray, labels: Optional[np.ndarray] = None) -> Dict[str, float]:
        """images: [N, 1, S, S] (or NHWC) in [-1, 1]; labels: the conditioning classes or None."""
        flat = self._flat(images)
        mu, sigma = gaussian_stats(self.features(flat))
        out = {"digits_fd": frechet_distance(mu, sigma, self.mu_real, self.sigma_real),
               "num_samples": int(len(flat)),
               "fd_real_holdout": self.fd_real_holdout,
               "num_real_holdout": self.num_real_holdout,
               "classifier_real_test_accuracy": self.real_test_accuracy}
        if labels is not None:
            pred = self.clf.predict(flat)
            out["accuracy"] = float((pred == np.asarray(labels)).mean())
        return out


@functools.lru_cache(maxsize=4)
def digits_evaluator(image_size: int = 16, seed: int = 0) -> DigitsEvaluator:
    return DigitsEvaluator(image_size, seed)


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC [0, 255] -> float32 NCHW [-1, 1]."""
    return (np.asarray(images, dtype=np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def compute_fid(fake_dir: str, real_dir: str, inception_weights: Optional[str] = None,
                cuda: bool = False, progress: bool = False) -> Dict[str, float]:
    """FID between two image folders via torch-fidelity (preferred) or clean-fid, offline only;
    progress: torch-fidelity's own progress output (stderr)."""
    try:
        import torch_fidelity  # noqa: F401
        have_tf = True
    except ImportError:
        have_tf = False
    if have_tf:
        if not inception_weights or not os.path.isfile(inception_weights):
            raise FileNotFoundError(
                "FID needs the Inception weights on disk (no download at run time): pass "
                "--inception-weights PATH to torch-fidelity's pt_inception-2015-12-05 .pth file")
        import torch_fidelity
        m = torch_fidelity.calculate_metrics(
            input1=fake_dir, input2=real_dir, cuda=cuda, fid=True, verbose=progress,
            feature_extractor_weights_path=inception_weights)
        return {"fid": float(m["frechet_inception_distance"])}
    try:
        from cleanfid import fid as cfid
    except ImportError:
        raise RuntimeError("FID needs torch-fidelity (pip install torch-fidelity) or clean-fid "
                           "(pip install clean-fid) with its Inception weights on disk") from None
    if inception_weights:
        raise ValueError("--inception-weights is for torch-fidelity; clean-fid reads its weights "
                         "from its own cache folder")
    return {"fid": float(cfid.compute_fid(fake_dir, real_dir, mode="clean"))}


def write_png_folder(images_uint8: np.ndarray, out_dir: str, progress: bool = False) -> str:
    from PIL import Image
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    for i, im in enumerate(tqdm(images_uint8, desc="writing PNGs for FID", unit="image",
                                disable=not progress, dynamic_ncols=True)):
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(
            os.path.join(out_dir, f"{i:06d}.png"))
    return out_dir


def evaluate_checkpoint(checkpoint: str, num_samples: int = 500, num_sampling_steps: Optional[int] = None,
                        cfg_scale: Optional[float] = None, sampler: Optional[str] = None,
                        seed: int = 0, use_ema: bool = True, device: str = "auto",
                        backend: Optional[str] = None, batch_size: int = 250,
                        progress: bool = False) -> Dict[str, float]:
    """Sample `num_samples` class-balanced digits from a checkpoint (a file or a results folder)
    and score them; progress: a tqdm bar on stderr over the sampling steps."""
    from .checkpoint import checkpoint_file
    from .sample import generate, load_for_sampling

    checkpoint = checkpoint_file(checkpoint)
    ld = load_for_sampling(checkpoint, use_ema=use_ema, device=device, backend=backend)
    cfg = ld.config
    if cfg.data != "digits":
        raise ValueError(f"{checkpoint!r} was trained on {cfg.data!r}: digits metrics need a digits "
                         "model; for other data write samples with sample.py --npz and pass "
                         "--npz ... --real-dir ...")
    labels = np.arange(num_samples) % cfg.num_classes
    steps = num_sampling_steps or cfg.sample_steps
    scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
    smp = sampler or cfg.sampler
    x = generate(ld, labels, num_sampling_steps=steps, cfg_scale=scale, sampler=smp, seed=seed,
                 batch_size=batch_size, progress=progress)
    res = digits_evaluator(cfg.image_size).evaluate(x.numpy(), labels)
    res.update({"checkpoint": checkpoint, "step": ld.step, "sampler": smp,
                "num_sampling_steps": steps, "cfg_scale": scale, "ema": use_ema, "seed": seed})
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switch-dit-evaluate", description=__doc__.split("\n")[0],
                                formatter_class=cli.HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint file or a results folder: sample from it, "
                                           "then score (digits models)")
    src.add_argument("--npz", help="score samples saved by `switch_dit.sample --npz`")
    p.add_argument("--num-samples", type=cli.int_in_range(2), default=500,
                   help="with --checkpoint: how many samples (>= 2)")
    cli.add_sampling_arguments(p)
    p.add_argument("--seed", type=cli.seed_int, default=0, help="sampling seed")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="SMoE kernels; default: the run's")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available")
    p.add_argument("--real-dir", help="with --npz: real images folder for FID (user data)")
    p.add_argument("--inception-weights", help="torch-fidelity Inception weights file (no download)")
    p.add_argument("--out", help="also write the metrics JSON here")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is also off when stderr is not a terminal)")
    return p


def _check_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The checkpoint path of --checkpoint, after the usage checks that need its config (a lazy
    peek: the full load and digest check happen in evaluate_checkpoint)."""
    from . import checkpoint as ckpt

    path = ckpt.checkpoint_file(args.checkpoint)
    try:
        config = ckpt.load_checkpoint(path, verify=False, mmap=True)["config"]
    except ckpt.CheckpointError as e:
        parser.error(str(e))
    if config.get("data") != "digits":
        parser.error(f"--checkpoint {args.checkpoint}: the model was trained on "
                     f"{config.get('data')!r}; digits metrics need a digits model (for other data "
                     "write samples with `switch_dit.sample --npz` and pass --npz ... --real-dir ...)")
    steps = config.get("diffusion_steps", 1000)
    if args.num_sampling_steps is not None and args.num_sampling_steps > steps:
        parser.error(f"--num-sampling-steps {args.num_sampling_steps}: the model was trained with "
                     f"{steps} diffusion steps; use at most that many")
    return path


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_output_file(parser, "--out", args.out)
    cli.check_device(parser, args.device)
    if args.real_dir and not os.path.isdir(args.real_dir):
        parser.error(f"--real-dir {args.real_dir!r} is not a folder")
    if args.checkpoint:
        cli.check_backend(parser, args.backend, args.device)
        path = _check_checkpoint(parser, args)
        res = evaluate_checkpoint(path, args.num_samples, args.num_sampling_steps,
                                  args.cfg_scale, args.sampler, args.seed, not args.no_ema,
                                  args.device, args.backend, progress=cli.show_progress(args.quiet))
    else:
        if not os.path.isfile(args.npz):
            parser.error(f"--npz {args.npz!r} does not exist")
        try:
            data = np.load(args.npz)
        except (OSError, ValueError) as e:
            parser.error(f"--npz {args.npz!r} is not a readable .npz file ({e})")
        if "samples" not in data:
            parser.error(f"{args.npz!r} has no 'samples' array (write it with sample.py --npz)")
        samples = data["samples"]
        labels = data["labels"] if "labels" in data else None
        if args.real_dir:
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    progress = cli.show_progress(args.quiet)
                    res = compute_fid(write_png_folder(samples, tmp, progress), args.real_dir,
                                      args.inception_weights, cuda=args.device == "cuda",
                                      progress=progress)
                except (RuntimeError, FileNotFoundError, ValueError) as e:
                    parser.error(str(e))
        else:
            x = uint8_to_unit(samples)
            res = digits_evaluator(x.shape[-1]).evaluate(x, labels)
        res["npz"] = args.npz
    text = json.dumps(res, indent=2, sort_keys=True)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
