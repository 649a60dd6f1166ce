"""h3moe.patch on tiny random transformers MoE models: parity with the model's eager implementation.

Per family (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss): logits, the
auxiliary loss and every parameter's gradient against the unpatched eager model (fp32 tight; bf16 within
a small multiple of eager bf16's own error against fp32), greedy generate() in fp32, unpatch, standard
checkpoints, torch.compile training. Backends: torch, and triton (interpreter on CPU) when it registers the ops.
"""
from __future__ import annotations

import copy

import pytest
import torch

import h3moe
from h3moe import _backend

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    initializer_range=0.1, max_position_embeddings=64, eos_token_id=None, pad_token_id=0, bos_token_id=1,
)

# family → (config class, model class, config overrides); one comment per row: what the row covers.
FAMILIES = {
    # softmax top-k, renormalized, fp32 routing weights
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    # no renormalization, weights in the hidden dtype, sigmoid-gated shared expert beside the routed ones
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False)),
    # renormalized, K=3 of E=6 (odd K)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=8, intermediate_size=64, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
        norm_topk_prob=True)),
    # no renormalization, E=5 (prime)
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=24, num_experts=5, num_experts_per_tok=2, norm_topk_prob=False)),
    # sigmoid + correction bias, group-limited top-k (2 of 4 groups), scaling 2.5, shared expert
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=0,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # top-k then softmax; transposed interleaved biased clamped-SwiGLU experts (grouped_mm fallback)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        head_dim=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)),
}

HAS_AUX = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"}


def make_model(family: str, dtype=torch.float32, device="cpu", **overrides):
    cfg_name, model_name, kw = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw, **overrides})
    cfg._experts_implementation = "eager"
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)  # nonzero: the bias must change the choice, never the weights
        for name, p in model.named_parameters():
            if name.endswith(("router.bias", "proj_bias")):
                p.normal_(0.0, 0.1)  # gpt-oss biases are zeros at init
    return model.to(device=device, dtype=dtype)


# triton runs under the interpreter on CPU (fp32, tiny shapes), so only on the families that cover its paths:
# route renormalized (mixtral) and not (qwen2_moe), experts fed fp32 sigmoid weights (deepseek_v3), top-k-softmax
# route (gpt_oss). Every family runs on the torch backend.
TRITON_FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss")


def need_backend(backend: str, *ops: str, device: str = "cpu") -> None:
    """Skip unless `backend` runs every op on `device` here (triton on CPU: only under the interpreter)."""
    if backend == "torch":
        return
    h3moe.backends()  # loads the backend modules, which register their ops
    for op in ops:
        ok, why = _backend._can_run(backend, op, torch.device(device))
        if not ok:
            pytest.skip(f"{backend}: {why}")


def _loss(out, family):
    loss = out.loss
    if family in HAS_AUX:
        loss = loss + out.aux_loss
    return loss


def _run(model, ids, family):
    out = model(ids, labels=ids, output_router_logits=family in HAS_AUX)
    model.zero_grad(set_to_none=True)
    _loss(out, family).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _check_report(report, family, n_layers=2):
    routers = report.routers()
    experts = report.experts()
    assert len(routers) == n_layers, str(report)
    if family == "gpt_oss":
        assert not experts
        left = [s for s in report.left_alone if s.role == "experts"]
        assert len(left) == n_layers and all("grouped_mm" in s.detail for s in left), str(report)
    else:
        assert len(experts) == n_layers, str(report)
    if family == "deepseek_v3":
        assert all("sigmoid_group_topk" in d and "torch" in d for d in routers.values())
    else:
        assert all("h3moe.route" in d for d in routers.values())


INTERP = pytest.mark.interpreter
PARITY_CASES = [(f, "torch") for f in FAMILIES] + [
    pytest.param(f, "triton", marks=INTERP) for f in FAMILIES if f in TRITON_FAMILIES
]


@pytest.mark.parametrize("family,backend", PARITY_CASES)
def test_patch_fp32_parity(family, backend):
    need_backend(backend, "route", "moe")
    eager = make_model(family)
    patched = copy.deepcopy(eager)
    report = h3moe.patch(patched, backend=backend)
    _check_report(report, family)
    ids = torch.randint(2, 64, (2 if backend == "torch" else 1, 8))
    out_e, g_e = _run(eager, ids, family)
    out_p, g_p = _run(patched, ids, family)
    torch.testing.assert_close(out_p.logits, out_e.logits, rtol=1e-5, atol=2e-5)
    if family in HAS_AUX:
        torch.testing.assert_close(out_p.aux_loss, out_e.aux_loss, rtol=1e-5, atol=1e-6)
        assert len(out_p.router_logits) == len(out_e.router_logits) == 2
        for a, b in zip(out_p.router_logits, out_e.router_logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert g_p.keys() == g_e.keys()
    # every router and expert weight received a gradient
    assert any("gate_up_proj" in n for n in g_e) and any(("gate.weight" in n or "router.weight" in n) for n in g_e)
    for n in g_e:
        scale = g_e[n].abs().max().item() + 1e-12
        torch.testing.assert_close(g_p[n], g_e[n], rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patch_bf16_within_eager_error(family):
    ref = make_model(family)
    eager = copy.deepcopy(ref).to(torch.bfloat16)
    patched = copy.deepcopy(eager)
    h3moe.patch(patched, backend="torch")
    ids = torch.randint(2, 64, (2, 8))
    with torch.no_grad():
        y_ref = ref(ids).logits
        y_e = eager(ids).logits.float()
        y_p = patched(ids).logits.float()
    assert torch.isfinite(y_p).all()
    # mean, not max: a near-tie that bf16 routes to another expert moves one token's logits in either model
    err_e = (y_e - y_ref).abs().mean().item()
    err_p = (y_p - y_ref).abs().mean().item()
    assert err_p <= 1.5 * err_e + 1e-3, (err_p, err_e)


@pytest.mark.parametrize(
    "family,backend",
    [
        ("mixtral", "torch"),  # softmax top-k, fused route + h3moe.moe
        ("qwen2_moe", "torch"),  # shared expert, weights in the hidden dtype
        ("deepseek_v3", "torch"),  # sigmoid group-limited routing
        ("gpt_oss", "torch"),  # top-k-then-softmax route, grouped_mm experts
        pytest.param("mixtral", "triton", marks=INTERP),  # the kernels under the interpreter, decode steps of T=2
    ],
)
def test_patch_greedy_generate_same_tokens(family, backend):
    need_backend(backend, "route", "moe")
    eager = make_model(family).eval()
    patched = copy.deepcopy(eager)
    h3moe.patch(patched, backend=backend)
    ids = torch.randint(2, 64, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    a = eager.generate(ids, **kw)
    b = patched.generate(ids, **kw)
    assert a.shape == (2, 11)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_unpatch_restores_and_patch_is_idempotent():
    model = make_model("qwen2_moe")
    routers = [m for m in model.modules() if type(m).__name__ == "Qwen2MoeTopKRouter"]
    before = model.get_experts_implementation()
    h3moe.patch(model)
    report = h3moe.patch(model)  # patching twice re-patches once
    assert len(report.routers()) == 2
    assert model.config._experts_implementation == "h3moe"
    assert all("forward" in r.__dict__ for r in routers)
    restored = h3moe.unpatch(model)
    assert len(restored) >= 2
    assert all("forward" not in r.__dict__ for r in routers)
    assert model.get_experts_implementation() == before
    assert not any(hasattr(m, "_h3moe_backend") for m in model.modules())


def test_patch_report_lists_unknown_router_and_options():
    model = make_model("mixtral")
    report = h3moe.patch(model, routers=False)
    assert not report.routers() and len(report.experts()) == 2
    assert sum(s.role == "router" and s.detail == "routers=False" for s in report.left_alone) == 2
    h3moe.unpatch(model)

    class MyRouter(torch.nn.Module):  # a router class h3moe does not know: left alone, and said so
        def forward(self, x):
            return x

    model.model.layers[0].mlp.extra_router = MyRouter()
    report = h3moe.patch(model, experts=False)
    assert model.config._experts_implementation == "eager"
    assert any(s.path.endswith("extra_router") and "unknown router class" in s.detail for s in report.left_alone)
    assert "MixtralTopKRouter" in str(report)


def test_probe_refuses_a_router_whose_forward_changed():
    model = make_model("mixtral")
    gate = model.model.layers[0].mlp.gate

    class DriftedRouter(type(gate)):  # same class name, different function (no renormalization)
        def forward(self, hidden_states):
            logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
            w, i = torch.softmax(logits.float(), -1).topk(self.top_k, -1)
            return logits, w, i

    DriftedRouter.__name__ = "MixtralTopKRouter"
    gate.__class__ = DriftedRouter
    report = h3moe.patch(model)
    assert len(report.routers()) == 1
    assert any("probe" in s.detail for s in report.left_alone if s.role == "router")


def test_deepseek_router_matches_eager_with_ties_in_group_stage_skipped():
    # topk_group == n_group: the group stage keeps every group and h3moe skips it
    model = make_model("deepseek_v3", topk_group=4)
    patched = copy.deepcopy(model)
    h3moe.patch(patched)
    ids = torch.randint(2, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, model(ids).logits, rtol=1e-5, atol=2e-5)


def test_save_pretrained_checkpoint_is_standard(tmp_path):
    model = make_model("mixtral").eval()
    plain_keys = set(model.state_dict())
    h3moe.patch(model)
    assert set(model.state_dict()) == plain_keys
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "h3moe" not in text
    loaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    assert "forward" not in loaded.model.layers[0].mlp.gate.__dict__
    ids = torch.randint(2, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=2e-5)


def test_patched_model_trains_under_torch_compile():
    # bf16: h3moe's torch backend takes torch's grouped_mm under compile, whose fake kernel accepts bf16 only
    # (fp32 under compile needs h3moe/ops/experts.py to take its batched path there).
    torch._dynamo.reset()
    model = make_model("mixtral", dtype=torch.bfloat16).train()
    h3moe.patch(model, backend="torch")
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + AOTAutograd; inductor codegen is slow on CI
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(2, 64, (2, 8))
    losses = []
    for _ in range(4):
        out = compiled(ids, labels=ids, output_router_logits=True)
        loss = out.loss + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses
    torch._dynamo.reset()


# --- GPU tier: bf16 at realistic shapes on the default (auto) backend --------------------------------------

GPU_SIZES = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, vocab_size=512, initializer_range=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patch_gpu_bf16_parity(family):
    over = dict(GPU_SIZES)
    if family in ("qwen3_moe", "gpt_oss"):
        over["head_dim"] = 32
    if family == "deepseek_v3":
        over["num_key_value_heads"] = 8
    ref = make_model(family, device="cuda", **over)
    with torch.no_grad():  # decisive routing: few bf16 near-ties at 128 tokens
        for n, p in ref.named_parameters():
            if n.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.mul_(10.0)
    eager = copy.deepcopy(ref).to(torch.bfloat16)
    patched = copy.deepcopy(eager)
    report = h3moe.patch(patched)
    _check_report(report, family)
    ids = torch.randint(2, 512, (2, 64), device="cuda")
    out_r = ref(ids, labels=ids)
    out_e = eager(ids, labels=ids)
    out_p = patched(ids, labels=ids)
    for out, m in ((out_r, ref), (out_e, eager), (out_p, patched)):
        m.zero_grad(set_to_none=True)
        out.loss.backward()
    assert torch.isfinite(out_p.logits).all()
    # mean, not max: a bf16 near-tie routed to another expert moves a few tokens' logits in either model
    err_e = (out_e.logits.float() - out_r.logits).abs().mean().item()
    err_p = (out_p.logits.float() - out_r.logits).abs().mean().item()
    assert err_p <= 1.5 * err_e + 1e-3, (err_p, err_e)
    g_r = dict(ref.named_parameters())
    for n, p in patched.named_parameters():
        if p.grad is None:
            continue
        ge = dict(eager.named_parameters())[n].grad.float()
        gr = g_r[n].grad
        ee = (ge - gr).abs().max().item()
        ep = (p.grad.float() - gr).abs().max().item()
        assert torch.isfinite(p.grad).all(), n
        assert ep <= 2 * ee + 1e-2 * (gr.abs().max().item() + 1e-6), (n, ep, ee)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_patch_gpu_fp32_generate(family):
    eager = make_model(family, device="cuda").eval()
    patched = copy.deepcopy(eager)
    h3moe.patch(patched)
    ids = torch.randint(2, 64, (2, 5), device="cuda")
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    a, b = eager.generate(ids, **kw), patched.generate(ids, **kw)
    if torch.equal(a.sequences, b.sequences):
        return
    # GPU kernels may round differently (TF32 dots): tokens may part only where eager's top two were a tie
    row, col = (a.sequences != b.sequences).nonzero()[0].tolist()
    top2 = a.scores[col - ids.shape[1]][row].float().topk(2).values
    assert (top2[0] - top2[1]).abs() <= 1e-3 * top2[0].abs().clamp(min=1), (row, col, top2)


def test_explicit_backend_that_cannot_run_fails_at_patch_time():
    model = make_model("mixtral")
    if h3moe.backends()["cuda"].available:
        pytest.skip("cuda backend runs here")
    with pytest.raises(h3moe.BackendUnavailable):
        h3moe.patch(model, backend="cuda")
    with pytest.raises(ValueError):
        h3moe.patch(model, backend="nope")
    assert "_h3moe_state" not in model.__dict__


# fullgraph: no graph break anywhere in h3moe's router + experts path (needs resolve() constant under dynamo)
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_patched_moe_block_compiles_fullgraph(family):
    torch._dynamo.reset()
    model = make_model(family, dtype=torch.bfloat16).train()
    h3moe.patch(model, backend="torch")
    block = model.model.layers[0].mlp
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16, requires_grad=True)
    y = compiled(x)
    with torch.no_grad():
        torch.testing.assert_close(y, block(x), rtol=0, atol=0)
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch._dynamo.reset()


def test_patched_model_deepcopies_and_pickles(tmp_path):
    model = make_model("qwen3_moe").eval()
    h3moe.patch(model)
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for m in (twin, loaded):
        gate = m.model.layers[0].mlp.gate
        assert gate.forward.module is gate  # bound to its own router, not the original's
    with torch.no_grad():
        twin.model.layers[0].mlp.gate.weight.mul_(-1.0)  # the twin's routers read the twin's weights
        ids = torch.randint(2, 64, (1, 8))
        assert not torch.allclose(twin(ids).logits, model(ids).logits)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
