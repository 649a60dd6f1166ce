"""Router losses: H3Fusion's gating loss and drift regularizer, load-balancing and z-loss.

The torch backend computes them vectorized, equal to h3moe/reference.py. The gating loss also has fused
kernel paths (triton: h3moe.ops.triton_gating, cuda: h3moe.ops.cuda) that accumulate p̄ (B, E) without
keeping (T, E) probabilities.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend, _validate
from .. import reference as ref

__all__ = ["gating_loss", "gating_loss_from_psums", "drift_reg", "load_balancing_loss", "z_loss"]


def _check_logits(router_logits) -> list[torch.Tensor]:
    layers = ref._layers(router_logits)
    if not layers:
        raise ValueError("router_logits: expected at least one layer's logits")
    for i, g in enumerate(layers):
        if not isinstance(g, torch.Tensor) or not g.is_floating_point() or g.dim() not in (2, 3):
            raise ValueError(f"router_logits[{i}]: expected a float (B*S, E) or (B, S, E) tensor")
    return layers


def _one_device(ts: list) -> list:
    """ts on the first one's device: the layers of a model split over GPUs (transformers' device_map="auto")
    hold their router logits on their own GPUs; as transformers' load_balancing_loss_func, the loss is taken
    on the first layer's device (differentiable copies of the others). No copy when they already agree."""
    dev = ts[0].device
    return ts if all(t.device == dev for t in ts) else [t.to(dev) for t in ts]


def _check_labels(labels, B: int | None, E: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() not in (1, 2):
        raise ValueError("labels: expected (B,) class indices or (B, E) soft targets")
    if labels.dim() == 2 and labels.shape[1] != E:
        raise ValueError(f"labels: soft targets have {labels.shape[1]} classes, router has E={E}")


def gating_loss(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    variant: str = "paper",
    backend: str = "auto",
) -> torch.Tensor:
    """H3Fusion gating loss (see reference.gating_loss_ref).

    Args:
        router_logits: L layers of (B*S, E) or (B, S, E) logits (a sequence, or one (L, B, S, E) tensor).
        labels: (B,) task index per sample, or (B, E) soft targets.
        attention_mask: optional (B, S); None averages over padding too, as the authors' code does.
        variant: "paper" (cross-entropy with p̄ as logits) or "nll" (-Σ y·log p̄).
        backend: "auto", "torch", "triton" or "cuda".
    Returns:
        scalar fp32.
    """
    layers = _one_device(_check_logits(router_logits))
    E = layers[0].shape[-1]
    _check_labels(labels, None, E)
    if variant not in ("paper", "nll"):
        raise ValueError(f"variant: expected 'paper' or 'nll', got {variant!r}")
    B = labels.shape[0]
    if layers[0].numel() % (B * E):
        raise ValueError(f"labels: {B} samples do not divide router_logits of shape {tuple(layers[0].shape)}")
    dev = layers[0].device
    labels = labels.to(dev)
    attention_mask = None if attention_mask is None else attention_mask.to(dev)
    be = _backend.resolve(backend, dev, "gating_loss")
    if be == "triton":
        from . import triton_gating

        with _backend.device_guard(layers[0]):
            return triton_gating.gating_loss(layers, labels, attention_mask, variant)
    if be == "cuda":
        from . import cuda

        with _backend.device_guard(layers[0]):  # (its ops set the device; its Triton fallback needs this)
            return cuda.gating_loss(layers, labels, attention_mask, variant)
    return ref.gating_loss_ref(layers, labels, attention_mask, variant)


def gating_loss_from_psums(
    psums: Sequence[torch.Tensor],
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    variant: str = "paper",
    seq_len: int | None = None,
) -> torch.Tensor:
    """The gating loss (reference.gating_loss_ref) from L layers' psum (B, E), as h3moe.route_with_gating
    returns them (any backend): p̄ = mean over layers of psum / n_b, n_b = the sample's mask sum clamped
    to 1, or seq_len (S) without a mask.

    Args:
        psums: L tensors (B, E), Σ over each sample's tokens of mask·softmax(logits).
        labels: (B,) task index per sample, or (B, E) soft targets.
        attention_mask: the (B, S) mask the psums were taken with, or None.
        variant: "paper" (cross-entropy with p̄ as logits) or "nll" (-Σ y·log p̄).
        seq_len: S, needed without an attention_mask.
    Returns:
        scalar, fp32 (fp64 for fp64 psums); differentiable w.r.t. the psums.
    """
    psums = list(psums)
    if not psums:
        raise ValueError("psums: expected at least one layer's (B, E) sums")
    psums = _one_device(psums)
    labels = labels.to(psums[0].device)
    attention_mask = None if attention_mask is None else attention_mask.to(psums[0].device)
    if variant not in ("paper", "nll"):
        raise ValueError(f"variant: expected 'paper' or 'nll', got {variant!r}")
    B, E = psums[0].shape
    _check_labels(labels, B, E)
    total = torch.stack(psums, 0).sum(0)  # (B, E)
    if attention_mask is None:
        if seq_len is None:
            raise ValueError("seq_len: needed without an attention_mask")
        denom = torch.full((B, 1), float(seq_len), dtype=total.dtype, device=total.device)
    else:
        denom = attention_mask.reshape(B, -1).to(total.dtype).sum(1, keepdim=True).clamp_min(1)
    return ref.gating_loss_from_pbar(total / (denom * len(psums)), labels, variant)


def drift_reg(expert_weights, gammas, initial=None) -> torch.Tensor:
    """Σ_e γ_e·‖W_e‖ (or ‖W_e − W_e⁰‖ with `initial`), averaged over layers. See reference.drift_reg_ref."""
    return ref.drift_reg_ref(expert_weights, gammas, initial)


def load_balancing_loss(router_logits, num_experts: int, top_k: int = 2, attention_mask=None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, equal to transformers' load_balancing_loss_func."""
    layers = _one_device(_check_logits(router_logits))
    _validate.top_k(top_k, num_experts)
    mask = None if attention_mask is None else attention_mask.to(layers[0].device)
    return ref.load_balancing_loss_ref(layers, num_experts, top_k, mask)


def z_loss(router_logits, attention_mask=None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)², averaged over layers."""
    layers = _one_device(_check_logits(router_logits))
    return ref.z_loss_ref(layers, None if attention_mask is None else attention_mask.to(layers[0].device))

