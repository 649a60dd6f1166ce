"""h3moe: H³Fusion as a kernel-optimized Mixture-of-Experts library.

Public API (stable): route, moe, quant_moe (with Packed, built by quantize), gating_loss, drift_reg,
load_balancing_loss, z_loss, MoE, backends,
patch/unpatch (transformers models; importing h3moe also registers experts_implementation="h3moe").
Backends: "torch" (vectorized, anywhere), "triton" (GPU; CPU under TRITON_INTERPRET=1), "cuda" (csrc/).
"""
from ._backend import BackendStatus, BackendUnavailable, backends
from .nn.moe import MoE
from .ops.experts import moe
from .ops.quant import Packed, quant_moe
from .ops.losses import drift_reg, gating_loss, gating_loss_from_psums, load_balancing_loss, z_loss
from .ops.routing import Routing, route
from .ops.routing import route_with_gating
from .integrations.transformers import install_import_hook as _install_import_hook
from .integrations.transformers import patch, unpatch

# Register "h3moe" in transformers' ExpertsInterface: now if transformers' MoE module is loaded, else when it
# is first imported (import h3moe never imports transformers; nothing happens without it).
_install_import_hook()

__version__ = "0.1.0"


def quantize(model, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False, **kwargs):
    """Quantize every fused expert tensor of `model` in place (NF4 / FP4 / int8, bitsandbytes' layouts).
    See h3moe.integrations.bitsandbytes.quantize; imported lazily (bitsandbytes is never imported here)."""
    from .integrations.bitsandbytes import quantize as _quantize

    return _quantize(model, quant_type, blocksize, double_quant, **kwargs)


__all__ = [
    "BackendStatus",
    "BackendUnavailable",
    "MoE",
    "Packed",
    "Routing",
    "backends",
    "drift_reg",
    "gating_loss",
    "gating_loss_from_psums",
    "load_balancing_loss",
    "moe",
    "patch",
    "quant_moe",
    "quantize",
    "route",
    "route_with_gating",
    "unpatch",
    "z_loss",
]
