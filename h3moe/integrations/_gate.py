"""What an experts module computes between its gate/up and down projections, in h3moe's terms.

transformers' fused experts apply `act_fn(gate) * up` (its `_default_apply_gate`) unless the class defines its
own `_apply_gate`. Several do: the clamped SwiGLU of DeepSeek-V4, GLM-5-Next and Hunyuan-V4
(`act(min(gate, L)) * clamp(up, -L, L)`, L = their `swiglu_limit`), which h3moe computes (`swiglu_limit=`);
SwiGLU computed in fp32 (Beam), which h3moe's kernels compute anyway; and forms h3moe does not compute
(gpt-oss's and MiniMax-M3's alpha and `up + 1`, Inkling-2's softcap). An own `_apply_gate` is recognised by
what it computes, not by its name: it is run once per class on a fixed probe (values well past any limit,
exact bounds included) against h3moe's forms, on a stand-in `self`, and taken only where it equals one
within fp32 rounding. Anything else keeps the model's own experts (transformers' path, or not quantized).
"""
from __future__ import annotations

import sys
import types

import torch

from ..reference import ACTIVATIONS, glu_ref

__all__ = ["gate_form", "activation_name"]

# transformers / torch activation classes → h3moe activation names (exact same function).
_ACT_BY_CLASS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",  # erf GELU (C or python form)
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUPytorchTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",
}
_ACT_BY_FUNCTION = {
    torch.nn.functional.silu: "silu",
    torch.nn.functional.gelu: "gelu",
    torch.nn.functional.relu: "relu",
    torch.relu: "relu",
}


def activation_name(act_fn) -> str | None:
    """The h3moe activation equal to a model's `act_fn`, or None."""
    if act_fn is None:
        return None
    if isinstance(act_fn, torch.nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act_fn.approximate)
    name = _ACT_BY_CLASS.get(type(act_fn).__name__)
    if name is not None:
        return name
    try:
        return _ACT_BY_FUNCTION.get(act_fn)
    except TypeError:  # unhashable
        return None


#: (class, activation name of the instance) → (activation, clamped) or None; filled by the eager probe.
_FORMS: dict = {}
_PROBE_LIMIT = 1.75


def _probe() -> torch.Tensor:
    """(16, 2*40) fp32 gate/up rows: a grid over ±4 limits with the bounds themselves, random values, and
    large ones (softcaps and other saturating forms show there)."""
    L = _PROBE_LIMIT
    kw = dict(device="cpu", dtype=torch.float32)  # whatever torch.set_default_device/dtype say
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-4 * L, 4 * L, 40, **kw)
    edges = torch.tensor([L, -L, 0.0, L * (1 + 1e-3), -L * (1 + 1e-3), 30.0, -30.0, 80.0], **kw)
    gate = torch.cat([grid.expand(8, 40), torch.randn(8, 40, generator=g, **kw) * 2 * L])
    up = torch.cat([grid.flip(0).expand(8, 40), torch.randn(8, 40, generator=g, **kw) * 2 * L])
    gate[0, :8], up[1, :8], gate[2, :8], up[2, :8] = edges, edges, edges, edges.flip(0)
    return torch.cat([gate, up], dim=1)


def _matches_nothing(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, 12345.0)


def _own_form(cls: type, act: str | None) -> tuple[str, bool] | None:
    key = (cls, act)
    if key in _FORMS:
        return _FORMS[key]
    h = _probe()
    I = h.shape[1] // 2
    found = None
    for name in dict.fromkeys(n for n in (act, "silu") if n):
        # the instance's own activation stands in for its act_fn; the other candidate (silu, for gates that
        # call F.silu themselves: GLM-5-Next, Hunyuan-V4) gets an act_fn that matches nothing, so a gate that
        # calls self.act_fn with an activation h3moe lacks (quick_gelu, gelu_10, ...) is not taken for silu
        act_fn = ACTIVATIONS[name] if name == act else _matches_nothing
        fake = types.SimpleNamespace(act_fn=act_fn, limit=_PROBE_LIMIT, swiglu_limit=_PROBE_LIMIT)
        try:
            with torch.no_grad():
                got = cls._apply_gate(fake, h.clone())
        except Exception:  # noqa: BLE001 (it reads something the stand-in lacks: not one of ours)
            break
        if not isinstance(got, torch.Tensor) or got.shape != (h.shape[0], I):
            break
        for clamped in (False, True):
            want = glu_ref(h[:, :I], h[:, I:], name, _PROBE_LIMIT if clamped else None)
            if torch.allclose(got.float(), want, rtol=1e-5, atol=1e-6):
                found = (name, clamped)
                break
        if found:
            break
    _FORMS[key] = found
    return found


# torch.compile evaluates the probe at trace time, eagerly, and keeps its answer as a constant of the graph (what
# torch.compiler.assume_constant_result sets): a model compiled before any eager call takes h3moe too.
_own_form._dynamo_marked_constant = True


def _limit_of(m) -> float | None:
    vals = {float(v) for v in (getattr(m, "swiglu_limit", None), getattr(m, "limit", None))
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return vals.pop() if len(vals) == 1 and 0 < next(iter(vals)) < float("inf") else None


def gate_form(m: torch.nn.Module, default_act: str | None = None, gated: bool = True) -> tuple[str, float | None] | str:
    """(activation, swiglu_limit) h3moe computes exactly as experts module m's gate, or why not (a str).
    default_act: the activation when m has no act_fn (None: that is a reason). Ungated experts (gated=False)
    apply act_fn to up alone: transformers never calls their _apply_gate."""
    act_fn = getattr(m, "act_fn", None)
    act = activation_name(act_fn) if act_fn is not None else default_act
    apply_gate = getattr(type(m), "_apply_gate", None)
    moe_mod = sys.modules.get("transformers.integrations.moe")
    default = getattr(moe_mod, "_default_apply_gate", None)
    if not gated or apply_gate is None or apply_gate is default:
        if act is None:
            return f"activation {type(act_fn).__name__} not in silu/gelu/gelu_tanh/relu/relu2"
        return act, None
    form = _own_form(type(m), act)
    if form is None:
        return f"its own {type(m).__name__}._apply_gate"
    name, clamped = form
    if not clamped:
        return name, None
    limit = _limit_of(m)
    if limit is None:
        return f"{type(m).__name__}._apply_gate clamps, but no one swiglu_limit/limit value on the module"
    return name, limit
