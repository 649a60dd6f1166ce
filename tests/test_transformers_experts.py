"""experts_implementation="h3moe": the ExpertsInterface registration and the experts forward.

The forward is checked against transformers' own implementations (batched_mm honors every decorator flag,
eager is the model's own loop) and against h3moe.reference.experts_ref, forward and every gradient.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import subprocess
import sys
import types

import pytest
import torch

import h3moe
from h3moe.integrations import transformers as h3tf
from h3moe.reference import experts_ref

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402
from transformers.integrations import moe as tfmoe  # noqa: E402

from test_transformers_patch import FAMILIES, make_model, need_backend  # noqa: E402


def test_import_h3moe_registers_lazily_without_importing_transformers():
    code = (
        "import sys, h3moe\n"
        "assert 'transformers' not in sys.modules, 'import h3moe imported transformers'\n"
        "from transformers.integrations import moe\n"
        "assert moe.ALL_EXPERTS_FUNCTIONS['h3moe'] is h3moe.integrations.transformers.h3moe_experts_forward\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_registered_in_this_process():
    assert tfmoe.ALL_EXPERTS_FUNCTIONS["h3moe"] is h3tf.h3moe_experts_forward


# --- a synthetic experts class per layout, built with transformers' own decorator -----------------------


def make_experts(E=5, H=16, I=12, act="silu", transposed=False, dtype=torch.float32, **flags):
    @tfmoe.use_experts_implementation(is_transposed=transposed, **flags)
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            gu, dn = ((E, H, 2 * I), (E, I, H)) if transposed else ((E, 2 * I, H), (E, H, I))
            self.gate_up_proj = torch.nn.Parameter(torch.randn(gu, dtype=dtype) / H**0.5)
            self.down_proj = torch.nn.Parameter(torch.randn(dn, dtype=dtype) / I**0.5)
            if flags.get("has_bias"):
                self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(E, 2 * I, dtype=dtype) * 0.1)
                self.down_proj_bias = torch.nn.Parameter(torch.randn(E, H, dtype=dtype) * 0.1)
            self.act_fn = ACT2FN[act]

        def forward(self, hidden_states, top_k_index, top_k_weights):  # "eager": not used here
            raise AssertionError("dispatch went to eager")

    return Experts(types.SimpleNamespace(_experts_implementation="h3moe"))


def _inputs(T, H, E, K, dtype=torch.float32):
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])  # (T, K) distinct experts per token
    w = torch.rand(T, K, dtype=torch.float32).requires_grad_()
    return x, ids, w


def _fwd_bwd(fn, m, x, ids, w):
    for t in (x, w, *m.parameters()):
        t.grad = None
    y = fn(m, x, ids, w)
    gen = torch.Generator().manual_seed(y.numel())  # the same cotangent for every implementation
    g = torch.randn(y.shape, generator=gen).to(y)
    (y * g).sum().backward()
    return y.detach(), [x.grad.clone(), w.grad.clone()] + [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize(
    "T,E,K,act,transposed",
    [
        (7, 5, 2, "silu", False),  # standard layout, prime E, T not a multiple of anything
        (1, 4, 1, "silu", False),  # a single token, K=1 (decode)
        (16, 4, 4, "gelu", False),  # K=E: every expert gets every token
        (9, 6, 3, "gelu_pytorch_tanh", False),  # gelu_tanh activation
        (8, 3, 2, "relu", False),  # relu
        (10, 5, 2, "silu", True),  # transposed layout, viewed back without a copy
        (6, 4, 2, "gelu", True),  # transposed + gelu
    ],
)
def test_experts_forward_matches_transformers(T, E, K, act, transposed):
    H = 16
    m = make_experts(E=E, H=H, act=act, transposed=transposed)
    assert not isinstance(h3tf.experts_plan(m), str)
    x, ids, w = _inputs(T, H, E, K)
    y, g = _fwd_bwd(h3tf.h3moe_experts_forward, m, x, ids, w)
    y_ref, g_ref = _fwd_bwd(tfmoe.batched_mm_experts_forward, m, x, ids, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if not transposed:  # and against h3moe's own reference
        name = h3tf.activation_name(m.act_fn)
        ref = experts_ref(x.detach(), m.gate_up_proj.detach(), m.down_proj.detach(), w.detach(), ids, name)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_transposed_experts_take_the_torch_backend_under_auto(monkeypatch):
    """Transposed experts (Aria) under backend "auto" run h3moe's torch backend on views of the weights: the GPU
    kernels want (E, 2I, H) rows, a copy of every expert at every call. An explicit backend still gets them
    (copied)."""
    from h3moe.ops import experts as ops_experts

    m = make_experts(E=4, H=16, transposed=True)
    x, ids, w = _inputs(5, 16, 4, 2)
    seen = []
    real = ops_experts.moe
    monkeypatch.setattr(h3tf, "moe", lambda *a, **k: seen.append((k["backend"], a[1].is_contiguous())) or real(*a, **k))
    with torch.no_grad():
        h3tf.h3moe_experts_forward(m, x, ids, w)
        m._h3moe_backend = "torch"
        h3tf.h3moe_experts_forward(m, x, ids, w)
    assert seen == [("torch", False), ("torch", False)]  # views, never a copy
    m._h3moe_backend = "auto"  # no grouped_mm for them (dtype, device): auto resolves as for any other layout
    monkeypatch.setattr(h3tf, "_use_torch_gmm", lambda *ts: False)
    monkeypatch.setattr(h3tf._backend, "resolve", lambda b, dev, op: "triton")  # as on a GPU
    monkeypatch.setattr(h3tf, "moe", lambda *a, **k: seen.append((k["backend"], a[1].is_contiguous())) or real(
        *a, **{**k, "backend": "torch"}))
    with torch.no_grad():
        h3tf.h3moe_experts_forward(m, x, ids, w)
    assert seen[-1] == ("auto", True)  # the kernels' layout, copied
    monkeypatch.undo()
    monkeypatch.setattr(h3tf, "moe", lambda *a, **k: seen.append((k["backend"], a[1].is_contiguous())) or real(*a, **k))
    if importlib.util.find_spec("triton") is not None:  # asked for by name: the kernels' layout, copied
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        m._h3moe_backend = "triton"
        with torch.no_grad():
            h3tf.h3moe_experts_forward(m, x, ids, w)
        assert seen[-1] == ("triton", True)


def test_activation_mapping():
    assert h3tf.activation_name(ACT2FN["silu"]) == "silu"
    assert h3tf.activation_name(ACT2FN["swish"]) == "silu"
    assert h3tf.activation_name(ACT2FN["gelu"]) == "gelu"
    assert h3tf.activation_name(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert h3tf.activation_name(ACT2FN["gelu_new"]) == "gelu_tanh"
    assert h3tf.activation_name(ACT2FN["relu"]) == "relu"
    assert h3tf.activation_name(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert h3tf.activation_name(ACT2FN["relu2"]) == "relu2"  # squared ReLU (Nemotron-H)
    for other in ("quick_gelu", "gelu_10", "tanh"):
        assert h3tf.activation_name(ACT2FN[other]) is None, other


def test_expert_parallel_sentinels():
    E, H, T, K = 4, 16, 9, 2
    m = make_experts(E=E, H=H)
    m._is_expert_parallel = True
    x, ids, w = _inputs(T, H, E, K)
    ids[::3, 1] = E  # slots owned by another rank (sentinel id E); EP zeroes their weights at dispatch
    with torch.no_grad():
        w[::3, 1] = 0.0
    y, g = _fwd_bwd(h3tf.h3moe_experts_forward, m, x, ids, w)
    y_ref, g_ref = _fwd_bwd(tfmoe.batched_mm_experts_forward, m, x, ids, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (g[1][::3, 1] == 0).all()  # no router gradient into another rank's slots


@pytest.mark.parametrize(
    "flags,act,why",
    [
        (dict(has_bias=True), "silu", "biases"),  # biased experts
        (dict(is_concatenated=False), "silu", "interleaved"),  # [g0, u0, g1, u1, ...] rows
        (dict(), "gelu_10", "activation"),  # an activation h3moe does not have (clipped GELU)
    ],
)
def test_uncovered_variant_falls_back_with_one_log_line(flags, act, why, caplog):
    E, H, T, K = 4, 16, 8, 2
    m = make_experts(E=E, H=H, act=act, **flags)
    plan = h3tf.experts_plan(m)
    assert isinstance(plan, str) and why in plan
    x, ids, w = _inputs(T, H, E, K)
    h3tf._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="h3moe"):
        y1, g1 = _fwd_bwd(h3tf.h3moe_experts_forward, m, x, ids, w)
        y2, _ = _fwd_bwd(h3tf.h3moe_experts_forward, m, x, ids, w)
    assert len([r for r in caplog.records if r.name == "h3moe"]) == 1
    y_ref, g_ref = _fwd_bwd(tfmoe.grouped_mm_experts_forward, m, x, ids, w)
    torch.testing.assert_close(y1, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(y2, y_ref, rtol=0, atol=0)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_bf16_hidden_with_bf16_or_fp32_router_weights(wdtype):
    E, H, T, K = 6, 32, 24, 2
    m = make_experts(E=E, H=H, I=24, dtype=torch.bfloat16)
    x, ids, w = _inputs(T, H, E, K, dtype=torch.bfloat16)
    w16 = w.detach().to(wdtype)
    with torch.no_grad():
        y = h3tf.h3moe_experts_forward(m, x, ids, w16)
        y_e = tfmoe.batched_mm_experts_forward(m, x, ids, w16).float()
        ref = experts_ref(x.float(), m.gate_up_proj.float(), m.down_proj.float(), w16.float(), ids)
    assert y.dtype == torch.bfloat16
    err = (y.float() - ref).abs().max().item()
    err_e = (y_e - ref).abs().max().item()
    assert err <= 2 * err_e + 1e-3, (err, err_e)


def test_empty_batch():
    m = make_experts()
    x = torch.randn(0, 16)
    y = h3tf.h3moe_experts_forward(m, x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert y.shape == (0, 16)


# --- whole models through the interface (routers stay the model's own) -----------------------------------


# every family on torch; the triton experts (interpreter) through the interface once
@pytest.mark.parametrize(
    "family,backend", [(f, "torch") for f in FAMILIES] + [pytest.param("mixtral", "triton", marks=pytest.mark.interpreter)]
)
def test_set_experts_implementation_parity(family, backend, monkeypatch, caplog):
    if backend == "triton":
        need_backend(backend, "moe")
        monkeypatch.setenv("H3MOE_BACKEND", "triton")
    eager = make_model(family)
    fast = copy.deepcopy(eager)
    fast.set_experts_implementation("h3moe")
    assert fast.config._experts_implementation == "h3moe"
    ids = torch.randint(2, 64, (1, 8))
    out = []
    h3tf._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="h3moe"):
        for model in (eager, fast):
            o = model(ids, labels=ids)
            model.zero_grad(set_to_none=True)
            o.loss.backward()
            out.append((o.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    h3_logs = [r for r in caplog.records if r.name == "h3moe"]
    assert len(h3_logs) == (1 if family == "gpt_oss" else 0), [r.getMessage() for r in h3_logs]
    (y_e, g_e), (y_f, g_f) = out
    torch.testing.assert_close(y_f, y_e, rtol=1e-5, atol=2e-5)
    assert g_f.keys() == g_e.keys()
    for n in g_e:
        torch.testing.assert_close(g_f[n], g_e[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_from_pretrained_with_experts_implementation_h3moe(tmp_path):
    model = make_model("qwen3_moe").eval()
    model.save_pretrained(tmp_path)
    fast = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="h3moe").eval()
    assert fast.config._experts_implementation == "h3moe"
    calls = []
    orig = h3tf.moe
    try:
        h3tf.moe = lambda *a, **k: calls.append(1) or orig(*a, **k)
        ids = torch.randint(2, 64, (2, 8))
        with torch.no_grad():
            torch.testing.assert_close(fast(ids).logits, model(ids).logits, rtol=1e-5, atol=2e-5)
    finally:
        h3tf.moe = orig
    assert len(calls) == 2  # one h3moe.moe per MoE layer


# --- GPU tier --------------------------------------------------------------------------------------------


def _loop_ref(self, x, ids, w):
    """fp32 reference that loops over experts (memory-light at realistic shapes, unlike batched_mm)."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(self.gate_up_proj.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = (x[tok] @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
        o = (self.act_fn(gate) * up) @ self.down_proj[e].t()
        y = y.index_add(0, tok, o * w[tok, slot, None])
    return y


@pytest.mark.gpu
@pytest.mark.parametrize(
    "T,E,K,H,I",
    [
        (512, 8, 2, 1024, 1536),  # Mixtral-like, small batch
        (2048, 64, 6, 512, 256),  # many small experts, DeepSeek-like
        (33, 16, 4, 256, 512),  # ragged T, most experts nearly empty
    ],
)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])  # Mixtral/DeepSeek pass fp32, Qwen/OLMoE bf16
def test_experts_forward_gpu_bf16(T, E, K, H, I, wdtype):
    m = make_experts(E=E, H=H, I=I, dtype=torch.bfloat16).cuda()
    m32 = copy.deepcopy(m).float()
    x, ids, w = _inputs(T, H, E, K, dtype=torch.bfloat16)
    x, ids, w = x.detach().cuda().requires_grad_(), ids.cuda(), w.detach().to(wdtype).cuda().requires_grad_()
    y, g = _fwd_bwd(h3tf.h3moe_experts_forward, m, x, ids, w)
    y_e, g_e = _fwd_bwd(tfmoe.grouped_mm_experts_forward, m, x, ids, w)
    x32 = x.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    y_r, g_r = _fwd_bwd(_loop_ref, m32, x32, ids, w32)
    assert torch.isfinite(y).all()
    assert (y.float() - y_r).abs().max() <= 2 * (y_e.float() - y_r).abs().max() + 1e-3
    for a, b, r in zip(g, g_e, g_r):
        assert (a.float() - r).abs().max() <= 2 * (b.float() - r).abs().max() + 1e-3 * (r.abs().max() + 1e-6)


def test_peft_lora_on_expert_parameters(monkeypatch):
    """PEFT's LoRA on the fused expert tensors (target_parameters: W + BA through a parametrization, how
    MoE experts are LoRA-tuned) runs through h3moe's experts: logits and the LoRA gradients equal eager's."""
    peft = pytest.importorskip("peft")
    eager = make_model("mixtral")
    cfg = peft.LoraConfig(r=4, target_modules=[], init_lora_weights=False,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    eager = peft.get_peft_model(eager, cfg)
    fast = copy.deepcopy(eager)
    fast.base_model.model.set_experts_implementation("h3moe")
    calls = []
    real = h3tf.moe
    monkeypatch.setattr(h3tf, "moe", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(2, 64, (2, 8))
    out = []
    for model in (eager, fast):
        o = model(input_ids=ids, labels=ids)
        model.zero_grad(set_to_none=True)
        o.loss.backward()
        out.append((o.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == 2  # both layers ran h3moe (not the fallback)
    assert out[0][1] and all("lora_" in n for n in out[0][1])  # only the adapters train
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=2e-5)
    for n, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][n], g, rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")
