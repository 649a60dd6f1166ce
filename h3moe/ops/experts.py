"""h3moe.moe: SwiGLU experts over the fused layout, gather → gate_up GEMM → act(gate)·up → down GEMM →
routing weight → combine of the K slots.

The torch backend lives here: rows sorted by expert (Routing.sorted_slots), two grouped matmuls
(`torch.nn.functional.grouped_mm` where it runs, a batched gather-weights fallback elsewhere), a
deterministic combine (each slot's row written once, then a sum over K in fp32). No per-expert Python
loop and no host synchronization. triton: h3moe.ops.triton_experts; cuda: h3moe.ops.cuda.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _backend, _validate
from .._amp import autocast_inputs
from ..reference import ACTIVATIONS, glu_ref
from .routing import Routing, as_routing

__all__ = ["moe", "grouped_mm"]

_HAS_GROUPED_MM = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _torch_grouped_mm(a, b, offs):
    fn = F.grouped_mm if hasattr(F, "grouped_mm") else torch._grouped_mm
    return fn(a, b, offs=offs)


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs(device_type: str, device_index, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype) whether torch's grouped matmul runs (it does not for float64, nor
    for every dtype on every GPU)."""
    if not _HAS_GROUPED_MM:
        return False
    try:
        dev = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
        a = torch.randn(4, 8, device=dev).to(dtype)
        b = torch.randn(2, 8, 8, device=dev).to(dtype)
        offs = torch.tensor([1, 4], dtype=torch.int32, device=dev)
        _torch_grouped_mm(a, b, offs)
        _torch_grouped_mm(a.t(), a[:, :8], offs)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _aligned(*ts: torch.Tensor) -> bool:
    """torch's grouped matmul wants 16-byte aligned pointers and strides."""
    compiling = torch.compiler.is_compiling()  # no data pointers on fake tensors
    for t in ts:
        size = t.element_size()
        if (not compiling and t.data_ptr() % 16) or any((s * size) % 16 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1):
            return False
    return True


def _use_torch_gmm(t: torch.Tensor, *others: torch.Tensor) -> bool:
    if not _aligned(t, *others):
        return False
    if torch.compiler.is_compiling():
        # grouped_mm's compile-time checks accept bf16 only; other dtypes take the batched path under compile.
        return _HAS_GROUPED_MM and t.dtype == torch.bfloat16
    return _grouped_mm_runs(t.device.type, t.device.index, t.dtype)


def _row_groups(offs: torch.Tensor, S: int) -> torch.Tensor:
    """(S,) int64 group of each row, from the cumulative ends offs (E,), on the device."""
    return torch.searchsorted(offs.long(), torch.arange(S, device=offs.device), right=True)


def _gmm_fwd(a, b, offs):
    """a (S, D) rows sorted by group, b (E, D, N), offs (E,) int32 cumulative ends → (S, N)."""
    if _use_torch_gmm(a, b):
        return _torch_grouped_mm(a, b, offs)
    g = _row_groups(offs, a.shape[0])
    return torch.bmm(a.unsqueeze(1), b.index_select(0, g)).squeeze(1)


def _gmm_weight_grad(a, dy, offs, E):
    """Σ over each group's rows of aᵀ·dy: a (S, D), dy (S, N) → (E, D, N)."""
    if _use_torch_gmm(a, dy):
        return _torch_grouped_mm(a.t(), dy, offs)
    g = _row_groups(offs, a.shape[0])
    out = a.new_zeros(E, a.shape[1], dy.shape[1])
    return out.index_add_(0, g, a.unsqueeze(2) * dy.unsqueeze(1))


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        return _gmm_fwd(a, b, offs)

    @staticmethod
    def backward(ctx, dy):
        a, b, offs = ctx.saved_tensors
        dy = dy.contiguous()
        da = _gmm_fwd(dy, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        db = None
        if ctx.needs_input_grad[1]:
            if b.stride(1) == 1 and b.stride(2) != 1:
                # b is the transposed view of a row-major weight w (E, N, D) (how the experts call this):
                # compute dw = Σ dyᵀ·a in w's own layout, so that AccumulateGrad keeps it without a copy
                # (a row-major (E, D, N) result would be copied into w's layout: 2.8 GB moved per
                # Mixtral-8x7B layer)
                db = _gmm_weight_grad(dy, a, offs, b.shape[0]).transpose(1, 2)
            else:
                db = _gmm_weight_grad(a, dy, offs, b.shape[0])
        return da, db, None


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Differentiable grouped matmul: a (S, D) rows sorted by group, b (E, D, N), offs (E,) int32
    cumulative row ends → (S, N). Row r of group e is a[r] @ b[e]."""
    return _GroupedMM.apply(a, b, offs)


def _act_and_grad(g: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(g), act'(g)) for the ACTIVATIONS of h3moe.reference, in g's dtype."""
    if activation == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * torch.exp(-0.5 * g * g) * 0.3989422804014327
    if activation == "gelu_tanh":
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        th = torch.tanh(inner)
        d_inner = 0.7978845608028654 * (1 + 3 * 0.044715 * g * g)
        return 0.5 * g * (1 + th), 0.5 * (1 + th) + 0.5 * g * (1 - th * th) * d_inner
    if activation == "relu":
        return torch.relu(g), (g > 0).to(g.dtype)
    if activation == "relu2":
        r = torch.relu(g)
        return r * r, 2 * r
    raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")


class _GLU(torch.autograd.Function):
    """a = act(h[:, :I]) * h[:, I:] for h (S, 2I), keeping only h for the backward, which writes d(h) into one
    (S, 2I) buffer (autograd of the sliced expression keeps act(gate) too, and its two SliceBackward nodes
    allocate, zero and add two more (S, 2I) tensors). silu: torch's fused silu_backward; the other
    activations: an fp32 chain (one rounding, more passes). With a swiglu_limit L the gate is min(gate, L)
    and the up clamp(up, -L, L) (reference.glu_ref), their gradients zero outside the bounds (torch.clamp's)."""

    @staticmethod
    def forward(ctx, h, activation, limit=None):
        ctx.save_for_backward(h)
        ctx.activation, ctx.limit = activation, limit
        I = h.shape[1] // 2
        return glu_ref(h[:, :I], h[:, I:], activation, limit)

    @staticmethod
    def backward(ctx, da):
        (h,) = ctx.saved_tensors
        I = h.shape[1] // 2
        L = ctx.limit
        g, u = h[:, :I], h[:, I:]
        if L is not None:
            g_in, u_in = (g <= L), (u >= -L) & (u <= L)  # torch.clamp's gradient masks (NaN: outside)
            g, u = g.clamp(max=L), u.clamp(min=-L, max=L)
        if ctx.activation == "silu":
            # eager autograd's own fused kernels, writing straight into the two halves of d(h): 4 passes over
            # (S, I) in h's dtype (silu_backward computes in fp32 inside; d(up) and the gate's incoming
            # gradient are rounded to h's dtype once each, as eager rounds them), where the fp32 chain below
            # moves ~5x the bytes (~15 GB against ~3 GB for Mixtral-8x7B at 4096 tokens, K=2)
            if torch.compiler.is_compiling() or L is not None:  # (dynamo takes no strided out=)
                dg, du = torch.ops.aten.silu_backward(da * u, g), da * F.silu(g)
                if L is not None:
                    dg, du = dg.masked_fill(~g_in, 0), du.masked_fill(~u_in, 0)
                return torch.cat([dg, du], dim=1), None, None
            dh = torch.empty_like(h)
            torch.ops.aten.silu_backward(da * u, g, grad_input=dh[:, :I])
            torch.mul(da, F.silu(g), out=dh[:, I:])
            return dh, None, None
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        g, u, da = g.to(acc), u.to(acc), da.to(acc)
        act, dact = _act_and_grad(g, ctx.activation)
        dg, du = da * u * dact, da * act
        if L is not None:
            dg, du = dg.masked_fill(~g_in, 0), du.masked_fill(~u_in, 0)
        dh = torch.empty_like(h)
        dh[:, :I] = dg
        dh[:, I:] = du
        return dh, None, None


def _moe_torch(x, w_gate_up, w_down, routing: Routing, activation: str, swiglu_limit=None,
               gated: bool = True) -> torch.Tensor:
    T, H = x.shape
    K = routing.top_k
    I = w_down.shape[2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    order = routing.sorted_slots.long()  # (S,) S = T*K, flat slot t*K+k sorted by expert
    offs = routing.offsets[1:]  # (E,) cumulative row ends
    xs = x.index_select(0, order // K)  # (S, H) gathered tokens
    h = grouped_mm(xs, w_gate_up.transpose(1, 2), offs)  # (S, 2I); ungated (S, I)
    a = _GLU.apply(h, activation, swiglu_limit) if gated else ACTIVATIONS[activation](h)  # (S, I)
    o = grouped_mm(a, w_down.transpose(1, 2), offs)  # (S, H)
    w = routing.weights.reshape(-1).index_select(0, order).to(acc)  # (S,)
    o = o.to(acc) * w.unsqueeze(1)
    slots = o.new_empty(o.shape).index_copy(0, order, o)  # (T*K, H) back in slot order, each row once
    return slots.view(T, K, H).sum(dim=1).to(x.dtype)


def _cuda_moe_pays(T: int, E: int) -> bool:
    """Whether "auto" should take the cuda expert kernels (mma.sync, weight-streaming decode) over Triton.
    From bench/results/h100-80gb-hbm3-2026-11-27-run1.md: cuda beat Triton only at T=1 with many small experts (OLMoE
    E=64: 0.175 vs 0.332 ms; Qwen3 E=128: 0.101 vs 0.174 ms) and lost everywhere else (T=1 Mixtral
    0.42 vs 0.26 ms; 7x slower at 4096 tokens)."""
    return T <= 2 and E >= 32


def moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing,
    *,
    activation: str = "silu",
    backend: str = "auto",
    recompute: bool | None = None,
    swiglu_limit: float | None = None,
    gated: bool = True,
) -> torch.Tensor:
    """SwiGLU mixture of experts.

    Args:
        x: (T, H) tokens.
        w_gate_up: (E, 2I, H) gate rows first, then up rows (transformers 5.x fused layout).
        w_down: (E, H, I).
        routing: a Routing from h3moe.route, or a (weights (T, K), ids (T, K)) pair.
        activation: "silu" (SwiGLU), "gelu", "gelu_tanh", "relu" or "relu2" (squared ReLU), applied to the gate
            half (ungated: to the up projection).
        backend: "auto", "torch", "triton" or "cuda".
        recompute: training memory of the Triton backward (also cuda's, which trains through it): False keeps
            the (T*K, 2I) gate/up pre-activation for the backward, True recomputes it there instead (less
            memory, +33% backward FLOPs); None: H3MOE_RECOMPUTE=1 means True. The torch backend keeps what
            autograd keeps.
        swiglu_limit: None, or L > 0: the clamped SwiGLU of DeepSeek-V4, GLM-5 and Hunyuan-V4 (their
            `swiglu_limit`), act(min(gate, L)) * clamp(up, -L, L) (reference.glu_ref). The cuda backend
            leaves it to Triton.
        gated: False for experts without a gate projection (Nemotron-H: down(relu2(up))): w_gate_up is then
            w_up (E, I, H) and the activation applies to it. The cuda backend leaves it to Triton.
    Returns:
        (T, H) in x's dtype (under torch.autocast, fp32 or fp16 x and weights are cast to its dtype first, as for
        torch.nn.functional.linear: the output is then in that dtype); differentiable w.r.t. x, both weight
        tensors and the routing weights.
    """
    T, H, E, I = _validate.experts(x, w_gate_up, w_down, gated)
    _validate.activation(activation)
    swiglu_limit = _validate.swiglu_limit(swiglu_limit, gated)
    x, w_gate_up, w_down = autocast_inputs(x, w_gate_up, w_down)  # torch.autocast: to its dtype (not fp64)
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"w_gate_up/w_down: dtypes {w_gate_up.dtype}/{w_down.dtype} differ from x's {x.dtype}")
    be = _backend.resolve(backend, x.device, "moe")
    if be == "cuda" and (swiglu_limit is not None or not gated or activation == "relu2" or (
            backend == "auto" and _backend.auto_requested() and not _cuda_moe_pays(T, E))):
        # (the cuda kernels have no clamped SwiGLU, ungated experts or relu2: Triton runs them, as it does
        # where cuda does not pay)
        be = "triton" if _backend.runs("triton", "moe", x.device) else "torch"
    # a (weights, ids) pair gets its sort metadata from the Triton kernels where the GPU backends run
    sort_be = "triton" if be in ("triton", "cuda") and _backend.runs("triton", "route", x.device) else "torch"
    routing = as_routing(routing, E, sort_be)
    _validate.routing(routing.weights, routing.ids, T, E)
    if be == "triton":
        from . import triton_experts

        return triton_experts.moe(x, w_gate_up, w_down, routing, activation, recompute, swiglu_limit)
    if be == "cuda":
        from . import cuda

        return cuda.moe(x, w_gate_up, w_down, routing, activation, recompute)
    return _moe_torch(x, w_gate_up, w_down, routing, activation, swiglu_limit, gated)
