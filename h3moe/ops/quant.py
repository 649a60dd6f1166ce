"""h3moe.quant_moe: SwiGLU experts whose fused weights are bitsandbytes-packed (NF4 / FP4 / int8).

Backends: triton (h3moe/kernels/quant.py: dequantize in registers inside the grouped GEMM, never to global
memory; kernels/quant.py's quant_kernel picks the kernels per call, 4-bit and int8 alike: fp16 / bf16
activations from 2 tokens on the tensor-core kernels, one token (and fp32 up to 16) the GEMV decode kernels,
fp32 above 16 the tl.dot kernels; the GEMV and tensor-core down kernels split I into fp32 partials and end with
h3moe/ops/combine.py, which sums the partials and each token's K slots into y in one pass), torch (the CPU /
fallback path: dequantize ONE expert at a time with `dequantize`, which equals bitsandbytes' dequantize_4bit /
int8_vectorwise_dequant, then that expert's rows; a per-expert loop with a host sync, fine for a fallback).
Inference only (no autograd through packed weights).

`Packed` is the layout both backends read; h3moe.integrations.bitsandbytes builds it (quantize, take over
bnb Linear4bit / Linear8bitLt experts, save / load). Nothing here needs bitsandbytes.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional

import torch

from .. import _backend, _validate
from .._amp import autocast_inputs
from ..reference import glu_ref
from .combine import combine
from .routing import Routing, as_routing
from .triton_experts import _arch  # compute capability as 80, 90, ... (cached); 90 off the GPU

__all__ = ["Packed", "quant_moe", "dequantize", "dequantize_absmax"]

_backend.register_ops("triton", "quant_moe")


class Packed(NamedTuple):
    """One fused expert tensor (E, N, Kd), quantized per expert in bitsandbytes' layout.

    4-bit ("nf4" / "fp4"): qweight (E, N*Kd/2) uint8 (element 2j in the high nibble of byte j);
        absmax (E, NB) fp32, NB = N*Kd/blocksize — or, nested, uint8 codes with absmax2 (E, ceil(NB/256))
        fp32, code2 (256,) fp32 and offset (E,) fp32; code (16,) fp32 table.
    "int8": qweight (E, N, Kd) int8; absmax (E, N) fp32 row absmax (bitsandbytes' row stats).
    """

    quant_type: str  # "nf4" | "fp4" | "int8"
    shape: tuple  # (E, N, Kd)
    blocksize: int  # 0 for int8
    qweight: torch.Tensor
    absmax: torch.Tensor
    code: Optional[torch.Tensor] = None
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    @property
    def bits(self) -> int:
        return 8 if self.quant_type == "int8" else 4

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


# ---------------------------------------------------------------------------------------------------------
# torch dequantization (equal to bitsandbytes' default / CPU ops)

def dequantize_absmax(p: Packed, e: int | None = None) -> torch.Tensor:
    """fp32 absmax (NB,) of expert e (or (E, NB) for all): bitsandbytes' nested dequant
    (dequantize_blockwise(code2[u8] * absmax2 per 256 blocks) + offset) when nested."""
    if not p.nested:
        return p.absmax if e is None else p.absmax[e]
    q = p.absmax if e is None else p.absmax[e : e + 1]  # (E', NB) uint8
    nb = q.shape[1]
    scale = p.absmax2 if e is None else p.absmax2[e : e + 1]  # (E', NB2)
    scale = scale.repeat_interleave(256, dim=1)[:, :nb]
    off = p.offset if e is None else p.offset[e : e + 1]
    out = p.code2[q.long()] * scale  # fp32, as dequantize_blockwise
    out = out + off.view(-1, 1)
    return out if e is None else out[0]


def dequantize(p: Packed, e: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Expert e's (N, Kd) matrix (or all (E, N, Kd)) in dtype; values computed in fp32 and cast once, as
    bitsandbytes' dequantize_4bit / int8_vectorwise_dequant compute them."""
    E, N, Kd = p.shape
    if p.bits == 8:
        q = p.qweight if e is None else p.qweight[e : e + 1]  # (E', N, Kd) int8
        s = p.absmax if e is None else p.absmax[e : e + 1]  # (E', N)
        out = (q * s.unsqueeze(-1)) * 7.874015718698502e-3  # bitsandbytes' 1/127
        out = out.to(dtype)
        return out if e is None else out[0]
    q = p.qweight if e is None else p.qweight[e : e + 1]  # (E', N*Kd/2) uint8
    amax = dequantize_absmax(p, e)
    amax = amax if e is None else amax.unsqueeze(0)  # (E', NB)
    b = q.long()
    idx = torch.stack((b >> 4, b & 15), dim=-1).reshape(q.shape[0], -1)  # (E', N*Kd) high nibble first
    vals = p.code[idx].view(q.shape[0], -1, p.blocksize) * amax.unsqueeze(-1)  # (E', NB, blocksize) fp32
    out = vals.reshape(q.shape[0], N, Kd).to(dtype)
    return out if e is None else out[0]


# ---------------------------------------------------------------------------------------------------------
# torch backend: one expert at a time

def _quant_moe_torch(x: torch.Tensor, gu: Packed, dn: Packed, routing: Routing, activation: str,
                     swiglu_limit: Optional[float] = None) -> torch.Tensor:
    T, H = x.shape
    K = routing.top_k
    I = dn.shape[2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    order = routing.sorted_slots.long()  # (S,)
    w = routing.weights.reshape(-1).to(acc)  # (T*K,)
    out = torch.zeros(T * K, H, dtype=acc, device=x.device)
    offs = routing.offsets.tolist()  # a host sync (eager); data-dependent sizes under torch.compile
    compiling = torch.compiler.is_compiling()
    for e in range(len(offs) - 1):
        if compiling:  # no branch on a data-dependent size: an empty expert runs on (0, H) rows
            torch._check(offs[e] >= 0)
            torch._check(offs[e] <= offs[e + 1])
            torch._check(offs[e + 1] <= order.shape[0])
        elif offs[e + 1] == offs[e]:
            continue
        slots = order[offs[e] : offs[e + 1]]  # (n_e,)
        xs = x.index_select(0, slots // K)  # (n_e, H)
        h = xs @ dequantize(gu, e, x.dtype).t()  # (n_e, 2I)
        a = glu_ref(h[:, :I], h[:, I:], activation, swiglu_limit)
        o = a @ dequantize(dn, e, x.dtype).t()  # (n_e, H)
        out.index_copy_(0, slots, o.to(acc) * w.index_select(0, slots).unsqueeze(1))
    return out.view(T, K, H).sum(dim=1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# triton backend: custom ops h3moe::quant_w4_gate_up / quant_w4_down / quant_w8_gate_up / quant_w8_down


def _empty(*shape, dtype, device) -> torch.Tensor:
    """Output allocation of the Triton launchers (every element is written by a kernel); tests replace it
    with a NaN-filled allocation to catch unwritten elements."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


_HALF = (torch.float16, torch.bfloat16)


def _lookup(kernel: str) -> int:
    """The LOOKUP constexpr of the 4-bit kernels of kind "gemv", "tc" or "dot" (kernels/quant.py: w4_lookup)."""
    from ..kernels import quant as kq

    return kq.W4_LOOKUP_IDS[kq.w4_lookup(kernel, _backend.interpreter_enabled())]


def _words(q: torch.Tensor) -> torch.Tensor:
    """The packed bytes as the word-reading kernels read them (4-bit GEMV, tensor-core decode), 32-bit words: a
    copy when a view starts off a 4-byte boundary (a slice of a larger buffer), else q itself. The copy is made
    at every call (the whole expert tensor: ~470 MB for Mixtral's gate_up), so it is said once."""
    if q.data_ptr() % 4 == 0:
        return q
    _warn_once("h3moe.quant_moe: a packed weight tensor starts off a 4-byte boundary; the word-reading kernels "
               "copy it at every call (slow): keep qweight in its own allocation (e.g. qweight.clone())")
    return q.clone()


def _dense(name: str, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t as the kernels index it (their own offsets, contiguous rows). A packed weight that is not contiguous
    (a strided view a user built by hand; h3moe.quantize never makes one) is copied at every call, said once;
    the small tables are copied quietly."""
    if t is None or t.is_contiguous():
        return t
    if name == "qweight":
        _warn_once("h3moe.quant_moe: a packed qweight is not contiguous; it is copied at every call (slow): "
                   "pass qweight.contiguous()")
    return t.contiguous()


def _all_dense(p: "Packed") -> bool:
    """Every tensor of p contiguous (the usual case: one cheap check per call on the decode path)."""
    for f in _TENSOR_FIELDS:  # a plain loop: dynamo refuses map(p.__getattribute__, ...)
        t = getattr(p, f)
        if t is not None and not t.is_contiguous():
            return False
    return True


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _w4_packed(q, absmax, absmax2, code2, offset, code, words: bool) -> tuple:
    """The packed-weight arguments of every 4-bit kernel, after its activations: q (as 32-bit words for the
    GEMV and tensor-core kernels), absmax, absmax2, code2, offset (absmax / code stand in when not nested: the
    kernels never read them then), code."""
    if absmax2 is None:
        absmax2, code2, offset = absmax, code, code
    return (_words(q) if words else q), absmax, absmax2, code2, offset, code


def _w4_blocks(absmax, absmax2) -> tuple:
    """(NB, NB2): absmax blocks per expert, nested scales per expert (0 when not nested)."""
    return absmax.shape[1], absmax2.shape[1] if absmax2 is not None else 0


def _tokens(weights: torch.Tensor) -> tuple[int, int]:
    """(T, K) from the routing weights passed to the down ops, (T, K) fp32."""
    if weights.dim() != 2:
        raise ValueError(f"weights: expected the (T, K) routing weights, got shape {tuple(weights.shape)}")
    return weights.shape[0], weights.shape[1]


def _m_tiles(S: int, E: int, BM: int) -> int:
    # Σ_e ceil(count_e / BM) <= S // BM + (number of non-empty experts) <= S // BM + min(E, S)
    return S // BM + min(E, S)


def _w4_gate_up_impl(
    x: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
    code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], code: torch.Tensor,
    sorted_slots: torch.Tensor, offsets: torch.Tensor, top_k: int, intermediate: int, blocksize: int,
    activation: str, swiglu_limit: Optional[float] = None,
) -> torch.Tensor:
    from ..kernels import quant as kq

    act = dict(ACT=kq.ACT_IDS[activation], LIMIT=swiglu_limit or 0.0)  # the epilogue's constexprs
    T, H = x.shape
    S, I, E = sorted_slots.shape[0], intermediate, offsets.shape[0] - 1
    out = _empty(S, I, dtype=x.dtype, device=x.device)
    if S == 0:
        return out
    nested = absmax2 is not None
    packed = functools.partial(_w4_packed, q, absmax, absmax2, code2, offset, code)
    kind = kq.quant_kernel(T, x.dtype in _HALF)
    if kind == "tc":  # 2+ tokens: tensor cores, every active expert's weights streamed once per row tile
        cfg = kq.pick_tc_config(T, S, E, 4, blocksize, H, I, "gate_up", _arch(x.device))
        grid = (_cdiv(I, cfg["BN"]), _m_tiles(S, E, cfg["BM"]))
        kq.w4_gate_up_tc_kernel[grid](
            x, *packed(True), sorted_slots, offsets, out, *_w4_blocks(absmax, absmax2), E=E, EP=_pow2(E), H=H, I=I,
            TOPK=top_k, BLOCKSIZE=blocksize, NESTED=nested, **act, BM=cfg["BM"], BN=cfg["BN"],
            LOOKUP=_lookup("tc"), DEPTH=cfg["DEPTH"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return out
    if kind == "gemv":  # decode: GEMV kernel, every active expert's weights streamed once
        cfg = kq.pick_decode_config(T, S, E, 4, blocksize, H, I, "gate_up")
        grid = (_cdiv(I, cfg["BN"]), _m_tiles(S, E, cfg["ROWS"]))
        kq.w4_gate_up_gemv_kernel[grid](
            x, *packed(True), sorted_slots, offsets, out, *_w4_blocks(absmax, absmax2), E=E, EP=_pow2(E), H=H, I=I,
            TOPK=top_k, BLOCKSIZE=blocksize, NESTED=nested, **act, ROWS=cfg["ROWS"],
            BN=cfg["BN"], NBLK=cfg["NBLK"], LOOKUP=_lookup("gemv"), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        return out
    cfg = kq.pick_config(S, 4, blocksize, H, I, x.dtype == torch.float32)
    grid = (_cdiv(I, cfg["BN"]), _m_tiles(S, E, cfg["BM"]))
    kq.w4_gate_up_kernel[grid](
        x, *packed(False), sorted_slots, offsets, out, *_w4_blocks(absmax, absmax2), E=E, H=H, I=I,
        TOPK=top_k, BLOCKSIZE=blocksize, NESTED=nested, **act,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], DOT_PREC=_dot_prec(x.dtype),
        LOOKUP=_lookup("dot"), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


# the op; the implementation stays callable for the eager inference path (_backend.eager_direct)
_w4_gate_up = torch.library.custom_op("h3moe::quant_w4_gate_up", mutates_args=())(_w4_gate_up_impl)


@_w4_gate_up.register_fake
def _(x, q, absmax, absmax2, code2, offset, code, sorted_slots, offsets, top_k, intermediate, blocksize, activation,
      swiglu_limit=None):
    return x.new_empty(sorted_slots.shape[0], intermediate)


def _w4_down_impl(
    a: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
    code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], code: torch.Tensor,
    sorted_slots: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, hidden: int, blocksize: int,
) -> torch.Tensor:
    from ..kernels import quant as kq

    S, I = a.shape
    H, E = hidden, offsets.shape[0] - 1
    T, K = _tokens(weights)
    TK = T * K
    nested = absmax2 is not None
    packed = functools.partial(_w4_packed, q, absmax, absmax2, code2, offset, code)
    kind = kq.quant_kernel(T, a.dtype in _HALF)
    if S and kind == "tc":  # 2+ tokens: tensor cores, split over I into KSPLIT partial sums (decode)
        cfg = kq.pick_tc_config(T, S, E, 4, blocksize, I, H, "down", _arch(a.device))
        ks = cfg["KSPLIT"]
        part = _empty(ks, TK, H, dtype=torch.float32, device=a.device)
        grid = (_cdiv(H, cfg["BN"]), _m_tiles(S, E, cfg["BM"]), ks)
        kq.w4_down_tc_kernel[grid](
            a, *packed(True), sorted_slots, offsets, weights, part, *_w4_blocks(absmax, absmax2), TK, E=E,
            EP=_pow2(E), H=H, I=I, BLOCKSIZE=blocksize, NESTED=nested, BM=cfg["BM"], BN=cfg["BN"], KSPLIT=ks,
            LOOKUP=_lookup("tc"), DEPTH=cfg["DEPTH"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return combine(part, T, K, a.dtype)
    if S and kind == "gemv":  # decode: GEMV kernel, split over I into KSPLIT partial sums
        cfg = kq.pick_decode_config(T, S, E, 4, blocksize, I, H, "down")
        ks = cfg["KSPLIT"]
        part = _empty(ks, TK, H, dtype=torch.float32, device=a.device)
        grid = (_cdiv(H, cfg["BN"]), _m_tiles(S, E, cfg["ROWS"]), ks)
        kq.w4_down_gemv_kernel[grid](
            a, *packed(True), sorted_slots, offsets, weights, part, *_w4_blocks(absmax, absmax2), TK, E=E,
            EP=_pow2(E), H=H, I=I, BLOCKSIZE=blocksize, NESTED=nested, ROWS=cfg["ROWS"], BN=cfg["BN"],
            NBLK=cfg["NBLK"], KSPLIT=ks, LOOKUP=_lookup("gemv"), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        return combine(part, T, K, a.dtype)
    out = _empty(TK, H, dtype=torch.float32, device=a.device)
    if S == 0:
        return combine(out, T, K, a.dtype)
    cfg = kq.pick_config(S, 4, blocksize, I, H, a.dtype == torch.float32)
    grid = (_cdiv(H, cfg["BN"]), _m_tiles(S, E, cfg["BM"]))
    kq.w4_down_kernel[grid](
        a, *packed(False), sorted_slots, offsets, weights, out, *_w4_blocks(absmax, absmax2), E=E, H=H, I=I,
        BLOCKSIZE=blocksize, NESTED=nested, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
        DOT_PREC=_dot_prec(a.dtype), LOOKUP=_lookup("dot"),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return combine(out, T, K, a.dtype)


# the op; the implementation stays callable for the eager inference path (_backend.eager_direct)
_w4_down = torch.library.custom_op("h3moe::quant_w4_down", mutates_args=())(_w4_down_impl)


@_w4_down.register_fake
def _(a, q, absmax, absmax2, code2, offset, code, sorted_slots, offsets, weights, hidden, blocksize):
    return a.new_empty(weights.shape[0], hidden)


def _w8_gate_up_impl(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, sorted_slots: torch.Tensor, offsets: torch.Tensor,
    top_k: int, activation: str, swiglu_limit: Optional[float] = None,
) -> torch.Tensor:
    from ..kernels import quant as kq

    act = dict(ACT=kq.ACT_IDS[activation], LIMIT=swiglu_limit or 0.0)  # the epilogue's constexprs
    T, H = x.shape
    S, I, E = sorted_slots.shape[0], q.shape[1] // 2, offsets.shape[0] - 1
    out = _empty(S, I, dtype=x.dtype, device=x.device)
    if S == 0:
        return out
    kind = kq.quant_kernel(T, x.dtype in _HALF)
    if kind == "tc":
        cfg = kq.pick_tc_config(T, S, E, 8, 0, H, I, "gate_up", _arch(x.device))
        grid = (_cdiv(I, cfg["BN"]), _m_tiles(S, E, cfg["BM"]))
        kq.w8_gate_up_tc_kernel[grid](
            x, _words(q), scale, sorted_slots, offsets, out, E=E, EP=_pow2(E), H=H, I=I, TOPK=top_k,
            **act, BM=cfg["BM"], BN=cfg["BN"], SUB=cfg["SUB"], DEPTH=cfg["DEPTH"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return out
    if kind == "gemv":
        cfg = kq.pick_decode_config(T, S, E, 8, 0, H, I, "gate_up")
        grid = (_cdiv(I, cfg["BN"]), _m_tiles(S, E, cfg["ROWS"]))
        kq.w8_gate_up_gemv_kernel[grid](
            x, q, scale, sorted_slots, offsets, out, E=E, EP=_pow2(E), H=H, I=I, TOPK=top_k, **act,
            ROWS=cfg["ROWS"], BN=cfg["BN"], BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return out
    cfg = kq.pick_config(S, 8, 0, H, I, x.dtype == torch.float32)
    grid = (_cdiv(I, cfg["BN"]), _m_tiles(S, E, cfg["BM"]))
    kq.w8_gate_up_kernel[grid](
        x, q, scale, sorted_slots, offsets, out, E=E, H=H, I=I, TOPK=top_k, **act,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], DOT_PREC=_dot_prec(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# the op; the implementation stays callable for the eager inference path (_backend.eager_direct)
_w8_gate_up = torch.library.custom_op("h3moe::quant_w8_gate_up", mutates_args=())(_w8_gate_up_impl)


@_w8_gate_up.register_fake
def _(x, q, scale, sorted_slots, offsets, top_k, activation, swiglu_limit=None):
    return x.new_empty(sorted_slots.shape[0], q.shape[1] // 2)


def _w8_down_impl(
    a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, sorted_slots: torch.Tensor, offsets: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    from ..kernels import quant as kq

    S, I = a.shape
    H, E = q.shape[1], offsets.shape[0] - 1
    T, K = _tokens(weights)
    TK = T * K
    kind = kq.quant_kernel(T, a.dtype in _HALF)
    if S and kind == "tc":
        cfg = kq.pick_tc_config(T, S, E, 8, 0, I, H, "down", _arch(a.device))
        ks = cfg["KSPLIT"]
        part = _empty(ks, TK, H, dtype=torch.float32, device=a.device)
        grid = (_cdiv(H, cfg["BN"]), _m_tiles(S, E, cfg["BM"]), ks)
        kq.w8_down_tc_kernel[grid](
            a, _words(q), scale, sorted_slots, offsets, weights, part, TK, E=E, EP=_pow2(E), H=H, I=I,
            BM=cfg["BM"], BN=cfg["BN"], SUB=cfg["SUB"], KSPLIT=ks, DEPTH=cfg["DEPTH"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        return combine(part, T, K, a.dtype)
    if S and kind == "gemv":
        cfg = kq.pick_decode_config(T, S, E, 8, 0, I, H, "down")
        ks = cfg["KSPLIT"]
        part = _empty(ks, TK, H, dtype=torch.float32, device=a.device)
        grid = (_cdiv(H, cfg["BN"]), _m_tiles(S, E, cfg["ROWS"]), ks)
        kq.w8_down_gemv_kernel[grid](
            a, q, scale, sorted_slots, offsets, weights, part, TK, E=E, EP=_pow2(E), H=H, I=I, ROWS=cfg["ROWS"],
            BN=cfg["BN"], BK=cfg["BK"], KSPLIT=ks, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return combine(part, T, K, a.dtype)
    out = _empty(TK, H, dtype=torch.float32, device=a.device)
    if S == 0:
        return combine(out, T, K, a.dtype)
    cfg = kq.pick_config(S, 8, 0, I, H, a.dtype == torch.float32)
    grid = (_cdiv(H, cfg["BN"]), _m_tiles(S, E, cfg["BM"]))
    kq.w8_down_kernel[grid](
        a, q, scale, sorted_slots, offsets, weights, out, E=E, H=H, I=I,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], DOT_PREC=_dot_prec(a.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return combine(out, T, K, a.dtype)


# the op; the implementation stays callable for the eager inference path (_backend.eager_direct)
_w8_down = torch.library.custom_op("h3moe::quant_w8_down", mutates_args=())(_w8_down_impl)


@_w8_down.register_fake
def _(a, q, scale, sorted_slots, offsets, weights):
    return a.new_empty(weights.shape[0], q.shape[1])


def _triton_layout_problem(gu: Packed, dn: Packed) -> str | None:
    """Why the Triton kernels cannot read these experts (None when they can)."""
    for name, p in (("gate_up", gu), ("down", dn)):
        Kd = p.shape[2]
        if p.bits == 4:
            if p.blocksize < 32 or Kd % p.blocksize:
                return (f"{name}: the triton kernels need blocksize >= 32 dividing the row length {Kd} (a block "
                        f"inside one row); got blocksize {p.blocksize}")
        elif Kd % 32:
            return f"{name}: the int8 triton kernels need the row length {Kd} to be a multiple of 32"
    return None


_WARNED: set = set()

#: The tensors of a Packed the kernels read.
_TENSOR_FIELDS = ("qweight", "absmax", "code", "absmax2", "code2", "offset")


def _quant_moe_triton(x: torch.Tensor, gu: Packed, dn: Packed, routing: Routing, activation: str,
                      swiglu_limit: Optional[float] = None) -> torch.Tensor:
    why = _triton_layout_problem(gu, dn)
    if why:
        raise ValueError(why)
    gu, dn = (p if _all_dense(p) else p._replace(**{f: _dense(f, getattr(p, f)) for f in _TENSOR_FIELDS})
              for p in (gu, dn))
    T, H = x.shape
    K = routing.top_k
    I = dn.shape[2]
    x = x.contiguous()
    slots = routing.sorted_slots.to(torch.int32).contiguous()
    offsets = routing.offsets.to(torch.int32).contiguous()
    w = routing.weights.detach().to(torch.float32).contiguous()  # (T, K): the down ops read T, K from it
    # eager inference calls the implementations directly (the dispatcher costs ~25 µs per op call, as much as
    # a whole quantized decode step on a small model); compile, fake tensors and autograd take the ops
    direct = _backend.eager_direct(x, gu.qweight, dn.qweight)
    w4_gate_up, w4_down = (_w4_gate_up_impl, _w4_down_impl) if direct else (_w4_gate_up, _w4_down)
    w8_gate_up, w8_down = (_w8_gate_up_impl, _w8_down_impl) if direct else (_w8_gate_up, _w8_down)
    if gu.bits == 4:
        a = w4_gate_up(x, gu.qweight, gu.absmax, gu.absmax2, gu.code2, gu.offset, gu.code, slots, offsets, K, I,
                       gu.blocksize, activation, swiglu_limit)
    else:
        a = w8_gate_up(x, gu.qweight, gu.absmax, slots, offsets, K, activation, swiglu_limit)
    if dn.bits == 4:  # y (T, H): the down projection and the sum of each token's K slots
        return w4_down(a, dn.qweight, dn.absmax, dn.absmax2, dn.code2, dn.offset, dn.code, slots, offsets, w, H,
                       dn.blocksize)
    return w8_down(a, dn.qweight, dn.absmax, slots, offsets, w)


def quant_moe(
    x: torch.Tensor,
    gate_up: Packed,
    down: Packed,
    routing,
    *,
    activation: str = "silu",
    backend: str = "auto",
    swiglu_limit: float | None = None,
) -> torch.Tensor:
    """SwiGLU mixture of experts over quantized fused weights.

    Args:
        x: (T, H) fp16 / bf16 / fp32 tokens.
        gate_up: Packed (E, 2I, H) (gate rows first, then up rows).
        down: Packed (E, H, I).
        routing: a Routing or a (weights (T, K), ids (T, K)) pair.
        activation: "silu" (SwiGLU), "gelu", "gelu_tanh", "relu" or "relu2".
        backend: "auto", "torch" or "triton".
        swiglu_limit: None, or L > 0: act(min(gate, L)) * clamp(up, -L, L) (h3moe.moe's; a compile-time
            constant of the Triton kernels: one compile per value).
    Returns:
        (T, H) in x's dtype: equal, within fp16/bf16 rounding, to bitsandbytes' dequantize followed by
        h3moe.reference.experts_ref.
    """
    _validate.tensor("x", x, 2)
    _validate.activation(activation)
    swiglu_limit = _validate.swiglu_limit(swiglu_limit)
    (x,) = autocast_inputs(x)  # torch.autocast: activations in its dtype (the packed weights stay packed)
    E, two_i, H = gate_up.shape
    if tuple(down.shape) != (E, H, two_i // 2) or x.shape[1] != H:
        raise ValueError(f"quant_moe: shapes x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)}, down "
                         f"{tuple(down.shape)} do not fit (T, H), (E, 2I, H), (E, H, I)")
    be = _backend.resolve(backend, x.device, "quant_moe")
    if be == "triton" and backend == "auto":  # a layout the kernels cannot read: the per-expert fallback, said once
        why = _triton_layout_problem(gate_up, down)
        if why:
            _warn_once(f"h3moe.quant_moe: {why}; dequantizing one expert at a time instead (slow)")
            be = "torch"
    routing = as_routing(routing, E, "triton" if be == "triton" else "torch")
    _validate.routing(routing.weights, routing.ids, x.shape[0], E)
    if be == "triton":
        from .triton_experts import _limit_in

        with _backend.device_guard(x):  # x's GPU, where it is not the current device (device_map="auto")
            return _quant_moe_triton(x, gate_up, down, routing, activation, _limit_in(swiglu_limit, x.dtype))
    return _quant_moe_torch(x, gate_up, down, routing, activation, swiglu_limit)
