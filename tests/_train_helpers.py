"""Shared tiny configurations for the training / sampling / CLI tests (not a test module)."""
from __future__ import annotations

import pytest
import torch

from switch_dit.config import get_preset


def tiny_config(results_dir, model: str = "SwitchDiT-S/2", **overrides):
    """The digits preset shrunk to seconds on a CPU: native 8x8 digits (16 tokens at patch 2),
    depth 2, width 32, batch 16, 100 diffusion steps; every knob of the real preset otherwise."""
    cfg = get_preset("digits")
    cfg.model = model
    cfg.image_size, cfg.depth, cfg.hidden_size, cfg.num_heads = 8, 2, 32, 2
    cfg.global_batch_size, cfg.max_steps, cfg.ckpt_every, cfg.log_every = 16, 4, 2, 1
    cfg.warmup_steps, cfg.diffusion_steps, cfg.sample_steps = 2, 100, 5
    cfg.keep_checkpoints = 0
    cfg.backend = "torch"  # the Triton interpreter (TRITON_INTERPRET=1 in tests) is too slow here;
    # the kernels have their own tests against this reference
    cfg.results_dir = str(results_dir)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise AttributeError(k)
        setattr(cfg, k, v)
    return cfg


def assert_tree_equal(a, b, path="state"):
    """Exact equality of nested dicts / lists of tensors and plain values (bit-identical)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture
def one_thread():
    """torch on one thread for the test: these models are tiny, and on a shared 2-core machine
    two spinning OpenMP threads per process made the tests about 2x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
