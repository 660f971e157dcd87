"""Model registry: DiT-, SwitchDiT- and DTR-{S,B,L,XL}/{2,4,8} and `create_model(name, **kwargs)`."""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict

import torch.nn as nn

from .dit import DiT
from .dtr import DTR
from .switch_dit import SwitchDiT

# size -> (depth, hidden_size, num_heads), DiT's configurations.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)
FAMILIES = {"DiT": DiT, "SwitchDiT": SwitchDiT, "DTR": DTR}

# Options of one family that the others accept and ignore, so a command line can pass one set.
_FAMILY_OPTIONS = {
    "DiT": set(),
    "SwitchDiT": {"num_experts", "k", "backend", "moe_recompute", "num_timesteps",
                  "prior_loss_weight", "prior_alpha"},
    "DTR": {"num_timesteps", "dtr_alpha", "dtr_beta"},
}
_DIT_OPTIONS = {"input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob",
                "depth", "hidden_size", "num_heads", "mlp_ratio"}


def _build(family: str, patch_size: int, size: str, **kwargs: Any) -> nn.Module:
    own = _DIT_OPTIONS | _FAMILY_OPTIONS[family]
    known = _DIT_OPTIONS.union(*_FAMILY_OPTIONS.values())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown}; known: {sorted(known)}")
    # None means "the default": lets callers forward optional command-line values untouched.
    depth, hidden_size, num_heads = SIZES[size]
    config = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads)
    config.update({k: v for k, v in kwargs.items() if k in own and v is not None})
    return FAMILIES[family](patch_size=patch_size, **config)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    f"{family}-{size}/{patch}": functools.partial(_build, family, patch, size)
    for family in FAMILIES for size in SIZES for patch in PATCHES
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("SwitchDiT-S/2", input_size=16)``.

    Keyword arguments: input_size (32), in_channels (4), num_classes (1000), learn_sigma (True),
    class_dropout_prob (0.1); overrides depth, hidden_size, num_heads, mlp_ratio (4.0) for small
    variants; Switch-DiT: num_experts (3), k (2), backend ("auto"), moe_recompute (False),
    num_timesteps (1000), prior_loss_weight (1.0), prior_alpha (4.0); DTR: num_timesteps (1000),
    dtr_alpha (4.0), dtr_beta (0.8). A value of None keeps the default; options of another family are ignored.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](**kwargs)
