"""switch_dit: Switch Diffusion Transformer (Park et al., ECCV 2024) with DiT and DTR baselines.

    from switch_dit.models import create_model, MODELS          # DiT / SwitchDiT / DTR-{S,B,L,XL}/{2,4,8}
    from switch_dit.diffusion import create_diffusion, create_loss_weighting
    from switch_dit.prior import diffusion_prior_mask, match_prior_columns, diffusion_prior_loss

The MoE layers come from `switch_dit_kernels` (its public API only).
"""
from .diffusion import create_diffusion, create_loss_weighting
from .models import MODELS, create_model
from .prior import diffusion_prior_loss, diffusion_prior_mask, match_prior_columns

__all__ = ["MODELS", "create_diffusion", "create_loss_weighting", "create_model",
           "diffusion_prior_loss", "diffusion_prior_mask", "match_prior_columns"]
__version__ = "0.1.0"
