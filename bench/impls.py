"""The implementations each case times, h3moe's and the baselines, all behind one interface.

An Impl has `prepare(inputs) -> state` (outside the timing: autograd leaves, quantized weights, modules)
and `run(state) -> outputs` (timed), the outputs in the order cases.reference_outputs returns its own.

h3moe rows: one per backend (torch, triton, cuda) that h3moe.backends() says can run here and that has
registered the op (h3moe._backend._OPS), probed at every run, so backends written later show up by
themselves. The Triton interpreter is never timed (CPU tensors) unless asked. Decode rows (fwd, nf4, int8 at
T <= 16, on CUDA) add '<name>+graph' for h3moe and torch:grouped_mm: the same call replayed from a CUDA graph
(the kernels' time without Python's launch overhead, as a serving engine runs decode). fwdbwd adds
h3moe:triton-recompute, the Triton backward that recomputes gate/up instead of reading the saved
pre-activation (H3MOE_RECOMPUTE=1: less memory, more FLOPs). fwd adds h3moe:triton-lowp from 128 tokens on
(K > 1): the K slot rows kept in x's dtype instead of fp32 before their sum (H3MOE_COMBINE=lowp, as eager
PyTorch and vLLM round them), to price the default fp32 combine on many-expert models. fwd and fwdbwd add
h3moe:triton-tma from TMA_MIN_T tokens on, on Hopper: every launch through tensor descriptors
(H3MOE_TMA=1), the A/B that decides whether the Tma candidates become defaults. nf4 adds the 4-bit kernels with their other nibble
lookup (H3MOE_W4_LOOKUP): h3moe:triton-load (the GEMV and tensor-core kernels' default is the warp shuffle;
h3moe:triton-shfl where the tl.dot kernels' table load is the default); nf4 and int8 add the kernels the
default does not take at that T (H3MOE_QUANT_KERNEL): h3moe:triton-tc at T=1 (where the GEMV is the default),
h3moe:triton-gemv at 2-16 tokens, h3moe:triton-dot above (the tensor-core kernels' predecessors).
Baselines:
    hf:eager       transformers' MixtralExperts.forward: the per-expert Python loop (the loop the H3Fusion
                   authors wrote), bf16 index_add accumulation.
    hf:batched_mm  transformers' batched_mm_experts_forward: one weight matrix gathered per (token, slot),
                   torch.bmm. Memory O(T·K·I·H): skipped above a cap.
    hf:grouped_mm  transformers' grouped_mm_experts_forward: sort, torch grouped matmul, unsort.
    hf:h3moe       transformers' ExpertsInterface calling h3moe (where h3moe registered "h3moe" there).
    torch:grouped_mm  torch.nn.functional.grouped_mm called directly with minimal glue (sort, gather, two
                   grouped matmuls, weighted fp32 sum of the K slots).
    torch:eager    the eager PyTorch router (softmax, top-k, renormalize, as MixtralTopKRouter) and the
                   eager gating loss (h3moe.reference.gating_loss_ref on the native dtype).
    bnb:dequant+mm bitsandbytes: per expert hit, dequantize (dequantize_4bit / int8_vectorwise_dequant) then
                   matmul, as a per-expert bitsandbytes Linear does (quantized cases, where installed).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import h3moe
from h3moe import _backend
from h3moe import reference as ref

from .cases import QUANT_CASES, Case

__all__ = ["Impl", "Skip", "CANDIDATES", "implementations", "h3moe_backends", "clear_caches"]

_H3 = ["h3moe:torch", "h3moe:triton", "h3moe:cuda"]
_HF = ["hf:eager", "hf:batched_mm", "hf:grouped_mm", "hf:h3moe", "torch:grouped_mm"]
#: The implementations each case can have (which of them run is decided here and now by implementations()).
_GRAPH = [f"{n}+graph" for n in _H3]  # decode only (T <= 16, CUDA): see _with_graphs
CANDIDATES = {
    "route": _H3 + ["torch:eager"],
    "fwd": _H3 + ["h3moe:triton-lowp", "h3moe:triton-tma"] + _HF + _GRAPH + ["torch:grouped_mm+graph"],
    "fwdbwd": _H3 + ["h3moe:triton-recompute", "h3moe:triton-tma"] + _HF, "layer": _H3 + _HF,
    "gating": _H3 + ["torch:eager"],
    "nf4": _H3 + ["h3moe:triton-load", "h3moe:triton-shfl", "h3moe:triton-tc", "h3moe:triton-gemv",
                  "h3moe:triton-dot", "bnb:dequant+mm"] + _GRAPH
    + ["h3moe:triton-load+graph", "h3moe:triton-tc+graph", "h3moe:triton-gemv+graph"],
    "int8": _H3 + ["h3moe:triton-tc", "h3moe:triton-gemv", "h3moe:triton-dot", "bnb:dequant+mm"] + _GRAPH
    + ["h3moe:triton-tc+graph", "h3moe:triton-gemv+graph"],
}

#: fwd rows from this many tokens on add h3moe:triton-lowp (K > 1): the fp32 slot buffer's bytes matter there
#: (S*H*4 written and read again: ~0.27 GB of Qwen3-30B-A3B's layer at 4096 tokens, K=8).
LOWP_MIN_T = 128

#: fwd / fwdbwd rows from this many tokens on add h3moe:triton-tma on sm_90+ (the large-tile regime).
TMA_MIN_T = 1024


def _tma_row(c: Case, device, skipped: list) -> bool:
    """Whether case c gets an h3moe:triton-tma row: Hopper, T >= TMA_MIN_T, and the descriptor kernels passed
    their smoke run in a child process (triton_experts.tma_smoke(): a fault cannot end this run)."""
    if device.type != "cuda" or c.T < TMA_MIN_T or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    from h3moe.ops import triton_experts

    why = triton_experts.tma_smoke()
    if why:
        skipped.append(("h3moe:triton-tma", f"the descriptor kernels failed their smoke run: {why}"))
    return why is None

#: Above this many bytes of gathered weights hf:batched_mm is skipped (it would not fit, or thrash).
BATCHED_MM_CAP = {"cuda": 8 * 2**30, "cpu": 256 * 2**20}


class Skip(Exception):
    """An implementation that does not apply here; the message says why."""


@dataclass
class Impl:
    name: str
    run: Callable[[dict], tuple]
    prepare: Callable[[dict], dict] = field(default=lambda inp: inp)
    #: quantized cases: (w_gate_up, w_down) this implementation's dequantized weights, for its reference.
    dequantized: Callable[[dict], tuple] | None = None
    #: implementations sharing a reference key share one reference computation.
    ref_key: str = "default"


# --------------------------------------------------------------------------------- transformers shims


class HFExperts:
    """The attributes transformers' experts functions read from `self` (MixtralExperts after
    @use_experts_implementation), over tensors we own: nothing is copied or initialized."""

    def __init__(self, w_gate_up, w_down, activation: str = "silu"):
        self.gate_up_proj = w_gate_up  # (E, 2I, H)
        self.down_proj = w_down  # (E, H, I)
        self.num_experts = w_gate_up.shape[0]
        self.hidden_dim = w_gate_up.shape[2]
        self.intermediate_dim = w_down.shape[2]
        self.act_fn = _hf_act(activation)
        self.has_gate, self.has_bias, self.is_transposed, self.is_concatenated = True, False, False, True
        self.has_post_expert_norm, self._is_expert_parallel = False, False
        self.config = types.SimpleNamespace(_experts_implementation=None)
        self.training = False

    def _apply_gate(self, gate_up_out):  # replaced by transformers' own _default_apply_gate where it exists
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def _hf_act(activation: str):
    """transformers' activation module (what MixtralExperts.act_fn is), else the reference's function."""
    try:
        from transformers.activations import ACT2FN

        return ACT2FN[{"gelu_tanh": "gelu_pytorch_tanh"}.get(activation, activation)]
    except (ImportError, KeyError):
        return ref.ACTIVATIONS[activation]


try:  # the same function object MixtralExperts gets, so integrations see the standard gate
    from transformers.integrations.moe import _default_apply_gate as _hf_default_gate

    HFExperts._apply_gate = _hf_default_gate
except ImportError:
    pass


def _hf_functions() -> tuple[dict, dict]:
    """transformers' experts implementations available here: name -> fn(self, x, top_k_index, top_k_weights),
    and name -> why not."""
    fns, why = {}, {}
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        # @use_experts_implementation wraps forward (functools.wraps): the eager loop is its __wrapped__.
        fns["hf:eager"] = getattr(MixtralExperts.forward, "__wrapped__", MixtralExperts.forward)
    except ImportError as e:
        why["hf:eager"] = f"transformers not importable: {e}"
    try:
        moe = importlib.import_module("transformers.integrations.moe")
    except ImportError as e:
        for n in ("hf:batched_mm", "hf:grouped_mm"):
            why[n] = f"transformers.integrations.moe not importable: {e}"
        return fns, why
    for name, attr in (("hf:batched_mm", "batched_mm_experts_forward"), ("hf:grouped_mm", "grouped_mm_experts_forward")):
        if hasattr(moe, attr):
            fns[name] = getattr(moe, attr)
        else:
            why[name] = f"this transformers has no {attr}"
    try:
        registry = moe.ALL_EXPERTS_FUNCTIONS
        if "h3moe" in registry:
            fns["hf:h3moe"] = registry["h3moe"]
    except Exception:  # noqa: BLE001 — an optional row
        pass
    return fns, why


def hf_router(x, router, K):
    """MixtralTopKRouter.forward's math: (T, E) logits, fp32 softmax, top-k, renormalize."""
    logits = F.linear(x, router)
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, K, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


# ------------------------------------------------------------------------------ torch grouped matmul


def _grouped_mm(a, b, offs):
    fn = F.grouped_mm if hasattr(F, "grouped_mm") else torch._grouped_mm
    return fn(a, b, offs=offs)


def torch_grouped_mm_experts(x, w_gate_up, w_down, weights, ids):
    """torch's grouped matmul called directly: x (T, H), w_gate_up (E, 2I, H), w_down (E, H, I),
    weights (T, K), ids (T, K) → (T, H). No host sync."""
    T, H = x.shape
    K = ids.shape[1]
    E, I = w_down.shape[0], w_down.shape[2]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (S,)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) cumulative row ends
    xs = x.index_select(0, order // K)  # (S, H)
    h = _grouped_mm(xs, w_gate_up.transpose(1, 2), offs)  # (S, 2I)
    a = F.silu(h[:, :I]) * h[:, I:]  # (S, I)
    o = _grouped_mm(a, w_down.transpose(1, 2), offs)  # (S, H)
    o = o.float() * weights.reshape(-1).index_select(0, order).unsqueeze(1).float()
    slots = torch.empty_like(o).index_copy(0, order, o)  # (S, H) in slot order
    return slots.view(T, K, H).sum(dim=1).to(x.dtype)


def _torch_gmm_runs(device, dtype) -> str | None:
    return _torch_gmm_runs_cached(device.type, device.index, dtype)


@functools.lru_cache(maxsize=None)
def _torch_gmm_runs_cached(device_type, index, dtype) -> str | None:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return "this torch has no grouped_mm"
    try:
        a = torch.randn(32, 16, device=device).to(dtype)
        b = torch.randn(2, 16, 16, device=device).to(dtype)
        _grouped_mm(a, b, torch.tensor([8, 32], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError, TypeError) as e:
        return f"torch grouped_mm does not run for {dtype} on {device.type}: {str(e).splitlines()[0][:80]}"
    return None


# ---------------------------------------------------------------------------------- h3moe backends


def h3moe_backends(ops: tuple[str, ...], device: torch.device, interpreter: bool = False):
    """[(backend, None)] for the backends that can run every op of `ops` here, [(backend, reason)] else."""
    status = h3moe.backends()
    out = []
    for name in ("torch", "triton", "cuda"):
        st = status[name]
        missing = [op for op in ops if op not in _backend._OPS.get(name, ())]
        if not st.available:
            out.append((name, st.reason))
        elif missing:
            out.append((name, f"does not implement {', '.join(missing)} yet"))
        elif name == "triton" and device.type == "cpu" and not interpreter:
            out.append((name, "CPU tensors: the Triton interpreter is not timed (--interpreter to include it)"))
        elif name == "cuda" and device.type != "cuda":
            out.append((name, "needs CUDA tensors"))
        else:
            out.append((name, None))
    return out


def _with_weights(r, w):
    return dataclasses.replace(r, weights=w)


# --------------------------------------------------------------------------------- fwd-like builders


def _fwd_impls(c: Case, device, fns, interpreter):
    m = c.model
    impls, skipped = [], []
    for b, why in h3moe_backends(("moe",), device, interpreter):
        if why:
            skipped.append((f"h3moe:{b}", why))
            continue
        impls.append(Impl(f"h3moe:{b}", lambda s, b=b: (h3moe.moe(s["x"], s["w_gate_up"], s["w_down"], s["routing"],
                                                                 backend=b),)))
        if b == "triton" and device.type == "cuda" and m.K > 1 and c.T >= LOWP_MIN_T:
            # the slot rows in x's dtype instead of fp32 (H3MOE_COMBINE=lowp): what the fp32 combine costs
            impls.append(Impl("h3moe:triton-lowp", lambda s: _with_env(
                "H3MOE_COMBINE", "lowp", h3moe.moe, s["x"], s["w_gate_up"], s["w_down"], s["routing"],
                backend="triton")))
        if b == "triton" and _tma_row(c, device, skipped):  # every launch through tensor descriptors
            impls.append(Impl("h3moe:triton-tma", lambda s: _with_env(
                "H3MOE_TMA", "1", h3moe.moe, s["x"], s["w_gate_up"], s["w_down"], s["routing"], backend="triton")))
    for name in ("hf:eager", "hf:batched_mm", "hf:grouped_mm", "hf:h3moe"):
        if name not in fns:
            continue
        fn = fns[name]
        impls.append(Impl(name, lambda s, fn=fn: (fn(HFExperts(s["w_gate_up"], s["w_down"]), s["x"], s["ids"],
                                                    s["weights"]),)))
    impls.append(Impl("torch:grouped_mm", lambda s: (torch_grouped_mm_experts(s["x"], s["w_gate_up"], s["w_down"],
                                                                             s["weights"], s["ids"]),)))
    return impls, skipped


def _fwdbwd_prepare(s):
    """Fresh autograd leaves (sharing storage with the inputs) for one implementation."""
    t = dict(s)
    for k in ("x", "w_gate_up", "w_down", "weights"):
        t[k] = s[k].detach().requires_grad_(True)
    t["routing"] = _with_weights(s["routing"], t["weights"])
    return t


def _fwdbwd(forward):
    def run(s):
        leaves = (s["x"], s["w_gate_up"], s["w_down"], s["weights"])
        for t in leaves:
            t.grad = None
        y = forward(s)
        y.backward(s["dy"])
        return (y.detach(), *(t.grad for t in leaves))

    return run


def _fwdbwd_impls(c: Case, device, fns, interpreter):
    impls, skipped = [], []
    for b, why in h3moe_backends(("moe",), device, interpreter):
        if why:
            skipped.append((f"h3moe:{b}", why))
            continue
        fwd = lambda s, b=b: h3moe.moe(s["x"], s["w_gate_up"], s["w_down"], s["routing"], backend=b)  # noqa: E731
        impls.append(Impl(f"h3moe:{b}", _fwdbwd(fwd), _fwdbwd_prepare))
        if b == "triton":  # the memory-saving form: the backward recomputes gate/up instead of reading them
            from h3moe.ops import triton_experts

            fwd = lambda s: triton_experts.moe(s["x"], s["w_gate_up"], s["w_down"], s["routing"],  # noqa: E731
                                               recompute=True)
            impls.append(Impl("h3moe:triton-recompute", _fwdbwd(fwd), _fwdbwd_prepare))
            if _tma_row(c, device, skipped):  # forward and backward through tensor descriptors (H3MOE_TMA=1)
                tma = _fwdbwd(lambda s: h3moe.moe(s["x"], s["w_gate_up"], s["w_down"], s["routing"],
                                                  backend="triton"))
                impls.append(Impl("h3moe:triton-tma", lambda s, run=tma: _with_env("H3MOE_TMA", "1", run, s)[0],
                                  _fwdbwd_prepare))
    for name in ("hf:eager", "hf:batched_mm", "hf:grouped_mm", "hf:h3moe"):
        if name in fns:
            fn = fns[name]
            fwd = lambda s, fn=fn: fn(HFExperts(s["w_gate_up"], s["w_down"]), s["x"], s["ids"], s["weights"])  # noqa: E731
            impls.append(Impl(name, _fwdbwd(fwd), _fwdbwd_prepare))
    fwd = lambda s: torch_grouped_mm_experts(s["x"], s["w_gate_up"], s["w_down"], s["weights"], s["ids"])  # noqa: E731
    impls.append(Impl("torch:grouped_mm", _fwdbwd(fwd), _fwdbwd_prepare))
    return impls, skipped


def _layer_prepare_h3moe(b):
    def prepare(s):
        t = dict(s)
        try:  # the module itself, its parameters replaced by ours (built on meta: nothing allocated)
            m = h3moe.MoE(s["x"].shape[1], s["w_down"].shape[2], s["w_gate_up"].shape[0], s["ids"].shape[1],
                          backend=b, device="meta", dtype=s["x"].dtype)
            m.gate.weight = torch.nn.Parameter(s["router"], requires_grad=False)
            m.gate_up_proj = torch.nn.Parameter(s["w_gate_up"], requires_grad=False)
            m.down_proj = torch.nn.Parameter(s["w_down"], requires_grad=False)
            t["module"] = m
        except Exception:  # noqa: BLE001 — fall back to the same ops called one by one
            t["module"] = None
        return t

    return prepare


def _layer_run_h3moe(b):
    def run(s):
        if s["module"] is not None:
            return (s["module"](s["x"]),)
        logits = F.linear(s["x"], s["router"])
        r = h3moe.route(logits, s["ids"].shape[1], backend=b)
        return (h3moe.moe(s["x"], s["w_gate_up"], s["w_down"], r, backend=b),)

    return run


def _layer_impls(c: Case, device, fns, interpreter):
    K = c.model.K
    impls, skipped = [], []
    for b, why in h3moe_backends(("route", "moe"), device, interpreter):
        if why:
            skipped.append((f"h3moe:{b}", why))
            continue
        impls.append(Impl(f"h3moe:{b}", _layer_run_h3moe(b), _layer_prepare_h3moe(b)))
    for name in ("hf:eager", "hf:batched_mm", "hf:grouped_mm", "hf:h3moe"):
        if name in fns:
            fn = fns[name]

            def run(s, fn=fn):
                w, ids = hf_router(s["x"], s["router"], K)
                return (fn(HFExperts(s["w_gate_up"], s["w_down"]), s["x"], ids, w),)

            impls.append(Impl(name, run))

    def run_tgmm(s):
        w, ids = hf_router(s["x"], s["router"], K)
        return (torch_grouped_mm_experts(s["x"], s["w_gate_up"], s["w_down"], w, ids),)

    impls.append(Impl("torch:grouped_mm", run_tgmm))
    return impls, skipped


# ------------------------------------------------------------------------------- route and gating


def _route_impls(c: Case, device, interpreter):
    K = c.model.K
    impls, skipped = [], []
    for b, why in h3moe_backends(("route",), device, interpreter):
        if why:
            skipped.append((f"h3moe:{b}", why))
            continue
        impls.append(Impl(f"h3moe:{b}", lambda s, b=b: (h3moe.route(s["logits"], K, backend=b).weights,)))

    def eager(s):
        probs = torch.softmax(s["logits"].float(), dim=-1)
        w, _ = torch.topk(probs, K, dim=-1)
        return (w / w.sum(dim=-1, keepdim=True),)

    impls.append(Impl("torch:eager", eager))
    return impls, skipped


def _gating_prepare(s):
    t = dict(s)
    t["logits"] = [g.detach().requires_grad_(True) for g in s["logits"]]
    return t


def _gating_run(loss_fn):
    def run(s):
        loss = loss_fn(s)
        grads = torch.autograd.grad(loss, s["logits"])
        return (loss.detach(), list(grads))

    return run


def _gating_impls(c: Case, device, interpreter):
    impls, skipped = [], []
    for b, why in h3moe_backends(("gating_loss",), device, interpreter):
        if why:
            skipped.append((f"h3moe:{b}", why))
            continue
        impls.append(Impl(f"h3moe:{b}", _gating_run(
            lambda s, b=b: h3moe.gating_loss(s["logits"], s["labels"], s["mask"], backend=b)), _gating_prepare))
    impls.append(Impl("torch:eager", _gating_run(lambda s: ref.gating_loss_ref(s["logits"], s["labels"], s["mask"])),
                      _gating_prepare))
    return impls, skipped


# --------------------------------------------------------------------------------------- quantized


def _bnb():
    try:
        import bitsandbytes.functional as bnbf  # noqa: F401

        return bnbf
    except Exception as e:  # noqa: BLE001 — ImportError, or a broken native library
        raise Skip(f"bitsandbytes not importable: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}")


#: Quantized weights, per (quantizer, format, weight tensors). Entries hold the weight tensors themselves, so
#: an id is never reused while its entry lives; the driver clears the cache when it changes model.
_QCACHE: dict = {}
_QCACHE_MAX = 16


def clear_caches() -> None:
    _QCACHE.clear()


def _cached(kind: str, fmt: str, w_gate_up, w_down, make):
    key = (kind, fmt, id(w_gate_up), id(w_down), w_gate_up._version, w_down._version)
    if key not in _QCACHE:
        if len(_QCACHE) >= _QCACHE_MAX:
            _QCACHE.pop(next(iter(_QCACHE)))
        _QCACHE[key] = (w_gate_up, w_down, make(w_gate_up, w_down, fmt))
    return _QCACHE[key][2]


def _bnb_quantize_now(w_gate_up, w_down, fmt):
    bnbf = _bnb()
    out = []
    for w in (w_gate_up, w_down):
        per = []
        for e in range(w.shape[0]):
            if fmt == "nf4":
                per.append(bnbf.quantize_4bit(w[e].contiguous(), blocksize=64, quant_type="nf4"))
            else:
                q, st, _ = bnbf.int8_vectorwise_quant(w[e].contiguous())
                per.append((q, st))
        out.append(per)
    return out


def _bnb_quantize(fmt, w_gate_up, w_down):
    """Per-expert bitsandbytes quantization: (q_gu, q_d) lists of (packed, state) per expert."""
    return _cached("bnb", fmt, w_gate_up, w_down, _bnb_quantize_now)


def _bnb_dequant(fmt, q, dtype):
    bnbf = _bnb()
    if fmt == "nf4":
        return bnbf.dequantize_4bit(q[0], q[1], quant_type="nf4").to(dtype)
    return bnbf.int8_vectorwise_dequant(q[0], q[1]).to(dtype)


def _bnb_impl(c: Case) -> Impl:
    _bnb()
    fmt = c.case

    def prepare(s):
        t = dict(s)
        t["bnb"] = _bnb_quantize(fmt, s["w_gate_up"], s["w_down"])
        return t

    def run(s):
        # transformers' eager loop with each hit expert's weights dequantized first (bitsandbytes Linear).
        x, ids, w = s["x"], s["ids"], s["weights"]
        q_gu, q_d = s["bnb"]
        E = len(q_gu)
        y = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)  # (E, K, T)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            pos, tok = torch.where(mask[e])
            gate, up = F.linear(x[tok], _bnb_dequant(fmt, q_gu[e], x.dtype)).chunk(2, dim=-1)
            o = F.linear(F.silu(gate) * up, _bnb_dequant(fmt, q_d[e], x.dtype))
            y.index_add_(0, tok, (o * w[tok, pos, None]).to(y.dtype))
        return (y,)

    def dequantized(s):
        q_gu, q_d = _bnb_quantize(fmt, s["w_gate_up"], s["w_down"])
        return (torch.stack([_bnb_dequant(fmt, q, torch.float32) for q in q_gu]),
                torch.stack([_bnb_dequant(fmt, q, torch.float32) for q in q_d]))

    return Impl("bnb:dequant+mm", run, prepare, dequantized, ref_key="bnb")


def _h3moe_quant_api():
    """h3moe's quantized experts as three callables: quantize(w_gate_up, w_down, fmt) -> q (bitsandbytes'
    per-expert layout, blocksize 64, no nesting), run(x, q, routing, backend) -> y, dequantize(q) ->
    (w_gate_up, w_down) fp32. Raises Skip where h3moe has no quantized path yet."""
    try:
        from h3moe.integrations.bitsandbytes import quantize_weight
        from h3moe.ops.quant import quant_moe
    except ImportError as e:
        raise Skip(f"h3moe's quantized experts not importable: {e}")

    def quantize(w_gate_up, w_down, fmt):
        return quantize_weight(w_gate_up, fmt, 64), quantize_weight(w_down, fmt, 64)

    def run(x, q, routing, backend):
        return quant_moe(x, q[0].packed, q[1].packed, routing, backend=backend)

    def dequantize(q):
        return q[0].dequantize(dtype=torch.float32), q[1].dequantize(dtype=torch.float32)

    return quantize, run, dequantize


def _default_w4_lookup(T: int) -> str:
    from h3moe.kernels.quant import default_w4_lookup

    return default_w4_lookup(T)


def _other_quant_kernel(T: int) -> str:
    """The quantized kernels a bf16 call over T tokens does not take by default, to time beside them: "tc"
    where the GEMV or the tl.dot kernels are the default, else the GEMV (T <= GEMV_MAX_T) or tl.dot."""
    from h3moe.kernels.quant import GEMV_MAX_T, quant_kernel

    if quant_kernel(T, True) != "tc":
        return "tc"
    return "gemv" if T <= GEMV_MAX_T else "dot"


def _with_env(var: str, value: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) with os.environ[var] = value, as a 1-tuple of its output (a few µs of Python: compare
    the '+graph' rows, where the launch was captured with the variable set)."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        return (fn(*args, **kwargs),)
    finally:
        if old is None:
            del os.environ[var]
        else:
            os.environ[var] = old


def _quant_impls(c: Case, device, interpreter):
    impls, skipped = [], []
    fmt = c.case
    try:
        quantize, quant_moe, dequantize = _h3moe_quant_api()

        def q_of(s):
            return _cached("h3moe", fmt, s["w_gate_up"], s["w_down"], quantize)

        def prepare(s):
            t = dict(s)
            t["q"] = q_of(s)
            return t

        def dequantized(s):
            return tuple(w.float() for w in dequantize(q_of(s)))

        for b, why in h3moe_backends(("quant_moe",), device, interpreter):
            if why:
                skipped.append((f"h3moe:{b}", why))
                continue
            impls.append(Impl(f"h3moe:{b}", lambda s, b=b: (quant_moe(s["x"], s["q"], s["routing"], backend=b),),
                              prepare, dequantized, ref_key="h3moe"))
            if b == "triton" and fmt == "nf4" and device.type == "cuda":
                # the 4-bit kernels' other nibble lookup at this T (warp shuffle / 16-entry table load)
                other = "load" if _default_w4_lookup(c.T) == "shfl" else "shfl"
                impls.append(Impl(f"h3moe:triton-{other}", lambda s, other=other: _with_env(
                    "H3MOE_W4_LOOKUP", other, quant_moe, s["x"], s["q"], s["routing"], backend="triton"),
                    prepare, dequantized, ref_key="h3moe"))
            if b == "triton" and device.type == "cuda":
                # the kernels the default does not take at this T (tensor cores / GEMV / tl.dot), 4-bit and int8
                other = _other_quant_kernel(c.T)
                impls.append(Impl(f"h3moe:triton-{other}", lambda s, other=other: _with_env(
                    "H3MOE_QUANT_KERNEL", other, quant_moe, s["x"], s["q"], s["routing"], backend="triton"),
                    prepare, dequantized, ref_key="h3moe"))
    except Skip as e:
        skipped.append(("h3moe:*", str(e)))
    try:
        impls.append(_bnb_impl(c))
    except Skip as e:
        skipped.append(("bnb:dequant+mm", str(e)))
    return impls, skipped


# ---------------------------------------------------------------------------------------- CUDA graphs

#: Decode (T <= GRAPH_MAX_T) rows are also timed replayed from a CUDA graph: what a serving engine runs (vLLM,
#: transformers' static cache + torch.compile "reduce-overhead"), the kernels' own time without Python's
#: launch overhead (about 0.1-0.2 ms per layer call, more than the GPU time of a small model's decode).
GRAPH_MAX_T = 16
#: Implementations known to capture (no host synchronization).
GRAPHABLE = ("h3moe:", "torch:grouped_mm")


def _graphed(impl: Impl) -> Impl:
    """impl replayed from a CUDA graph captured per input set: '<name>+graph'."""

    def prepare(s):
        st = impl.prepare(s)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compiles, autotunes) outside the capture
            for _ in range(2):
                impl.run(st)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                outs = impl.run(st)
        except Exception as e:  # noqa: BLE001 — an implementation that cannot be captured: its row is skipped
            raise Skip(f"CUDA graph capture failed: {type(e).__name__}: {str(e).strip()[:120]}") from None
        return {"graph": g, "outs": outs, "state": st}

    def run(s):
        s["graph"].replay()
        return s["outs"]

    deq = (lambda s: impl.dequantized(s)) if impl.dequantized else None
    return Impl(f"{impl.name}+graph", run, prepare, deq, ref_key=impl.ref_key)


def _with_graphs(c: Case, device, impls: list) -> list:
    if device.type != "cuda" or c.T > GRAPH_MAX_T:
        return impls
    return impls + [_graphed(i) for i in impls if i.name.startswith(GRAPHABLE)]


# ------------------------------------------------------------------------------------------ entry


def implementations(c: Case, device: torch.device, *, interpreter: bool = False, only=None):
    """(impls, skipped) for case c on device: skipped is [(impl name, reason)]. `only`: keep the
    implementations whose name contains one of these strings."""
    skipped = []
    if c.case in ("fwd", "fwdbwd", "layer"):
        fns, why = _hf_functions()
        skipped += list(why.items())
        cap = BATCHED_MM_CAP["cuda" if device.type == "cuda" else "cpu"] // (2 if c.case == "fwdbwd" else 1)
        gathered = c.S * 3 * c.model.I * c.model.H * torch.finfo(c.dtype).bits // 8
        if "hf:batched_mm" in fns and gathered > cap:
            fns.pop("hf:batched_mm")
            skipped.append(("hf:batched_mm", f"would gather {gathered / 2**30:.1f} GiB of weights "
                                             f"(cap {cap / 2**30:.2f} GiB)"))
        builder = {"fwd": _fwd_impls, "fwdbwd": _fwdbwd_impls, "layer": _layer_impls}[c.case]
        impls, sk = builder(c, device, fns, interpreter)
        gmm_why = _torch_gmm_runs(device, c.dtype)
        if gmm_why:
            impls = [i for i in impls if i.name != "torch:grouped_mm"]
            sk.append(("torch:grouped_mm", gmm_why))
        if c.case == "fwd":
            impls = _with_graphs(c, device, impls)
    elif c.case == "route":
        impls, sk = _route_impls(c, device, interpreter)
    elif c.case == "gating":
        impls, sk = _gating_impls(c, device, interpreter)
    elif c.case in QUANT_CASES:
        impls, sk = _quant_impls(c, device, interpreter)
        impls = _with_graphs(c, device, impls)
    else:
        raise ValueError(f"unknown case {c.case!r}")
    skipped += sk
    plan_skips = dict(c.skip)
    kept = []
    for i in impls:
        if i.name in plan_skips:
            skipped.append((i.name, plan_skips[i.name]))
        elif not only or any(o in i.name for o in only):
            kept.append(i)
    if only:
        skipped = [(n, r) for n, r in skipped if any(o in n for o in only)]
    return kept, skipped
