"""switch_dit_kernels: fused Mixture-of-Experts kernels (Triton) with a pure-PyTorch reference.

    from switch_dit_kernels import MoE, TimestepMoE                       # nn.Modules
    from switch_dit_kernels import route_topk, expert_linear, expert_mlp, switch_modulation

Importing this package needs neither Triton nor the optional CUDA extension, and does not touch
the GPU.
"""
from .backend import BACKENDS, resolve_backend, triton_available
from .functional import expert_linear, expert_mlp, route_topk, switch_modulation
from .modules import MoE, TimestepMoE, TimestepRouting
from .routing import RoutingMetadata, build_routing_metadata
from ._cuda import cuda_extension_available

__all__ = [
    "BACKENDS", "MoE", "RoutingMetadata", "TimestepMoE", "TimestepRouting", "build_routing_metadata",
    "cuda_extension_available", "expert_linear", "expert_mlp", "resolve_backend", "route_topk",
    "switch_modulation", "triton_available",
]
__version__ = "0.1.0"
