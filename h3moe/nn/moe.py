"""h3moe.MoE: a sparse MoE layer (router + SwiGLU experts) over h3moe's ops."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate
from ..ops.experts import moe
from ..ops.routing import Routing, route


class MoE(nn.Module):
    """Router `gate.weight` (E, H) and experts `gate_up_proj` (E, 2I, H), `down_proj` (E, H, I): the same
    parameter names and layout as transformers 5.x Mixtral blocks.

    forward(x (..., H)) → (..., H). The router logits of the last forward are kept in `self.router_logits`
    (T, E) for the losses (h3moe.gating_loss, load_balancing_loss, z_loss), and its Routing in
    `self.routing`.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool = True,
        activation: str = "silu",
        backend: str = "auto",
        recompute: bool | None = None,
        swiglu_limit: float | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        _validate.top_k(top_k, num_experts)
        _validate.activation(activation)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.activation, self.backend = renormalize, activation, backend
        self.recompute = recompute  # see h3moe.moe
        self.swiglu_limit = _validate.swiglu_limit(swiglu_limit)  # clamped SwiGLU (DeepSeek-V4): see h3moe.moe
        kw = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.router_logits: torch.Tensor | None = None
        self.routing: Routing | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate.weight, std=1.0 / math.sqrt(self.hidden_size))
        nn.init.normal_(self.gate_up_proj, std=1.0 / math.sqrt(self.hidden_size))
        nn.init.normal_(self.down_proj, std=1.0 / math.sqrt(self.intermediate_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.hidden_size or not x.is_floating_point():
            raise ValueError(f"x: expected a float tensor (..., {self.hidden_size}), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)  # (T, H)
        logits = self.gate(x2)  # (T, E)
        routing = route(logits, self.top_k, renormalize=self.renormalize, backend=self.backend)
        self.router_logits, self.routing = logits, routing
        y = moe(x2, self.gate_up_proj, self.down_proj, routing, activation=self.activation, backend=self.backend,
                recompute=self.recompute, swiglu_limit=self.swiglu_limit)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return (f"H={self.hidden_size}, I={self.intermediate_size}, E={self.num_experts}, K={self.top_k}, "
                f"activation={self.activation}, backend={self.backend}"
                + (f", swiglu_limit={self.swiglu_limit}" if self.swiglu_limit is not None else ""))
