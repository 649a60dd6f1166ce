"""Triton backend of h3moe.route: fused softmax top-k routing plus the permutation metadata.

Custom ops (namespace h3moe, each with a fake implementation):
    h3moe::triton_route(logits (T, E), top_k, renormalize)
        -> weights (T, K) fp32 (fp64 for fp64 logits), ids (T, K) int64, counts (E,) int32,
           offsets (E+1,) int32, sorted_slots (T*K,) int32
    h3moe::triton_route_bwd(grad_weights (T, K), logits (T, E), ids (T, K), renormalize) -> (T, E) logits' dtype
    h3moe::triton_route_gating(logits (T, E), top_k, renormalize, num_samples B, mask (T,) or None)
        -> the five outputs of triton_route, and psum (B, E) fp32 (fp64 for fp64 logits)
           = Σ over each sample's tokens of mask·softmax(logits) (token t belongs to sample t // (T/B)),
           accumulated by the top-k kernel from the softmax it already holds (no (T, E) probabilities).
    h3moe::triton_route_gating_bwd(logits, ids, grad_weights or None, grad_psum (B, E) or None, mask, num_samples,
        renormalize) -> (T, E) logits' dtype: ONE pass over the logits adds the top-k gradient and the
        gating-loss gradient m_t·p_t⊙(dpsum_b − <dpsum_b, p_t>). Autograd of triton_route_gating calls it
        once with both gradients; it saves only the logits, ids (T, K) and the (T,) mask.
    h3moe::triton_sort_by_expert(ids (T, K), num_experts) -> counts (E,), offsets (E+1,), sorted_slots (T*K,)
        int32: the metadata of given ids (a (weights, ids) pair), with the same kernels minus the softmax.
The forward is two kernel launches (top-k + block histograms + last-block scan, then a counting-sort
scatter; see h3moe/kernels/routing.py) plus a 4-byte memset for the scan ticket; one launch where one program
holds every token (T <= BLOCK_T = 2048 / next_pow2(E) clamped to 8..64: decode), for route and sort_by_expert.
No host synchronization and no data-dependent shapes: it can be captured in a CUDA graph and traced by
torch.compile(fullgraph=True). The first call of each shape family also loads the path it did not take
(_load_both), so one warm-up still covers every token count under CUDA graphs.

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

__all__ = ["route", "route_with_gating", "sort_by_expert"]


def _token_blocks(T: int, E: int, dev):
    """The token-block partition of route_topk_kernel / ids_histogram_kernel and route_scatter_kernel:
    (E_PAD, BLOCK_T, programs nb, num_warps, block_counts (nb, E_PAD) int32 scratch for the block histograms
    then their prefixes, the last-block ticket (1,) int32 zeroed). One program (nb == 1: T <= BLOCK_T, 8-64
    tokens by E, every decode step) sorts in registers (ONE_BLOCK): no scratch, no ticket (None, None), no
    scatter launch."""
    e_pad = triton.next_power_of_2(E)
    block_t = K.block_t_for(e_pad)
    nb = triton.cdiv(T, block_t)
    if _one_block(nb):
        return e_pad, block_t, nb, K.num_warps_for(e_pad), None, None
    block_counts = torch.empty(nb, e_pad, dtype=torch.int32, device=dev)
    return e_pad, block_t, nb, K.num_warps_for(e_pad), block_counts, torch.zeros(1, dtype=torch.int32, device=dev)


#: Whether one-program routings sort in registers (ONE_BLOCK, one launch); tests turn it off to compare the
#: two paths.
ONE_BLOCK = True


def _one_block(nb: int) -> bool:
    return nb == 1 and ONE_BLOCK


#: Keys whose other routing path (one launch at T <= BLOCK_T, two beyond) is loaded (_load_both).
_BOTH: set = set()


def _dummy(T: int, N: int, device) -> torch.Tensor:
    """(T, N) int64 inputs for _load_both's run: arange, not random (the user's RNG stream stays untouched)."""
    return torch.arange(T * N, device=device).view(T, N)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _load_both(key: tuple, t: torch.Tensor, nb: int, other) -> None:
    """At the first call of `key` (an op and what its kernels are compiled for), run `other(T)` once on a
    dummy input of T tokens that takes the path this call did not (one program if this call had several, two
    programs if it had one), so that both are loaded: Triton loads a kernel at its first launch, which a CUDA
    graph capture does not allow, and one warm-up at any token count must keep covering every other one (as
    one warm-up per tile regime does for the experts). Outside a capture only (inside, nothing can load)."""
    if not ONE_BLOCK or key in _BOTH or not _on_gpu(t) or torch.cuda.is_current_stream_capturing():
        return
    _BOTH.add(key)
    block_t = K.block_t_for(triton.next_power_of_2(key[1]))
    other(block_t + 1 if nb == 1 else 1)


def _sort_by_expert_impl(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, nb = _sort_by_expert_launch(ids, num_experts)
    if nb:
        _load_both(("sort", num_experts, ids.shape[1], ids.device), ids, nb, lambda T: _sort_by_expert_launch(
            _dummy(T, ids.shape[1], ids.device) % num_experts, num_experts))
    return out


def _sort_by_expert_launch(ids: torch.Tensor, num_experts: int):
    """((counts, offsets, sorted_slots), programs launched: 0 when there was nothing to sort)."""
    T, top_k = ids.shape
    E, dev = num_experts, ids.device
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    sorted_slots = torch.empty(T * top_k, dtype=torch.int32, device=dev)
    if T == 0 or top_k == 0:
        counts.zero_()
        offsets.zero_()
        return (counts, offsets, sorted_slots), 0
    ids = ids.to(torch.int64).contiguous()
    e_pad, block_t, nb, num_warps, block_counts, ticket = _token_blocks(T, E, dev)
    one = block_counts is None  # ONE_BLOCK: the scratch and ticket pointers are never read
    K.ids_histogram_kernel[(nb,)](
        ids, counts if one else block_counts, counts, offsets, counts if one else ticket, sorted_slots, T, E, nb,
        K=top_k, E_PAD=e_pad, BLOCK_T=block_t, BLOCK_B=16, ONE_BLOCK=one, num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    if not one:
        K.route_scatter_kernel[(nb,)](
            ids, block_counts, offsets, sorted_slots, T, E, T, nb,
            K=top_k, E_PAD=e_pad, BLOCK_T=block_t, SAMPLE_BLOCKS=False, DUPS=True, num_warps=num_warps,
            num_stages=1,
        )  # fmt: skip
    return (counts, offsets, sorted_slots), nb


# the op; the implementation stays callable for eager calls (_backend.eager_direct)
_sort_by_expert = torch.library.custom_op("h3moe::triton_sort_by_expert", mutates_args=())(_sort_by_expert_impl)


@_sort_by_expert.register_fake
def _(ids, num_experts):
    T, top_k = ids.shape
    new = ids.new_empty
    return (new((num_experts,), dtype=torch.int32), new((num_experts + 1,), dtype=torch.int32),
            new((T * top_k,), dtype=torch.int32))


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h3moe.ops.routing.sort_by_expert on the Triton kernels of route() (block histograms, last-block scan,
    a stable counting-sort scatter: 2 launches and a 4-byte memset instead of torch's argsort and ~6 more; one
    launch when one program holds every token, as at decode),
    for ids that are given rather than routed here (transformers' experts interface passes them). A token may
    name an expert twice. ids (T, K) integer in [0, E), E <= 256 (beyond: torch). Returns counts (E,),
    offsets (E+1,), sorted_slots (T*K,), all int32, equal to the torch function's."""
    if num_experts > K.MAX_EXPERTS:
        from .routing import sort_by_expert as torch_sort

        return torch_sort(ids, num_experts)
    op = _sort_by_expert_impl if _backend.eager_direct(ids) else _sort_by_expert
    with _backend.device_guard(ids):
        return op(ids, num_experts)


def _weights_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _triton_route_impl(
    logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, nb = _route_launch(logits, top_k, renormalize)
    if nb:
        E = logits.shape[1]
        _load_both(("route", E, top_k, renormalize, logits.dtype, logits.device), logits, nb,
                   lambda T: _route_launch(_dummy(T, E, logits.device).to(logits.dtype), top_k, renormalize))
    return out


def _route_launch(logits: torch.Tensor, top_k: int, renormalize: bool):
    """((weights, ids, counts, offsets, sorted_slots), programs launched: 0 when there was nothing to route)."""
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
        return (weights, ids, counts, offsets, sorted_slots), 0
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    e_pad, block_t, nb, num_warps, block_counts, ticket = _token_blocks(T, E, dev)
    one = block_counts is None  # ONE_BLOCK: the scratch and ticket pointers are never read
    K.route_topk_kernel[(nb,)](
        logits, weights, ids, counts if one else block_counts, counts, offsets, counts if one else ticket,
        sorted_slots, logits, weights,  # no mask, no psum
        T, E, logits.stride(0), nb, T, nb,
        K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t, BLOCK_B=16,  # scan rows/step
        RENORM=renormalize, FP64=logits.dtype == torch.float64, PSUM=False, HAS_MASK=False, ONE_BLOCK=one,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    if not one:
        K.route_scatter_kernel[(nb,)](
            ids, block_counts, offsets, sorted_slots, T, E, T, nb,
            K=top_k, E_PAD=e_pad, BLOCK_T=block_t, SAMPLE_BLOCKS=False, num_warps=num_warps, num_stages=1,
        )  # fmt: skip
    return (weights, ids, counts, offsets, sorted_slots), nb


def _route_fake(logits, top_k):
    """Routing's outputs (weights, ids, counts, offsets, sorted_slots), shapes only."""
    T, E = logits.shape
    new = logits.new_empty
    return (
        new((T, top_k), dtype=_weights_dtype(logits)),
        new((T, top_k), dtype=torch.int64),
        new((E,), dtype=torch.int32),
        new((E + 1,), dtype=torch.int32),
        new((T * top_k,), dtype=torch.int32),
    )


# the op; the implementation stays callable for eager inference (_backend.eager_direct)
_triton_route = torch.library.custom_op("h3moe::triton_route", mutates_args=())(_triton_route_impl)


@_triton_route.register_fake
def _(logits, top_k, renormalize):
    return _route_fake(logits, top_k)


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
        grad_weights, logits, ids, grad_weights, logits, grad_logits, T, E, logits.stride(0), T,  # no psum
        K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t,
        RENORM=renormalize, FP64=logits.dtype == torch.float64, TOPK_GRAD=True, PSUM_GRAD=False, HAS_MASK=False,
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


# ----------------------------------------------------------------------------------------------------------
# Routing fused with the gating-loss sums (route_with_gating).


def _psum_block_t(e_pad: int, S: int) -> int:
    """Tokens per program with sample-aligned blocks: block_t_for(E_PAD), smaller for samples shorter than it
    (a program never covers two samples, so a long block over a short sample would be mostly padding)."""
    return min(K.block_t_for(e_pad), max(8, triton.next_power_of_2(S)))


@torch.library.custom_op("h3moe::triton_route_gating", mutates_args=())
def _triton_route_gating(
    logits: torch.Tensor, top_k: int, renormalize: bool, num_samples: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    B = num_samples
    dev = logits.device
    acc = _weights_dtype(logits)
    weights = torch.empty(T, top_k, dtype=acc, device=dev)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    sorted_slots = torch.empty(T * top_k, dtype=torch.int32, device=dev)
    if T == 0:  # nothing to launch: counts, offsets and the sums of no tokens are all zero
        counts.zero_()
        offsets.zero_()
        return weights, ids, counts, offsets, sorted_slots, torch.zeros(B, E, dtype=acc, device=dev)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    S = T // B
    e_pad = triton.next_power_of_2(E)
    block_t = _psum_block_t(e_pad, S)
    nbs = triton.cdiv(S, block_t)  # programs per sample
    nb = B * nbs
    num_warps = K.num_warps_for(e_pad)
    # Two launches even for one sample of at most BLOCK_T tokens (a training op; its one-launch form spilled
    # 8 B at E=32, K=8 with a mask, and the shorter samples' smaller BLOCK_T are compiles of their own anyway)
    block_counts = torch.empty(nb, e_pad, dtype=torch.int32, device=dev)  # histograms, then block prefixes
    ticket = torch.zeros(1, dtype=torch.int32, device=dev)
    psum_part = torch.empty(nb, e_pad, dtype=acc, device=dev)  # every row written
    K.route_topk_kernel[(nb,)](
        logits, weights, ids, block_counts, counts, offsets, ticket, sorted_slots,
        mask if mask is not None else logits, psum_part,
        T, E, logits.stride(0), nb, S, nbs,
        K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t, BLOCK_B=16,
        RENORM=renormalize, FP64=acc == torch.float64, PSUM=True, HAS_MASK=mask is not None,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    K.route_scatter_kernel[(nb,)](
        ids, block_counts, offsets, sorted_slots, T, E, S, nbs,
        K=top_k, E_PAD=e_pad, BLOCK_T=block_t, SAMPLE_BLOCKS=True, num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    # Per-sample sum of its nbs block partials: a fixed-order reduction, deterministic (no atomics).
    psum = psum_part.view(B, nbs, e_pad)[:, :, :E].sum(dim=1)
    return weights, ids, counts, offsets, sorted_slots, psum


@_triton_route_gating.register_fake
def _(logits, top_k, renormalize, num_samples, mask):
    psum = logits.new_empty((num_samples, logits.shape[1]), dtype=_weights_dtype(logits))
    return (*_route_fake(logits, top_k), psum)


@torch.library.custom_op("h3moe::triton_route_gating_bwd", mutates_args=())
def _triton_route_gating_bwd(
    logits: torch.Tensor,
    ids: torch.Tensor,
    grad_weights: torch.Tensor | None,
    grad_psum: torch.Tensor | None,
    mask: torch.Tensor | None,
    num_samples: int,
    renormalize: bool,
) -> torch.Tensor:
    T, E = logits.shape
    top_k = ids.shape[1]
    grad_logits = torch.empty(T, E, dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad_logits
    if grad_weights is None and grad_psum is None:
        return grad_logits.zero_()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    acc = _weights_dtype(logits)
    gw = grad_weights.to(acc).contiguous() if grad_weights is not None else None
    gp = grad_psum.to(acc).contiguous() if grad_psum is not None else None
    e_pad = triton.next_power_of_2(E)
    block_t = K.block_t_for(e_pad)
    dummy = gw if gw is not None else gp
    K.route_bwd_kernel[(triton.cdiv(T, block_t),)](
        dummy, logits, ids.contiguous(), gp if gp is not None else dummy, mask if mask is not None else logits,
        grad_logits, T, E, logits.stride(0), T // num_samples,
        K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t,
        RENORM=renormalize, FP64=acc == torch.float64,
        TOPK_GRAD=gw is not None, PSUM_GRAD=gp is not None, HAS_MASK=mask is not None,
        num_warps=K.num_warps_for(e_pad), num_stages=1,
    )  # fmt: skip
    return grad_logits


@_triton_route_gating_bwd.register_fake
def _(logits, ids, grad_weights, grad_psum, mask, num_samples, renormalize):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _gating_setup_context(ctx, inputs, output):
    logits, _top_k, renormalize, num_samples, mask = inputs
    ctx.save_for_backward(logits, output[1], mask)  # (T, E) logits (the caller's), (T, K) ids, (T,) mask
    ctx.renormalize, ctx.num_samples = renormalize, num_samples


def _gating_backward(ctx, grad_weights, _di, _dc, _do, _ds, grad_psum):
    logits, ids, mask = ctx.saved_tensors
    if grad_weights is None and grad_psum is None:
        return None, None, None, None, None
    d = torch.ops.h3moe.triton_route_gating_bwd(
        logits, ids, grad_weights, grad_psum, mask, ctx.num_samples, ctx.renormalize
    )
    return d, None, None, None, None


_triton_route_gating.register_autograd(_gating_backward, setup_context=_gating_setup_context)


def _mask_arg(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The (B, S) mask as a flat (T,) tensor in its own dtype (bool read as uint8): no fp32 copy."""
    if attention_mask is None:
        return None
    m = attention_mask.reshape(-1)
    if m.numel() != T:
        raise ValueError(f"attention_mask: {m.numel()} positions, router logits have {T} tokens")
    return (m.view(torch.uint8) if m.dtype == torch.bool else m).contiguous()


def route_with_gating(
    logits: torch.Tensor,
    top_k: int,
    num_samples: int,
    attention_mask: torch.Tensor | None = None,
    *,
    renormalize: bool = True,
) -> tuple[Routing, torch.Tensor]:
    """Routing plus this layer's gating-loss sums in one pass over the logits (arguments checked by
    h3moe.route_with_gating). Same semantics as h3moe.ops.cuda.route_with_gating.

    Args:
        logits: (T, E) or (B, S, E) router logits, T = num_samples * S (token t belongs to sample t // S).
        top_k: K, 1 <= K <= E.
        num_samples: B, divides T.
        attention_mask: optional (B, S) (any int / float / bool dtype); padding tokens add nothing to psum.
        renormalize: divide the K selected probabilities by their sum.
    Returns:
        (Routing, psum (B, E) fp32 (fp64 for fp64 logits) = Σ over each sample's tokens of mask·softmax).
        Both are differentiable; one backward kernel takes both gradients. gating_loss_from_psums
        (h3moe.ops.losses) turns L layers' psums into the loss.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    T, E = logits.shape
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1 or T % num_samples:
        raise ValueError(f"num_samples: {num_samples!r} does not divide T={T}")
    mask = _mask_arg(attention_mask, T)
    if E > K.MAX_EXPERTS:
        from .routing import _route_with_gating_torch

        return _route_with_gating_torch(logits, top_k, num_samples, attention_mask, renormalize)
    with _backend.device_guard(logits):
        w, ids, counts, offsets, sorted_slots, psum = torch.ops.h3moe.triton_route_gating(
            logits, top_k, renormalize, num_samples, mask
        )
    return Routing(w, ids, counts, offsets, sorted_slots), psum


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
    op = _triton_route_impl if _backend.eager_direct(logits) else _triton_route  # inference: no dispatcher
    with _backend.device_guard(logits):
        weights, ids, counts, offsets, sorted_slots = op(logits, top_k, renormalize)
    return Routing(weights, ids, counts, offsets, sorted_slots)
