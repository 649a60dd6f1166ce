"""Argument checks shared by the public ops. Each raises ValueError naming the argument."""
from __future__ import annotations

import torch

from .reference import ACTIVATIONS


def tensor(name: str, t, ndim: int, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def top_k(k, num_experts: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"top_k: expected an int in 1..{num_experts} (the number of experts), got {k!r}")


def activation(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {act!r}")


def swiglu_limit(limit, gated: bool = True) -> float | None:
    """None, or a finite positive number (returned as a float), on gated experts only."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < float("inf"):
        raise ValueError(f"swiglu_limit: expected None or a finite number > 0, got {limit!r}")
    if not gated:
        raise ValueError("swiglu_limit: a clamped SwiGLU needs gated experts")
    return float(limit)


def experts(x, w_gate_up, w_down, gated: bool = True) -> tuple[int, int, int, int]:
    """Check x (T, H), w_gate_up (E, 2I, H) (ungated: w_up (E, I, H)), w_down (E, H, I); return (T, H, E, I)."""
    tensor("x", x, 2)
    tensor("w_gate_up", w_gate_up, 3)
    tensor("w_down", w_down, 3)
    T, H = x.shape
    E, two_i, h2 = w_gate_up.shape
    if gated and two_i % 2:
        raise ValueError(f"w_gate_up: expected (E, 2I, H) with an even second dim, got {tuple(w_gate_up.shape)}")
    I = two_i // 2 if gated else two_i
    if h2 != H:
        raise ValueError(f"w_gate_up: hidden size {h2} does not match x's H={H}")
    if w_down.shape[0] != E:
        raise ValueError(f"w_down: {w_down.shape[0]} experts, but w_gate_up has E={E}")
    if w_down.shape[1] != H:
        raise ValueError(f"w_down: expected (E, H, I) with H={H}, got {tuple(w_down.shape)}")
    if w_down.shape[2] != I:
        raise ValueError(f"w_down: intermediate size {w_down.shape[2]} does not match w_gate_up's I={I}")
    return T, H, E, I


def routing(weights, ids, T: int, E: int) -> None:
    tensor("routing.weights", weights, 2)
    tensor("routing.ids", ids, 2, floating=False)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"routing.ids: expected an integer tensor, got {ids.dtype}")
    if weights.shape != ids.shape:
        raise ValueError(f"routing: weights {tuple(weights.shape)} and ids {tuple(ids.shape)} differ in shape")
    if weights.shape[0] != T:
        raise ValueError(f"routing: {weights.shape[0]} tokens, but x has T={T}")
    top_k(weights.shape[1], E)
