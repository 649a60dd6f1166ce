"""Triton backend of h3moe.gating_loss: H3Fusion's gating loss with O(B·E) extra memory per layer.

Custom ops (namespace h3moe, each with a fake implementation):
    h3moe::triton_gating_pbar(logits (B*S, E), mask (B, S) any dtype or None, batch B) -> p̄_l (B, E) fp32
        (fp64 for fp64 logits): the masked mean over each sample's tokens of the fp32 softmax.
    h3moe::triton_gating_pbar_bwd(grad (B, E), logits, mask, batch) -> d logits (B*S, E) in the logits' dtype.
Autograd saves only the logits (already alive: the router produced them) and the (B, S) mask; the backward
kernel recomputes the softmax. The (B, E) loss on top (cross-entropy / NLL, and the mean over layers) is
plain torch, exactly as reference.gating_loss_ref writes it.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .. import _backend
from ..reference import gating_loss_from_pbar

_backend.register_ops("triton", "gating_loss")

import triton  # noqa: E402  (after registering: a missing triton still leaves the op declared)

from ..kernels import gating_loss as K  # noqa: E402

__all__ = ["gating_loss", "mean_router_probs"]


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split(B: int, S: int, block_s: int, device: torch.device) -> int:
    """Programs per sample: enough for ~4 programs per SM over the batch, at most one per tile."""
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 2
    return max(1, min(triton.cdiv(4 * sms, B), triton.cdiv(S, block_s)))


def _n_b(mask: torch.Tensor | None, B: int, S: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(B,) tokens averaged per sample: sum of the mask clamped to >= 1, or S."""
    if mask is None:
        return torch.full((B,), float(S), dtype=dtype, device=device)
    return mask.sum(dim=1, dtype=dtype).clamp_min(1)


def _mask_arg(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, S) mask as the kernels read it, in its own dtype (no (B, S) fp32 copy); bool as uint8."""
    if mask is None:
        return None
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).contiguous()


@torch.library.custom_op("h3moe::triton_gating_pbar", mutates_args=())
def _triton_gating_pbar(logits: torch.Tensor, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    T, E = logits.shape
    B = batch
    S = T // B
    acc = _acc_dtype(logits)
    if T == 0:
        # as the reference: the mean of nothing is NaN; a masked sum of nothing over a clamped count is 0
        return torch.full((B, E), float("nan") if mask is None else 0.0, dtype=acc, device=logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    e_pad = triton.next_power_of_2(E)
    block_s = K.rows_for(e_pad)
    split = _split(B, S, block_s, logits.device)
    rows_per_split = triton.cdiv(triton.cdiv(S, split), block_s) * block_s
    split = triton.cdiv(S, rows_per_split)
    mask_c = _mask_arg(mask)
    partial = torch.empty(B, split, e_pad, dtype=acc, device=logits.device)
    K.pbar_fwd_kernel[(B, split)](
        logits, mask_c if mask_c is not None else logits, partial, S, E, logits.stride(0), rows_per_split,
        HAS_MASK=mask is not None, E_PAD=e_pad, BLOCK_S=block_s, FP64=acc == torch.float64,
        num_warps=4, num_stages=1,
    )  # fmt: skip
    return partial.sum(dim=1)[:, :E] / _n_b(mask, B, S, acc, logits.device)[:, None]


@_triton_gating_pbar.register_fake
def _(logits, mask, batch):
    return logits.new_empty((batch, logits.shape[1]), dtype=_acc_dtype(logits))


@torch.library.custom_op("h3moe::triton_gating_pbar_bwd", mutates_args=())
def _triton_gating_pbar_bwd(
    grad: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None, batch: int
) -> torch.Tensor:
    T, E = logits.shape
    B = batch
    S = T // B
    acc = _acc_dtype(logits)
    out = torch.empty(T, E, dtype=logits.dtype, device=logits.device)
    if T == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    gs = (grad.to(acc) / _n_b(mask, B, S, acc, logits.device)[:, None]).contiguous()  # (B, E)
    mask_c = _mask_arg(mask)
    block_t = K.rows_for(triton.next_power_of_2(E))
    K.pbar_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits, mask_c if mask_c is not None else logits, gs, out, T, S, E, logits.stride(0),
        HAS_MASK=mask is not None, E_PAD=triton.next_power_of_2(E), BLOCK_T=block_t, FP64=acc == torch.float64,
        num_warps=4, num_stages=1,
    )  # fmt: skip
    return out


@_triton_gating_pbar_bwd.register_fake
def _(grad, logits, mask, batch):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, mask, batch = inputs
    ctx.save_for_backward(logits, mask)
    ctx.batch = batch


def _backward(ctx, grad):
    logits, mask = ctx.saved_tensors
    return torch.ops.h3moe.triton_gating_pbar_bwd(grad, logits, mask, ctx.batch), None, None


_triton_gating_pbar.register_autograd(_backward, setup_context=_setup_context)


class _PbarAllLayers(torch.autograd.Function):
    """p̄ of L same-shaped layers in one launch each way. Keeps for the backward only what the caller already
    holds (the layers' logits, the (B, S) mask): the concatenation and the repeated mask are rebuilt there."""

    @staticmethod
    def forward(ctx, mask, batch, *flat):
        ctx.batch = batch
        ctx.save_for_backward(mask, *flat)
        L = len(flat)
        with torch.no_grad():
            m = None if mask is None else mask.repeat(L, 1)  # (L*B, S)
            return torch.ops.h3moe.triton_gating_pbar(torch.cat(flat, 0), m, L * batch)

    @staticmethod
    def backward(ctx, grad):
        mask, *flat = ctx.saved_tensors
        L = len(flat)
        m = None if mask is None else mask.repeat(L, 1)
        d = torch.ops.h3moe.triton_gating_pbar_bwd(grad.contiguous(), torch.cat(flat, 0), m, L * ctx.batch)
        return (None, None, *d.split(flat[0].shape[0], 0))


def mean_router_probs(
    layers: Sequence[torch.Tensor], batch_size: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """p̄ (B, E), equal to reference.mean_router_probs_ref, through the Triton kernels."""
    B = batch_size
    mask = None if attention_mask is None else attention_mask.reshape(B, -1)
    flat = [g.reshape(-1, g.shape[-1]) for g in layers]  # L × (B*S, E)
    L = len(flat)
    if L > 1 and all(f.shape == flat[0].shape and f.dtype == flat[0].dtype for f in flat):
        # One launch forward and one backward for all L layers, instead of L of each (measured on an H100: the
        # per-layer ops were launch-bound, slower than eager torch at 32 layers). The L layers' logits,
        # concatenated, are L·B samples of S tokens. The concatenation is a temporary of each pass: the
        # backward keeps only the layers' own logits (and (L*B, E) results), no (T, E) copy or probabilities.
        p = _PbarAllLayers.apply(mask, B, *flat)  # (L*B, E)
        return p.view(L, B, -1).mean(dim=0)
    per_layer = [torch.ops.h3moe.triton_gating_pbar(f, mask, B) for f in flat]
    return per_layer[0] if L == 1 else torch.stack(per_layer, dim=0).mean(dim=0)


def gating_loss(
    layers: Sequence[torch.Tensor],
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    variant: str = "paper",
) -> torch.Tensor:
    """H3Fusion gating loss on the Triton backend (arguments checked by h3moe.gating_loss).

    Args:
        layers: L tensors of (B*S, E) or (B, S, E) router logits, any float dtype.
        labels: (B,) task index per sample or (B, E) soft targets.
        attention_mask: None or (B, S).
        variant: "paper" (cross-entropy with p̄ as logits) or "nll" (-Σ y·log p̄).
    Returns:
        scalar fp32 (fp64 for fp64 logits), equal to reference.gating_loss_ref.
    """
    p_bar = mean_router_probs(layers, labels.shape[0], attention_mask)  # (B, E)
    return gating_loss_from_pbar(p_bar, labels, variant)
