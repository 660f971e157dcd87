"""Prewarm Triton's caches: compile and autotune the kernels of a run's shapes once, before the run.

A first call compiles (and, with autotuning, times) every config of every kernel it launches; the
compiled kernels and the autotuner's choices land in Triton's cache (TRITON_CACHE_DIR, default
~/.triton/cache), where every later process on that machine finds them. Started together, the ranks
of a torchrun job each pay the whole cost at once; run this once per node first and they pay
nothing (compile_check --first-step, Switch-DiT-XL/2 on the sm_90 stand-in driver: 10 compilations
cold, 3 kernels loaded and no timing warm).

    python -m switch_dit_kernels.warmup switch_modulation            # Switch-DiT-XL/2, 32 a GPU
    python -m switch_dit_kernels.warmup switch_modulation --batch 16 --tokens 256 --dim 1152 \
        --experts 3 --k 2 [--recompute]
    python -m switch_dit_kernels.warmup expert_mlp --tokens 16384 --dim 2048 --hidden 1024 \
        --experts 64 --k 8 --activation swiglu
    python -m switch_dit_kernels.warmup expert_linear --tokens 8192 --dim 1152 --experts 8 --k 2

Use the run's own shapes and dtype, per GPU: the autotune keys hold the dimensions (D, N, k, the
GEMMs' K and N) but not the batch, so the first process's batch decides the config every later
process reuses. Needs the GPU the run uses (results are kept per GPU model and Triton version);
on a machine without CUDA it says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _leaf(*shape, dtype, device):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(True)


def _routing(rows: int, k: int, experts: int, device):
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(rows)]).to(device)
    return torch.rand(rows, k, device=device, requires_grad=True), ids


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def warm_switch_modulation(batch: int, tokens: int, dim: int, experts: int, k: int, *,
                           dtype=torch.bfloat16, device="cuda", recompute: bool = False) -> float:
    """One forward + backward of `switch_modulation` (Triton) on x [batch, tokens, dim], per-sample
    routing [batch, k] over ``experts``, gates needing a gradient (a training step). Seconds."""
    from .functional import switch_modulation
    t0 = time.perf_counter()
    x = _leaf(batch, tokens, dim, dtype=dtype, device=device)
    g, ids = _routing(batch, k, experts, device)
    r = switch_modulation(x, _leaf(experts, dim, dim, dtype=dtype, device=device),
                          _leaf(experts, dim, dtype=dtype, device=device), g, ids,
                          backend="triton", recompute=recompute)
    r.backward(torch.ones_like(r))
    _sync(device)
    return time.perf_counter() - t0


def warm_expert_linear(tokens: int, dim: int, out: int, experts: int, k: int, *,
                       tokens_per_route: int = 1, dtype=torch.bfloat16, device="cuda") -> float:
    """One forward + backward of `expert_linear` (Triton) on x [tokens, dim] -> [tokens, out]."""
    from .functional import expert_linear
    t0 = time.perf_counter()
    g, ids = _routing(tokens // tokens_per_route, k, experts, device)
    y = expert_linear(_leaf(tokens, dim, dtype=dtype, device=device),
                      _leaf(experts, dim, out, dtype=dtype, device=device),
                      _leaf(experts, out, dtype=dtype, device=device), g, ids,
                      tokens_per_route=tokens_per_route, backend="triton")
    y.backward(torch.ones_like(y))
    _sync(device)
    return time.perf_counter() - t0


def warm_expert_mlp(tokens: int, dim: int, hidden: int, experts: int, k: int, *,
                    activation: str = "gelu_tanh", tokens_per_route: int = 1,
                    dtype=torch.bfloat16, device="cuda") -> float:
    """One forward + backward of `expert_mlp` (Triton): D -> hidden -> D per expert."""
    from ._validate import GATED_ACTIVATIONS
    from .functional import expert_mlp
    t0 = time.perf_counter()
    width = 2 * hidden if activation in GATED_ACTIVATIONS else hidden
    g, ids = _routing(tokens // tokens_per_route, k, experts, device)
    y = expert_mlp(_leaf(tokens, dim, dtype=dtype, device=device),
                   _leaf(experts, dim, width, dtype=dtype, device=device),
                   _leaf(experts, width, dtype=dtype, device=device),
                   _leaf(experts, hidden, dim, dtype=dtype, device=device),
                   _leaf(experts, dim, dtype=dtype, device=device), g, ids,
                   activation=activation, tokens_per_route=tokens_per_route, backend="triton")
    y.backward(torch.ones_like(y))
    _sync(device)
    return time.perf_counter() - t0


def cache_dir() -> str:
    """Where Triton keeps compiled kernels and (SWITCH_DIT_AUTOTUNE_CACHE=1) autotune choices."""
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m switch_dit_kernels.warmup",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda")
    sub = ap.add_subparsers(dest="op", required=True)
    sm = sub.add_parser("switch_modulation", help="Switch-DiT's SMoE layer (default: XL/2)")
    sm.add_argument("--batch", type=int, default=32, help="samples per GPU (default 32)")
    sm.add_argument("--tokens", type=int, default=256, help="N (default 256: /2 patches of 32x32)")
    sm.add_argument("--dim", type=int, default=1152, help="D (default 1152: XL)")
    sm.add_argument("--experts", type=int, default=3)
    sm.add_argument("--k", type=int, default=2)
    sm.add_argument("--recompute", action="store_true", help="the run uses moe_recompute")
    for name in ("expert_linear", "expert_mlp"):
        p = sub.add_parser(name)
        p.add_argument("--tokens", type=int, required=True, help="rows T per GPU")
        p.add_argument("--dim", type=int, required=True)
        p.add_argument("--experts", type=int, required=True)
        p.add_argument("--k", type=int, required=True)
        p.add_argument("--tokens-per-route", type=int, default=1)
        if name == "expert_linear":
            p.add_argument("--out", type=int, default=None, help="output width (default dim)")
        else:
            p.add_argument("--hidden", type=int, required=True)
            p.add_argument("--activation", default="gelu_tanh")
    return ap


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("switch_dit_kernels.warmup: no CUDA GPU here; the kernels are compiled and timed for "
              "the GPU the run uses, so run this on that machine", file=sys.stderr)
        return 2
    from .kernels.tuning import autotune_cache_enabled, autotune_mode
    mode = autotune_mode()
    kept = ("autotune choices kept on disk" if autotune_cache_enabled() and mode != "off" else
            "compiled kernels kept on disk (SWITCH_DIT_AUTOTUNE_CACHE=0: the choices are not)"
            if mode != "off" else "compiled kernels kept on disk")
    dtype = DTYPES[args.dtype]
    if args.op == "switch_modulation":
        shapes = (f"B={args.batch} N={args.tokens} D={args.dim} E={args.experts} k={args.k}"
                  f"{' recompute' if args.recompute else ''}")
        seconds = warm_switch_modulation(args.batch, args.tokens, args.dim, args.experts, args.k,
                                         dtype=dtype, device=args.device, recompute=args.recompute)
    elif args.op == "expert_linear":
        out = args.out or args.dim
        shapes = f"T={args.tokens} D={args.dim} Dout={out} E={args.experts} k={args.k}"
        seconds = warm_expert_linear(args.tokens, args.dim, out, args.experts, args.k,
                                     tokens_per_route=args.tokens_per_route, dtype=dtype,
                                     device=args.device)
    else:
        shapes = (f"T={args.tokens} D={args.dim} H={args.hidden} E={args.experts} k={args.k} "
                  f"{args.activation}")
        seconds = warm_expert_mlp(args.tokens, args.dim, args.hidden, args.experts, args.k,
                                  activation=args.activation,
                                  tokens_per_route=args.tokens_per_route, dtype=dtype,
                                  device=args.device)
    print(f"warmed {args.op} ({shapes}, {args.dtype}) on {torch.cuda.get_device_name(args.device)}"
          f" in {seconds:.1f} s (autotuning {mode}; {kept}): {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
