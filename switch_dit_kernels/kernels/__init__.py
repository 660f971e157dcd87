"""Triton kernels and their launchers: tensors in, tensors out, no autograd.

Import these modules only when Triton is installed; the functional layer does so lazily.
"""
