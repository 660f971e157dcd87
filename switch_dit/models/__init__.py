"""Models: DiT, Switch-DiT and DTR, the registry `MODELS` / `create_model(name, **kwargs)`, and
`load_pretrained(model, path)` (this project's, DiT's and the official Switch-DiT / DTR weights)."""
from .dit import DiT
from .dtr import DTR, dtr_channel_masks
from .pretrained import PretrainedMismatch, load_pretrained, read_state_dict
from .registry import MODELS, create_model
from .switch_dit import GateTables, SwitchDiT, expert_sharing

__all__ = ["DTR", "DiT", "GateTables", "MODELS", "PretrainedMismatch", "SwitchDiT", "create_model",
           "dtr_channel_masks", "expert_sharing", "load_pretrained", "read_state_dict"]
