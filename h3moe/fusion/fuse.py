"""H³Fusion: N aligned dense Llama-family LMs → one transformers `MixtralForCausalLM`.

Layout of the result (transformers 5.x Mixtral):
    embed_tokens, final norm, lm_head, per layer input_layernorm and self_attn: from the base model
        (attention="base"; the paper freezes attention), or q/k/v/o averaged over the N models ("mean").
    layer l, expert e: gate_up_proj[e] = cat(gate_proj_e, up_proj_e) (E, 2I, H), down_proj[e] = down_proj_e.
    layer l, router: mlp.gate.weight (E, H), initialized by `router_init`.

Each model's FFN was trained behind its own post-attention RMSNorm. Its per-channel weight w_e is folded
into expert e's input columns (gate_up_proj[e] · diag(w_e)) and the fused post_attention_layernorm weight
is set to ones, so every expert sees exactly the input it saw in its own model — with a zero router and
top_k = N the fused FFN output is the mean of the N models' FFN outputs. (For LoRA-aligned models of one
base, the N norm weights are the base's and folding changes nothing but where the scale lives.)

Expert models may be given as models or local directories, or as peft LoRA adapters (a PeftModel or an
adapter directory), which are merged into a copy of their base (`base`, else the adapter's
base_model_name_or_path) — the way the H³Fusion authors built their MoE from three LoRA-aligned models.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["fuse", "FusionError", "load_dense", "CHECKED_FIELDS"]

#: Config fields every model must share (a mismatch names the field).
CHECKED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "tie_word_embeddings",
)


class FusionError(ValueError):
    """Models that cannot be fused (the message names the model and the field)."""


def _is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _load_base_for_adapter(path: str, base, dtype):
    if base is not None:
        return copy.deepcopy(base)
    with open(os.path.join(path, "adapter_config.json")) as f:
        name = json.load(f).get("base_model_name_or_path")
    if not name or not os.path.isdir(name):
        raise FusionError(f"LoRA adapter {path}: its base model {name!r} is not a local directory; pass base=")
    return load_dense(name, dtype=dtype)


def load_dense(model, *, base=None, dtype=None, what: str = "model"):
    """A dense causal LM from a model, a local directory, or a peft LoRA adapter (merged; see module doc)."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{what}: no such model directory: {path}")
        if _is_adapter_dir(path):
            from peft import PeftModel

            base_model = _load_base_for_adapter(path, base, dtype)
            return PeftModel.from_pretrained(base_model, path).merge_and_unload()
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{what}: {path} has no config.json (not a transformers model directory)")
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto")
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is in the hf extra
        PeftModel = ()
    if PeftModel and isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()  # merge a copy: the caller's adapter stays usable
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: expected a model, a local path or a peft adapter, got {type(model).__name__}")
    return model


#: model types whose decoder layer computes exactly what Mixtral's does around its FFN (RMSNorm w·x̂, rotary
#: attention without q/k norms, no embedding scale, no softcaps or multipliers). Gemma, Qwen3, OLMo-2,
#: Granite, Cohere... share Llama's module names but not its computation: fused into Mixtral they would lose
#: it silently.
MIXTRAL_LIKE = ("llama", "mistral")
#: a Mixtral-like decoder layer's parameters (outside the FFN, which becomes the experts)
_LAYER_PARAMS = (
    {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    | {"input_layernorm.weight", "post_attention_layernorm.weight"}
)


def _check_architecture(model, layers, what: str) -> None:
    mt = getattr(model.config, "model_type", None)
    extra = sorted(n for n, _ in layers[0].named_parameters() if n not in _LAYER_PARAMS)
    if extra:
        raise FusionError(f"{what}: model_type={mt!r} decoder layers hold parameters a Mixtral layer lacks "
                          f"({', '.join(extra)}): the fused model would drop them")
    if mt not in MIXTRAL_LIKE:
        raise FusionError(f"{what}: model_type={mt!r} is not one whose layers compute as Mixtral's "
                          f"({', '.join(MIXTRAL_LIKE)}); the fused MixtralForCausalLM would not reproduce it. "
                          "check_architecture=False (CLI: --any-architecture) fuses it anyway")


def _layers(model, what: str):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        raise FusionError(f"{what}: {type(model).__name__} is not a Llama-family causal LM (model.layers, lm_head)")
    for i, layer in enumerate(layers):
        mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise FusionError(f"{what}: layer {i} has no dense SwiGLU mlp (gate_proj, up_proj, down_proj); "
                              f"model_type={getattr(model.config, 'model_type', '?')}")
        if any(getattr(getattr(mlp, n), "bias", None) is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise FusionError(f"{what}: mlp_bias=True is not supported (Mixtral experts have no biases)")
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise FusionError(f"{what}: layer {i} has no q/k/v/o attention projections")
        if any(getattr(getattr(attn, n), "bias", None) is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise FusionError(f"{what}: attention_bias=True is not supported (Mixtral attention has no biases)")
    return layers


def _field(cfg, name):
    v = getattr(cfg, name, None)
    if name == "head_dim" and v is None:
        v = cfg.hidden_size // cfg.num_attention_heads
    if name == "num_key_value_heads" and v is None:
        v = cfg.num_attention_heads
    return v


def _rope(cfg):
    rp = getattr(cfg, "rope_parameters", None)
    if rp is None:
        rp = {"rope_type": "default", "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    return dict(rp)


def _check_same(models: Sequence[nn.Module], names: Sequence[str]) -> None:
    ref_cfg = models[0].config
    for m, name in zip(models[1:], names[1:]):
        for field in CHECKED_FIELDS + ("rope_parameters",):
            a = _rope(ref_cfg) if field == "rope_parameters" else _field(ref_cfg, field)
            b = _rope(m.config) if field == "rope_parameters" else _field(m.config, field)
            if a != b:
                raise FusionError(f"config mismatch in {field!r}: {names[0]} has {a!r}, {name} has {b!r} "
                                  f"(all models must share the architecture and sizes)")


def _mixtral_config(cfg, num_experts: int, top_k: int, names: Sequence[str]):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=_field(cfg, "num_key_value_heads"),
        head_dim=_field(cfg, "head_dim"),
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=getattr(cfg, "initializer_range", 0.02),
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=_rope(cfg),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        sliding_window=getattr(cfg, "sliding_window", None),
        attention_dropout=getattr(cfg, "attention_dropout", 0.0),
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        output_router_logits=False,
        router_jitter_noise=0.0,
        h3fusion_experts=list(names),  # extra config key: saved in config.json, ignored by transformers
    )


@torch.no_grad()
def _mean_hidden(model, layer_idx_count: int, prompts, tokenizer, device) -> torch.Tensor:
    """(L, H) mean over the prompts' tokens of each layer's post-attention residual (the MoE input, pre-norm)."""
    layers = model.model.layers
    sums = [None] * layer_idx_count
    counts = 0
    captured: dict[int, torch.Tensor] = {}
    hooks = [layers[l].post_attention_layernorm.register_forward_hook(
        lambda mod, args, out, l=l: captured.__setitem__(l, args[0].detach())) for l in range(layer_idx_count)]
    try:
        for p in prompts:
            if isinstance(p, str):
                ids = tokenizer(p, return_tensors="pt")["input_ids"]
            else:
                ids = torch.as_tensor(p).reshape(1, -1)
            model(input_ids=ids.to(device))
            for l in range(layer_idx_count):
                h = captured[l].float().reshape(-1, captured[l].shape[-1])  # (S, H)
                sums[l] = h.sum(0) if sums[l] is None else sums[l] + h.sum(0)
            counts += h.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(sums) / counts


def fuse(
    experts: Sequence,
    base=None,
    top_k: int = 2,
    router_init: str = "zeros",
    attention: str = "base",
    *,
    names: Sequence[str] | None = None,
    prompts: Sequence[Sequence] | None = None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = False,
    check_architecture: bool = True,
):
    """Fuse N dense Llama-family causal LMs into a `MixtralForCausalLM` with N experts.

    Args:
        experts: N models, local model directories, or peft LoRA adapters (PeftModel or adapter directory).
        base: model or path for embeddings, norms, attention and lm_head; None takes expert 0's.
            LoRA adapters are merged into copies of `base` when given.
        top_k: experts per token K (1 <= K <= N).
        router_init: "zeros" (uniform routing: with K = N the FFN is the mean of the experts'),
            "hidden" (row e = normalized mean hidden state of `prompts[e]` in model e, per layer),
            "random" (normal, std = initializer_range).
        attention: "base" (copy the base's attention) or "mean" (average q/k/v/o over the N models).
        names: N expert (task) names, saved in config.h3fusion_experts; default expert0..expertN-1.
        prompts: for router_init="hidden": N lists of prompts (strings, with `tokenizer`, or token id lists).
        tokenizer: tokenizes string prompts.
        dtype: dtype of the result; default the base's.
        seed: for router_init="random".
        progress: show a progress bar over the layers (tqdm).
        check_architecture: refuse models whose layers Mixtral's do not reproduce: a model_type outside
            MIXTRAL_LIKE (llama, mistral), or layer parameters Mixtral lacks (Qwen3's q/k norms, Gemma-2's
            extra norms). False fuses them anyway (what is not Mixtral's is dropped or computed as Mixtral does).
    Returns:
        transformers.MixtralForCausalLM (eval mode, on the base's device).
    """
    from transformers import MixtralForCausalLM

    if isinstance(experts, (str, os.PathLike, nn.Module)) or len(experts) < 1:
        raise FusionError("experts: expected a sequence of at least one model or path")
    N = len(experts)
    names = list(names) if names is not None else [f"expert{e}" for e in range(N)]
    if len(names) != N or len(set(names)) != N:
        raise FusionError(f"names: expected {N} distinct names, got {names}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= N:
        raise FusionError(f"top_k: expected an int in [1, {N}], got {top_k!r}")
    if router_init not in ("zeros", "hidden", "random"):
        raise FusionError(f"router_init: expected 'zeros', 'hidden' or 'random', got {router_init!r}")
    if attention not in ("base", "mean"):
        raise FusionError(f"attention: expected 'base' or 'mean', got {attention!r}")
    if router_init == "hidden":
        if prompts is None or len(prompts) != N or any(len(p) == 0 for p in prompts):
            raise FusionError(f"router_init='hidden' needs prompts: {N} non-empty lists, one per expert")
        if any(isinstance(p, str) for ps in prompts for p in ps) and tokenizer is None:
            raise FusionError("router_init='hidden' with string prompts needs tokenizer=")

    base_model = load_dense(base, dtype=dtype, what="base") if base is not None else None
    models = [load_dense(m, base=base_model, dtype=dtype, what=names[e]) for e, m in enumerate(experts)]
    src = base_model if base_model is not None else models[0]
    all_models, all_names = [src] + models, ["base" if base_model is not None else names[0]] + names
    for m, n in zip(all_models, all_names):
        layers = _layers(m, n)
        if check_architecture:
            _check_architecture(m, layers, n)
    _check_same(all_models, all_names)

    cfg = src.config
    dtype = dtype or next(src.parameters()).dtype
    device = next(src.parameters()).device
    mcfg = _mixtral_config(cfg, N, top_k, names)
    with torch.device(device):
        fused = MixtralForCausalLM(mcfg).to(dtype)
    fused.eval()

    def put(dst: torch.Tensor, src_t: torch.Tensor) -> None:
        dst.copy_(src_t.detach().to(device=dst.device, dtype=dst.dtype))

    with torch.no_grad():
        put(fused.model.embed_tokens.weight, src.model.embed_tokens.weight)
        put(fused.model.norm.weight, src.model.norm.weight)
        if not mcfg.tie_word_embeddings:
            put(fused.lm_head.weight, src.lm_head.weight)
        src_layers = src.model.layers
        exp_layers = [m.model.layers for m in models]
        from tqdm.auto import tqdm

        for l, layer in enumerate(tqdm(fused.model.layers, desc="fuse layers", disable=not progress)):
            put(layer.input_layernorm.weight, src_layers[l].input_layernorm.weight)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if attention == "base":
                    w = getattr(src_layers[l].self_attn, n).weight
                else:
                    w = torch.stack([getattr(el[l].self_attn, n).weight.float() for el in exp_layers]).mean(0)
                put(getattr(layer.self_attn, n).weight, w)
            layer.post_attention_layernorm.weight.fill_(1.0)
            for e, el in enumerate(exp_layers):
                mlp = el[l].mlp
                w_norm = el[l].post_attention_layernorm.weight.float()  # (H,) folded into the input columns
                gate_up = torch.cat([mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()], 0)  # (2I, H)
                put(layer.mlp.experts.gate_up_proj[e], gate_up * w_norm[None, :])
                put(layer.mlp.experts.down_proj[e], mlp.down_proj.weight)  # (H, I)

        router_rows = None
        if router_init == "hidden":
            L = mcfg.num_hidden_layers
            rows = []
            for e, m in enumerate(models):
                h = _mean_hidden(m.eval(), L, prompts[e], tokenizer, next(m.parameters()).device)  # (L, H)
                rows.append(h)
            router_rows = torch.stack(rows, 1)  # (L, E, H) residual means
        for l, layer in enumerate(fused.model.layers):
            w = layer.mlp.gate.weight  # (E, H)
            if router_init == "zeros":
                w.zero_()
            elif router_init == "random":
                g = torch.Generator().manual_seed(seed + l)
                put(w, torch.randn(w.shape, generator=g) * mcfg.initializer_range)
            else:
                # The router sees the fused post-attention norm's output; normalize the means the same way,
                # center them (what all experts share says nothing about which to pick), unit rows.
                h = layer.post_attention_layernorm(router_rows[l].to(device=device, dtype=dtype)).float()
                h = h - h.mean(0, keepdim=True)
                put(w, h / h.norm(dim=1, keepdim=True).clamp_min(1e-6))
    return fused
