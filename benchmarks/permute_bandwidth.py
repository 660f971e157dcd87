"""Bandwidth of the expert permutation (csrc, Triton, torch) against a copy of the same bytes.

    python -m benchmarks.permute_bandwidth [--json FILE] [--tokens 65536] [--dim 1152] [--k 2]
                                           [--tokens-per-route 1,256] [--experts 8]
                                           [--dtype bfloat16] [--budget-s SECONDS]

Ops, with T token rows of D elements and k slots each; "bytes" is what each op must move at least
(every input element read once, every output element written once; index and weight reads are
under 0.1% at D = 1152 and not counted):
    permute         x [T, D] -> xs [T*k, D]                        T*D + T*k*D
    unpermute       h [T*k, D], w [T/N, k] -> y [T, D]             T*k*D + T*D
    permute_bwd     dxs [T*k, D] -> dx [T, D] (sum of k copies)    T*k*D + T*D
    unpermute_bwd   dy [T, D], h -> dh [T*k, D], dw [T/N, k]       T*D + 2*T*k*D
Impls: "csrc" (switch_dit_kernels._C, when built), "triton" (kernels/combine.py: the combine
and its gate gradient; Triton's permute is fused into its grouped GEMM, so it has no
stand-alone line), "torch" (index_select / gathers: the fallback of backend "grouped_mm").
The reference is `dst.copy_(src)` of T*k*D elements in the same run, counted as read + write
(an H200 copies at about 4.3 TB/s); each row reports GB/s and its fraction of that copy rate.
Times are medians of triton.testing.do_bench (L2 flushed before each run). Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

import torch

from benchmarks import common


def _torch_unpermute_bwd(dy, h, meta, w):
    """dh = w * dy in sorted order and dw = <dy, h> per pair, with plain torch gathers."""
    src = meta.sorted_row_sources()
    n = meta.tokens_per_route
    w_rows = w.reshape(-1)[meta.sorted_pairs.long()].repeat_interleave(n)[:, None]
    dh = (dy.index_select(0, src).float() * w_rows).to(dy.dtype)
    rows = meta.pair_to_sorted.long()[:, None] * n + torch.arange(n, device=dy.device)
    hk = h.index_select(0, rows.reshape(-1)).float().view(meta.num_routes, meta.k, n, -1)
    dw = (hk * dy.float().view(meta.num_routes, 1, n, -1)).sum((2, 3))
    return dh, dw


def _ops(impl: str, x, h, dy, w, meta):
    """{op: zero-argument callable} of one implementation (missing ops are left out)."""
    from switch_dit_kernels import permute_ops as po
    k, n, p2s = meta.k, meta.tokens_per_route, meta.pair_to_sorted
    if impl == "csrc":
        return {
            "permute": lambda: po.permute_rows(x, p2s, k, n),
            "unpermute": lambda: po.unpermute_rows(h, p2s, w, k, n),
            "permute_bwd": lambda: po.unpermute_rows(h, p2s, None, k, n),
            "unpermute_bwd": lambda: po.unpermute_rows_backward(dy, h, p2s, w, k, n),
        }
    if impl == "triton":
        from switch_dit_kernels.kernels.combine import combine, gate_grad
        gate = w.reshape(-1).contiguous()
        return {
            "unpermute": lambda: combine(h, meta, gate),
            "permute_bwd": lambda: combine(h, meta),
            # the dw half of unpermute_bwd only (dh is fused into Triton's grouped GEMM)
            "unpermute_bwd(dw only)": lambda: gate_grad(dy, h, meta),
        }
    return {
        "permute": lambda: po.permute_rows_torch(x, p2s, k, n),
        "unpermute": lambda: po.unpermute_rows_torch(h, p2s, w, k, n),
        "permute_bwd": lambda: po.unpermute_rows_torch(h, p2s, None, k, n),
        "unpermute_bwd": lambda: _torch_unpermute_bwd(dy, h, meta, w),
    }


def _bytes(op: str, tokens: int, k: int, dim: int, itemsize: int) -> int:
    row = dim * itemsize
    return {
        "permute": tokens * row * (1 + k),
        "unpermute": tokens * row * (k + 1),
        "permute_bwd": tokens * row * (k + 1),
        "unpermute_bwd": tokens * row * (1 + 2 * k),
        "unpermute_bwd(dw only)": tokens * row * (1 + k),
    }[op]


def _impls(requested: Sequence[str]) -> List[str]:
    from switch_dit_kernels import cuda_extension_available, triton_available
    out = []
    for impl in requested:
        if impl == "csrc" and not cuda_extension_available():
            print("csrc: the extension is not built (pip install -e . with nvcc): skipped")
            continue
        if impl == "triton" and not triton_available():
            print("triton: not installed: skipped")
            continue
        out.append(impl)
    return out


def _copy(rows: int, dim: int, dtype: torch.dtype, device: torch.device):
    """(ms, bytes read + written) of dst.copy_(src) for [rows, dim] tensors."""
    src = torch.randn(rows, dim, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = common.time_cuda(lambda: dst.copy_(src)).ms
    return ms, 2 * src.numel() * src.element_size()


def run(args: argparse.Namespace) -> List[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.permute_bandwidth needs a CUDA GPU: torch.cuda.is_available() "
                         "is False (the bandwidth of a copy on the CPU says nothing about the kernels)")
    from switch_dit_kernels.routing import build_routing_metadata

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    env = common.environment(device)
    deadline = common.Deadline(args.budget_s)
    tokens, dim, k = args.tokens, args.dim, args.k
    config = dict(tokens=tokens, dim=dim, k=k, experts=args.experts, dtype=args.dtype,
                  tokens_per_route=args.tokens_per_route, impls=args.impls)
    rows: List[dict] = []
    itemsize = torch.empty((), dtype=dtype).element_size()

    def record(row: dict) -> None:
        row.update(device=env["device"], torch=env["torch"], triton=env["triton"])
        rows.append(row)
        if args.json:
            common.write_json(args.json, "permute_bandwidth", env, rows, config)

    # The reference: a device-to-device copy of T*k*D elements (the largest tensor any op writes).
    copy_ms, copy_bytes = _copy(tokens * k, dim, dtype, device)
    copy_gbs = copy_bytes / (copy_ms * 1e-3) / 1e9
    record(dict(impl="copy", op="copy", tokens_per_route=None, ms=copy_ms, bytes=copy_bytes,
                gb_s=copy_gbs, frac_copy=1.0))

    impls = _impls(args.impls)
    for n in args.tokens_per_route:
        if tokens % n:
            print(f"tokens_per_route={n} does not divide tokens={tokens}: skipped")
            continue
        routes = tokens // n
        logits = torch.randn(routes, args.experts, device=device)
        w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
        meta = build_routing_metadata(ids, args.experts, tokens_per_route=n)
        x = torch.randn(tokens, dim, device=device).to(dtype)
        dy = torch.randn(tokens, dim, device=device).to(dtype)
        h = torch.randn(tokens * k, dim, device=device).to(dtype)
        for impl in impls:
            for op, fn in _ops(impl, x, h, dy, w, meta).items():
                if deadline.expired():
                    print("budget spent: stopping")
                    return rows
                row = dict(impl=impl, op=op, tokens_per_route=n)
                try:
                    ms = common.time_cuda(fn).ms
                    nbytes = _bytes(op, tokens, k, dim, itemsize)
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    row.update(ms=ms, bytes=nbytes, gb_s=gbs, frac_copy=gbs / copy_gbs)
                except Exception as exc:  # noqa: BLE001 - a failing impl is a row, not a crash
                    row.update(error=common.format_error(exc))
                record(row)
        del x, dy, h
        common.free_memory(device)
    return rows


COLUMNS = [("impl", "impl", ""), ("op", "op", ""), ("N", "tokens_per_route", ""),
           ("ms", "ms", ".4f"), ("GB/s", "gb_s", ".0f"), ("of copy", "frac_copy", ".1%"),
           ("error", "error", "")]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.permute_bandwidth",
                                description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="write the rows here (rewritten after every row)")
    p.add_argument("--tokens", type=int, default=65536, help="T, token rows")
    p.add_argument("--dim", type=int, default=1152, help="D, elements per row")
    p.add_argument("--k", type=int, default=2, help="slots per route unit")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens-per-route", default="1,256",
                   help="comma-separated N values (1: token routing; 256: Switch-DiT samples)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--impls", default="csrc,triton,torch", help="comma-separated subset")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new rows after this")
    args = p.parse_args(argv)
    args.tokens_per_route = [int(v) for v in args.tokens_per_route.split(",") if v]
    args.impls = [v for v in args.impls.split(",") if v]
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    rows = run(args)
    print(common.format_table(rows, COLUMNS))
    if rows:
        print(f"device: {rows[0]['device']}; torch {rows[0]['torch']}, triton {rows[0]['triton']}; "
              "target: permute/unpermute >= 75% of the copy rate")
    return rows


if __name__ == "__main__":
    main()
