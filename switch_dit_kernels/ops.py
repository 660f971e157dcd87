"""torch.library ops of the public functions (namespace ``switch_dit``): one graph node each for torch.compile.

    switch_dit::route_topk          (Triton router)            + closed-form backward in torch ops
    switch_dit::expert_linear       (backend "triton"/"torch")  + switch_dit::expert_linear_backward
    switch_dit::expert_mlp          (backend "triton"/"torch")  + switch_dit::expert_mlp_backward
    switch_dit::switch_modulation   (backend "triton"/"torch")  + switch_dit::switch_modulation_backward
                                                                   (eager, private y: ..._backward_)

Each op has a fake kernel (shapes and dtypes only), so torch.compile traces a model through it as
one node and never into Triton launchers (``data_ptr``, autotuning) or into the reference's
data-dependent sizes (``nonzero``, ``numel() == 0``). Autograd is registered with
``register_autograd``; what the backward needs from the forward (the expert outputs h, the MLP's
pre-activation, Switch-DiT's y) is an op output, empty ([0, ...]) when the caller said it will not
be needed. The routing metadata (a sort of R*k ids) is rebuilt in the backward instead of being
carried: four small tensors less on the graph, one O(R*k) sort more.

The "torch" backend of the ops runs `reference` inside the op; its backward op runs autograd
through the reference with the dispatcher's autograd keys switched back on (``torch.func.vjp``
there fails under the dispatch modes opcheck and others use). `functional` takes it under
torch.compile only: eagerly the torch backend stays plain autograd through `reference`, which is
also what keeps its second-order gradients exact.

Second-order gradients: route_topk's backward is differentiable torch ops (exact). The expert and
modulation backward ops have no derivative: differentiating them (``create_graph=True`` then a
gradient penalty) raises a RuntimeError saying so, instead of silently dropping the penalty's
contribution as the autograd.Functions before them did.

Expert ids are checked (`_validate.check_topk_ids_values`) in the real forward implementations,
which run eagerly even inside a compiled graph: no graph break, nothing for the fake kernels to do.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _validate, reference

# Backends an op implements. functional.py maps "auto" to one of them before calling an op.
OP_BACKENDS = ("triton", "torch")


def _check_backend(backend: str) -> None:
    if backend not in OP_BACKENDS:
        raise ValueError(f"backend must be one of {OP_BACKENDS} inside a switch_dit op, got "
                         f"{backend!r}")


def _empty(like: Tensor, *trailing: int) -> Tensor:
    """The stand-in for an optional op output that is not kept: [0, *trailing] in like's dtype."""
    return like.new_empty((0, *trailing))


def _or_empty(t: Optional[Tensor], like: Tensor, *trailing: int) -> Tensor:
    return t if t is not None else _empty(like, *trailing)


def _kept(t: Tensor) -> Optional[Tensor]:
    """Inverse of `_or_empty` on the backward side: an empty stand-in means "not kept"."""
    return t if t.shape[0] > 0 else None


def _grads_or_empty(grads: Sequence[Optional[Tensor]], likes: Sequence[Optional[Tensor]]
                    ) -> List[Tensor]:
    """Backward ops return one tensor per differentiable input: [0] stand-ins for None (shaped
    like the input, or like the first one for an absent input such as a None bias)."""
    return [g if g is not None else (like if like is not None else likes[0]).new_empty(0)
            for g, like in zip(grads, likes)]


def _fake_grads(needs: Sequence[bool], likes: Sequence[Optional[Tensor]]) -> List[Tensor]:
    return _grads_or_empty([torch.empty_like(like, memory_format=torch.contiguous_format)
                            if need and like is not None else None
                            for need, like in zip(needs, likes)], likes)


def _autograd_keys_on():
    """A context that turns the dispatcher's autograd keys back on: an op's implementation runs
    with them excluded, so plain autograd inside it would record no graph."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor",
                "ADInplaceOrView"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _vjp(fn, primals: Sequence[Optional[Tensor]], needs: Sequence[bool], cotangent: Tensor
         ) -> List[Optional[Tensor]]:
    """Gradients of fn(*primals) for the primals flagged in ``needs`` (None for the others), by
    autograd run inside an op's implementation (the torch backend's backward)."""
    wanted = [i for i, (p, need) in enumerate(zip(primals, needs)) if need and p is not None]
    grads: List[Optional[Tensor]] = [None] * len(primals)
    if not wanted:
        return grads
    with _autograd_keys_on(), torch.enable_grad():
        args = [p.detach() if p is not None else None for p in primals]
        for i in wanted:
            args[i].requires_grad_(True)
        out = fn(*args)
        found = torch.autograd.grad(out, [args[i] for i in wanted], cotangent, allow_unused=True)
    for i, g in zip(wanted, found):
        grads[i] = g if g is not None else torch.zeros_like(primals[i])
    return grads


def _plain_eager(t: Tensor) -> bool:
    """True when ``t`` is a plain tensor outside any tracing (no fake/functional tensor subclass,
    no dispatch mode, not inside torch.compile)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


def _refuse_double_backward(op_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"double backward through {op_name} is unsupported: its backward has no derivative "
            "(create_graph=True followed by a gradient penalty, a Hessian-vector product, ...). "
            "Use backend='torch' outside torch.compile, whose plain-autograd reference computes "
            "second-order gradients exactly.")
    return backward


def _no_setup(ctx, inputs, output) -> None:
    pass


def _register_autograd(fwd_op, bwd_op, backward, setup_context, name: str) -> None:
    """The forward op differentiates through ``backward``; its backward op refuses a second
    derivative, naming ``name`` in the error."""
    fwd_op.register_autograd(backward, setup_context=setup_context)
    bwd_op.register_autograd(_refuse_double_backward(f"switch_dit's {name}"),
                             setup_context=_no_setup)


def _input_grads(grads: Sequence[Tensor], needs: Sequence[bool], num_inputs: int) -> tuple:
    """A forward op's autograd result: its differentiable inputs' gradients where ``needs`` says
    so (None elsewhere), then None for the remaining ``num_inputs - len(needs)`` arguments."""
    return (*(g if need else None for g, need in zip(grads, needs)),
            *(None,) * (num_inputs - len(needs)))


# ---------------------------------------------------------------------------------------------
# route_topk (Triton only: the torch backend is softmax + topk, which compiles as it is)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("switch_dit::route_topk", mutates_args=())
def route_topk_op(logits: Tensor, k: int, renormalize: bool) -> Tuple[Tensor, Tensor]:
    """Fused softmax + top-k on the Triton kernel: logits [R, E] -> (weights [R, k] float32,
    ids [R, k] int64)."""
    from .topk_ops import route_topk_forward
    return route_topk_forward(logits, k, renormalize)


@route_topk_op.register_fake
def _route_topk_fake(logits, k, renormalize):
    rows = logits.shape[0]
    return (logits.new_empty((rows, k), dtype=torch.float32),
            logits.new_empty((rows, k), dtype=torch.int64))


def _route_topk_setup(ctx, inputs, output) -> None:
    logits, _k, renormalize = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.renormalize = renormalize


def _route_topk_backward(ctx, grad_weights, _grad_ids):
    from .topk_ops import route_topk_backward
    logits, ids = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None
    return route_topk_backward(grad_weights, logits, ids, ctx.renormalize), None, None


route_topk_op.register_autograd(_route_topk_backward, setup_context=_route_topk_setup)


# ---------------------------------------------------------------------------------------------
# expert_linear
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("switch_dit::expert_linear", mutates_args=())
def expert_linear_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], topk_weights: Tensor,
                         topk_ids: Tensor, tokens_per_route: int, backend: str, keep_h: bool
                         ) -> Tuple[Tensor, Tensor]:
    """(y [T, Dout], h): h the unweighted expert outputs [R*k*N, Dout] in expert-sorted order
    when ``keep_h`` on "triton" (the gate gradient's input), else [0, Dout]."""
    _check_backend(backend)
    _validate.check_topk_ids_values(topk_ids, weight.shape[0])
    dout = weight.shape[2]
    if backend == "torch":
        y = reference.expert_linear(x, weight, bias, topk_weights, topk_ids,
                                    tokens_per_route=tokens_per_route)
        return y, _empty(x, dout)
    from .expert_ops import linear_forward
    y, h = linear_forward(_contig(x), weight, _contig(bias), topk_weights,
                          topk_ids.contiguous(), tokens_per_route, keep_h)
    return y, _or_empty(h, x, dout)


@expert_linear_fwd_op.register_fake
def _expert_linear_fake(x, weight, bias, topk_weights, topk_ids, tokens_per_route, backend,
                        keep_h):
    dout = weight.shape[2]
    rows = topk_ids.shape[0] * topk_ids.shape[1] * tokens_per_route
    kept = backend == "triton" and keep_h
    return x.new_empty((x.shape[0], dout)), x.new_empty((rows if kept else 0, dout))


@torch.library.custom_op("switch_dit::expert_linear_backward", mutates_args=())
def expert_linear_bwd_op(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         topk_weights: Tensor, topk_ids: Tensor, h: Tensor,
                         tokens_per_route: int, backend: str, needs: List[bool]) -> List[Tensor]:
    """[dx, dW, db, d(topk_weights)] for the inputs flagged in ``needs``, [0] for the others."""
    likes = (x, weight, bias, topk_weights)
    if backend == "torch":
        def fn(x_, w_, b_, g_):
            return reference.expert_linear(x_, w_, b_, g_, topk_ids,
                                           tokens_per_route=tokens_per_route)
        return _grads_or_empty(_vjp(fn, likes, needs, grad_y), likes)
    from .expert_ops import linear_backward
    grads = linear_backward(grad_y, _contig(x), weight, bias is not None, topk_weights,
                            topk_ids.contiguous(), _kept(h), tokens_per_route, needs)
    return _grads_or_empty(grads, likes)


@expert_linear_bwd_op.register_fake
def _expert_linear_bwd_fake(grad_y, x, weight, bias, topk_weights, topk_ids, h, tokens_per_route,
                            backend, needs):
    return _fake_grads(needs, (x, weight, bias, topk_weights))


def _expert_linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, topk_weights, topk_ids, tokens_per_route, backend, _keep_h = inputs
    ctx.save_for_backward(x, weight, bias, topk_weights, topk_ids, output[1])
    ctx.tokens_per_route, ctx.backend = tokens_per_route, backend


def _expert_linear_backward(ctx, grad_y, _grad_h):
    x, weight, bias, topk_weights, topk_ids, h = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if grad_y is None or not any(needs):
        return (None,) * 8
    grads = expert_linear_bwd_op(grad_y, x, weight, bias, topk_weights, topk_ids, h,
                                 ctx.tokens_per_route, ctx.backend, needs)
    return _input_grads(grads, needs, 8)


_register_autograd(expert_linear_fwd_op, expert_linear_bwd_op, _expert_linear_backward,
                   _expert_linear_setup, "expert_linear")


def expert_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], topk_weights: Tensor,
                     topk_ids: Tensor, tokens_per_route: int, backend: str) -> Tensor:
    """expert_linear through ``switch_dit::expert_linear`` (arguments already checked): keeps h
    only when the gates will need a gradient."""
    keep_h = torch.is_grad_enabled() and topk_weights.requires_grad
    # copied here, not inside the op: the op saves its input x, so the backward op reuses the copy
    return expert_linear_fwd_op(_contig(x), weight, bias, topk_weights, topk_ids,
                                tokens_per_route, backend, keep_h)[0]


# ---------------------------------------------------------------------------------------------
# expert_mlp
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("switch_dit::expert_mlp", mutates_args=())
def expert_mlp_fwd_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                      b2: Optional[Tensor], topk_weights: Tensor, topk_ids: Tensor,
                      activation: str, tokens_per_route: int, backend: str, train: bool,
                      keep_out: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y [T, Dout], pre, h1, out) in expert-sorted rows on "triton": pre [R*k*N, H or 2H] when
    ``train``, h1 [R*k*N, H], out [R*k*N, Dout] when ``keep_out``; [0, ...] when not kept (and
    all three on "torch", whose backward recomputes)."""
    _check_backend(backend)
    _validate.check_topk_ids_values(topk_ids, w1.shape[0])
    hidden_w, hidden, dout = w1.shape[2], w2.shape[1], w2.shape[2]
    if backend == "torch":
        y = reference.expert_mlp(x, w1, b1, w2, b2, topk_weights, topk_ids,
                                 activation=activation, tokens_per_route=tokens_per_route)
        return y, _empty(x, hidden_w), _empty(x, hidden), _empty(x, dout)
    from .expert_ops import mlp_forward
    y, pre, h1, out = mlp_forward(_contig(x), w1, _contig(b1), w2, _contig(b2), topk_weights,
                                  topk_ids.contiguous(), activation, tokens_per_route, train,
                                  keep_out)
    return y, _or_empty(pre, x, hidden_w), h1, _or_empty(out, x, dout)


@expert_mlp_fwd_op.register_fake
def _expert_mlp_fake(x, w1, b1, w2, b2, topk_weights, topk_ids, activation, tokens_per_route,
                     backend, train, keep_out):
    hidden_w, hidden, dout = w1.shape[2], w2.shape[1], w2.shape[2]
    rows = topk_ids.shape[0] * topk_ids.shape[1] * tokens_per_route
    triton = backend == "triton"
    return (x.new_empty((x.shape[0], dout)),
            x.new_empty((rows if triton and train else 0, hidden_w)),
            x.new_empty((rows if triton else 0, hidden)),
            x.new_empty((rows if triton and keep_out else 0, dout)))


@torch.library.custom_op("switch_dit::expert_mlp_backward", mutates_args=())
def expert_mlp_bwd_op(grad_y: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                      b2: Optional[Tensor], topk_weights: Tensor, topk_ids: Tensor, pre: Tensor,
                      h1: Tensor, out: Tensor, activation: str, tokens_per_route: int,
                      backend: str, needs: List[bool]) -> List[Tensor]:
    """[dx, dw1, db1, dw2, db2, d(topk_weights)] for the inputs flagged in ``needs``."""
    likes = (x, w1, b1, w2, b2, topk_weights)
    if backend == "torch":
        def fn(x_, w1_, b1_, w2_, b2_, g_):
            return reference.expert_mlp(x_, w1_, b1_, w2_, b2_, g_, topk_ids,
                                        activation=activation, tokens_per_route=tokens_per_route)
        return _grads_or_empty(_vjp(fn, likes, needs, grad_y), likes)
    from .expert_ops import mlp_backward
    grads = mlp_backward(grad_y, _contig(x), w1, b1 is not None, w2, b2 is not None,
                         topk_weights, topk_ids.contiguous(), pre, h1, _kept(out), activation,
                         tokens_per_route, needs)
    return _grads_or_empty(grads, likes)


@expert_mlp_bwd_op.register_fake
def _expert_mlp_bwd_fake(grad_y, x, w1, b1, w2, b2, topk_weights, topk_ids, pre, h1, out,
                         activation, tokens_per_route, backend, needs):
    return _fake_grads(needs, (x, w1, b1, w2, b2, topk_weights))


def _expert_mlp_setup(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, topk_weights, topk_ids, activation, tokens_per_route, backend = inputs[:10]
    _y, pre, h1, out = output
    ctx.save_for_backward(x, w1, b1, w2, b2, topk_weights, topk_ids, pre, h1, out)
    ctx.activation, ctx.tokens_per_route, ctx.backend = activation, tokens_per_route, backend


def _expert_mlp_backward(ctx, grad_y, *_grad_intermediates):
    x, w1, b1, w2, b2, topk_weights, topk_ids, pre, h1, out = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    if grad_y is None or not any(needs):
        return (None,) * 12
    grads = expert_mlp_bwd_op(grad_y, x, w1, b1, w2, b2, topk_weights, topk_ids, pre, h1, out,
                              ctx.activation, ctx.tokens_per_route, ctx.backend, needs)
    return _input_grads(grads, needs, 12)


_register_autograd(expert_mlp_fwd_op, expert_mlp_bwd_op, _expert_mlp_backward,
                   _expert_mlp_setup, "expert_mlp")


def expert_mlp_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                  topk_weights: Tensor, topk_ids: Tensor, activation: str, tokens_per_route: int,
                  backend: str) -> Tensor:
    """expert_mlp through ``switch_dit::expert_mlp`` (arguments already checked): keeps the
    backward's intermediates only when some input will need a gradient."""
    grad_on = torch.is_grad_enabled()
    train = grad_on and any(t is not None and t.requires_grad
                            for t in (x, w1, b1, w2, b2, topk_weights))
    keep_out = grad_on and topk_weights.requires_grad
    # copied here, not inside the op: the op saves its input x, so the backward op reuses the copy
    return expert_mlp_fwd_op(_contig(x), w1, b1, w2, b2, topk_weights, topk_ids, activation,
                             tokens_per_route, backend, train, keep_out)[0]


# ---------------------------------------------------------------------------------------------
# switch_modulation
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("switch_dit::switch_modulation", mutates_args=())
def switch_modulation_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             topk_weights: Tensor, topk_ids: Tensor, backend: str, keep_y: bool,
                             y_private: bool = False) -> Tuple[Tensor, Tensor]:
    """(r [B, N, D], y): y = x W~ + b~ [B, N, D] when ``keep_y`` on "triton", else [0, N, D].

    ``y_private``: the caller drops y unread (as `switch_modulation_op` does), so the eager
    backward may overwrite it as the kernel's u buffer instead of copying it first."""
    _check_backend(backend)
    _validate.check_topk_ids_values(topk_ids, weight.shape[0])
    if backend == "torch":
        r = reference.switch_modulation(x, weight, bias, topk_weights, topk_ids)
        return r, _empty(x, *x.shape[1:])
    from .modulation_ops import modulation_forward
    r, y = modulation_forward(x, weight, bias, topk_weights, topk_ids, keep_y)
    return r, _or_empty(y, x, *x.shape[1:])


@switch_modulation_fwd_op.register_fake
def _switch_modulation_fake(x, weight, bias, topk_weights, topk_ids, backend, keep_y,
                            y_private=False):
    kept = backend == "triton" and keep_y
    return torch.empty_like(x), x.new_empty((x.shape[0] if kept else 0, *x.shape[1:]))


def _switch_modulation_grads(grad_r, x, weight, bias, topk_weights, topk_ids, y, backend, needs):
    """Both backward ops' body; on "triton" ``y`` (kept or [0, N, D]) becomes the u buffer."""
    likes = (x, weight, bias, topk_weights)
    if backend == "torch":
        def fn(x_, w_, b_, g_):
            return reference.switch_modulation(x_, w_, b_, g_, topk_ids)
        return _grads_or_empty(_vjp(fn, likes, needs, grad_r), likes)
    from .modulation_ops import modulation_backward
    grads = modulation_backward(grad_r, x, weight, bias, topk_weights, topk_ids, _kept(y), needs)
    return _grads_or_empty(grads, likes)


@torch.library.custom_op("switch_dit::switch_modulation_backward", mutates_args=())
def switch_modulation_bwd_op(grad_r: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             topk_weights: Tensor, topk_ids: Tensor, y: Tensor, backend: str,
                             needs: List[bool]) -> List[Tensor]:
    """[dx, dW, db, d(topk_weights)] for the inputs flagged in ``needs``, [0] for the others.
    Functional: a kept y is copied before the kernel overwrites it (traced backwards,
    create_graph=True, a y the caller can still see)."""
    return _switch_modulation_grads(grad_r, x, weight, bias, topk_weights, topk_ids,
                                    y.clone() if y.shape[0] > 0 else y, backend, needs)


@torch.library.custom_op("switch_dit::switch_modulation_backward_", mutates_args=("y",))
def switch_modulation_bwd_inplace_op(grad_r: Tensor, x: Tensor, weight: Tensor,
                                     bias: Optional[Tensor], topk_weights: Tensor,
                                     topk_ids: Tensor, y: Tensor, backend: str, needs: List[bool]
                                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """`switch_modulation_bwd_op` that OVERWRITES y with u = dR * x (the kernel's buffer): the
    eager backward of a private y, handed over by the autograd node. It saves the copy, an
    x-sized read and write (about a quarter of the bytes the Triton backward moves). A mutating
    op carries no autograd formula: create_graph=True takes the functional op."""
    # A tuple, not a list: functionalization (auto_functionalize) takes no Tensor[] output from
    # a mutating op.
    return tuple(_switch_modulation_grads(grad_r, x, weight, bias, topk_weights, topk_ids, y,
                                          backend, needs))


def _switch_modulation_bwd_fake(grad_r, x, weight, bias, topk_weights, topk_ids, y, backend,
                                needs):
    return _fake_grads(needs, (x, weight, bias, topk_weights))


switch_modulation_bwd_op.register_fake(_switch_modulation_bwd_fake)
switch_modulation_bwd_inplace_op.register_fake(
    lambda *args: tuple(_switch_modulation_bwd_fake(*args)))


def _switch_modulation_setup(ctx, inputs, output) -> None:
    x, weight, bias, topk_weights, topk_ids, backend, _keep_y = inputs[:7]
    ctx.save_for_backward(x, weight, bias, topk_weights, topk_ids)
    ctx.backend = backend
    ctx.y_private = len(inputs) > 7 and inputs[7]
    # y (x-sized) is held on the node, not in saved_tensors: the first backward takes it (a
    # retain_graph second backward recomputes it), and tests can see whether it is kept.
    ctx.y = _kept(output[1])


def _switch_modulation_backward(ctx, grad_r, _grad_y):
    x, weight, bias, topk_weights, topk_ids = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if grad_r is None or not any(needs):
        return (None,) * 7
    y, ctx.y = ctx.y, None
    # Overwrite y in place only when nobody else can read it: private, eager (a traced backward
    # may not mutate a forward output) and without create_graph (grad mode on in a backward):
    # the functional op's autograd is what refuses double backward with a clear error.
    in_place = (ctx.y_private and y is not None and not torch.is_grad_enabled()
                and _plain_eager(grad_r))
    op = switch_modulation_bwd_inplace_op if in_place else switch_modulation_bwd_op
    grads = op(grad_r, x, weight, bias, topk_weights, topk_ids, _or_empty(y, x, *x.shape[1:]),
               ctx.backend, needs)
    return _input_grads(grads, needs, 8)


_register_autograd(switch_modulation_fwd_op, switch_modulation_bwd_op,
                   _switch_modulation_backward, _switch_modulation_setup, "switch_modulation")


def switch_modulation_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], topk_weights: Tensor,
                         topk_ids: Tensor, backend: str, recompute: bool = False) -> Tensor:
    """switch_modulation through ``switch_dit::switch_modulation`` (arguments already checked):
    keeps y only when x will need a gradient and ``recompute`` is off."""
    keep_y = torch.is_grad_enabled() and x.requires_grad and not recompute
    return switch_modulation_fwd_op(x, weight, bias, topk_weights, topk_ids, backend, keep_y,
                                    y_private=True)[0]


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    """x and biases with a unit last stride (weights are not copied: they take strides)."""
    from .expert_ops import unit_stride
    return unit_stride(t)
