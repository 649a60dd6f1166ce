"""Every experts class the installed transformers ships with @use_experts_implementation, through h3moe's
experts forward and through h3moe.quantize: where h3moe takes it (experts_plan), its output and gradients equal the class's own eager
forward; where it does not, it says why and transformers' grouped_mm runs (equal too). The classes are
found by scanning transformers' modeling files, so a transformers upgrade that adds a family, or changes a
gate, is checked here without a test edit. Built from each family's own config class, shrunk to tiny
sizes. Families whose gate h3moe must take (or must refuse) are named below.
"""
from __future__ import annotations

import importlib
import logging
import pathlib
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import h3moe  # noqa: E402
from h3moe.integrations import transformers as h3tf  # noqa: E402

#: family → must h3moe take its experts (True) or fall back (False), where the installed transformers has it
EXPECT = {
    "mixtral": True, "qwen3_moe": True, "deepseek_v3": True, "olmoe": True,
    "deepseek_v4": True, "glm5_next": True, "hy_v4": True,  # clamped SwiGLU (swiglu_limit)
    "beam": True,  # SwiGLU in fp32
    "nemotron_h": True,  # ungated relu2 experts (gated=False)
    "gpt_oss": False, "minimax_m3_vl": False, "inkling2": False,
}
#: family → must h3moe.quantize take its experts (True) or leave them (False), where the installed transformers has it
QUANTIZED = {
    "mixtral": True, "qwen3_moe": True, "deepseek_v4": True, "beam": True,
    "aria": True,  # transposed: quantized in h3moe's layout
    "nemotron_h": False, "gpt_oss": False, "minimax_m3_vl": False, "inkling2": False,
}
_SHRINK_EXACT = {"hidden_size": 32, "moe_hidden_size": 32, "num_experts_per_tok": 2, "top_k": 2, "moe_topk": 2}
_EXPERT_COUNTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "num_routed_experts")


def _shrink(cfg):
    for k, v in list(vars(cfg).items()):
        if k.startswith("_") or isinstance(v, bool):
            continue
        if hasattr(v, "to_dict") and k.endswith("config"):
            _shrink(v)
            continue
        new = _SHRINK_EXACT.get(k.lower())
        if new is None and ("intermediate_size" in k.lower() or k.lower() in ("moe_ffn_hidden_size", "expert_dim")):
            new = 16
        if new is None and k.lower() in _EXPERT_COUNTS:
            new = 4
        if new is None:
            continue
        if isinstance(v, int) or v is None:
            setattr(cfg, k, new)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
            setattr(cfg, k, type(v)([new] * len(v)))
    return cfg


def _experts_classes():
    root = pathlib.Path(transformers.__file__).parent / "models"
    found = []
    for f in sorted(root.glob("*/modeling_*.py")):
        for name in re.findall(r"@use_experts_implementation[^\n]*\n(?:@[^\n]*\n)*class (\w+)\(", f.read_text()):
            found.append((f.parent.name, f.stem, name))
    return found


CLASSES = _experts_classes()


def _build(family: str, stem: str, name: str):
    """The experts module with tiny random weights, or None where this sweep cannot build it."""
    try:
        mod = importlib.import_module(f"transformers.models.{family}.{stem}")
        cmod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    except Exception:  # noqa: BLE001 (an optional dependency of that family)
        return None
    cls = getattr(mod, name)
    configs = [getattr(cmod, n) for n in dir(cmod) if n.endswith("Config")]
    configs = [c for c in configs if isinstance(c, type) and issubclass(c, transformers.PretrainedConfig)
               and c.__module__ == cmod.__name__]
    for C in configs:
        try:
            cfg = _shrink(C())
        except Exception:  # noqa: BLE001
            continue
        subs = [getattr(cfg, a) for a in ("text_config", "thinker_config") if hasattr(getattr(cfg, a, None), "to_dict")]
        for c in subs + [cfg]:
            try:
                m = cls(c)
            except Exception:  # noqa: BLE001
                continue
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            return m
    return None


def _run(m, impl, x, ids, w):
    m.config._experts_implementation = impl
    m.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_()
    y = m(xs, ids, w)
    y.backward(torch.ones_like(y))
    return y.detach(), xs.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_the_scan_finds_the_families():
    families = {f for f, _, _ in CLASSES}
    assert len(families) >= 10 and "mixtral" in families and "qwen3_moe" in families


@pytest.mark.parametrize("family,stem,name", CLASSES, ids=[f"{f}.{n}" for f, _, n in CLASSES])
def test_experts_class_through_h3moe(family, stem, name, caplog):
    m = _build(family, stem, name)
    if m is None:
        assert family not in EXPECT, f"{family}: could not be built, but its coverage is asserted"
        pytest.skip("this sweep cannot build the module from its config")
    plan = h3tf.experts_plan(m)
    if family in EXPECT:
        assert isinstance(plan, str) != EXPECT[family], f"{family}: {plan}"
    if not isinstance(plan, str) and plan[2] is not None:  # a clamped SwiGLU: a limit that binds here
        for attr in ("swiglu_limit", "limit"):
            if isinstance(getattr(m, attr, None), (int, float)):
                setattr(m, attr, 0.9)
        assert h3tf.experts_plan(m)[2] == 0.9
    E = next(p for p in m.parameters() if p.dim() == 3).shape[0]
    H = m.gate_up_proj.shape[1 if getattr(m, "is_transposed", False) else 2] if hasattr(m, "gate_up_proj") \
        else m.down_proj.shape[1]
    g = torch.Generator().manual_seed(1)
    T, K = 9, 2
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    want = _run(m, "eager", x, ids, w)
    h3tf._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="h3moe"):
        got = _run(m, "h3moe", x, ids, w)
    logged = [r.getMessage() for r in caplog.records if r.name == "h3moe"]
    assert len(logged) == (1 if isinstance(plan, str) else 0), logged
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    assert got[2].keys() == want[2].keys()
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")
    if not isinstance(plan, str) and plan[2] is not None:  # the clamp did bind: without it the output differs
        from h3moe.reference import experts_ref

        W = (m.gate_up_proj.detach(), m.down_proj.detach())
        assert not torch.allclose(experts_ref(x, *W, w, ids, plan[0]), want[0], rtol=1e-3, atol=1e-3)


def _assert_same_model(eager, fast):
    """fast (h3moe's experts) equals eager: logits, every gradient of a loss, greedy generation; both left in
    eval mode. Returns the token ids used."""
    ids = torch.randint(2, 64, (2, 10))
    outs = []
    for model in (eager, fast):
        o = model(ids, labels=ids)
        model.zero_grad(set_to_none=True)
        o.loss.backward()
        outs.append((o.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys()
    for n, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g, rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")
    eager.eval(), fast.eval()
    with torch.no_grad():
        assert torch.equal(fast.generate(ids[:1], max_new_tokens=6, do_sample=False),
                           eager.generate(ids[:1], max_new_tokens=6, do_sample=False))
    return ids


def test_deepseek_v4_model_end_to_end():
    """A tiny DeepSeek-V4 (clamped SwiGLU experts, limit binding) through experts_implementation="h3moe":
    logits and gradients equal eager, greedy generation token for token, and h3moe.quantize keeps the limit
    (its generation equals the model with the dequantized experts)."""
    import copy

    if not hasattr(transformers, "DeepseekV4Config"):
        pytest.skip("this transformers has no DeepSeek-V4")
    from h3moe.integrations import bitsandbytes as hb

    cfg = transformers.DeepseekV4Config(
        vocab_size=64, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8,
        n_shared_experts=1, max_position_embeddings=128, sliding_window=8, o_groups=2, o_lora_rank=16,
        index_n_heads=2, index_head_dim=16, index_topk=8, num_nextn_predict_layers=0, swiglu_limit=0.5,
        qk_rope_head_dim=8, hc_mult=2)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    eager = transformers.DeepseekV4ForCausalLM(cfg)
    experts = [m for m in eager.modules() if type(m).__name__ == "DeepseekV4Experts"]
    with torch.no_grad():
        for m in experts:
            m.gate_up_proj.normal_(0, 0.3)
            m.down_proj.normal_(0, 0.3)
    fast = copy.deepcopy(eager)
    fast.set_experts_implementation("h3moe")
    assert all(h3tf.experts_plan(m)[2] == 0.5 for m in experts)
    ids = _assert_same_model(eager, fast)
    with torch.no_grad():
        h3moe.quantize(fast, "nf4", 32)
        q = [m for m in fast.modules() if isinstance(m, hb.QuantizedExperts)]
        assert len(q) == 2 and all(m.swiglu_limit == 0.5 for m in q)
        for m, qm in zip(experts, q):  # eager with the dequantized weights
            m.gate_up_proj.copy_(qm.gate_up_proj.dequantize())
            m.down_proj.copy_(qm.down_proj.dequantize())
        torch.testing.assert_close(fast(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(fast.generate(ids[:1], max_new_tokens=6, do_sample=False),
                           eager.generate(ids[:1], max_new_tokens=6, do_sample=False))


def _tiny_v4_experts(limit: float = 0.8):
    """DeepSeek-V4's experts module (clamped SwiGLU), E=3, H=16, I=8, random weights; skip without it."""
    import types

    if not hasattr(transformers, "DeepseekV4Config"):
        pytest.skip("this transformers has no DeepSeek-V4")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    cfg = types.SimpleNamespace(num_local_experts=3, hidden_size=16, intermediate_size=8, hidden_act="silu",
                                swiglu_limit=limit, _experts_implementation="eager")
    m = DeepseekV4Experts(cfg)
    with torch.no_grad():
        m.gate_up_proj.normal_(0, 0.3), m.down_proj.normal_(0, 0.3)
    return m


def test_own_gate_probe_takes_only_what_h3moe_computes():
    """The probe of an own _apply_gate: DeepSeek-V4's clamped gate over an act_fn h3moe lacks (quick_gelu,
    gelu_10) is not taken for silu; the probe ignores torch's default device and dtype."""
    from transformers.activations import ACT2FN

    from h3moe.integrations import _gate

    m = _tiny_v4_experts()
    assert h3tf.experts_plan(m) == ("silu", False, 0.8, True)
    for act in ("quick_gelu", "gelu_10"):
        m.act_fn = ACT2FN[act]
        assert isinstance(h3tf.experts_plan(m), str), act
    m.act_fn = ACT2FN["relu2"]  # one h3moe has: taken as itself
    assert h3tf.experts_plan(m) == ("relu2", False, 0.8, True)
    _gate._FORMS.clear()
    torch.set_default_dtype(torch.float64)
    try:
        assert _gate._probe().dtype == torch.float32
        m.act_fn = ACT2FN["silu"]
        assert h3tf.experts_plan(m) == ("silu", False, 0.8, True)
    finally:
        torch.set_default_dtype(torch.float32)


def test_own_gate_under_torch_compile_before_any_eager_call(monkeypatch):
    """Compiled (fullgraph) before any eager call, DeepSeek-V4's experts are probed at trace time (a constant
    of the graph): the compiled h3moe path runs with the limit, equal to eager."""
    from h3moe.integrations import _gate

    m = _tiny_v4_experts()
    x, ids, w = torch.randn(5, 16), torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]]), torch.rand(5, 2)
    want = m(x, ids, w)
    m.config._experts_implementation = "h3moe"
    _gate._FORMS.clear()
    seen = []
    real = h3tf.moe
    monkeypatch.setattr(h3tf, "moe", lambda *a, **k: seen.append(k["swiglu_limit"]) or real(*a, **k))
    torch._dynamo.reset()
    try:
        got = torch.compile(m, fullgraph=True, backend="eager")(x, ids, w)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert seen == [0.8] and _gate._FORMS  # traced through h3moe, probed once


@pytest.mark.parametrize("family,stem,name", CLASSES, ids=[f"{f}.{n}" for f, _, n in CLASSES])
def test_experts_class_quantized(family, stem, name, caplog):
    """h3moe.quantize on every experts class: either quantized (NF4) and equal to the class's own eager forward
    over the dequantized weights, or left as it is with a warning saying why (never quantized into a gate it
    does not compute)."""
    pytest.importorskip("safetensors")
    from h3moe.integrations import bitsandbytes as hb

    m = _build(family, stem, name)
    if m is None:
        pytest.skip("this sweep cannot build the module from its config")
    if not isinstance(h3tf.experts_plan(m), str) and h3tf.experts_plan(m)[2] is not None:
        for attr in ("swiglu_limit", "limit"):  # a limit that binds at these sizes
            if isinstance(getattr(m, attr, None), (int, float)):
                setattr(m, attr, 0.9)
    holder = torch.nn.Module()
    holder.experts = m
    with caplog.at_level(logging.WARNING, logger="h3moe"):
        h3moe.quantize(holder, "nf4", 64)
    q = holder.experts
    if family in QUANTIZED:
        assert (q is not m) == QUANTIZED[family], family
    if q is m:
        assert "h3moe.quantize: skipping" in caplog.text
        return
    assert isinstance(q, hb.QuantizedExperts)
    E, H = q.num_experts, q.hidden_dim
    g = torch.Generator().manual_seed(2)
    T, K = 7, 2
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    # the dequantized experts are the module's own, within NF4's error (a transposed layout read the wrong way
    # round does not come close)
    from h3moe.integrations.bitsandbytes import _fused_views

    for got, want in zip((q.gate_up_proj.dequantize(), q.down_proj.dequantize()), _fused_views(m)):
        assert got.shape == want.shape and (got - want).norm() < 0.2 * want.norm()
    with torch.no_grad():  # (transposed experts, Aria: quantized in h3moe's layout, compared in theirs)
        back = (lambda t: t.transpose(1, 2)) if getattr(m, "is_transposed", False) else (lambda t: t)
        m.gate_up_proj.copy_(back(q.gate_up_proj.dequantize()))
        m.down_proj.copy_(back(q.down_proj.dequantize()))
        m.config._experts_implementation = "eager"
        torch.testing.assert_close(q(x, ids, w), m(x, ids, w), rtol=1e-4, atol=1e-5)


def test_ungated_experts_ignore_an_apply_gate():
    """transformers never calls _apply_gate on ungated experts (has_gate=False: act_fn(up)); neither does the
    plan (a class-level _apply_gate that clamps changes nothing)."""
    try:
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
    except ImportError:
        pytest.skip("this transformers has no Nemotron-H")
    m = _build("nemotron_h", "modeling_nemotron_h", "NemotronHExperts")
    if m is None:
        pytest.skip("this sweep cannot build the module from its config")

    class Clamping(NemotronHExperts):
        swiglu_limit = 0.5

        def _apply_gate(self, gate_up):
            g, u = gate_up.chunk(2, dim=-1)
            return self.act_fn(g.clamp(max=0.5)) * u.clamp(-0.5, 0.5)

    m.__class__ = Clamping
    assert h3tf.experts_plan(m) == ("relu2", False, None, False)


def test_nemotron_h_model_end_to_end():
    """A tiny Nemotron-H (hybrid, ungated relu2 experts) through experts_implementation="h3moe": the patch
    report names gated=False, logits and gradients equal eager, greedy generation token for token."""
    import copy

    if not hasattr(transformers, "NemotronHConfig"):
        pytest.skip("this transformers has no Nemotron-H")
    cfg = transformers.NemotronHConfig(
        vocab_size=64, hidden_size=64, layers_block_type=["moe", "full_attention", "moe"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, intermediate_size=64, ssm_state_size=16,
        mamba_num_heads=4, mamba_head_dim=16, n_groups=1, chunk_size=16, n_routed_experts=6, n_shared_experts=1,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    eager = transformers.NemotronHForCausalLM(cfg)
    with torch.no_grad():
        for n, p in eager.named_parameters():
            if ".experts." in n:
                p.normal_(0, 0.2)
    fast = copy.deepcopy(eager)
    report = h3moe.patch(fast)
    assert sum("gated=False" in s.detail for s in report.swapped) == 2, report
    _assert_same_model(eager, fast)
