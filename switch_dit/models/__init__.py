"""Models: DiT, Switch-DiT and DTR, and the registry `MODELS` / `create_model(name, **kwargs)`."""
from .dit import DiT
from .dtr import DTR, dtr_channel_masks
from .registry import MODELS, create_model
from .switch_dit import GateTables, SwitchDiT, expert_sharing

__all__ = ["DTR", "DiT", "GateTables", "MODELS", "SwitchDiT", "create_model", "dtr_channel_masks",
           "expert_sharing"]
