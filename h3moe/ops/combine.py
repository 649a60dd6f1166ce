"""The slot combine: y (T, H) = sum over the R splits and K slots of buf (R, T*K, H), in y's dtype (Triton
kernel h3moe/kernels/combine.py: one pass, deterministic). Shared by the Triton experts (forward and the
backward's d(x)) and the quantized experts."""
from __future__ import annotations

import torch

__all__ = ["combine"]


def combine(buf: torch.Tensor, T: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """buf (R, T*K, H) or (T*K, H) rows in slot order (flat slot t*K + k) → (T, H) in dtype, the R*K rows of
    each token summed in fp32 in a fixed order. Runs inside the caller's custom op (no op of its own)."""
    from ..kernels import combine as kc  # lazy: importing h3moe must not import triton

    if buf.dim() == 2:
        buf = buf.unsqueeze(0)
    R, TK, H = buf.shape
    if TK != T * K:
        raise ValueError(f"combine: buf has {TK} rows per split, expected T*K = {T}*{K}")
    if R * K > MAX_TERMS:  # the kernel unrolls its R*K loads
        return buf.sum(dim=0, dtype=torch.float32).view(T, K, H).sum(dim=1).to(dtype)
    y = torch.empty(T, H, device=buf.device, dtype=dtype)
    if T == 0 or H == 0:
        return y
    buf = buf.contiguous()
    grid = (-(-H // kc.BLOCK_H) * T,)
    kc.combine_kernel[grid](buf, y, TK, H, K=K, R=R, BLOCK_H=kc.BLOCK_H, num_warps=4, num_stages=1)
    return y


#: Most rows per token the kernel sums (R*K, unrolled); beyond, torch sums.
MAX_TERMS = 32
