"""Test setup: run Triton kernels through the CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence at conftest import time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped otherwise)")
    config.addinivalue_line("markers", "slow: slow on the CPU; still part of the default run")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs per test."""
    torch.manual_seed(0)
