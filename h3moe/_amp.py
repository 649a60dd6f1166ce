"""torch.autocast for h3moe's expert ops: under an enabled autocast region of the inputs' device, fp32
(and other floating) activations and expert weights enter the experts in the region's dtype (bf16 / fp16),
as autocast casts the operands of torch.nn.functional.linear (what transformers' eager experts run), and the
output comes out in that dtype. The casts are ordinary differentiable .to() calls: fp32 master weights get
fp32 gradients. Without this, custom ops see fp32 inputs under autocast and run the fp32 kernels (tf32x3 on the GPU: several
times slower than bf16), the case of a model loaded in fp32 and trained with mixed precision (Trainer(bf16=True)).
fp64 is left alone, as autocast leaves it; so are integer tensors (ids) and packed quantized weights (uint8)."""
from __future__ import annotations

import torch

__all__ = ["autocast_inputs"]


def autocast_inputs(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """ts with every floating tensor but fp64 cast to the autocast dtype where autocast is enabled for ts[0]'s
    device (fp16 under a bf16 region too, as autocast's casts); unchanged otherwise."""
    dev = ts[0].device.type
    try:
        if not torch.is_autocast_enabled(dev):
            return ts
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return ts
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.is_floating_point() and t.dtype not in (dt, torch.float64) else t for t in ts)
