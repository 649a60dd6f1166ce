"""H³Fusion fine-tuning: the loss, freezing, router accuracy, a plain loop and a transformers Trainer.

Loss (per batch of B samples, each with a task label y_b ∈ [0, E)):
    L = LM(next-token CE on labelled positions)
      + λ · gating_loss(router logits of every MoE layer, y)        (h3moe.gating_loss, backend's kernels)
      + Σ_e γ_e · ‖W_e − W_e⁰‖ averaged over layers                  (drift from the aligned experts)
      + α · load_balancing_loss + β · z_loss                          (optional, off by default)
Router logits come from the model's own outputs (`output_router_logits=True`: each Mixtral router returns
them), never from forward hooks.

The drift term has an analytic backward: ∂/∂W_e γ_e‖W_e − W_e⁰‖ = γ_e (W_e − W_e⁰)/‖W_e − W_e⁰‖ (0 where
W_e = W_e⁰, the subgradient autograd also picks), so nothing but the (E,) norms is kept for backward.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.losses import gating_loss, load_balancing_loss, z_loss
from ..reference import mean_router_probs_ref

__all__ = [
    "H3FusionLoss",
    "H3FusionTrainer",
    "drift_reg",
    "expert_params",
    "freeze_for_fusion",
    "use_h3moe_experts",
    "router_accuracy",
    "lm_loss",
    "train_fusion",
]


class _DriftNorms(torch.autograd.Function):
    """Σ_e γ_e·‖W_e − W0_e‖ for one (E, ...) tensor, with the analytic backward."""

    @staticmethod
    def forward(ctx, w, w0, gammas):
        E = w.shape[0]
        d = (w.detach() - w0.to(w.dtype)).reshape(E, -1).float()  # (E, n)
        norms = torch.linalg.vector_norm(d, dim=1)  # (E,)
        ctx.save_for_backward(w, w0, gammas, norms)
        return (gammas.float() * norms).sum().to(w.dtype)

    @staticmethod
    def backward(ctx, g):
        w, w0, gammas, norms = ctx.saved_tensors
        E = w.shape[0]
        scale = torch.where(norms > 0, gammas.float() / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        d = (w - w0.to(w.dtype)).reshape(E, -1).float()
        grad = (d * (scale * g.float())[:, None]).reshape(w.shape).to(w.dtype)
        return grad, None, None


def drift_reg(expert_weights, gammas, initial) -> torch.Tensor:
    """Σ_e γ_e·‖W_e − W_e⁰‖ averaged over layers (= reference.drift_reg_ref with `initial`), with the
    analytic gradient γ_e·(W_e − W_e⁰)/‖W_e − W_e⁰‖.

    Args:
        expert_weights: per layer a tuple of (E, ...) tensors (e.g. (gate_up_proj, down_proj)).
        gammas: (E,) or float.
        initial: same structure, the starting (aligned) weights.
    """
    total = 0.0
    layers = list(expert_weights)
    for ws, w0s in zip(layers, initial):
        ws = (ws,) if isinstance(ws, torch.Tensor) else tuple(ws)
        w0s = (w0s,) if isinstance(w0s, torch.Tensor) else tuple(w0s)
        E = ws[0].shape[0]
        g = torch.as_tensor(gammas, dtype=torch.float32, device=ws[0].device).expand(E).contiguous()
        for w, w0 in zip(ws, w0s):
            total = total + _DriftNorms.apply(w, w0, g)
    return total / len(layers)


def _moe_blocks(model) -> list[nn.Module]:
    blocks = [layer.mlp for layer in model.model.layers]
    if not all(hasattr(b, "gate") and hasattr(b, "experts") for b in blocks):
        raise TypeError(f"{type(model).__name__}: expected a Mixtral-style model (layers[i].mlp.gate/.experts)")
    return blocks


def expert_params(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (gate_up_proj (E, 2I, H), down_proj (E, H, I))."""
    return [(b.experts.gate_up_proj, b.experts.down_proj) for b in _moe_blocks(model)]


def freeze_for_fusion(model, *, router: bool = True, experts: bool = True, attention: bool = False,
                      embeddings: bool = False, norms: bool = False) -> list[str]:
    """Set requires_grad per H³Fusion's recipe (router and experts train; attention, embeddings, lm_head and
    norms frozen). Returns the names of the trainable parameters."""
    trainable = []
    for name, p in model.named_parameters():
        if ".mlp.gate." in name:
            on = router
        elif ".mlp.experts." in name:
            on = experts
        elif ".self_attn." in name:
            on = attention
        elif "norm" in name:
            on = norms
        else:  # embed_tokens, lm_head
            on = embeddings
        p.requires_grad_(on)
        if on:
            trainable.append(name)
    return trainable


def use_h3moe_experts(model) -> str:
    """Run the model's experts through h3moe (transformers experts_implementation "h3moe") when the
    integration is registered; otherwise keep transformers' default. Returns the implementation in use."""
    try:
        import h3moe.integrations.transformers  # noqa: F401  (registers "h3moe")
    except Exception:  # noqa: BLE001 - the integration is optional here
        pass
    try:
        model.set_experts_implementation("h3moe")
    except Exception:  # noqa: BLE001 - not registered / not supported: keep the default
        pass
    return getattr(model.config, "_experts_implementation", None) or "default"


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, S, V) predict labels shifted by one; -100 is ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class H3FusionLoss(nn.Module):
    """LM loss + λ·gating loss + Σ_e γ_e·drift_e (+ α·load balancing + β·z-loss).

    Args:
        model: the fused MixtralForCausalLM (its experts' current weights are the drift origin W⁰).
        gate_coef: λ.
        gammas: γ, a float or (E,) sequence; 0 disables the drift term (no copy of the experts is kept).
        load_balancing_coef: α (0: off).
        z_coef: β (0: off).
        variant: gating loss variant, "paper" or "nll".
        backend: h3moe backend for the gating loss ("auto", "torch", "triton", "cuda").
    forward(outputs, labels, task_labels, attention_mask) → scalar; its parts are in `self.parts`.
    """

    def __init__(self, model, gate_coef: float = 1.0, gammas: float | Sequence[float] = 0.0,
                 load_balancing_coef: float = 0.0, z_coef: float = 0.0, variant: str = "paper",
                 backend: str = "auto"):
        super().__init__()
        self.model_ref = [model]  # not a submodule
        self.gate_coef, self.lb_coef, self.z_coef = float(gate_coef), float(load_balancing_coef), float(z_coef)
        self.variant, self.backend = variant, backend
        E = model.config.num_local_experts
        g = torch.as_tensor(gammas, dtype=torch.float32)
        if g.dim() == 1 and g.numel() != E:
            raise ValueError(f"gammas: expected a float or {E} values, got {g.numel()}")
        self.gammas = g.expand(E).clone()
        self.initial = None
        if bool((self.gammas != 0).any()):
            self.initial = [tuple(w.detach().clone() for w in ws) for ws in expert_params(model)]
        self.parts: dict[str, float] = {}

    def forward(self, outputs, labels: torch.Tensor | None, task_labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        router_logits = getattr(outputs, "router_logits", None)
        if not router_logits:
            raise ValueError("outputs.router_logits is empty: call the model with output_router_logits=True")
        model = self.model_ref[0]
        parts = {}
        total = outputs.logits.new_zeros((), dtype=torch.float32)
        if labels is not None:
            parts["lm"] = lm_loss(outputs.logits, labels)
            total = total + parts["lm"]
        if self.gate_coef:
            parts["gate"] = gating_loss(router_logits, task_labels, attention_mask, variant=self.variant,
                                        backend=self.backend)
            total = total + self.gate_coef * parts["gate"].to(total.device)
        if self.initial is not None:
            parts["drift"] = drift_reg(expert_params(model), self.gammas.to(total.device), self.initial)
            total = total + parts["drift"].float().to(total.device)
        if self.lb_coef:
            parts["lb"] = load_balancing_loss(router_logits, model.config.num_local_experts,
                                              model.config.num_experts_per_tok, attention_mask)
            total = total + self.lb_coef * parts["lb"].to(total.device)
        if self.z_coef:
            parts["z"] = z_loss(router_logits, attention_mask)
            total = total + self.z_coef * parts["z"].to(total.device)
        self.parts = {k: float(v.detach()) for k, v in parts.items()}
        return total


@torch.no_grad()
def router_accuracy(model, batch: dict[str, torch.Tensor], num_tasks: int | None = None) -> dict:
    """Router accuracy on task labels: sample b is right when argmax of p̄_b (router probabilities averaged
    over its real tokens and over layers) is its task. Returns {"all": acc, task_index: acc, ...}."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                output_router_logits=True)
    model.train(was)
    y = batch["task_labels"].to(dev)
    p_bar = mean_router_probs_ref(out.router_logits, y.shape[0], batch["attention_mask"].to(dev))
    right = p_bar.argmax(-1) == y
    res = {"all": float(right.float().mean())}
    for t in range(num_tasks or p_bar.shape[-1]):
        sel = y == t
        if sel.any():
            res[t] = float(right[sel].float().mean())
    return res


def train_fusion(model, examples, *, steps: int = 40, batch_size: int = 16, lr: float = 1e-3,
                 router_lr: float | None = None, loss: H3FusionLoss | None = None, seed: int = 0,
                 progress: bool = True, log_every: int = 0, desc: str = "train fusion", grad_accum: int = 1,
                 gradient_checkpointing: bool = False) -> list[dict]:
    """A plain loop: AdamW over the trainable parameters (router at `router_lr`, default 10·lr).
    `examples` from data.encode_records. Returns per-step loss parts (means over the micro-batches).

    Memory, for fused models at real sizes on one GPU:
        grad_accum: each step's batch runs as this many micro-batches (batch_size must divide into them), the
            gradients summed over them, each micro-batch's loss weighted 1/grad_accum. A micro-batch's loss is
            its own mean over its tokens, so micro-batches with fewer real tokens weigh as much as fuller ones
            (not exactly the one-batch loss where padding differs between them).
        gradient_checkpointing: the decoder layers recompute their activations in the backward (transformers'
            gradient checkpointing, non-reentrant: the frozen embeddings give the layers inputs without grad).
    """
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1 or batch_size % grad_accum:
        raise ValueError(f"grad_accum: expected a positive int dividing batch_size={batch_size}, got {grad_accum!r}")
    use_cache = getattr(model.config, "use_cache", None)
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    gradient_checkpointing = gradient_checkpointing and not getattr(model, flag, False)  # on already: left as set
    hooks = getattr(model, "_require_grads_hooks", None)  # enabling checkpointing adds input-embedding hooks
    if gradient_checkpointing:  # transformers >= 5.2x names it activation checkpointing; older ones gradient
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    try:
        return _train_loop(model, examples, steps, batch_size, lr, router_lr, loss, seed, progress, log_every, desc,
                           grad_accum)
    finally:
        if gradient_checkpointing:  # the model leaves as it came (generation wants its cache back)
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
            model.config.use_cache = use_cache
            _restore_input_hooks(model, hooks)


def _restore_input_hooks(model, hooks) -> None:
    """Remove the input-embedding forward hooks transformers' checkpointing enable registered
    (enable_input_require_grads) and give the model back the hook list it had (a caller's own, or none)."""
    added = getattr(model, "_require_grads_hooks", None)
    if added is hooks:
        return
    for h in added or ():
        h.remove()
    if hooks is None:
        for name in ("_require_grads_hooks", "_require_grads_hook"):
            if name in model.__dict__:
                delattr(model, name)
    else:
        model._require_grads_hooks = hooks
        if hooks:
            model._require_grads_hook = hooks[0]
        elif "_require_grads_hook" in model.__dict__:
            del model._require_grads_hook


def _train_loop(model, examples, steps, batch_size, lr, router_lr, loss, seed, progress, log_every, desc,
                grad_accum) -> list[dict]:
    from tqdm.auto import tqdm

    from .data import batches

    loss = loss or H3FusionLoss(model)
    router = [p for n, p in model.named_parameters() if p.requires_grad and ".mlp.gate." in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and ".mlp.gate." not in n]
    groups = [g for g in ({"params": router, "lr": router_lr or 10 * lr}, {"params": rest, "lr": lr}) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters (see freeze_for_fusion)")
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    bar = tqdm(batches(examples, batch_size, steps, gen), total=steps, desc=desc, disable=not progress)
    for step, b in enumerate(bar):
        opt.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        for i in range(grad_accum):
            m = {k: v[i::grad_accum].to(dev) for k, v in b.items()}  # (batch_size / grad_accum, ...)
            out = model(input_ids=m["input_ids"], attention_mask=m["attention_mask"], output_router_logits=True)
            total = loss(out, m["labels"], m["task_labels"], m["attention_mask"])
            (total / grad_accum).backward()
            for k, v in {"loss": float(total.detach()), **loss.parts}.items():
                parts[k] = parts.get(k, 0.0) + v / grad_accum
        opt.step()
        rec = {"step": step, **parts}
        history.append(rec)
        bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k != "step"})
        if log_every and (step % log_every == 0 or step == steps - 1):
            print("  " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
    model.eval()
    return history


from transformers import Trainer as _Trainer  # noqa: E402  (the hf extra; fusion needs it anyway)


class H3FusionTrainer(_Trainer):
    """transformers.Trainer for H³Fusion: batches carry `task_labels` (B,) next to input_ids,
    attention_mask and labels (use `data.collate`); the loss is H3FusionLoss.

    Extra args: h3_loss (an H3FusionLoss) or gate_coef / gammas / load_balancing_coef / z_coef /
    variant / loss_backend to build one; freeze (default True) applies freeze_for_fusion.
    """

    def __init__(self, model=None, args=None, *, h3_loss: H3FusionLoss | None = None, gate_coef: float = 1.0,
                 gammas=0.0, load_balancing_coef: float = 0.0, z_coef: float = 0.0, variant: str = "paper",
                 loss_backend: str = "auto", freeze: bool = True, **kwargs):
        if freeze:
            freeze_for_fusion(model)
        kwargs.setdefault("data_collator", _collate_examples)
        if args is not None:
            args.remove_unused_columns = False  # keep task_labels
        super().__init__(model=model, args=args, **kwargs)
        self.h3_loss = h3_loss or H3FusionLoss(model, gate_coef, gammas, load_balancing_coef, z_coef,
                                               variant, loss_backend)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        task_labels = inputs.pop("task_labels")
        labels = inputs.pop("labels", None)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        output_router_logits=True)
        loss = self.h3_loss(outputs, labels, task_labels, inputs.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss


def _collate_examples(examples):
    from .data import collate

    if examples and "task_labels" in examples[0] and isinstance(examples[0]["task_labels"], torch.Tensor):
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    return collate(examples)
