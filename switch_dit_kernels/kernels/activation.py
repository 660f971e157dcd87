"""Activation functions and their derivatives as Triton device functions (GEMM epilogues).

Every function takes and returns float32 blocks. ``ACT`` is a constexpr code from `ACT_CODES`;
the gated activations ("swiglu", "geglu") use the code of their gate nonlinearity (silu, tanh-GELU)
plus the kernel's GATED flag: h = act(gate) * up.
"""
from __future__ import annotations

import triton
import triton.language as tl

ACT_NONE, ACT_GELU_TANH, ACT_GELU, ACT_SILU, ACT_RELU = 0, 1, 2, 3, 4

# activation name -> (code of the elementwise nonlinearity, gated)
ACT_CODES = {
    "gelu_tanh": (ACT_GELU_TANH, False),
    "gelu": (ACT_GELU, False),
    "silu": (ACT_SILU, False),
    "relu": (ACT_RELU, False),
    "swiglu": (ACT_SILU, True),
    "geglu": (ACT_GELU_TANH, True),
}

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def act_fwd(x, ACT: tl.constexpr):
    """act(x) for a float32 block."""
    if ACT == 1:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh intrinsic needed. Sigmoids are written out:
        # tl.sigmoid is a jit function, which the CPU interpreter re-patches on every call.
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        y = x / (1.0 + tl.exp(-2.0 * u))
    elif ACT == 2:
        y = 0.5 * x * (1.0 + tl.erf(x * _INV_SQRT_2))
    elif ACT == 3:
        y = x / (1.0 + tl.exp(-x))
    elif ACT == 4:
        y = tl.maximum(x, 0.0)
    else:
        y = x
    return y


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx for a float32 block (relu: 0 at x = 0, as PyTorch)."""
    if ACT == 1:
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        d = s + x * 2.0 * s * (1.0 - s) * du
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.erf(x * _INV_SQRT_2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-x))
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 4:
        d = tl.where(x > 0.0, 1.0, 0.0)
    else:
        d = x * 0.0 + 1.0
    return d
