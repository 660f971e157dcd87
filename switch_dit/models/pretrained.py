"""Pretrained weights in: this project's checkpoints, raw DiT state dicts, official Switch-DiT / DTR.

    from switch_dit.models import create_model, load_pretrained
    model = create_model("SwitchDiT-XL/2")
    load_pretrained(model, "DiT-XL-2-256x256.pt")     # DiT's function, identity-initialised experts

Sources `read_state_dict` understands (`path` may also be a results folder: its latest.pt):
- this project's training checkpoints ({"model", "ema", "step", "config", ...}): the EMA weights by
  default, the raw ones with use_ema=False; its `switch_dit.export` .safetensors files;
- raw DiT state dicts, as released by facebookresearch/DiT (DiT-XL-2-256x256.pt: DiT's own key
  names, which are this project's DiT key names);
- official Switch-DiT ("DMoE") and DTR training checkpoints ({"model", "ema", "opt", "config"}):
  `routers.{i}.experts.w` [E, D, D] / `.b` [E, D] -> `blocks.{i}.moe.weight` / `.bias` (same layout,
  x @ w), `routers.{i}.f_gate.1.*` -> `blocks.{i}.moe.gate.1.*`. Their fixed tables (`full_time`,
  `prior._unit_mapping`, `routers.{i}._unit_mapping`) are compared with the tables this model
  recomputes and dropped; a difference (another T, alpha, beta, k or E) is an error.
A "module." (DDP) or "_orig_mod." (torch.compile) prefix is removed.

A DiT state dict loaded into a Switch-DiT leaves every expert at zero, so m = 1 and the model
computes DiT's function (the gates keep their initial values: with zero experts they change
nothing). Every other mismatch (a key the model lacks or misses, another shape) is a
`PretrainedMismatch` (a ValueError) naming the key and both shapes. Loading is all or nothing: the
model is untouched on error.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

StateDict = Dict[str, torch.Tensor]

_OFFICIAL_EXPERT = re.compile(r"^routers\.(\d+)\.experts\.(w|b)$")
_OFFICIAL_GATE = re.compile(r"^routers\.(\d+)\.f_gate\.1\.(weight|bias)$")
_OFFICIAL_DTR_TABLE = re.compile(r"^routers\.(\d+)\._unit_mapping$")
_EXPERT_KEY = re.compile(r"^blocks\.\d+\.moe\.(weight|bias)$")
_GATE_KEY = re.compile(r"^blocks\.\d+\.moe\.gate\.")


class PretrainedMismatch(ValueError):
    """The weights do not fit the model: the message names the key and both shapes."""


class _StubObject:
    """Stands in for a class the unpickler cannot import (an OmegaConf config, say)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _PermissiveUnpickler(pickle.Unpickler):
    """Official training checkpoints pickle their hydra/OmegaConf config next to the weights: a
    class that may not be installed here. Weights never need it, so unknown classes become stubs."""

    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_StubObject,), {"__module__": "switch_dit.models.pretrained.stub"})


class _PermissivePickle:
    Unpickler = _PermissiveUnpickler
    load = staticmethod(lambda f, **kw: _PermissiveUnpickler(f, **kw).load())
    __name__ = "pickle"


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # not plain tensors/containers (an official checkpoint's pickled config): checkpoints
        # execute code when unpickled like this, so load only files you trust
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_PermissivePickle)


def _strip_prefixes(sd: StateDict) -> StateDict:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_state_dict(path: str, use_ema: bool = True) -> Tuple[StateDict, str]:
    """(flat state dict on the CPU, source description) from any supported file or results folder."""
    from ..checkpoint import checkpoint_file

    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights {path!r}: no such file")
    which = "ema" if use_ema else "model"
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), f"safetensors file {path}"
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise PretrainedMismatch(f"{path!r} holds a {type(obj).__name__}, not a state dict or checkpoint")
    if which in obj and isinstance(obj[which], dict):
        kind = "switch-dit checkpoint" if "step" in obj and "integrity" in obj else \
            "official training checkpoint"
        sd = obj[which]
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind, sd = "raw state dict", obj
    else:
        raise PretrainedMismatch(f"{path!r} is neither a state dict nor a checkpoint with a {which!r} entry "
                         f"(top-level keys: {sorted(obj)[:10]})")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return _strip_prefixes(sd), f"{kind} {path} ({which} weights)" if kind != "raw state dict" \
        else f"{kind} {path}"


def _expect_table(key: str, got: torch.Tensor, want: Optional[torch.Tensor], what: str) -> None:
    if want is None:
        raise PretrainedMismatch(f"key {key!r} {tuple(got.shape)}: the source was trained with {what}, "
                         "which this model does not have")
    if tuple(got.shape) != tuple(want.shape) or not torch.equal(got.to(want.dtype).cpu(), want.cpu()):
        raise PretrainedMismatch(f"key {key!r}: the source's fixed table {tuple(got.shape)} differs from the "
                         f"one this model recomputes {tuple(want.shape)} ({what}: another number of "
                         "timesteps, alpha, beta, k or experts)")


def convert_state_dict(sd: StateDict, model: nn.Module) -> StateDict:
    """Rename an official Switch-DiT / DTR state dict to this project's keys for `model`, checking
    and dropping its fixed tables. This project's and DiT's own keys pass through unchanged."""
    prior_mask = getattr(model, "prior_mask", None)
    dtr_masks = getattr(model, "dtr_masks", None)
    timestep_ids = getattr(model, "timestep_ids", None)
    out: StateDict = {}
    for key, value in sd.items():
        m_exp, m_gate, m_dtr = (_OFFICIAL_EXPERT.match(key), _OFFICIAL_GATE.match(key),
                                _OFFICIAL_DTR_TABLE.match(key))
        if m_exp:
            out[f"blocks.{m_exp.group(1)}.moe.{'weight' if m_exp.group(2) == 'w' else 'bias'}"] = value
        elif m_gate:
            out[f"blocks.{m_gate.group(1)}.moe.gate.1.{m_gate.group(2)}"] = value
        elif key == "full_time":
            if timestep_ids is None:
                raise PretrainedMismatch(f"key 'full_time' {tuple(value.shape)}: a Switch-DiT checkpoint "
                                 f"cannot be loaded into {type(model).__name__}")
            _expect_table(key, value, timestep_ids, "the timestep list of Switch-DiT's gate table")
        elif key == "prior._unit_mapping":
            _expect_table(key, value, prior_mask, "Switch-DiT's diffusion prior")
        elif m_dtr:
            _expect_table(key, value, dtr_masks, "DTR's channel masks")
        else:
            out[key] = value
    return out


def load_pretrained(model: nn.Module, source: Union[str, StateDict], use_ema: bool = True,
                    verbose: bool = False) -> Dict[str, Any]:
    """Load weights from `source` (a path understood by `read_state_dict`, or a state dict) into
    `model` in place; returns {"source", "loaded", "identity_experts"} (key lists).

    Keys missing from the source are allowed only for Switch-DiT's experts and gates, and only when
    the source has none of them (a DiT into a Switch-DiT): the experts are set to zero (identity).
    """
    if isinstance(source, str):
        sd, desc = read_state_dict(source, use_ema=use_ema)
    elif isinstance(source, dict):
        sd, desc = _strip_prefixes(dict(source)), "state dict"
    else:
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    sd = convert_state_dict(sd, model)
    own = model.state_dict()
    unexpected = sorted(k for k in sd if k not in own)
    if unexpected:
        k = unexpected[0]
        raise PretrainedMismatch(f"key {k!r} {tuple(sd[k].shape)} from {desc} has no place in "
                         f"{type(model).__name__} ({len(unexpected)} such keys: "
                         f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''})")
    missing = sorted(k for k in own if k not in sd)
    source_has_moe = any(_EXPERT_KEY.match(k) or _GATE_KEY.match(k) for k in sd)
    identity: List[str] = []
    for k in missing:
        if (_EXPERT_KEY.match(k) or _GATE_KEY.match(k)) and not source_has_moe:
            if _EXPERT_KEY.match(k):
                identity.append(k)
            continue
        raise PretrainedMismatch(f"key {k!r} {tuple(own[k].shape)} of {type(model).__name__} is missing from "
                         f"{desc} ({len(missing)} missing keys)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise PretrainedMismatch(f"key {k!r}: {desc} has shape {tuple(v.shape)}, "
                             f"{type(model).__name__} expects {tuple(own[k].shape)}")
        if v.is_floating_point() != own[k].is_floating_point():
            raise PretrainedMismatch(f"key {k!r}: {desc} holds {v.dtype}, the model {own[k].dtype}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
        for k in identity:
            own[k].zero_()  # zero experts: m = 1, the block computes DiT's function
    if verbose:
        print(f"[switch-dit] loaded {len(sd)} tensors from {desc}"
              + (f"; {len(identity)} expert tensors zero (identity)" if identity else ""))
    return {"source": desc, "loaded": sorted(sd), "identity_experts": identity}
