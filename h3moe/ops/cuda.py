"""cuda backend: the kernels of csrc/ (libh3moe_cuda.so, plain C ABI) behind torch.library custom ops.

Ops (namespace h3moe::cuda_*, each with a fake for torch.compile / meta tensors):
    cuda_route_fwd(logits, top_k, renormalize, num_samples, mask) -> (weights, ids, counts, offsets,
        sorted_slots, psum): softmax top-k routing plus the permutation metadata, and (num_samples > 0) the
        gating-loss sums psum (B, E) = Σ_t∈b mask[t]·softmax(logits[t]), all in one pass over the logits.
        Autograd: cuda_route_bwd, one pass over the logits that adds the top-k gradient and the
        gating-loss gradient (when both outputs are used, they arrive in the same backward call).
    cuda_route_bwd(logits, ids, dweights, dpsum, mask, num_samples, renormalize) -> dlogits.
    cuda_moe_fwd(x, w_gate_up, w_down, weights, offsets, sorted_slots, activation, split_k) -> y: SwiGLU experts,
        mma.sync tensor cores, forward only (inference / decode).

Python API (same signatures as the other backends): route, moe, gating_loss; and route_with_gating
(routing plus the layer's psum, for a training loop that wants the fused gating loss), gating_loss_from_psums.

What the cuda backend does not run, it hands on with one log line (to Triton where it can run, else the
torch backend): routing with E > 256, K > 8 or float64 logits; moe when autograd needs its gradient
(no backward kernel here), for fp32/fp64 or for H, I not multiples of 8. `supports(op, ...)` says which.
Kernels run on torch's current CUDA stream; nothing synchronizes with the host.
"""
import functools
import logging
from typing import Optional

import torch

from .. import _backend, _lib
from ..reference import ACTIVATIONS
from .losses import gating_loss_from_psums
from .routing import Routing

__all__ = ["route", "moe", "gating_loss", "route_with_gating", "gating_loss_from_psums", "supports"]

log = logging.getLogger("h3moe")

_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ACT = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
MAX_EXPERTS = 256  # csrc/routing.cu kRouteMaxE
MAX_TOPK = 8  # csrc/routing.cu kRouteMaxK
#: Ops whose cuda kernels are forward-only: with autograd on they are handed on to triton / torch, so a
#: benchmark of their backward under the name "cuda" would time another backend.
INFERENCE_ONLY_OPS = ("moe",)


def _ptr(t: Optional[torch.Tensor]):
    return t.data_ptr() if t is not None and t.numel() > 0 else None


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _aligned(*ts: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


# ------------------------------------------------------------------------------------------------------
# custom ops
def _route_fwd_impl(
    logits: torch.Tensor, top_k: int, renormalize: bool, num_samples: int, mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (T, E) contiguous; top_k 0..8 (0: psum only); num_samples B (0: no psum), B divides T;
    mask (T,) fp32 or None. Returns weights (T, K) fp32, ids (T, K) int64, counts (E,), offsets (E+1,),
    sorted_slots (T*K,) int32, psum (B, E) fp32."""
    T, E = logits.shape
    K, dev = top_k, logits.device
    weights = torch.empty(T, K, dtype=torch.float32, device=dev)
    ids = torch.empty(T, K, dtype=torch.int64, device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    sorted_slots = torch.empty(T * K, dtype=torch.int32, device=dev)
    psum = torch.zeros(num_samples, E, dtype=torch.float32, device=dev)
    if T == 0 or (K == 0 and num_samples == 0):
        return weights, ids, counts, offsets, sorted_slots, psum
    lib = _lib.load()
    ws_bytes = lib.h3moe_sort_workspace_bytes(T * K, E) if K > 0 else 0
    ws = torch.empty(max(1, (ws_bytes + 3) // 4), dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        _lib.call(
            "h3moe_route_fwd", logits.data_ptr(), _DTYPE[logits.dtype], T, E, K, int(renormalize),
            _ptr(weights), _ptr(ids), T // num_samples if num_samples else 1, _ptr(mask),
            _ptr(psum) if num_samples else None, _ptr(counts) if K else None, _ptr(offsets) if K else None,
            _ptr(sorted_slots), _ptr(ws), ws.numel() * 4, _stream(dev),
        )
    return weights, ids, counts, offsets, sorted_slots, psum


# the op; the implementation stays callable for eager inference (_backend.eager_direct)
_route_fwd_op = torch.library.custom_op("h3moe::cuda_route_fwd", mutates_args=())(_route_fwd_impl)


@_route_fwd_op.register_fake
def _(logits, top_k, renormalize, num_samples, mask):
    T, E = logits.shape
    f32, i32 = torch.float32, torch.int32
    return (logits.new_empty(T, top_k, dtype=f32), logits.new_empty(T, top_k, dtype=torch.int64),
            logits.new_empty(E, dtype=i32), logits.new_empty(E + 1, dtype=i32),
            logits.new_empty(T * top_k, dtype=i32), logits.new_empty(num_samples, E, dtype=f32))


@torch.library.custom_op("h3moe::cuda_route_bwd", mutates_args=())
def _route_bwd_op(
    logits: torch.Tensor, ids: torch.Tensor, dweights: Optional[torch.Tensor], dpsum: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], num_samples: int, renormalize: bool,
) -> torch.Tensor:
    """d(logits) (T, E) in logits' dtype from dweights (T, K) fp32 and/or dpsum (B, E) fp32, one pass."""
    T, E = logits.shape
    K = ids.shape[1]
    dev = logits.device
    if dweights is None and dpsum is None:
        return torch.zeros_like(logits)
    dlogits = torch.empty_like(logits)
    if T == 0:
        return dlogits
    dw = dweights.float().contiguous() if dweights is not None else None
    dp = dpsum.float().contiguous() if dpsum is not None else None
    with torch.cuda.device(dev):
        _lib.call(
            "h3moe_route_bwd", logits.data_ptr(), _DTYPE[logits.dtype], T, E, K if dw is not None else 0,
            int(renormalize), _ptr(ids), _ptr(dw), T // num_samples if num_samples else 1, _ptr(mask),
            _ptr(dp), dlogits.data_ptr(), _stream(dev),
        )
    return dlogits


@_route_bwd_op.register_fake
def _(logits, ids, dweights, dpsum, mask, num_samples, renormalize):
    return torch.empty_like(logits)


def _route_setup_context(ctx, inputs, output):
    logits, top_k, renormalize, num_samples, mask = inputs
    ctx.save_for_backward(logits, output[1], mask)
    ctx.renormalize, ctx.num_samples, ctx.top_k = renormalize, num_samples, top_k


def _route_backward(ctx, dweights, _dids, _dcounts, _doffsets, _dsorted, dpsum):
    logits, ids, mask = ctx.saved_tensors
    if ctx.top_k == 0:
        dweights = None
    if ctx.num_samples == 0:
        dpsum = None
    return _route_bwd_op(logits, ids, dweights, dpsum, mask, ctx.num_samples, ctx.renormalize), None, None, None, None


_route_fwd_op.register_autograd(_route_backward, setup_context=_route_setup_context)


def _moe_fwd_impl(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
    offsets: torch.Tensor, sorted_slots: torch.Tensor, activation: str, split_k: int = 0,
) -> torch.Tensor:
    """x (T, H), w_gate_up (E, 2I, H), w_down (E, H, I) fp16/bf16, contiguous, 16-byte aligned; weights
    (T, K) fp32; offsets (E+1,), sorted_slots (T*K,) int32 → y (T, H). Forward only. split_k: 0 = auto."""
    T, H = x.shape
    E, I = w_down.shape[0], w_down.shape[2]
    K = weights.shape[1]
    dev = x.device
    y = torch.empty_like(x)
    if T == 0:
        return y
    dt = _DTYPE[x.dtype]
    ws_bytes = _lib.load().h3moe_moe_workspace_bytes(dt, T, H, I, E, K, split_k)
    # act(gate)·up rows, split-K partials, weighted down rows: no initialization needed
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        _lib.call(
            "h3moe_moe_fwd", x.data_ptr(), dt, T, H, I, E, K, w_gate_up.data_ptr(), w_down.data_ptr(),
            weights.data_ptr(), offsets.data_ptr(), sorted_slots.data_ptr(), _ACT[activation], split_k,
            ws.data_ptr(), ws_bytes, y.data_ptr(), _stream(dev),
        )
    return y


_moe_fwd_op = torch.library.custom_op("h3moe::cuda_moe_fwd", mutates_args=())(_moe_fwd_impl)


@_moe_fwd_op.register_fake
def _(x, w_gate_up, w_down, weights, offsets, sorted_slots, activation, split_k=0):
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------------------
# capability checks and fallbacks
def supports(op: str, *tensors: torch.Tensor, top_k: int = 1) -> tuple[bool, str]:
    """(True, "") if the cuda kernels run `op` on these arguments, else (False, why).

    route: (logits,), top_k=K · moe: (x, w_gate_up, w_down) · gating_loss: (one layer's logits,).
    """
    ok, why = _lib.status()
    if not ok:
        return False, why
    t0 = tensors[0]
    if t0.device.type != "cuda":
        return False, f"needs CUDA tensors, got {t0.device.type}"
    if op in ("route", "gating_loss"):
        E = t0.shape[-1]
        if t0.dtype not in _DTYPE:
            return False, f"logits dtype {t0.dtype} (fp32/fp16/bf16 only)"
        if E > MAX_EXPERTS:
            return False, f"E={E} > {MAX_EXPERTS}"
        if op == "route" and top_k > MAX_TOPK:
            return False, f"top_k={top_k} > {MAX_TOPK}"
        return True, ""
    if op == "moe":
        x, w_gate_up, w_down = tensors[:3]
        if x.dtype not in (torch.float16, torch.bfloat16):
            return False, f"dtype {x.dtype} (fp16/bf16 only: tensor cores)"
        H, I = x.shape[1], w_down.shape[2]
        if H % 8 or I % 8:
            return False, f"H={H}, I={I} must be multiples of 8 (16-byte loads)"
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False, "autograd needs a gradient and the cuda experts kernel is forward-only"
        return True, ""
    return False, f"op {op!r} not implemented by the cuda backend"


@functools.lru_cache(maxsize=None)
def _log_once(msg: str) -> None:
    log.warning(msg)


def _fallback_backend(op: str, device: torch.device, why: str) -> str:
    be = "triton" if _backend._can_run("triton", op, device)[0] else "torch"
    _log_once(f"h3moe cuda backend: {op} falls back to {be} ({why})")
    return be


# ------------------------------------------------------------------------------------------------------
# public API
def route(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> Routing:
    """Softmax top-k routing (see h3moe.route): weights (T, K) fp32 differentiable, ids, metadata."""
    ok, why = supports("route", logits, top_k=top_k)
    if not ok:
        if _fallback_backend("route", logits.device, why) == "triton":
            from . import triton_routing

            return triton_routing.route(logits, top_k, renormalize)
        from .routing import _route_torch

        return _route_torch(logits, top_k, renormalize)
    op = _route_fwd_impl if _backend.eager_direct(logits) else _route_fwd_op  # inference: no dispatcher
    w, ids, counts, offsets, sorted_slots, _ = op(logits.contiguous(), top_k, renormalize, 0, None)
    return Routing(w, ids, counts, offsets, sorted_slots)


def _token_mask(attention_mask: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
    if attention_mask is None:
        return None
    m = attention_mask.reshape(-1).to(torch.float32).contiguous()
    if m.numel() != T:
        raise ValueError(f"attention_mask: {m.numel()} positions, router logits have {T} tokens")
    return m


def route_with_gating(
    logits: torch.Tensor, top_k: int, num_samples: int, attention_mask: Optional[torch.Tensor] = None,
    *, renormalize: bool = True,
) -> tuple[Routing, torch.Tensor]:
    """Routing plus this layer's gating-loss sums, in one pass over the logits (no (T, E) probabilities).

    Args:
        logits: (T, E) router logits, T = num_samples * S (token t belongs to sample t // S).
        attention_mask: optional (B, S); padding tokens add nothing to psum.
    Returns:
        (Routing, psum (B, E) fp32 = Σ over each sample's tokens of mask·softmax(logits)). Both are
        differentiable; their gradients reach the logits in one backward kernel. Turn psums of L layers
        into the loss with gating_loss_from_psums.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    T = logits.shape[0]
    if num_samples < 1 or T % num_samples:
        raise ValueError(f"num_samples: {num_samples} does not divide T={T}")
    ok, why = supports("route", logits, top_k=top_k)
    if not ok:
        raise _backend.BackendUnavailable(f"route_with_gating: {why}")
    mask = _token_mask(attention_mask, T)
    w, ids, counts, offsets, sorted_slots, psum = _route_fwd_op(
        logits.contiguous(), top_k, renormalize, num_samples, mask)
    return Routing(w, ids, counts, offsets, sorted_slots), psum


class _PsumAllLayers(torch.autograd.Function):
    """psum (L*B, E) of L same-shaped layers with one routing-kernel launch each way (K = 0). Keeps for the
    backward only what the caller holds (the layers' logits, the mask): no concatenated (L*T, E) copy."""

    @staticmethod
    def forward(ctx, attention_mask, B, *flat):
        L, T = len(flat), flat[0].shape[0]
        ctx.B = B
        ctx.save_for_backward(attention_mask, *flat)
        m = None if attention_mask is None else attention_mask.reshape(B, -1).repeat(L, 1)  # (L*B, S)
        with torch.no_grad():
            out = _route_fwd_op(torch.cat(flat, 0).contiguous(), 0, False, L * B, _token_mask(m, L * T))
        ctx.ids = out[1]  # (L*T, 0): no slots with K = 0
        return out[5]

    @staticmethod
    def backward(ctx, dpsum):
        attention_mask, *flat = ctx.saved_tensors
        L, T = len(flat), flat[0].shape[0]
        m = None if attention_mask is None else attention_mask.reshape(ctx.B, -1).repeat(L, 1)
        d = _route_bwd_op(torch.cat(flat, 0).contiguous(), ctx.ids, None, dpsum.contiguous(),
                          _token_mask(m, L * T), L * ctx.B, False)
        return (None, None, *d.split(T, 0))


def gating_loss(layers, labels, attention_mask=None, variant: str = "paper") -> torch.Tensor:
    """H3Fusion gating loss (reference.gating_loss_ref): p̄ (B, E) accumulated by the routing kernel with
    K = 0 (no (T, E) probabilities kept); backward by the routing backward kernel."""
    layers = list(layers)
    for g in layers:
        ok, why = supports("gating_loss", g)
        if not ok:
            if _fallback_backend("gating_loss", g.device, why) == "triton":
                from . import triton_gating

                return triton_gating.gating_loss(layers, labels, attention_mask, variant)
            from ..reference import gating_loss_ref

            return gating_loss_ref(layers, labels, attention_mask, variant)
    B = labels.shape[0]
    flat = [g.reshape(-1, g.shape[-1]) for g in layers]  # L × (B*S, E)
    L, T = len(flat), flat[0].shape[0]
    if L > 1 and all(f.shape == flat[0].shape and f.dtype == flat[0].dtype for f in flat):
        # All L layers in one launch each way (per-layer launches were launch-bound on an H100): the layers'
        # logits concatenated are L·B samples of S tokens. The concatenation is a temporary of each pass.
        psum = _PsumAllLayers.apply(attention_mask, B, *flat)  # (L*B, E)
        return gating_loss_from_psums(list(psum.view(L, B, -1).unbind(0)), labels, attention_mask, variant, T // B)
    psums = [_route_fwd_op(f.contiguous(), 0, False, B, _token_mask(attention_mask, T))[5] for f in flat]
    return gating_loss_from_psums(psums, labels, attention_mask, variant, T // B)


def moe(x, w_gate_up, w_down, routing: Routing, activation: str = "silu", recompute=None) -> torch.Tensor:
    """SwiGLU experts (see h3moe.moe) with the mma.sync kernels; forward only — with autograd on, or for
    dtypes / sizes the kernels do not take, it falls back (one log line)."""
    ok, why = supports("moe", x, w_gate_up, w_down, routing.weights)
    gated = w_gate_up.shape[1] == 2 * w_down.shape[2]
    if ok and (activation not in _ACT or not gated):
        ok, why = False, "relu2 or ungated experts (no cuda kernel)"
    if not ok:
        if _fallback_backend("moe", x.device, why) == "triton":
            from . import triton_experts

            return triton_experts.moe(x, w_gate_up, w_down, routing, activation, recompute)
        from .experts import _moe_torch

        return _moe_torch(x, w_gate_up, w_down, routing, activation, None, gated)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    x, w_gate_up, w_down = (t.contiguous() for t in (x, w_gate_up, w_down))
    x, w_gate_up, w_down = (t if _aligned(t) else t.clone() for t in (x, w_gate_up, w_down))
    op = _moe_fwd_impl if _backend.eager_direct(x, w_gate_up, w_down) else _moe_fwd_op  # no dispatcher
    return op(
        x, w_gate_up, w_down, routing.weights.to(torch.float32).contiguous(),
        routing.offsets.to(torch.int32).contiguous(), routing.sorted_slots.to(torch.int32).contiguous(),
        activation,
    )


_backend.register_ops("cuda", "route", "moe", "gating_loss")
