"""Eager PyTorch references: the one source of truth for h3moe's numerics.

Written for clarity, not speed. Every backend (torch, triton, cuda), every test and every benchmark
is checked against these functions. Letters: T tokens, E experts, K top-k, H hidden, I intermediate,
B batch (samples), S sequence length, L layers.

Weight layout (transformers 5.x fused experts):
    w_gate_up (E, 2I, H): rows [0, I) are the gate projection, rows [I, 2I) the up projection.
    w_down    (E, H, I).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "glu_ref",
    "route_ref",
    "experts_ref",
    "moe_ref",
    "mean_router_probs_ref",
    "gating_loss_ref",
    "gating_loss_from_pbar",
    "drift_reg_ref",
    "load_balancing_loss_ref",
    "z_loss_ref",
]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


#: Activations every backend supports on the gate half (SwiGLU when "silu"); relu2 (squared ReLU) is
#: Nemotron-H's, on ungated experts (gated=False).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "relu2": _relu2,
}


def glu_ref(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu",
            swiglu_limit: float | None = None) -> torch.Tensor:
    """act(gate) * up; with swiglu_limit L, the clamped SwiGLU of DeepSeek-V4, GLM-5 and Hunyuan-V4:
    act(min(gate, L)) * clamp(up, -L, L) (torch.clamp's gradient: 1 inside the bounds, ends included)."""
    if swiglu_limit is not None:
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
    return ACTIVATIONS[activation](gate) * up


def route_ref(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing, as transformers' `MixtralTopKRouter` and the H3Fusion block compute it.

    Args:
        logits: (T, E) router logits, any float dtype.
        top_k: K, number of experts per token (1 <= K <= E).
        renormalize: divide the K selected probabilities by their sum.
    Returns:
        weights: (T, K) fp32 routing weights (float64 when logits are float64).
        ids: (T, K) int64 expert indices, in descending order of probability.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(dtype), dim=-1)  # (T, E)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # (T, K)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def experts_ref(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
    swiglu_limit: float | None = None,
    gated: bool = True,
) -> torch.Tensor:
    """SwiGLU experts: per (token, slot) `weight * down(act(gate) * up)`, summed over the K slots; ungated
    (gated=False, Nemotron-H): `weight * down(act(up))`.

    Args:
        x: (T, H) tokens.
        w_gate_up: (E, 2I, H) gate rows first, then up rows; ungated: (E, I, H), the up rows alone.
        w_down: (E, H, I).
        weights: (T, K) routing weights.
        ids: (T, K) expert index per slot.
        activation: key of ACTIVATIONS, applied to the gate half.
        swiglu_limit: None, or L > 0 for the clamped form (glu_ref; gated only).
        gated: False for experts without a gate projection.
    Returns:
        (T, H) in x's dtype; the K slots are summed in fp32 (float64 for float64 inputs).
    """
    T, H = x.shape
    K = ids.shape[1]
    I = w_down.shape[2]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.zeros(T, H, dtype=acc_dtype, device=x.device)
    for k in range(K):
        e = ids[:, k]  # (T,)
        h = torch.einsum("th,tnh->tn", x, w_gate_up[e])  # (T, 2I), ungated (T, I)
        if gated:
            a = glu_ref(h[:, :I], h[:, I:], activation, swiglu_limit)  # (T, I)
        elif swiglu_limit is None:
            a = ACTIVATIONS[activation](h)
        else:
            raise ValueError("swiglu_limit: a clamped SwiGLU needs gated experts")
        o = torch.einsum("ti,thi->th", a, w_down[e])  # (T, H)
        y = y + weights[:, k, None].to(acc_dtype) * o.to(acc_dtype)
    return y.to(x.dtype)


def moe_ref(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    activation: str = "silu",
    swiglu_limit: float | None = None,
    gated: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole MoE layer: router (E, H) linear, route_ref, experts_ref. Returns (y (T, H), logits (T, E))."""
    logits = x @ router_weight.t()
    weights, ids = route_ref(logits, top_k, renormalize)
    return experts_ref(x, w_gate_up, w_down, weights, ids, activation, swiglu_limit, gated), logits


def _layers(router_logits) -> list[torch.Tensor]:
    if isinstance(router_logits, torch.Tensor):
        return [router_logits] if router_logits.dim() <= 3 else list(router_logits.unbind(0))
    return list(router_logits)


def mean_router_probs_ref(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    batch_size: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """p̄ (B, E): per layer the fp32 softmax of the router logits, averaged over each sample's tokens,
    then averaged over layers.

    Args:
        router_logits: one layer's (B*S, E) or (B, S, E) logits, or a sequence of L of them, or (L, B, S, E).
        batch_size: B.
        attention_mask: optional (B, S), 1 for real tokens; padding tokens are left out of each mean.
            None averages over every position, padding included, as the H3Fusion authors' code does.
    """
    per_layer = []
    for logits in _layers(router_logits):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        E = logits.shape[-1]
        p = torch.softmax(logits.to(dtype), dim=-1).reshape(batch_size, -1, E)  # (B, S, E)
        if attention_mask is None:
            per_layer.append(p.mean(dim=1))
        else:
            m = attention_mask.reshape(batch_size, -1, 1).to(dtype)  # (B, S, 1)
            per_layer.append((p * m).sum(dim=1) / m.sum(dim=1).clamp_min(1))
    return torch.stack(per_layer, dim=0).mean(dim=0)


def gating_loss_ref(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    variant: str = "paper",
) -> torch.Tensor:
    """H3Fusion's gating loss: penalize the router for choosing experts that do not match the task.

    Args:
        router_logits: as in mean_router_probs_ref.
        labels: (B,) int task (expert) index per sample, or (B, E) soft / one-hot targets.
        attention_mask: optional (B, S).
        variant: "paper" — nn.CrossEntropyLoss with p̄ taken as logits (what the authors' trainer
            computes: the softmax is applied a second time); "nll" — mean over samples of -Σ_e y_e·log p̄_e.
    Returns:
        scalar loss (fp32, float64 for float64 logits).
    """
    p_bar = mean_router_probs_ref(router_logits, labels.shape[0], attention_mask)  # (B, E)
    return gating_loss_from_pbar(p_bar, labels, variant)


def gating_loss_from_pbar(p_bar: torch.Tensor, labels: torch.Tensor, variant: str = "paper") -> torch.Tensor:
    """The gating loss from p̄ (B, E) (see gating_loss_ref); every backend ends with this."""
    if variant == "paper":
        target = labels if labels.dim() == 1 else labels.to(p_bar.dtype)
        return F.cross_entropy(p_bar, target)
    if variant == "nll":
        y = F.one_hot(labels, p_bar.shape[-1]).to(p_bar.dtype) if labels.dim() == 1 else labels.to(p_bar.dtype)
        return -(y * torch.log(p_bar)).sum(dim=-1).mean()
    raise ValueError(f"variant: expected 'paper' or 'nll', got {variant!r}")


def _as_layers(expert_weights) -> list[list[torch.Tensor]]:
    """Normalize to a list over layers of a list of (E, ...) tensors."""
    if isinstance(expert_weights, torch.Tensor):
        return [[expert_weights]]
    items = list(expert_weights)
    if items and all(isinstance(t, torch.Tensor) for t in items):
        return [items]  # one layer given as a tuple of its tensors
    return [[t] if isinstance(t, torch.Tensor) else list(t) for t in items]


def drift_reg_ref(expert_weights, gammas, initial=None) -> torch.Tensor:
    """H3Fusion's expert regularizer Σ_e γ_e·‖W_e‖, averaged over layers.

    ‖W_e‖ is the Frobenius norm of each of expert e's weight tensors, summed over its tensors
    (gate_up and down). With `initial` given (same structure), the norm is of W_e - W_e⁰: the drift from
    the aligned starting point.

    Args:
        expert_weights: per layer an (E, ...) tensor or a tuple of them (e.g. (gate_up_proj, down_proj));
            a single layer may be given bare.
        gammas: (E,) tensor or sequence, or a float for all experts.
        initial: None or the same structure as expert_weights.
    Returns:
        scalar.
    """
    layers = _as_layers(expert_weights)
    inits = _as_layers(initial) if initial is not None else [[None] * len(l) for l in layers]
    total = 0.0
    for ws, w0s in zip(layers, inits):
        E = ws[0].shape[0]
        g = torch.as_tensor(gammas, dtype=ws[0].dtype, device=ws[0].device).expand(E)
        for w, w0 in zip(ws, w0s):
            d = w if w0 is None else w - w0.to(w.dtype)
            norms = torch.linalg.vector_norm(d.reshape(E, -1), dim=1)  # (E,)
            total = total + (g * norms).sum()
    return total / len(layers)


def load_balancing_loss_ref(
    gate_logits: torch.Tensor | Sequence[torch.Tensor],
    num_experts: int,
    top_k: int = 2,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, equal to transformers' `load_balancing_loss_func`:
    E · Σ_e f_e · P_e with f_e the fraction of (token, slot) assignments to e and P_e the mean router
    probability of e, over all layers' tokens (padding excluded when a (B, S) mask is given)."""
    layers = [g.reshape(-1, g.shape[-1]) for g in _layers(gate_logits)]
    logits = torch.cat(layers, dim=0)  # (L*T, E)
    probs = torch.softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    _, ids = torch.topk(probs, top_k, dim=-1)
    assign = F.one_hot(ids, num_experts).to(probs.dtype).sum(dim=1)  # (L*T, E)
    if attention_mask is None:
        m = torch.ones(probs.shape[0], 1, dtype=probs.dtype, device=probs.device)
    else:
        m = attention_mask.reshape(-1, 1).to(probs.dtype).repeat(len(layers), 1)
    rows = m.sum()
    f = (assign * m).sum(dim=0) / rows
    p = (probs * m).sum(dim=0) / rows
    return (f * p).sum() * num_experts


def z_loss_ref(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)², averaged over layers."""
    out = []
    for g in _layers(router_logits):
        g = g.reshape(-1, g.shape[-1])
        z = torch.logsumexp(g.float() if g.dtype != torch.float64 else g, dim=-1) ** 2  # (T,)
        if attention_mask is None:
            out.append(z.mean())
        else:
            m = attention_mask.reshape(-1).to(z.dtype)
            out.append((z * m).sum() / m.sum().clamp_min(1))
    return torch.stack(out).mean()
