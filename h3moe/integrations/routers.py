"""Router kinds of the transformers MoE families, and the fast forwards that replace them.

Every router takes hidden states (..., H) and returns `(router_logits (T, E), top_k_weights (T, K),
top_k_index (T, K))`, as transformers 5.x routers do. The kinds:

    softmax_topk          softmax over E, top-k, optional renormalization (Mixtral, Qwen2/3-MoE, OLMoE):
                          h3moe.route, the fused routing kernel.
    topk_softmax          top-k of the logits, then softmax over the K picked (gpt-oss): h3moe.route with
                          renormalize=True, which is the same function — softmax(l)_k / Σ_{j∈topk} softmax(l)_j
                          = exp(l_k) / Σ_{j∈topk} exp(l_j) — and the same top-k, softmax being monotone.
    sigmoid_group_topk    sigmoid scores, + e_score_correction_bias for the choice only, group-limited top-k
                          (keep `topk_group` of `n_group` groups ranked by the sum of their two best), the
                          weights gathered from the biased-free scores, optional renormalization, times
                          `routed_scaling_factor` (DeepSeek-V3). No h3moe kernel covers it: vectorized torch
                          here, equal to the eager router (and skipping the group stage when every group is
                          kept).

The fused softmax-top-k path hands its Routing (with the expert-sorted permutation) to the experts forward of
the same layer through `take_routing`, so that the permutation is computed once per layer, not twice.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..ops.routing import Routing, route

__all__ = ["ROUTER_KINDS", "RouterForward", "router_kind", "make_forward", "is_patched", "take_routing", "sigmoid_group_topk"]

# Known router classes (by class name) → (kind, dtype of the returned weights: "fp32" or "logits").
ROUTER_KINDS: dict[str, tuple[str, str]] = {
    "MixtralTopKRouter": ("softmax_topk", "fp32"),
    "Qwen2MoeTopKRouter": ("softmax_topk", "logits"),
    "Qwen3MoeTopKRouter": ("softmax_topk", "logits"),
    "OlmoeTopKRouter": ("softmax_topk", "logits"),
    "GptOssTopKRouter": ("topk_softmax", "logits"),
    "DeepseekV3TopkRouter": ("sigmoid_group_topk", "fp32"),
}

_REQUIRED = {
    "softmax_topk": ("weight", "top_k"),
    "topk_softmax": ("weight", "bias", "top_k"),
    "sigmoid_group_topk": (
        "weight", "top_k", "e_score_correction_bias", "num_group", "topk_group", "norm_topk_prob",
        "routed_scaling_factor",
    ),
}


def router_kind(module: torch.nn.Module) -> tuple[str | None, str]:
    """(kind, weights dtype rule) of a router module, or (None, why not)."""
    name = type(module).__name__
    if name not in ROUTER_KINDS:
        return None, f"unknown router class {name}"
    kind, wdtype = ROUTER_KINDS[name]
    missing = [a for a in _REQUIRED[kind] if not hasattr(module, a)]
    if missing:
        return None, f"{name} lacks {missing} (transformers version drift?)"
    w = module.weight
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        return None, f"{name}.weight is not a float (E, H) tensor (quantized router?)"
    return kind, wdtype


# --- hand-off of the fused routing to the experts of the same layer -------------------------------------

_LAST = threading.local()


def _stash(routing: Routing) -> None:
    if not torch.compiler.is_compiling():
        _LAST.routing = routing


def clear_routing() -> None:
    _LAST.routing = None


def take_routing(top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> Routing | None:
    """The Routing the patched router computed for exactly this `top_k_index` tensor (same object), with
    `top_k_weights` as its weights; None otherwise (the caller then sorts by expert itself)."""
    r = getattr(_LAST, "routing", None)
    if r is None or r.ids is not top_k_index or torch.compiler.is_compiling():
        return None
    _LAST.routing = None
    return Routing(top_k_weights, r.ids, r.counts, r.offsets, r.sorted_slots)


# --- the forwards --------------------------------------------------------------------------------------


def _softmax_topk_forward(self, hidden_states, *, backend, wdtype, stash=False):
    hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
    logits = F.linear(hidden_states, self.weight)  # (T, E)
    renorm = bool(getattr(self, "norm_topk_prob", True))  # Mixtral has no flag: always renormalizes
    r = route(logits, self.top_k, renormalize=renorm, backend=backend)
    weights = r.weights if wdtype == "fp32" else r.weights.to(logits.dtype)  # (T, K)
    if stash:
        _stash(r)
    return logits, weights, r.ids


def _topk_softmax_forward(self, hidden_states, *, backend, wdtype, stash=False):
    hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
    logits = F.linear(hidden_states, self.weight, self.bias)  # (T, E)
    r = route(logits, self.top_k, renormalize=True, backend=backend)
    weights = r.weights.to(logits.dtype)  # (T, K) gpt-oss returns the logits' dtype
    if stash:
        _stash(r)
    return logits, weights, r.ids


def sigmoid_group_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing. logits (T, E) fp32 → weights (T, K) fp32, ids (T, K) int64 (descending score)."""
    T, E = logits.shape
    scores = logits.sigmoid()  # (T, E)
    choice = scores + correction_bias  # (T, E) only picks experts, never weighs them
    if topk_group < n_group:
        per_group = choice.view(T, n_group, E // n_group)  # (T, G, E/G)
        group_scores = per_group.topk(2, dim=-1).values.sum(dim=-1)  # (T, G)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
        keep = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device).scatter_(1, group_idx, True)
        choice = per_group.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, E)
    ids = choice.topk(top_k, dim=-1).indices  # (T, K)
    weights = scores.gather(1, ids)  # (T, K)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def _sigmoid_group_topk_forward(self, hidden_states, *, backend, wdtype, stash=False):
    hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
    logits = F.linear(hidden_states.float(), self.weight.float())  # (T, E) fp32, as DeepSeek-V3 does
    weights, ids = sigmoid_group_topk(
        logits,
        self.e_score_correction_bias.float(),
        self.top_k,
        self.num_group,
        self.topk_group,
        bool(self.norm_topk_prob),
        float(self.routed_scaling_factor),
    )
    return logits, weights, ids


_FORWARDS = {
    "softmax_topk": _softmax_topk_forward,
    "topk_softmax": _topk_softmax_forward,
    "sigmoid_group_topk": _sigmoid_group_topk_forward,
}


class RouterForward:
    """The forward h3moe sets on a router instance (`module.forward = RouterForward(...)`): computes router
    `kind` with h3moe. A plain object holding the module, so copy.deepcopy of the model rebinds it to the copy
    and pickling the whole model works. `stash`: hand the Routing to the h3moe experts of the same layer."""

    def __init__(self, module: torch.nn.Module, kind: str, wdtype: str, backend: str, stash: bool = False):
        self.module, self.kind, self.wdtype, self.backend, self.stash = module, kind, wdtype, backend, stash

    def __call__(self, hidden_states):
        return _FORWARDS[self.kind](
            self.module, hidden_states, backend=self.backend, wdtype=self.wdtype, stash=self.stash
        )


def make_forward(module: torch.nn.Module, kind: str, wdtype: str, backend: str, stash: bool = False):
    return RouterForward(module, kind, wdtype, backend, stash)


def is_patched(module: torch.nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), RouterForward)


def describe(kind: str, module: torch.nn.Module) -> str:
    if kind == "softmax_topk":
        renorm = bool(getattr(module, "norm_topk_prob", True))
        return f"softmax_topk(K={module.top_k}, renormalize={renorm}) -> h3moe.route (fused)"
    if kind == "topk_softmax":
        return f"topk_softmax(K={module.top_k}) -> h3moe.route(renormalize=True) (fused, same function)"
    return (
        f"sigmoid_group_topk(K={module.top_k}, groups {module.topk_group}/{module.num_group}, "
        f"scale={module.routed_scaling_factor}) -> vectorized torch in h3moe.integrations (no kernel covers it)"
    )
