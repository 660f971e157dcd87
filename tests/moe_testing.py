"""Shared helpers of the expert-op tests: routing patterns and the reference-error rule."""
from __future__ import annotations

import torch

# atol added to "2 x PyTorch's own error", relative to the reference's largest magnitude.
REL_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3,
            torch.bfloat16: 1.5e-2}


def make_routing(num_routes: int, k: int, num_experts: int, pattern: str = "random",
                 device="cpu", weight_dtype=torch.float32):
    """(topk_weights [R, k], topk_ids [R, k] int64) with the expert usage named by ``pattern``:

    "random": k distinct random experts per route unit.
    "one":    every unit picks the same k experts (k = 1: every row on one expert; the others
              get no rows).
    "sparse": only odd-numbered experts are used: expert 0 and others get no rows, so empty
              experts sit before, between and after the used ones.
    """
    if pattern == "random":
        ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(num_routes)])
    elif pattern == "one":
        ids = torch.arange(num_experts - 1, num_experts - 1 - k, -1).expand(num_routes, k).clone()
    elif pattern == "sparse":
        pool = torch.arange(1, num_experts, 2)
        assert k <= pool.numel(), "sparse routing needs k <= E // 2"
        ids = torch.stack([pool[torch.randperm(pool.numel())[:k]] for _ in range(num_routes)])
    else:
        raise ValueError(pattern)
    weights = torch.rand(num_routes, k) + 0.1
    return weights.to(device=device, dtype=weight_dtype), ids.to(device)


def assert_matches_reference(name: str, got: torch.Tensor, ref64: torch.Tensor,
                             ref_same: torch.Tensor, dtype: torch.dtype) -> None:
    """Flash-attention's rule: |got - ref64| <= 2 |ref_same - ref64| + atol (max over elements).

    ref64 is the reference in float64, ref_same the reference in the test dtype (PyTorch's own
    error). NaN anywhere in ``got`` fails.
    """
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert not got.isnan().any(), f"{name}: NaN in the output (an unwritten tile?)"
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    base = (ref_same.double() - ref64).abs().max().item() if got.numel() else 0.0
    scale = ref64.abs().max().item() if got.numel() else 0.0
    atol = REL_ATOL[dtype] * max(scale, 1.0)
    assert err <= 2 * base + atol, (
        f"{name}: error {err:.3g} > 2 x PyTorch's {base:.3g} + atol {atol:.3g} (|ref| {scale:.3g})")


def run_with_grads(fn, floats: dict, ints: dict, dtype, dy: torch.Tensor):
    """fn(**inputs) with the floating inputs cast to ``dtype`` (topk_weights kept in its own
    dtype unless ``dtype`` is float64) and made leaves; returns (y, {name: grad})."""
    leaves = {}
    for name, t in floats.items():
        if t is None:
            leaves[name] = None
            continue
        cast = t if (name == "topk_weights" and dtype != torch.float64) else t.to(dtype)
        leaves[name] = cast.detach().clone().requires_grad_(True)
    y = fn(**leaves, **ints)
    names = [n for n, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(y, [leaves[n] for n in names], dy.to(y.dtype))
    return y, dict(zip(names, grads))


def check_against_reference(fast_fn, ref_fn, floats: dict, ints: dict, dtype) -> None:
    """Forward and every gradient of ``fast_fn`` vs ``ref_fn`` in float64 and in ``dtype``."""
    with torch.no_grad():
        probe = ref_fn(**{n: (t.double() if t is not None else None) for n, t in floats.items()},
                       **ints)
    dy = torch.randn(probe.shape, dtype=torch.float64, device=probe.device)
    y64, g64 = run_with_grads(ref_fn, floats, ints, torch.float64, dy)
    y_ref, g_ref = run_with_grads(ref_fn, floats, ints, dtype, dy)
    y, g = run_with_grads(fast_fn, floats, ints, dtype, dy)
    assert y.dtype == dtype
    assert_matches_reference("y", y, y64, y_ref, dtype)
    for name in g64:
        keeps_own = name == "topk_weights" and dtype != torch.float64  # as run_with_grads casts
        want_dtype = floats[name].dtype if keeps_own else dtype
        assert g[name].dtype == want_dtype, f"d{name} has dtype {g[name].dtype}"
        assert_matches_reference(f"d{name}", g[name], g64[name], g_ref[name], dtype)


def run_twice_second_without_host_sync(fn):
    """fn() once (compiling and autotuning synchronise), then again with any synchronising CUDA
    call raising; returns the second result."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
