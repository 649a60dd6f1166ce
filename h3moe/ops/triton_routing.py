"""Triton backend of h3moe.route: fused softmax top-k routing plus the permutation metadata.

Custom ops (namespace h3moe, each with a fake implementation):
    h3moe::triton_route(logits (T, E), top_k, renormalize)
        -> weights (T, K) fp32 (fp64 for fp64 logits), ids (T, K) int64, counts (E,) int32,
           offsets (E+1,) int32, sorted_slots (T*K,) int32
    h3moe::triton_route_bwd(grad_weights (T, K), logits (T, E), ids (T, K), renormalize) -> (T, E) logits' dtype
The forward is two kernel launches (top-k + block histograms + last-block scan, then a counting-sort
scatter; see h3moe/kernels/routing.py) plus a 4-byte memset for the scan ticket. No host synchronization
and no data-dependent shapes: it can be captured in a CUDA graph and traced by torch.compile(fullgraph=True).

Ties: equal probabilities go to the lowest expert index first. torch.topk does not promise any order among
ties, so ids equal the torch backend's exactly when each row's K+1 largest probabilities are distinct.

E > 256 is beyond the kernel's register tile; route() then runs the torch backend's code (same Routing).
"""
from __future__ import annotations

import torch

from .. import _backend
from .routing import Routing, _route_torch

_backend.register_ops("triton", "route")

import triton  # noqa: E402  (after registering: a missing triton still leaves the op declared)

from ..kernels import routing as K  # noqa: E402

__all__ = ["route"]


def _weights_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("h3moe::triton_route", mutates_args=())
def _triton_route(
    logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    dev = logits.device
    weights = torch.empty(T, top_k, dtype=_weights_dtype(logits), device=dev)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    sorted_slots = torch.empty(T * top_k, dtype=torch.int32, device=dev)
    if T == 0:  # nothing to launch; counts and offsets are all zero
        counts.zero_()
        offsets.zero_()
        return weights, ids, counts, offsets, sorted_slots
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    e_pad = triton.next_power_of_2(E)
    block_t = K.block_t_for(e_pad)
    nb = triton.cdiv(T, block_t)
    num_warps = K.num_warps_for(e_pad)
    block_counts = torch.empty(nb, e_pad, dtype=torch.int32, device=dev)  # histograms, then block prefixes
    ticket = torch.zeros(1, dtype=torch.int32, device=dev)
    K.route_topk_kernel[(nb,)](
        logits, weights, ids, block_counts, counts, offsets, ticket,
        T, E, logits.stride(0), nb,
        K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t, BLOCK_B=16,  # scan rows/step
        RENORM=renormalize, FP64=logits.dtype == torch.float64,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    K.route_scatter_kernel[(nb,)](
        ids, block_counts, offsets, sorted_slots, T, E,
        K=top_k, E_PAD=e_pad, BLOCK_T=block_t, num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    return weights, ids, counts, offsets, sorted_slots


@_triton_route.register_fake
def _(logits, top_k, renormalize):
    T, E = logits.shape
    new = logits.new_empty
    return (
        new((T, top_k), dtype=_weights_dtype(logits)),
        new((T, top_k), dtype=torch.int64),
        new((E,), dtype=torch.int32),
        new((E + 1,), dtype=torch.int32),
        new((T * top_k,), dtype=torch.int32),
    )


@torch.library.custom_op("h3moe::triton_route_bwd", mutates_args=())
def _triton_route_bwd(
    grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, renormalize: bool
) -> torch.Tensor:
    T, E = logits.shape
    top_k = ids.shape[1]
    grad_logits = torch.empty(T, E, dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad_logits
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad_weights = grad_weights.to(_weights_dtype(logits)).contiguous()
    ids = ids.contiguous()
    e_pad = triton.next_power_of_2(E)
    block_t = K.block_t_for(e_pad)
    K.route_bwd_kernel[(triton.cdiv(T, block_t),)](
        grad_weights, logits, ids, grad_logits, T, E, logits.stride(0),
        K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t,
        RENORM=renormalize, FP64=logits.dtype == torch.float64,
        num_warps=K.num_warps_for(e_pad), num_stages=1,
    )  # fmt: skip
    return grad_logits


@_triton_route_bwd.register_fake
def _(grad_weights, logits, ids, renormalize):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, _top_k, renormalize = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.renormalize = renormalize


def _backward(ctx, grad_weights, *_int_grads):
    logits, ids = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None
    return torch.ops.h3moe.triton_route_bwd(grad_weights, logits, ids, ctx.renormalize), None, None


_triton_route.register_autograd(_backward, setup_context=_setup_context)


def route(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> Routing:
    """Softmax top-k routing on the Triton backend (arguments checked by h3moe.route).

    Args:
        logits: (T, E) router logits, any float dtype, on CUDA (or CPU under TRITON_INTERPRET=1).
        top_k: K, 1 <= K <= E.
        renormalize: divide the K selected probabilities by their sum.
    Returns:
        Routing, equal to the torch backend's (ties aside: see the module docstring).
    """
    if logits.shape[1] > K.MAX_EXPERTS:
        return _route_torch(logits, top_k, renormalize)
    weights, ids, counts, offsets, sorted_slots = torch.ops.h3moe.triton_route(logits, top_k, renormalize)
    return Routing(weights, ids, counts, offsets, sorted_slots)
