"""Quantized fused experts in bitsandbytes' own layouts: NF4 / FP4 (4-bit, per-block absmax, optional
nested absmax) and int8 (LLM.int8 row-wise), read packed by h3moe.ops.quant (Triton kernels on the GPU,
one-expert-at-a-time dequantization elsewhere).

    model = h3moe.quantize(model, "nf4", blocksize=64, double_quant=False)   # in place; returns the model
    h3moe.integrations.bitsandbytes.save_quantized(model, "experts.safetensors")
    load_quantized(fresh_model, "experts.safetensors")

What gets quantized: h3moe.MoE layers, transformers 5.x fused-experts modules (gate_up_proj (E, 2I, H),
down_proj (E, H, I) parameters, e.g. MixtralExperts), and ModuleList-style experts (per-expert MLPs with
gate_proj/up_proj/down_proj or w1/w3/w2 linears) — whose bitsandbytes Linear4bit / Linear8bitLt weights are
taken over as they are (packed bytes and statistics reused, not requantized). Attention and the rest are
left alone: quantize them through bitsandbytes as usual.

Layout: each expert's matrix is quantized as its own flattened tensor (bitsandbytes.functional.quantize_4bit
on W[e]), so expert e's blocks start at its first row and bitsandbytes' dequantize_4bit on expert e's slice
and QuantState (`QuantizedWeight.to_bnb(e)`) gives back W[e]. The quantizers here are pure torch, equal to
bitsandbytes' (default-backend ops): bitsandbytes itself is needed only to read the result with its own
functions or to take over its modules, never to run.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.moe import MoE
from ..ops.quant import Packed, dequantize, quant_moe
from ..ops.routing import route

__all__ = [
    "QuantizedWeight", "QuantizedExperts", "QuantizedExpertList", "QuantizedMoE", "QuantReport",
    "quantize", "quantize_weight", "quantize_4bit", "quantize_blockwise", "quantize_int8", "code_4bit",
    "dynamic_map", "save_quantized", "load_quantized", "module_bytes",
]

log = logging.getLogger("h3moe")

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these
NESTED_BLOCKSIZE = 256  # bitsandbytes' quantize_4bit nests absmax with blocksize=256

# bitsandbytes.functional.get_4bit_type: NF4 quantiles of N(0, 1); FP4 (1 sign, 2 exponent, 1 mantissa bit)
# in bit-pattern order, divided by its absmax (12).
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
        1.0]
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def code_4bit(quant_type: str, device=None) -> torch.Tensor:
    """(16,) fp32 table, equal to bitsandbytes.functional.get_4bit_type(quant_type)."""
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, device=device)
    return data.div_(data.abs().max())


def dynamic_map(device=None) -> torch.Tensor:
    """(256,) fp32, equal to bitsandbytes.functional.create_dynamic_map() (signed, 7 exponent bits): the
    code of nested absmax."""
    data = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


def _blocks(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten A, split into blocks (a last partial block allowed) → (scaled in [-1, 1] (n,), absmax (nb,))."""
    flat = A.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    com = flat[:full].view(-1, blocksize)
    absmax = com.abs().amax(dim=-1)
    scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return scaled, absmax


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' quantize_blockwise (nearest code entry per block-scaled value) → (uint8 (n,), absmax)."""
    scaled, absmax = _blocks(A, blocksize)
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


def quantize_4bit(A: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, nested: bool = False) -> dict:
    """One tensor, as bitsandbytes.functional.quantize_4bit(A, blocksize, compress_statistics=nested,
    quant_type) lays it out. Returns {"qweight": uint8 ((n+1)//2,), "absmax": fp32 (nb,) or uint8 when
    nested, and when nested "absmax2": fp32 (ceil(nb/256),), "offset": fp32 scalar}."""
    code = code_4bit(quant_type, A.device)
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    scaled, absmax = _blocks(A, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    q8 = q.to(torch.uint8)
    out = {"qweight": (q8[::2] << 4) | q8[1::2]}
    if nested:
        offset = absmax.mean()
        qa, absmax2 = quantize_blockwise(absmax - offset, dynamic_map(A.device), NESTED_BLOCKSIZE)
        out.update(absmax=qa, absmax2=absmax2, offset=offset)
    else:
        out["absmax"] = absmax
    return out


def quantize_int8(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes.functional.int8_vectorwise_quant(A) (threshold 0): (int8 (N, Kd), row absmax fp32 (N,)).
    An all-zero row quantizes to zeros (bitsandbytes would divide by zero)."""
    row = A.abs().amax(dim=1).float()
    q = torch.round(A.float() * (127.0 / row.unsqueeze(-1)))
    q = torch.where(row.unsqueeze(-1) > 0, q, torch.zeros_like(q))
    return q.to(torch.int8), row


# ---------------------------------------------------------------------------------------------------------
# containers


class QuantizedWeight(nn.Module):
    """A fused expert tensor (E, N, Kd) quantized per expert, as buffers (so state_dict / safetensors carry
    it): qweight, absmax, code (4-bit), absmax2 / code2 / offset (nested). See h3moe.ops.quant.Packed."""

    def __init__(self, quant_type: str, shape, blocksize: int = 64, nested: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}")
        E, N, Kd = (int(s) for s in shape)
        self.quant_type, self.shape, self.dtype = quant_type, (E, N, Kd), dtype
        if quant_type == "int8":
            self.blocksize, self.nested = 0, False
            self.register_buffer("qweight", torch.zeros(E, N, Kd, dtype=torch.int8, device=device))
            self.register_buffer("absmax", torch.zeros(E, N, dtype=torch.float32, device=device))
            return
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize: expected one of {BLOCKSIZES}, got {blocksize!r}")
        if (N * Kd) % blocksize or (N * Kd) % 2:
            raise ValueError(f"blocksize {blocksize} must divide each expert's {N}x{Kd} elements")
        self.blocksize, self.nested = blocksize, nested
        nb = N * Kd // blocksize
        self.register_buffer("qweight", torch.zeros(E, N * Kd // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(E, nb, dtype=torch.uint8 if nested else torch.float32,
                                                   device=device))
        self.register_buffer("code", code_4bit(quant_type, device))
        if nested:
            self.register_buffer("absmax2", torch.zeros(E, math.ceil(nb / NESTED_BLOCKSIZE), device=device))
            self.register_buffer("code2", dynamic_map(device))
            self.register_buffer("offset", torch.zeros(E, device=device))

    def _apply(self, fn, recurse=True):
        """Moves follow the model (.to(device), .cuda()); dtype casts (.half(), .to(torch.bfloat16)) do not
        touch the quantization state: codes, tables and absmax stay uint8 / int8 / fp32 as the kernels read."""
        for name, t in self._buffers.items():
            if t is not None:
                target = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device  # where fn sends it
                self._buffers[name] = t.to(target)
        return self

    @property
    def packed(self) -> Packed:
        if self.quant_type == "int8":
            return Packed("int8", self.shape, 0, self.qweight, self.absmax)
        if self.nested:
            return Packed(self.quant_type, self.shape, self.blocksize, self.qweight, self.absmax, self.code,
                          self.absmax2, self.code2, self.offset)
        return Packed(self.quant_type, self.shape, self.blocksize, self.qweight, self.absmax, self.code)

    def dequantize(self, e: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert e's (N, Kd) matrix, or all (E, N, Kd), in dtype (default: the original dtype)."""
        return dequantize(self.packed, e, dtype or self.dtype)

    def to_bnb(self, e: int):
        """Expert e as bitsandbytes reads it: 4-bit → (packed uint8 (N*Kd/2, 1), QuantState) for
        bitsandbytes.functional.dequantize_4bit; int8 → (int8 (N, Kd), row stats (N,)) for
        int8_vectorwise_dequant."""
        if self.quant_type == "int8":
            return self.qweight[e], self.absmax[e]
        from bitsandbytes.functional import QuantState

        state2 = offset = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2[e], code=self.code2, blocksize=NESTED_BLOCKSIZE,
                                dtype=torch.float32)
            offset = self.offset[e]
        qs = QuantState(absmax=self.absmax[e], shape=torch.Size(self.shape[1:]), code=self.code,
                        blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype, offset=offset,
                        state2=state2)
        return self.qweight[e].view(-1, 1), qs

    @classmethod
    def from_float(cls, W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                   double_quant: bool = False) -> "QuantizedWeight":
        """Quantize W (E, N, Kd) one expert at a time."""
        if W.dim() != 3 or not W.is_floating_point():
            raise ValueError(f"expected a float (E, N, Kd) tensor, got {W.dtype} {tuple(W.shape)}")
        qw = cls(quant_type, W.shape, blocksize, double_quant, W.dtype, W.device)
        with torch.no_grad():
            for e in range(W.shape[0]):
                if quant_type == "int8":
                    q, row = quantize_int8(W[e])
                    qw.qweight[e], qw.absmax[e] = q, row
                    continue
                d = quantize_4bit(W[e], quant_type, blocksize, double_quant)
                qw.qweight[e], qw.absmax[e] = d["qweight"], d["absmax"]
                if double_quant:
                    qw.absmax2[e], qw.offset[e] = d["absmax2"], d["offset"]
        return qw

    def extra_repr(self) -> str:
        E, N, Kd = self.shape
        bs = f", blocksize={self.blocksize}, nested={self.nested}" if self.quant_type != "int8" else ""
        return f"{self.quant_type}, E={E}, N={N}, Kd={Kd}{bs}, dtype={self.dtype}"


def quantize_weight(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = False) -> QuantizedWeight:
    """A fused expert tensor (E, N, Kd) → QuantizedWeight (per-expert bitsandbytes layout)."""
    return QuantizedWeight.from_float(W, quant_type, blocksize, double_quant)


class QuantizedExperts(nn.Module):
    """Drop-in for a transformers fused-experts module: forward(hidden_states (T, H), top_k_index (T, K),
    top_k_weights (T, K)) → (T, H) through h3moe.ops.quant.quant_moe."""

    def __init__(self, gate_up_proj: QuantizedWeight, down_proj: QuantizedWeight, activation: str = "silu",
                 backend: str = "auto", swiglu_limit: float | None = None):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.num_experts, self.hidden_dim, self.intermediate_dim = down_proj.shape
        self.activation, self.backend, self.swiglu_limit = activation, backend, swiglu_limit

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return quant_moe(hidden_states, self.gate_up_proj.packed, self.down_proj.packed,
                         (top_k_weights, top_k_index), activation=self.activation, backend=self.backend,
                         swiglu_limit=self.swiglu_limit)


class _ExpertView:
    """experts[e] of a QuantizedExpertList: expert e's MLP on (..., H) rows, through the quantized op."""

    def __init__(self, parent: "QuantizedExpertList", e: int):
        self.parent, self.e = parent, e

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        T = x2.shape[0]
        ids = torch.full((T, 1), self.e, dtype=torch.long, device=x.device)
        w = torch.ones(T, 1, dtype=torch.float32, device=x.device)
        p = self.parent
        return quant_moe(x2, p.gate_up_proj.packed, p.down_proj.packed, (w, ids), activation=p.activation,
                         backend=p.backend, swiglu_limit=p.swiglu_limit).reshape(shape)


class QuantizedExpertList(QuantizedExperts):
    """Replaces a ModuleList of per-expert MLPs: indexable (experts[e](x) runs expert e) so the parent's
    own per-expert loop keeps working, and callable like QuantizedExperts for a fused dispatch."""

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, e: int) -> _ExpertView:
        if not -self.num_experts <= e < self.num_experts:
            raise IndexError(e)
        return _ExpertView(self, e % self.num_experts)

    def __iter__(self):
        return (self[e] for e in range(self.num_experts))


class QuantizedMoE(MoE):
    """h3moe.MoE whose gate_up_proj / down_proj are QuantizedWeight (made by quantize(), by class swap)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        logits = self.gate(x2)
        routing = route(logits, self.top_k, renormalize=self.renormalize, backend=self.backend)
        self.router_logits, self.routing = logits, routing
        y = quant_moe(x2, self.gate_up_proj.packed, self.down_proj.packed, routing, activation=self.activation,
                      backend=self.backend, swiglu_limit=self.swiglu_limit)
        return y.reshape(shape)

    def reset_parameters(self) -> None:  # packed weights are not re-initialized
        nn.init.normal_(self.gate.weight, std=1.0 / math.sqrt(self.hidden_size))


# ---------------------------------------------------------------------------------------------------------
# finding and converting expert modules

_LIST_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _activation_of(module) -> str | None:
    """The h3moe activation of a per-expert MLP's act_fn (silu without one), or None."""
    from ._gate import activation_name

    act = getattr(module, "act_fn", None)
    return "silu" if act is None else activation_name(act)


def _is_fused_experts(m: nn.Module) -> bool:
    gu, dn = _fused_views(m)
    if gu is None:
        return False
    E, two_i, H = gu.shape
    return tuple(dn.shape) == (E, H, two_i // 2) and two_i % 2 == 0


def _fused_views(m: nn.Module):
    """(gate_up (E, 2I, H), down (E, H, I)) of a fused-experts module, as views of its tensors (transformers'
    transposed layout, Aria's (E, H, 2I) / (E, I, H), viewed back); (None, None) if it holds none."""
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3):
        return None, None
    if getattr(m, "is_transposed", False):
        gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
    return gu, dn


def _fused_experts_supported(m: nn.Module) -> tuple[str, float | None] | str:
    """(activation, swiglu_limit) of a fused-experts module h3moe can quantize, or why it cannot (a str).
    A class's own _apply_gate counts only where it computes one of h3moe's forms (integrations/_gate.py):
    quantizing a gate h3moe does not compute would change the model's outputs."""
    if getattr(m, "has_bias", False) or hasattr(m, "gate_up_proj_bias"):
        return "biased experts (gpt-oss layout)"
    if not getattr(m, "is_concatenated", True) or not getattr(m, "has_gate", True):
        return "interleaved or ungated experts"
    if getattr(m, "has_post_expert_norm", False):
        return "post-expert norm"
    from ._gate import gate_form

    return gate_form(m, default_act="silu" if getattr(m, "act_fn", None) is None else None)


def _list_names(m: nn.Module):
    if not isinstance(m, nn.ModuleList) or len(m) == 0:
        return None
    for names in _LIST_NAMES:
        if all(all(isinstance(getattr(x, n, None), nn.Linear) and getattr(x, n).bias is None for n in names)
               for x in m):
            return names
    return None


def _is_bnb4(lin) -> bool:
    return type(lin).__name__ == "Linear4bit" and getattr(lin.weight, "quant_state", None) is not None


def _is_bnb8(lin) -> bool:
    return type(lin).__name__ == "Linear8bitLt" and lin.weight.dtype == torch.int8 and \
        getattr(lin.weight, "SCB", None) is not None


def _bnb4_absmax(qs) -> torch.Tensor:
    """fp32 absmax of a bitsandbytes QuantState, de-nested exactly as bitsandbytes dequantizes it."""
    if not qs.nested:
        return qs.absmax.float()
    s2 = qs.state2
    p = Packed("nf4", (1, 1, 1), 0, None, qs.absmax.view(1, -1), None, s2.absmax.view(1, -1), s2.code,
               qs.offset.view(1).float())
    from ..ops.quant import dequantize_absmax

    return dequantize_absmax(p, 0)


def _take_over_list(mlist: nn.ModuleList, names, quant_type, blocksize, double_quant):
    """ModuleList experts → (gate_up QuantizedWeight, down QuantizedWeight). bitsandbytes Linear4bit /
    Linear8bitLt weights are taken over as they are (nested absmax stored de-nested as fp32: gate and up
    carry their own offsets); float nn.Linear weights are quantized."""
    g, u, d = names
    lins = [[getattr(x, n) for n in names] for x in mlist]
    if all(_is_bnb4(l) for row in lins for l in row):
        qs0 = lins[0][0].weight.quant_state
        for row in lins:
            for l in row:
                qs = l.weight.quant_state
                if getattr(qs, "packing_format_for_cpu", False):
                    raise ValueError("a Linear4bit weight was repacked for bitsandbytes' CPU kernels by a CPU "
                                     "forward; take the experts over before running them on CPU")
                if (qs.quant_type, qs.blocksize) != (qs0.quant_type, qs0.blocksize):
                    raise ValueError("Linear4bit experts mix quant types or blocksizes")

        def build(parts_per_expert, shape):
            qw = QuantizedWeight(qs0.quant_type, shape, qs0.blocksize, False, qs0.dtype, parts_per_expert[0][0]
                                 .weight.device)
            for e, parts in enumerate(parts_per_expert):
                qw.qweight[e] = torch.cat([l.weight.data.reshape(-1) for l in parts])
                qw.absmax[e] = torch.cat([_bnb4_absmax(l.weight.quant_state) for l in parts])
            return qw

        I, H = lins[0][0].weight.quant_state.shape
        E = len(lins)
        return build([[r[0], r[1]] for r in lins], (E, 2 * I, H)), build([[r[2]] for r in lins], (E, H, I))
    if all(_is_bnb8(l) for row in lins for l in row):
        I, H = lins[0][0].weight.shape
        E = len(lins)
        dt = torch.float16
        gu = QuantizedWeight("int8", (E, 2 * I, H), dtype=dt, device=lins[0][0].weight.device)
        dn = QuantizedWeight("int8", (E, H, I), dtype=dt, device=lins[0][0].weight.device)
        for e, (lg, lu, ld) in enumerate(lins):
            gu.qweight[e] = torch.cat([lg.weight.data, lu.weight.data])
            gu.absmax[e] = torch.cat([lg.weight.SCB, lu.weight.SCB]).float()
            dn.qweight[e], dn.absmax[e] = ld.weight.data, ld.weight.SCB.float()
        return gu, dn
    if any(type(l).__name__ in ("Linear4bit", "Linear8bitLt", "Params4bit") for row in lins for l in row) and \
            not all(type(l) is nn.Linear for row in lins for l in row):
        raise ValueError("ModuleList experts mix bitsandbytes and float linears, or hold unquantized "
                         "bitsandbytes weights: move the model to its device first")
    W_gu = torch.stack([torch.cat([lg.weight, lu.weight]) for lg, lu, _ in lins]).detach()
    W_dn = torch.stack([ld.weight for _, _, ld in lins]).detach()
    return (QuantizedWeight.from_float(W_gu, quant_type, blocksize, double_quant),
            QuantizedWeight.from_float(W_dn, quant_type, blocksize, double_quant))


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _install_moe(m: MoE, gu: QuantizedWeight, dn: QuantizedWeight) -> None:
    del m.gate_up_proj, m.down_proj  # the float parameters
    m.gate_up_proj, m.down_proj = gu, dn
    m.__class__ = QuantizedMoE


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@dataclass
class QuantReport:
    quant_type: str
    blocksize: int
    double_quant: bool
    modules: list  # names of the converted expert modules
    expert_bytes_before: int
    expert_bytes_after: int
    model_bytes_before: int
    model_bytes_after: int

    def __str__(self) -> str:
        mb = 2**20
        return (f"h3moe.quantize({self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}): "
                f"{len(self.modules)} expert modules, experts {self.expert_bytes_before / mb:.2f} MiB -> "
                f"{self.expert_bytes_after / mb:.2f} MiB, model {self.model_bytes_before / mb:.2f} MiB -> "
                f"{self.model_bytes_after / mb:.2f} MiB ({self.model_bytes_before} -> {self.model_bytes_after} "
                f"bytes)")


def _targets(model: nn.Module):
    """(path, kind, module, form) of every expert container, outermost first, skipping ones already quantized;
    form: a fused-experts module's (activation, swiglu_limit) (_fused_experts_supported), else None."""
    out, claimed = [], []
    for path, m in model.named_modules():
        if any(path.startswith(c + ".") for c in claimed):
            continue
        if isinstance(m, (QuantizedMoE, QuantizedExperts)):
            claimed.append(path)
            continue
        if isinstance(m, MoE):
            out.append((path, "moe", m, None))
        elif _is_fused_experts(m):
            form = _fused_experts_supported(m)
            if isinstance(form, str):
                log.warning("h3moe.quantize: skipping %s (%s)", path or type(m).__name__, form)
                continue
            out.append((path, "experts", m, form))
        elif _list_names(m) is not None:
            out.append((path, "list", m, None))
        else:
            if hasattr(m, "is_transposed") and hasattr(m, "has_gate"):  # transformers experts in another layout
                why = "ungated experts" if not m.has_gate else "not (E, 2I, H) / (E, H, I) expert tensors"
                log.warning("h3moe.quantize: skipping %s (%s)", path or type(m).__name__, why)
            continue
        claimed.append(path)
    return out


def quantize(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False, *,
             backend: str = "auto", verbose: bool = False) -> nn.Module:
    """Quantize every fused expert tensor of `model` in place into bitsandbytes' layouts.

    Args:
        model: a model or module holding h3moe.MoE layers, transformers fused-experts modules (gate_up_proj
            (E, 2I, H), down_proj (E, H, I)) or ModuleList-style experts (bitsandbytes Linear4bit /
            Linear8bitLt experts are taken over as they are), or one such module itself.
        quant_type: "nf4", "fp4" (4-bit, absmax per `blocksize` elements) or "int8" (row-wise).
        blocksize: 4-bit block size (bitsandbytes' values 32..4096); the Triton kernels need it to divide
            H and I.
        double_quant: nest the absmax (bitsandbytes' compress_statistics).
        backend: backend of the converted modules' forward ("auto": Triton on CUDA, torch elsewhere).
        verbose: also print the memory report.
    Returns:
        the model, converted in place (a bare transformers experts module or ModuleList is replaced: use the
        returned QuantizedExperts); `.h3moe_quant_report` on it is a QuantReport with the bytes before and
        after (also logged on the "h3moe" logger as one line).
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}")
    if quant_type != "int8" and blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {BLOCKSIZES}, got {blocksize!r}")
    before = module_bytes(model)
    targets = _targets(model)
    exp_before = exp_after = 0
    meta = {}
    root = model
    for path, kind, m, form in targets:
        exp_before += module_bytes(m)
        if kind == "list":
            names = _list_names(m)
            act = _activation_of(m[0])
            if act is None:
                raise ValueError(f"{path}: unsupported expert activation {type(m[0].act_fn).__name__}")
            gu, dn = _take_over_list(m, names, quant_type, blocksize, double_quant)
            new = QuantizedExpertList(gu, dn, act, backend)
            if path:
                _set_child(model, path, new)
            else:
                root = new
        else:
            with torch.no_grad():  # (transposed experts: quantized in h3moe's layout, a copy anyway)
                W_gu, W_dn = (w.detach().contiguous() for w in _fused_views(m))
                gu = QuantizedWeight.from_float(W_gu, quant_type, blocksize, double_quant)
                dn = QuantizedWeight.from_float(W_dn, quant_type, blocksize, double_quant)
            if kind == "moe":
                _install_moe(m, gu, dn)
                m.backend = backend if backend != "auto" else m.backend
                new = m
            else:
                act, limit = form
                new = QuantizedExperts(gu, dn, act, backend, limit)
                if path:
                    _set_child(model, path, new)
                else:
                    root = new
        exp_after += module_bytes(new)
        meta[path] = _describe(kind, new)
    after = module_bytes(root)
    report = QuantReport(quant_type, blocksize, double_quant, [t[0] for t in targets], exp_before, exp_after,
                         before, after)
    root.h3moe_quant_report = report
    root.h3moe_quant_meta = meta
    log.info("%s", report)
    if verbose:
        print(report)
    return root


def _describe(kind: str, m) -> dict:
    gu, dn = m.gate_up_proj, m.down_proj
    d = {"kind": kind, "activation": m.activation}
    if getattr(m, "swiglu_limit", None) is not None:
        d["swiglu_limit"] = m.swiglu_limit
    for name, qw in (("gate_up", gu), ("down", dn)):
        d[name] = {"quant_type": qw.quant_type, "shape": list(qw.shape), "blocksize": qw.blocksize,
                   "nested": qw.nested, "dtype": str(qw.dtype).replace("torch.", "")}
    return d


# ---------------------------------------------------------------------------------------------------------
# save / load with safetensors

_META_KEY = "h3moe_quant"


def save_quantized(model: nn.Module, path: str) -> None:
    """Save the whole quantized model's state (packed experts included) to one safetensors file, with the
    experts' layout in its metadata."""
    from safetensors.torch import save_model

    meta = getattr(model, "h3moe_quant_meta", None)
    if meta is None:
        raise ValueError("save_quantized: the model was not quantized by h3moe.quantize")
    save_model(model, path, metadata={_META_KEY: json.dumps(meta)})


def load_quantized(model: nn.Module, path: str, *, backend: str = "auto", strict: bool = True) -> nn.Module:
    """Load a save_quantized file into a model of the same architecture, unquantized (its expert modules
    are replaced by empty quantized containers first, then every tensor is loaded). Returns the model."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[_META_KEY])
    for mpath, d in meta.items():
        m = model.get_submodule(mpath) if mpath else model
        dev = next((t.device for t in list(m.parameters()) + list(m.buffers())), None)
        qws = []
        for name in ("gate_up", "down"):
            s = d[name]
            qws.append(QuantizedWeight(s["quant_type"], s["shape"], s["blocksize"] or 64, s["nested"],
                                       getattr(torch, s["dtype"]), dev))
        if d["kind"] == "moe":
            if isinstance(m, QuantizedMoE):
                m.gate_up_proj, m.down_proj = qws
            else:
                _install_moe(m, *qws)
        elif d["kind"] == "list":
            _set_child(model, mpath, QuantizedExpertList(qws[0], qws[1], d["activation"], backend))
        else:
            limit = d.get("swiglu_limit")
            if "swiglu_limit" not in d and _is_fused_experts(m):
                # a file saved before h3moe kept the clamped SwiGLU: the module it replaces says whether its
                # gate clamps (that file's experts were quantized as they are: only the gate was dropped)
                form = _fused_experts_supported(m)
                if isinstance(form, str):
                    raise ValueError(f"load_quantized: {mpath or type(m).__name__} computes a gate h3moe does not "
                                     f"({form}); this file was quantized without it")
                limit = form[1]
            _set_child(model, mpath, QuantizedExperts(qws[0], qws[1], d["activation"], backend, limit))
    load_model(model, path, strict=strict)
    model.h3moe_quant_meta = meta
    return model
