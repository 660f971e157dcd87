"""Command-line helpers: argparse types and pre-flight checks shared by train, sample, evaluate, demo.

Every check here turns a user mistake into one usage line and exit code 2 (argparse's
`type=` functions raise ArgumentTypeError; the `check_*` functions call `parser.error`) before
any model is built or any file is written.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Optional

# numpy's seed (used by the training loop as seed * world_size + rank) must be < 2**32; 2**31 - 1
# leaves room for any rank count up to 2 and is what most tools accept as a seed.
MAX_SEED = 2**31 - 1


def float_in_range(low: Optional[float] = None, high: Optional[float] = None, *,
                   low_inclusive: bool = True, high_inclusive: bool = True) -> Callable[[str], float]:
    """An argparse `type`: a finite float within [low, high] (either end open or unbounded).

    "nan", "inf" and "-inf" are refused: float() accepts them, and a NaN compares False with every
    bound, so without this check `--grad-clip nan` would pass every range test.
    """
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low or (value == low and not low_inclusive)):
            raise argparse.ArgumentTypeError(f"must be {'>=' if low_inclusive else '>'} {low:g}, "
                                             f"got {text}")
        if high is not None and (value > high or (value == high and not high_inclusive)):
            raise argparse.ArgumentTypeError(f"must be {'<=' if high_inclusive else '<'} {high:g}, "
                                             f"got {text}")
        return value
    parse.__name__ = "float"  # argparse names the type in "invalid float value" messages
    return parse


def int_in_range(low: Optional[int] = None, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse `type`: an integer within [low, high] (either end unbounded)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value
    parse.__name__ = "int"
    return parse


positive_int = int_in_range(1)
non_negative_int = int_in_range(0)
seed_int = int_in_range(0, MAX_SEED)
positive_float = float_in_range(0.0, low_inclusive=False)
non_negative_float = float_in_range(0.0)
cfg_scale_float = float_in_range(1.0)  # classifier-free guidance: 1 = off; below 1 is not guidance


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only for real defaults: flags whose default is None (the preset's or
    the run's value) say in their help where the value comes from, instead of "(default: None)",
    and on/off flags do not print "(default: False)"."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def run_default(field_name: str) -> str:
    """Help text for a sampling flag whose default is stored in the checkpoint's config."""
    from .config import get_preset

    digits, latent = get_preset("digits"), get_preset("latent256-XL")
    return (f"default: the run's (digits preset: {getattr(digits, field_name)}; latent256-*: "
            f"{getattr(latent, field_name)})")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def writable_dir_problem(path: str) -> Optional[str]:
    """Why `path` cannot be (or become) a writable folder, or None when it can."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "is a file, not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return "is not writable"
        return None
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        return f"cannot be created: {base} is a file"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"cannot be created: {base} is not writable"
    return None


def writable_file_problem(path: str) -> Optional[str]:
    """Why a file cannot be written at `path` (an existing folder, an unwritable place), or None."""
    if os.path.isdir(path) or path.endswith(os.sep):
        return "is a folder; give a file name"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "exists and is not writable"
    why = writable_dir_problem(os.path.dirname(os.path.abspath(path)))
    return None if why is None else f"cannot be written: its folder {why}"


def check_output_dir(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    why = writable_dir_problem(path)
    if why:
        parser.error(f"{flag} {path}: {why}")


def check_output_file(parser: argparse.ArgumentParser, flag: str, path: Optional[str]) -> None:
    if path is None:
        return
    why = writable_file_problem(path)
    if why:
        parser.error(f"{flag} {path}: {why}")


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """--device cuda on a machine without CUDA: a usage error, not a RuntimeError later."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available on this machine (use --device cpu "
                         "or auto)")


def check_backend(parser: argparse.ArgumentParser, backend: Optional[str], device: str) -> None:
    """--backend the SMoE kernels cannot run with on `device` ("auto", "cpu" or "cuda")."""
    if backend is None:
        return
    import torch
    from switch_dit_kernels import resolve_backend, triton_available

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        # No CUDA tensor as a probe: it would create a context on GPU 0 in every torchrun rank
        # before the rank picks its own GPU. On CUDA only Triton itself can be missing.
        if backend == "triton" and not triton_available():
            parser.error(f"--backend {backend}: the `triton` package is not installed "
                         "(pip install triton), or use --backend torch")
        return
    try:
        resolve_backend(backend, torch.empty(0))
    except (ValueError, RuntimeError) as e:
        parser.error(f"--backend {backend}: {e}")


def show_progress(quiet: bool = False) -> bool:
    """Progress bars go to stderr, only when it is a terminal and --quiet was not given."""
    return not quiet and sys.stderr.isatty()


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--num-sampling-steps, --cfg-scale and --sampler, each defaulting to the run's own setting
    (shared by `switch_dit.sample` and `switch_dit.evaluate`)."""
    parser.add_argument("--num-sampling-steps", type=positive_int, default=None,
                        help=run_default("sample_steps"))
    parser.add_argument("--cfg-scale", type=cfg_scale_float, default=None,
                        help="classifier-free guidance, >= 1 (1 = off); " + run_default("cfg_scale"))
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default=None,
                        help=run_default("sampler"))
