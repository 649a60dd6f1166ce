"""Drop-in h3moe for Hugging Face transformers 5.x MoE models.

Two levels:

1. The experts interface. Importing h3moe registers "h3moe" in transformers' `ExpertsInterface` (lazily: the
   registration runs when `transformers.integrations.moe` is first imported, so `import h3moe` does not pay
   for importing transformers, ~2 s). Then `from_pretrained(..., experts_implementation="h3moe")` or
   `model.set_experts_implementation("h3moe")` runs `h3moe.moe` in every family whose experts class carries
   `@use_experts_implementation`. The forward honors the decorator's flags: the standard layout (concatenated
   [gate; up] rows, no bias, a gate, act_fn in silu/gelu/gelu_tanh/relu) runs h3moe, and so does a class's
   own `_apply_gate` where it computes one of h3moe's forms: the clamped SwiGLU of DeepSeek-V4, GLM-5-Next and
   Hunyuan-V4 (swiglu_limit), SwiGLU in fp32 (Beam); recognised by a one-time probe (h3moe/integrations/_gate.py;
   under torch.compile it runs at trace time). Ungated experts (has_gate=False: Nemotron-H's relu2 of up_proj)
   run h3moe.moe(gated=False).
   Transposed weights are viewed back as (E, 2I, H)/(E, H, I) and run on the torch backend under "auto"
   (the GPU kernels would copy every expert at every call). Any other variant (gpt-oss: transposed +
   interleaved + biases + alpha SwiGLU; MiniMax-M3's and Inkling-2's gates; post-expert norm; quantized
   weights; another activation) falls back to transformers' `grouped_mm` forward, with one log line per
   variant. Expert-parallel sentinels (ids >= E, weight 0) are clamped to a real expert with weight 0.

2. `patch(model)` sets that experts implementation and also swaps each known router's forward for h3moe's
   (see h3moe/integrations/routers.py: the fused softmax-top-k kernel for Mixtral/Qwen/OLMoE and gpt-oss,
   vectorized torch for DeepSeek-V3's sigmoid group-limited routing). The router modules stay (only their
   forward is replaced, on the instance), so parameters, state_dict keys, checkpoints, the `router_logits`
   output-capture hooks and the auxiliary loss are untouched. It returns a `PatchReport`; `unpatch(model)`
   restores the original forwards and experts implementation.
"""
from __future__ import annotations

import copy
import importlib.abc
import importlib.util
import logging
import sys
from dataclasses import dataclass, field

import torch

from .. import _backend
from ..ops.experts import _use_torch_gmm, moe
from . import routers as _routers
from ._gate import activation_name, gate_form  # noqa: F401 (activation_name: part of this module's API)

__all__ = ["patch", "unpatch", "PatchReport", "Swap", "h3moe_experts_forward", "register", "install_import_hook"]

logger = logging.getLogger("h3moe")

NAME = "h3moe"
_TARGET = "transformers.integrations.moe"

# --- the experts forward -------------------------------------------------------------------------------


def _is_interface_experts(m: torch.nn.Module) -> bool:
    """An experts module built by transformers' @use_experts_implementation."""
    return hasattr(m, "is_concatenated") and hasattr(m, "is_transposed") and hasattr(type(m), "_apply_gate")


def _float3d(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point() and type(t) in (
        torch.Tensor, torch.nn.Parameter
    )


def experts_plan(self: torch.nn.Module) -> tuple[str, bool, float | None, bool] | str:
    """(activation, transposed, swiglu_limit, gated) when h3moe.moe computes these experts exactly; else why
    not. Ungated experts (has_gate=False, Nemotron-H: down(act(up))) read `up_proj` (E, I, H)."""
    why = []
    gated = getattr(self, "has_gate", True)
    if getattr(self, "has_bias", False):
        why.append("biases")
    if not getattr(self, "is_concatenated", True):
        why.append("interleaved gate/up")
    if getattr(self, "has_post_expert_norm", False):
        why.append("post-expert norm")
    form = gate_form(self, gated=gated) if not why else "(not probed)"
    if isinstance(form, str) and not why:
        why.append(form)
    gu = getattr(self, "gate_up_proj" if gated else "up_proj", None)
    dn = getattr(self, "down_proj", None)
    if not (_float3d(gu) and _float3d(dn)):
        why.append(f"{'gate_up_proj' if gated else 'up_proj'}/down_proj are not plain float (E, ., .) tensors "
                   "(quantized?)")
    elif gu.dtype != dn.dtype:
        why.append(f"gate_up_proj {gu.dtype} and down_proj {dn.dtype} differ")
    if why:
        if getattr(self, "is_transposed", False):
            why.insert(0, "transposed")
        return ", ".join(why)
    act, limit = form
    return act, bool(getattr(self, "is_transposed", False)), limit, bool(gated)


_LOGGED: set[str] = set()


def _fallback(self, hidden_states, top_k_index, top_k_weights, why: str):
    from transformers.integrations.moe import grouped_mm_experts_forward

    _routers.clear_routing()
    key = f"{type(self).__name__}: {why}"
    if key not in _LOGGED and not torch.compiler.is_compiling():  # (logging breaks a fullgraph trace)
        _LOGGED.add(key)
        logger.warning("h3moe: %s is not covered by h3moe.moe (%s); using transformers' grouped_mm", *key.split(": ", 1))
    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def h3moe_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,  # (T, H)
    top_k_index: torch.Tensor,  # (T, K) int
    top_k_weights: torch.Tensor,  # (T, K) float (router dtype: fp32 or the hidden dtype)
) -> torch.Tensor:
    """ExpertsInterface forward: h3moe.moe over the module's fused expert weights. Returns (T, H)."""
    plan = experts_plan(self)
    if isinstance(plan, str):
        return _fallback(self, hidden_states, top_k_index, top_k_weights, plan)
    activation, transposed, limit, gated = plan
    backend = getattr(self, "_h3moe_backend", "auto")
    w_gate_up = self.gate_up_proj if gated else self.up_proj  # (E, 2I, H) (ungated (E, I, H)) or transposed
    w_down = self.down_proj  # (E, H, I) or transposed
    if transposed:
        w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)  # views
        if backend == "auto" and _backend.auto_requested() and _use_torch_gmm(w_gate_up, w_down):
            # the torch backend reads the views as they are (torch's grouped matmul takes either layout); the
            # Triton and cuda kernels want (E, 2I, H) rows: a copy of every expert at every call (~1.6 GB per
            # layer for Aria's experts), which costs more than they save. Without grouped_mm for this dtype and
            # device the torch backend would gather a weight copy per row instead: the kernels, copied, win.
            backend = "torch"
        elif _backend.resolve(backend, hidden_states.device, "moe") != "torch":
            w_gate_up, w_down = w_gate_up.contiguous(), w_down.contiguous()  # asked for: a copy per call
    x = hidden_states if hidden_states.dtype == w_gate_up.dtype else hidden_states.to(w_gate_up.dtype)
    if x.shape[0] == 0:
        return hidden_states.new_zeros(hidden_states.shape)
    if getattr(self, "_is_expert_parallel", False):
        E = w_gate_up.shape[0]
        sentinel = top_k_index >= E  # (T, K) slots owned by another rank
        top_k_index = top_k_index.clamp(max=E - 1)
        top_k_weights = top_k_weights.masked_fill(sentinel, 0.0)
        routing = (top_k_weights, top_k_index)
    else:
        routing = _routers.take_routing(top_k_index, top_k_weights)
        if routing is None:
            routing = (top_k_weights, top_k_index)
    y = moe(x, w_gate_up, w_down, routing, activation=activation, backend=backend, swiglu_limit=limit, gated=gated)
    return y if y.dtype == hidden_states.dtype else y.to(hidden_states.dtype)


# --- registration --------------------------------------------------------------------------------------


def register() -> bool:
    """Register "h3moe" in transformers' ExpertsInterface (imports transformers). False without it."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(NAME, h3moe_experts_forward)
    return True


def _register_into(module) -> None:
    try:
        module.ExpertsInterface.register(NAME, h3moe_experts_forward)
    except Exception as e:  # never break transformers' import
        logger.debug("h3moe: could not register in ExpertsInterface: %s", e)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers h3moe when transformers.integrations.moe is imported, after the module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_into(module)

        loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


_HOOK = _RegisterOnImport()


def install_import_hook() -> None:
    """Called by `import h3moe`: register now if transformers' MoE module is loaded, else when it is.
    Does nothing (and costs nothing) without transformers."""
    if _TARGET in sys.modules:
        _register_into(sys.modules[_TARGET])
        return
    if _HOOK in sys.meta_path:
        return
    try:
        if importlib.util.find_spec("transformers") is None:
            return
    except (ImportError, ValueError):
        return
    sys.meta_path.insert(0, _HOOK)


# --- patch / unpatch -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Swap:
    path: str  # module path in the model ("" for the root)
    cls: str  # module class
    role: str  # "router" or "experts"
    detail: str  # what runs now, or why it was left alone


@dataclass
class PatchReport:
    """What h3moe.patch swapped, per module path, and what it left alone and why."""

    backend: str
    experts_implementation: str | None = None  # the model's experts implementation before the patch
    swapped: list[Swap] = field(default_factory=list)
    left_alone: list[Swap] = field(default_factory=list)

    def routers(self) -> dict[str, str]:
        return {s.path: s.detail for s in self.swapped if s.role == "router"}

    def experts(self) -> dict[str, str]:
        return {s.path: s.detail for s in self.swapped if s.role == "experts"}

    def __str__(self) -> str:
        lines = [f"h3moe.patch (backend={self.backend}; experts implementation was {self.experts_implementation!r})"]
        lines += [f"  swapped  {s.role:7s} {s.path} ({s.cls}): {s.detail}" for s in self.swapped]
        lines += [f"  left     {s.role:7s} {s.path} ({s.cls}): {s.detail}" for s in self.left_alone]
        return "\n".join(lines)


def _probe(module: torch.nn.Module, kind: str, wdtype: str) -> str | None:
    """Check on a float64 copy with random parameters that h3moe's router computes exactly what the module's
    own forward does (same logits, same expert sets, same weights). None if equal, else why not."""
    w = module.weight
    if w.device.type == "meta":
        return None
    with torch.no_grad():
        m = copy.deepcopy(module)
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m.__dict__.pop("forward", None)
        m = m.double()
        for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
            t.normal_()
        x = torch.randn(16, w.shape[1], dtype=torch.float64, device=w.device)
        try:
            ref = type(module).forward(m, x)
            out = _routers._FORWARDS[kind](m, x, backend="torch", wdtype=wdtype)
        except Exception as e:  # noqa: BLE001 - report, don't patch
            return f"probe failed: {type(e).__name__}: {e}"
        if not (isinstance(ref, tuple) and len(ref) == 3):
            return "its forward does not return (logits, weights, ids)"
        if not torch.allclose(ref[0].double(), out[0].double(), rtol=1e-6, atol=1e-6):
            return "probe: router logits differ from the module's forward"
        ri, ro = ref[2].sort(dim=-1), out[2].sort(dim=-1)
        if not torch.equal(ri.values, ro.values):
            return "probe: expert choice differs from the module's forward"
        rw, ow = ref[1].gather(1, ri.indices).double(), out[1].gather(1, ro.indices).double()
        if not torch.allclose(rw, ow, rtol=1e-5, atol=1e-6):
            return "probe: routing weights differ from the module's forward"
    return None


def patch(
    model: torch.nn.Module,
    *,
    backend: str = "auto",
    routers: bool = True,
    experts: bool = True,
    probe: bool = True,
) -> PatchReport:
    """Run a transformers MoE model's routers and experts on h3moe kernels, in place.

    Args:
        model: a transformers 5.x model (or any module containing their MoE blocks).
        backend: "auto", "torch", "triton" or "cuda", for every h3moe op the patched model runs.
        routers: swap known routers' forwards for h3moe routing.
        experts: set the model's experts implementation to "h3moe".
        probe: check each router's replacement against its own forward on a float64 copy first.
    Returns:
        PatchReport: per module path, what was swapped and what was left alone and why.
    """
    if backend not in _backend.BACKENDS and backend != "auto":
        raise ValueError(f"backend: expected one of {_backend.BACKENDS} or 'auto', got {backend!r}")
    if not register():
        raise ImportError("h3moe.patch needs transformers (pip install transformers)")
    if backend != "auto":  # an explicit backend that cannot run here fails now, not at the first forward
        p = next(model.parameters(), None)
        if p is not None and p.device.type != "meta":
            for op in ("route", "moe"):
                _backend.resolve(backend, p.device, op)
    if "_h3moe_state" in model.__dict__:
        unpatch(model)
    report = PatchReport(backend=backend)
    state: dict = {"experts_implementation": None}

    expert_modules = [(n, m) for n, m in model.named_modules() if _is_interface_experts(m)]
    if expert_modules:
        config = getattr(model, "config", None)
        report.experts_implementation = getattr(config, "_experts_implementation", None)
        if experts and hasattr(model, "set_experts_implementation"):
            state["experts_implementation"] = (
                model.get_experts_implementation() if hasattr(model, "get_experts_implementation")
                else report.experts_implementation
            )
            model.set_experts_implementation(NAME)
        for n, m in expert_modules:
            cls = type(m).__name__
            impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
            if not experts:
                report.left_alone.append(Swap(n, cls, "experts", "experts=False"))
                continue
            if impl != NAME:
                report.left_alone.append(Swap(n, cls, "experts", f"its config dispatches to {impl!r}"))
                continue
            m._h3moe_backend = backend
            plan = experts_plan(m)
            if isinstance(plan, str):
                report.left_alone.append(Swap(n, cls, "experts", f"falls back to transformers' grouped_mm: {plan}"))
            else:
                act, transposed, limit, gated = plan
                how = "transposed views" if transposed else "in place"
                lim = (f", swiglu_limit={limit}" if limit is not None else "") + ("" if gated else ", gated=False")
                report.swapped.append(Swap(n, cls, "experts", f"h3moe.moe(activation={act!r}{lim}), weights {how}"))

    for n, m in model.named_modules():
        cls = type(m).__name__
        kind, wdtype = _routers.router_kind(m)
        if kind is None:
            if cls.lower().endswith("router"):
                report.left_alone.append(Swap(n, cls, "router", wdtype))
            continue
        if not routers:
            report.left_alone.append(Swap(n, cls, "router", "routers=False"))
            continue
        why = _probe(m, kind, wdtype) if probe else None
        if why is not None:
            report.left_alone.append(Swap(n, cls, "router", why))
            continue
        stash = any(s.role == "experts" for s in report.swapped)  # the experts take the routing over
        m.forward = _routers.make_forward(m, kind, wdtype, backend, stash=stash)
        report.swapped.append(Swap(n, cls, "router", _routers.describe(kind, m)))

    model._h3moe_state = state
    model._h3moe_report = report
    return report


def unpatch(model: torch.nn.Module) -> list[str]:
    """Undo h3moe.patch: the original router forwards and experts implementation. Returns the paths restored."""
    state = model.__dict__.pop("_h3moe_state", None)
    model.__dict__.pop("_h3moe_report", None)
    restored = []
    for n, m in model.named_modules():
        if _routers.is_patched(m):
            del m.__dict__["forward"]
            restored.append(n)
        if m.__dict__.pop("_h3moe_backend", None) is not None and n not in restored:
            restored.append(n)
    prev = state["experts_implementation"] if state else None
    if prev is not None and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(prev)
    return restored
