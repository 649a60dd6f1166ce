"""h3moe.route: softmax top-k routing plus the permutation metadata the expert GEMMs need.

Backends: torch (here), triton (h3moe.ops.triton_routing), cuda (h3moe.ops.cuda). All return the same
`Routing`; none synchronizes with the host, so routing can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _backend, _validate

__all__ = ["Routing", "route", "route_with_gating", "sort_by_expert", "as_routing"]


@dataclass
class Routing:
    """Routing of T tokens to K of E experts.

    weights: (T, K) fp32, differentiable w.r.t. the router logits.
    ids: (T, K) int64 expert index of each slot.
    counts: (E,) int32 number of (token, slot) pairs per expert.
    offsets: (E+1,) int32 exclusive prefix sum of counts: expert e owns sorted rows [offsets[e], offsets[e+1]).
    sorted_slots: (T*K,) int32 flat slot index t*K+k of each row, sorted by expert (stable: token order
        within an expert).
    """

    weights: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    sorted_slots: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Permutation metadata from expert ids (T, K), on the device, without host synchronization.

    Returns counts (E,) int32, offsets (E+1,) int32, sorted_slots (T*K,) int32.
    """
    flat = ids.reshape(-1).long()  # (T*K,)
    sorted_slots = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return counts, offsets, sorted_slots


def as_routing(routing, num_experts: int, backend: str = "torch") -> Routing:
    """Accept a Routing or a (weights, ids) pair (e.g. from a transformers router). The pair's sort metadata
    is built by `backend`: "triton" (the Triton counting sort; the caller checked that Triton runs on ids'
    device) or "torch"."""
    if isinstance(routing, Routing):
        return routing
    if isinstance(routing, (tuple, list)) and len(routing) == 2:
        weights, ids = routing
        _validate.tensor("routing.weights", weights, 2)
        _validate.tensor("routing.ids", ids, 2, floating=False)
        if backend == "triton":
            from .triton_routing import sort_by_expert as triton_sort

            counts, offsets, sorted_slots = triton_sort(ids, num_experts)
        else:
            counts, offsets, sorted_slots = sort_by_expert(ids, num_experts)
        return Routing(weights, ids, counts, offsets, sorted_slots)
    raise ValueError(f"routing: expected a Routing or a (weights, ids) pair, got {type(routing).__name__}")


def _route_torch(logits: torch.Tensor, top_k: int, renormalize: bool) -> Routing:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(dtype), dim=-1)  # (T, E)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # (T, K)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    counts, offsets, sorted_slots = sort_by_expert(ids, logits.shape[1])
    return Routing(weights, ids, counts, offsets, sorted_slots)


def route(logits: torch.Tensor, top_k: int, *, renormalize: bool = True, backend: str = "auto") -> Routing:
    """Softmax top-k routing.

    Args:
        logits: (T, E) router logits, any float dtype.
        top_k: K, 1 <= K <= E.
        renormalize: divide the K selected probabilities by their sum (Mixtral, H3Fusion).
        backend: "auto", "torch", "triton" or "cuda".
    Returns:
        Routing (weights (T, K) fp32, ids (T, K) int64 and the permutation metadata).
    """
    _validate.tensor("logits", logits, 2)
    _validate.top_k(top_k, logits.shape[1])
    be = _backend.resolve(backend, logits.device, "route")
    if be == "triton":
        from . import triton_routing

        return triton_routing.route(logits, top_k, renormalize)
    if be == "cuda":
        from . import cuda

        return cuda.route(logits, top_k, renormalize)
    return _route_torch(logits, top_k, renormalize)


def _route_with_gating_torch(
    logits: torch.Tensor, top_k: int, num_samples: int, attention_mask: torch.Tensor | None, renormalize: bool
) -> tuple[Routing, torch.Tensor]:
    """torch fallback of route_with_gating: one softmax serves the top-k and psum (it keeps (T, E) probs)."""
    T, E = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(dtype), dim=-1)  # (T, E)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # (T, K)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    counts, offsets, sorted_slots = sort_by_expert(ids, E)
    if attention_mask is not None:
        probs = probs * attention_mask.reshape(T, 1).to(dtype)
    psum = probs.reshape(num_samples, T // num_samples, E).sum(dim=1)  # (B, E)
    return Routing(weights, ids, counts, offsets, sorted_slots), psum


def route_with_gating(
    logits: torch.Tensor,
    top_k: int,
    num_samples: int,
    attention_mask: torch.Tensor | None = None,
    *,
    renormalize: bool = True,
    backend: str = "auto",
) -> tuple[Routing, torch.Tensor]:
    """Softmax top-k routing fused with the layer's gating-loss sums (H3Fusion training).

    The triton and cuda backends read the logits once forward (no (T, E) probabilities kept) and once
    backward: a single kernel adds the gradients through the weights and through psum.

    Args:
        logits: (T, E) or (B, S, E) router logits, any float dtype; T = num_samples * S, token t belongs to
            sample t // S.
        top_k: K, 1 <= K <= E.
        num_samples: B, the batch size (divides T).
        attention_mask: optional (B, S), 1 for real tokens; padding tokens add nothing to psum.
        renormalize: divide the K selected probabilities by their sum.
        backend: "auto", "torch", "triton" or "cuda" (the cuda backend hands E > 256, K > 8 or fp64 logits on,
            with one log line, as h3moe.route does).
    Returns:
        (Routing, psum (B, E) fp32 (fp64 for fp64 logits) = Σ over each sample's tokens of
        mask·softmax(logits)). Both differentiable w.r.t. the logits. h3moe.ops.losses.gating_loss_from_psums
        turns L layers' psums into the gating loss.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise ValueError("logits: expected a (T, E) or (B, S, E) tensor")
    logits = logits.reshape(-1, logits.shape[-1])
    _validate.tensor("logits", logits, 2)
    _validate.top_k(top_k, logits.shape[1])
    T = logits.shape[0]
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1 or T % num_samples:
        raise ValueError(f"num_samples: expected a positive int that divides T={T}, got {num_samples!r}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.numel() != T:
            raise ValueError(f"attention_mask: expected (B, S) with B*S = T = {T} positions")
    be = _backend.resolve(backend, logits.device, "route")
    if be == "cuda":
        from . import cuda

        ok, why = cuda.supports("route", logits, top_k=top_k)
        if ok:
            return cuda.route_with_gating(logits, top_k, num_samples, attention_mask, renormalize=renormalize)
        be = cuda._fallback_backend("route", logits.device, why)
    if be == "triton":
        from . import triton_routing

        return triton_routing.route_with_gating(logits, top_k, num_samples, attention_mask, renormalize=renormalize)
    return _route_with_gating_torch(logits, top_k, num_samples, attention_mask, renormalize)
