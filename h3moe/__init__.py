"""h3moe: H³Fusion as a kernel-optimized Mixture-of-Experts library.

Public API (stable): route, moe, gating_loss, drift_reg, load_balancing_loss, z_loss, MoE, backends.
Backends: "torch" (vectorized, anywhere), "triton" (GPU; CPU under TRITON_INTERPRET=1), "cuda" (csrc/).
"""
from ._backend import BackendStatus, BackendUnavailable, backends
from .nn.moe import MoE
from .ops.experts import moe
from .ops.losses import drift_reg, gating_loss, load_balancing_loss, z_loss
from .ops.routing import Routing, route

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailable",
    "MoE",
    "Routing",
    "backends",
    "drift_reg",
    "gating_loss",
    "load_balancing_loss",
    "moe",
    "route",
    "z_loss",
]
