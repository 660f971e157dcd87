"""Expert layers through an explicit permutation: rows gathered into expert order, GEMMs, weighted combine.

This is the path of backends "cuda" and "grouped_mm" (and of users who pair the permutation with
a vendor grouped GEMM): build the routing metadata, gather x into expert-sorted rows [R*k*N, D],
run each expert's GEMM on its contiguous slice, and combine each token's k outputs with its
weights. Unlike the Triton kernels it materialises the k copies of x and of the output.

    impl "cuda":       permutation by the csrc extension (switch_dit_kernels._C; CPU tensors run
                       the same row code on the host). GEMMs: torch._grouped_mm where it runs
                       natively (bfloat16, sm_90+, feature sizes multiples of 8), which needs no
                       host sync; otherwise one torch.mm per expert on contiguous slices of the
                       sorted rows. Slicing needs the expert offsets on the host, so that
                       fallback costs ONE device-to-host sync per call (offsets read once).
    impl "grouped_mm": torch._grouped_mm (bfloat16, CUDA sm_90+, torch >= 2.8) for the GEMMs and
                       the csrc permutation when built, torch index_select otherwise. Raises a
                       RuntimeError saying why where torch._grouped_mm cannot run natively.

Gradients: the permutation ops are torch.autograd.Functions (the backward of permute is the sum of
the k copies, of unpermute a weighted permute plus dweights = <dY, h> per pair); the GEMMs, biases
and activations use ordinary torch autograd.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from . import _cuda, _validate
from .reference import activation_fn
from .routing import RoutingMetadata, build_routing_metadata

_DTYPE_TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_INDEX_TAG = {torch.int32: 0, torch.int64: 1}
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Launchers: tensors in, tensors out, no autograd. Each has its plain-torch twin below it.
# ----------------------------------------------------------------------------------------------

def _launch(name: str, device: torch.device, *pointers: int, num_routes: int, k: int,
            tokens_per_route: int, dim: int, dtype: torch.dtype, index: torch.Tensor) -> None:
    ext = _cuda.require_extension()
    kwargs = dict(num_routes=num_routes, k=k, tokens_per_route=tokens_per_route, dim=dim,
                  dtype=_DTYPE_TAG[dtype], index_dtype=_INDEX_TAG[index.dtype])
    fn = getattr(ext, name)
    if device.type == "cuda":
        # The kernel launches on the calling thread's current device: make it the tensors' one.
        with torch.cuda.device(device):
            fn(*pointers, stream=torch.cuda.current_stream(device).cuda_stream, **kwargs)
    elif device.type == "cpu":
        fn(*pointers, on_host=True, **kwargs)
    else:
        raise ValueError(f"the csrc permutation runs on CUDA or CPU tensors, got {device}")


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def permute_rows(x: torch.Tensor, pair_to_sorted: torch.Tensor, k: int,
                 tokens_per_route: int) -> torch.Tensor:
    """out[s*N + n] = x[(sorted_pairs[s] // k)*N + n]: x [R*N, D] -> out [R*k*N, D] (csrc).

    pair_to_sorted: [R*k] int32/int64, the sorted position of each pair r*k + j.
    """
    x = x.contiguous()
    pair_to_sorted = pair_to_sorted.contiguous()
    num_routes = pair_to_sorted.numel() // k
    out = x.new_empty((pair_to_sorted.numel() * tokens_per_route, x.shape[1]))
    _launch("permute", x.device, out.data_ptr(), x.data_ptr(), pair_to_sorted.data_ptr(),
            num_routes=num_routes, k=k, tokens_per_route=tokens_per_route, dim=x.shape[1],
            dtype=x.dtype, index=pair_to_sorted)
    return out


def permute_rows_torch(x: torch.Tensor, pair_to_sorted: torch.Tensor, k: int,
                       tokens_per_route: int) -> torch.Tensor:
    """Plain-torch twin of `permute_rows` (index_select; differentiable by autograd)."""
    sorted_pairs = torch.empty_like(pair_to_sorted)
    sorted_pairs[pair_to_sorted.long()] = torch.arange(pair_to_sorted.numel(), device=x.device,
                                                       dtype=pair_to_sorted.dtype)
    n = tokens_per_route
    rows = (sorted_pairs.long() // k)[:, None] * n + torch.arange(n, device=x.device)
    return x.index_select(0, rows.reshape(-1))


def unpermute_rows(h: torch.Tensor, pair_to_sorted: torch.Tensor,
                   weights: Optional[torch.Tensor], k: int, tokens_per_route: int) -> torch.Tensor:
    """y[r*N + n] = sum_j w[r, j] * h[pair_to_sorted[r*k + j]*N + n] (float32 sum in j order).

    h: [R*k*N, D]; weights: [R, k] float32 or None (unit weights: permute's backward).
    Returns y [R*N, D] in h's dtype (csrc).
    """
    h = h.contiguous()
    pair_to_sorted = pair_to_sorted.contiguous()
    if weights is not None:
        weights = weights.to(torch.float32).contiguous()
    num_routes = pair_to_sorted.numel() // k
    y = h.new_empty((num_routes * tokens_per_route, h.shape[1]))
    _launch("unpermute", h.device, y.data_ptr(), h.data_ptr(), pair_to_sorted.data_ptr(),
            _ptr(weights), num_routes=num_routes, k=k, tokens_per_route=tokens_per_route,
            dim=h.shape[1], dtype=h.dtype, index=pair_to_sorted)
    return y


def unpermute_rows_torch(h: torch.Tensor, pair_to_sorted: torch.Tensor,
                         weights: Optional[torch.Tensor], k: int,
                         tokens_per_route: int) -> torch.Tensor:
    """Plain-torch twin of `unpermute_rows` (differentiable by autograd)."""
    num_routes, n, dim = pair_to_sorted.numel() // k, tokens_per_route, h.shape[1]
    rows = pair_to_sorted.long().view(num_routes, k, 1) * n + torch.arange(n, device=h.device)
    acc = torch.promote_types(h.dtype, torch.float32)  # float32 sums (float64 stays float64)
    hj = h.index_select(0, rows.reshape(-1)).view(num_routes, k, n, dim).to(acc)
    if weights is not None:
        hj = hj * weights.to(acc).view(num_routes, k, 1, 1)
    return hj.sum(1).to(h.dtype).view(num_routes * n, dim)


def unpermute_rows_backward(dy: torch.Tensor, h: Optional[torch.Tensor],
                            pair_to_sorted: torch.Tensor, weights: Optional[torch.Tensor], k: int,
                            tokens_per_route: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backward of `unpermute_rows` (csrc): dh = weighted permute of dy; with h, also dweights.

    dy: [R*N, D]; h: [R*k*N, D] or None (no dweights). Returns dh [R*k*N, D] in dy's dtype and
    dweights [R, k] float32 (the sum over n of <dy row, h row>, reduced in a fixed order) or None.
    """
    dy = dy.contiguous()
    pair_to_sorted = pair_to_sorted.contiguous()
    if weights is not None:
        weights = weights.to(torch.float32).contiguous()
    num_routes, n = pair_to_sorted.numel() // k, tokens_per_route
    dh = dy.new_empty((pair_to_sorted.numel() * n, dy.shape[1]))
    partial = None
    if h is not None:
        h = h.contiguous().to(dy.dtype)
        partial = torch.empty(pair_to_sorted.numel() * n, dtype=torch.float32, device=dy.device)
    _launch("unpermute_backward", dy.device, dh.data_ptr(), _ptr(partial), dy.data_ptr(), _ptr(h),
            pair_to_sorted.data_ptr(), _ptr(weights), num_routes=num_routes, k=k,
            tokens_per_route=n, dim=dy.shape[1], dtype=dy.dtype, index=pair_to_sorted)
    dweights = None if partial is None else partial.view(num_routes, k, n).sum(-1)
    return dh, dweights


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class _NoDoubleBackward(torch.autograd.Function):
    """Identity on ``result`` (a gradient the csrc kernels computed) that ties it to ``grad`` in
    the graph and raises if differentiated: with create_graph=True the kernels' output would
    otherwise carry no graph and a gradient penalty would come back silently wrong."""

    @staticmethod
    def forward(ctx, result, grad):
        return result.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "double backward through switch_dit's csrc permutation (backend='cuda' or "
            "'grouped_mm') is unsupported: its kernels have no derivative. Use backend='torch' "
            "for second-order gradients.")


def _graph_safe(result: Optional[torch.Tensor], grad: torch.Tensor) -> Optional[torch.Tensor]:
    """``result`` as is, or wrapped by _NoDoubleBackward under create_graph=True."""
    if result is None or not (torch.is_grad_enabled() and grad.requires_grad):
        return result
    return _NoDoubleBackward.apply(result, grad)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pair_to_sorted, k, tokens_per_route):
        ctx.save_for_backward(pair_to_sorted)
        ctx.k, ctx.n = k, tokens_per_route
        return permute_rows(x, pair_to_sorted, k, tokens_per_route)

    @staticmethod
    def backward(ctx, grad_out):
        (pair_to_sorted,) = ctx.saved_tensors
        # Each token row was copied to k sorted rows: its gradient is the sum of theirs.
        dx = unpermute_rows(grad_out, pair_to_sorted, None, ctx.k, ctx.n)
        return _graph_safe(dx, grad_out), None, None, None


class _UnpermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weights, pair_to_sorted, k, tokens_per_route):
        # h is kept only for dweights: without a weight gradient it can be freed.
        ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, weights, pair_to_sorted)
        ctx.k, ctx.n = k, tokens_per_route
        return unpermute_rows(h, pair_to_sorted, weights, k, tokens_per_route)

    @staticmethod
    def backward(ctx, grad_y):
        h, weights, pair_to_sorted = ctx.saved_tensors
        dh, dw = unpermute_rows_backward(grad_y, h, pair_to_sorted, weights, ctx.k, ctx.n)
        if dw is not None:
            dw = dw.reshape(weights.shape)
        dh = dh if ctx.needs_input_grad[0] else None
        return _graph_safe(dh, grad_y), _graph_safe(dw, grad_y), None, None, None


def _csrc_usable(x: torch.Tensor) -> bool:
    return (x.dtype in _DTYPE_TAG and x.device.type in ("cuda", "cpu")
            and _cuda.cuda_extension_available())


def permute_tokens(x: torch.Tensor, meta: RoutingMetadata, *, impl: str = "auto") -> torch.Tensor:
    """Gather x [R*N, D] into expert-sorted rows [R*k*N, D] (differentiable).

    impl: "csrc" (the compiled extension; raises if not built), "torch" (index_select) or "auto"
    (csrc when built and x is float32/float16/bfloat16, else torch). Expert e owns sorted rows
    [expert_offsets[e]*N, expert_offsets[e+1]*N): feed them to any grouped GEMM.
    """
    _check_meta(meta)
    _check_rows("x", x, meta.num_routes * meta.tokens_per_route, "meta.num_routes * N")
    _check_device("x", x, meta)
    if impl == "auto":
        impl = "csrc" if _csrc_usable(x) else "torch"
    if impl == "torch":
        return permute_rows_torch(x, meta.pair_to_sorted, meta.k, meta.tokens_per_route)
    if impl != "csrc":
        raise ValueError(f"impl must be 'auto', 'csrc' or 'torch', got {impl!r}")
    _check_csrc_dtype("x", x)
    return _PermuteRows.apply(x, meta.pair_to_sorted, meta.k, meta.tokens_per_route)


def unpermute_tokens(h: torch.Tensor, meta: RoutingMetadata, topk_weights: Optional[torch.Tensor],
                     *, impl: str = "auto") -> torch.Tensor:
    """Combine sorted rows h [R*k*N, D] into token rows [R*N, D]: y = sum_j topk_weights[r, j] * h.

    topk_weights: [R, k] floating (used in float32) or None for unit weights. Differentiable in h
    and topk_weights. impl as in `permute_tokens`.
    """
    _check_meta(meta)
    _check_rows("h", h, meta.num_sorted_rows, "meta.num_sorted_rows = R*k*N")
    _check_device("h", h, meta)
    if topk_weights is not None:
        _validate.check_tensor("topk_weights", topk_weights, 2)
        if tuple(topk_weights.shape) != (meta.num_routes, meta.k):
            raise ValueError(f"topk_weights must be [R, k] = [{meta.num_routes}, {meta.k}] to match "
                             f"meta, got {tuple(topk_weights.shape)}")
        _validate.check_same_device(h=h, topk_weights=topk_weights)
    if impl == "auto":
        impl = "csrc" if _csrc_usable(h) else "torch"
    if impl == "torch":
        return unpermute_rows_torch(h, meta.pair_to_sorted, topk_weights, meta.k,
                                    meta.tokens_per_route)
    if impl != "csrc":
        raise ValueError(f"impl must be 'auto', 'csrc' or 'torch', got {impl!r}")
    _check_csrc_dtype("h", h)
    # float32 for the kernel; autograd casts dweights back to topk_weights' dtype.
    weights = None if topk_weights is None else topk_weights.to(torch.float32).reshape(-1)
    return _UnpermuteRows.apply(h, weights, meta.pair_to_sorted, meta.k, meta.tokens_per_route)


def _check_meta(meta) -> None:
    if not isinstance(meta, RoutingMetadata):
        raise TypeError(f"meta must be a RoutingMetadata (from build_routing_metadata), got "
                        f"{type(meta).__name__}")


def _check_rows(name: str, t, rows: int, what: str) -> None:
    """t a 2-D floating tensor [rows, D] (rows as the routing metadata implies)."""
    _validate.check_tensor(name, t, 2)
    if t.shape[0] != rows:
        raise ValueError(f"{name} must have {what} = {rows} rows to match meta, got shape "
                         f"{tuple(t.shape)}")


def _check_device(name: str, t: torch.Tensor, meta: RoutingMetadata) -> None:
    if t.device != meta.pair_to_sorted.device:
        raise ValueError(f"{name} is on {t.device} but meta (its topk_ids) is on "
                         f"{meta.pair_to_sorted.device}")


def _check_csrc_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPE_TAG:
        raise TypeError(f"{name}: the csrc permutation supports float32, float16 and bfloat16, "
                        f"got {t.dtype}; use backend='torch' for other dtypes")


# ----------------------------------------------------------------------------------------------
# GEMMs on the sorted rows
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_mm_unavailable(x: torch.Tensor, feature_dims: Sequence[int]) -> Optional[str]:
    """Why torch._grouped_mm cannot run natively (no host sync) here, or None when it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm (needs torch >= 2.8)"
    if x.device.type != "cuda":
        return f"torch._grouped_mm needs CUDA tensors, got {x.device}"
    if x.dtype != torch.bfloat16:
        return f"torch._grouped_mm needs bfloat16 inputs, got {x.dtype}"
    major, minor = _capability(x.device.index if x.device.index is not None
                               else torch.cuda.current_device())
    if major < 9:
        return (f"torch._grouped_mm runs natively on sm_90+ only (this GPU is sm_{major}{minor}; "
                "elsewhere torch loops with host syncs)")
    bad = [d for d in feature_dims if d % 8]
    if bad:
        return ("torch._grouped_mm needs feature sizes that are multiples of 8 (16-byte rows), "
                f"got {list(feature_dims)}")
    return None


class _Plan(NamedTuple):
    permutation: str         # "csrc" | "torch"
    row_bounds: Optional[list]  # None: torch._grouped_mm with device offsets; else host bounds


def _plan(x: torch.Tensor, impl: str, meta: RoutingMetadata, feature_dims: Sequence[int]) -> _Plan:
    rows = meta.num_sorted_rows
    if impl == "grouped_mm":
        reason = grouped_mm_unavailable(x, feature_dims)
        if reason is not None:
            raise RuntimeError(f"backend='grouped_mm': {reason}; use backend='triton' or 'torch'")
        if rows > _INT32_MAX:
            raise RuntimeError(f"backend='grouped_mm': {rows} sorted rows overflow int32 offsets")
        return _Plan("csrc" if _csrc_usable(x) else "torch", None)
    if impl != "cuda":
        raise ValueError(f"impl must be 'cuda' or 'grouped_mm', got {impl!r}")
    _check_csrc_dtype("x", x)
    _cuda.require_extension()
    if grouped_mm_unavailable(x, feature_dims) is None and rows <= _INT32_MAX:
        return _Plan("csrc", None)
    # Per-expert slices need host-known bounds: the one device-to-host sync of this path.
    return _Plan("csrc", (meta.expert_offsets.long() * meta.tokens_per_route).tolist())


def _expert_gemm(a: torch.Tensor, weight: torch.Tensor, meta: RoutingMetadata,
                 plan: _Plan) -> torch.Tensor:
    """out[rows of expert e] = a[rows of expert e] @ weight[e]: a [R*k*N, Din] -> [R*k*N, Dout]."""
    if plan.row_bounds is None:
        ends = (meta.expert_offsets[1:] * meta.tokens_per_route).to(torch.int32)
        return torch._grouped_mm(a, weight, offs=ends)
    b = plan.row_bounds
    outs = [a[b[e]:b[e + 1]] @ weight[e] for e in range(weight.shape[0]) if b[e + 1] > b[e]]
    # a[:0] @ weight[0] keeps the graph when there are no rows at all (R = 0).
    return torch.cat(outs) if outs else a[:0] @ weight[0]


class _AddGroupBias(torch.autograd.Function):
    """out[m*n + i] = h[m*n + i] + b[m] for runs of n rows; b float32, added in h's dtype.

    The gradient of b sums each run in float32 (torch.sum(dtype=float32)) and stays float32, so a
    bias gradient accumulates over all rows before its one rounding to the bias dtype, as the
    reference's per-expert reduction does (a bfloat16 sum per run would round once per run).
    """

    @staticmethod
    def forward(ctx, h, b, n):
        ctx.n = n
        return (h.reshape(-1, n, h.shape[1]) + b.to(h.dtype)[:, None, :]).view(h.shape)

    @staticmethod
    def backward(ctx, grad):
        db = None
        if ctx.needs_input_grad[1]:
            db = grad.reshape(-1, ctx.n, grad.shape[1]).sum(1, dtype=torch.float32)
        return grad, db, None


def _pair_bias(h: torch.Tensor, bias: torch.Tensor, topk_ids: torch.Tensor,
               meta: RoutingMetadata) -> torch.Tensor:
    """h + bias[expert of each sorted row]: sorted rows come in runs of N per pair."""
    pair_expert = topk_ids.reshape(-1).long()[meta.sorted_pairs.long()]
    # Gathered in float32: its gradient accumulates over pairs in float32 (index_put in bfloat16
    # would round after every pair).
    return _AddGroupBias.apply(h, bias.float()[pair_expert], meta.tokens_per_route)


def _add_routed_bias(y: torch.Tensor, bias: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, tokens_per_route: int) -> torch.Tensor:
    """y + sum_j g[r, j] * bias[e_rj] per unit: the bias folded out of the k-way combine."""
    b = (topk_weights.float()[:, :, None] * bias.float()[topk_ids.long()]).sum(1)  # [R, Dout]
    return _AddGroupBias.apply(y, b, tokens_per_route)


# ----------------------------------------------------------------------------------------------
# Expert layers (the backends "cuda" and "grouped_mm" of functional.expert_linear / expert_mlp)
# ----------------------------------------------------------------------------------------------

def expert_linear_permuted(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                           tokens_per_route: int, impl: str) -> torch.Tensor:
    """y[t] = sum_j g[r, j] * (x[t] @ weight[e_rj] + bias[e_rj]) by permute -> GEMMs -> unpermute.

    Args:
        x: [T, Din] float32/float16/bfloat16 (bfloat16 for "grouped_mm").
        weight: [E, Din, Dout].  bias: [E, Dout] or None.  topk_*: [R, k], T = R * tokens_per_route.
        impl: "cuda" or "grouped_mm" (see the module docstring).
    Returns:
        y [T, Dout] in x's dtype.
    """
    meta = build_routing_metadata(topk_ids, weight.shape[0], tokens_per_route=tokens_per_route,
                                  check_ids=False)  # checked by the caller
    plan = _plan(x, impl, meta, (weight.shape[1], weight.shape[2]))
    xs = permute_tokens(x, meta, impl=plan.permutation)
    h = _expert_gemm(xs, weight, meta, plan)
    y = unpermute_tokens(h, meta, topk_weights, impl=plan.permutation)
    if bias is not None:
        y = _add_routed_bias(y, bias, topk_weights, topk_ids, tokens_per_route)
    return y


def expert_mlp_permuted(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                        w2: torch.Tensor, b2: Optional[torch.Tensor], topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, *, activation: str, tokens_per_route: int,
                        impl: str) -> torch.Tensor:
    """y = sum_j g * (act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]) by permute -> 2 GEMMs -> unpermute.

    Args:
        x: [T, D].  w1: [E, D, H] or [E, D, 2H] (gated).  b1: [E, H or 2H] or None.
        w2: [E, H, Dout].  b2: [E, Dout] or None.  topk_*: [R, k].  activation: as in reference.
        impl: "cuda" or "grouped_mm".
    Returns:
        y [T, Dout] in x's dtype.
    """
    meta = build_routing_metadata(topk_ids, w1.shape[0], tokens_per_route=tokens_per_route,
                                  check_ids=False)  # checked by the caller
    plan = _plan(x, impl, meta, (w1.shape[1], w1.shape[2], w2.shape[1], w2.shape[2]))
    xs = permute_tokens(x, meta, impl=plan.permutation)
    h = _expert_gemm(xs, w1, meta, plan)
    if b1 is not None:
        h = _pair_bias(h, b1, topk_ids, meta)
    h = _expert_gemm(activation_fn(activation, h).contiguous(), w2, meta, plan)
    y = unpermute_tokens(h, meta, topk_weights, impl=plan.permutation)
    if b2 is not None:
        y = _add_routed_bias(y, b2, topk_weights, topk_ids, tokens_per_route)
    return y
