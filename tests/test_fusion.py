"""H³Fusion: fuse (layout, norms folding, configs, LoRA, router init), save/load, the loss, training, Trainer.

All on tiny random Llama models (H=32, I=64, L=2) on CPU; the whole file runs in well under a minute.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from h3moe import reference as ref  # noqa: E402
from h3moe.fusion import (  # noqa: E402
    FusionError,
    H3FusionLoss,
    collate,
    drift_reg,
    expert_params,
    freeze_for_fusion,
    fuse,
    router_accuracy,
    train_fusion,
    use_h3moe_experts,
)
from h3moe.fusion import tiny  # noqa: E402
from h3moe.fusion.data import char_tokenizer  # noqa: E402

H, I = 32, 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: on a shared 2-core machine, intra-op thread sync costs 10-30x the math.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _model(tok, seed, **kw):
    """A tiny Llama with random (not unit) norm weights so that norm folding is exercised."""
    m = tiny.tiny_llama(tokenizer=tok, hidden_size=kw.pop("hidden_size", H),
                        intermediate_size=kw.pop("intermediate_size", I), seed=seed, **kw)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def experts(tok):
    return [_model(tok, seed=s) for s in (11, 12, 13)]


def _ids(tok, B=3, S=12):
    return torch.randint(4, len(tok), (B, S))


# ------------------------------------------------------------------------------------------------ fuse


def test_zero_router_top_k_n_is_mean_of_ffns(experts):
    fused = fuse(experts, top_k=3, router_init="zeros")
    assert isinstance(fused, transformers.MixtralForCausalLM)
    x = torch.randn(2, 7, H)
    for l in range(2):
        layer = fused.model.layers[l]
        got = layer.mlp(layer.post_attention_layernorm(x))
        want = torch.stack([
            m.model.layers[l].mlp(m.model.layers[l].post_attention_layernorm(x)) for m in experts
        ]).mean(0)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # embeddings, attention, norms and lm_head are expert 0's (base=None)
    src = experts[0]
    assert torch.equal(fused.model.embed_tokens.weight, src.model.embed_tokens.weight)
    assert torch.equal(fused.lm_head.weight, src.lm_head.weight)
    assert torch.equal(fused.model.norm.weight, src.model.norm.weight)
    assert torch.equal(fused.model.layers[1].self_attn.k_proj.weight, src.model.layers[1].self_attn.k_proj.weight)
    assert torch.equal(fused.model.layers[1].input_layernorm.weight, src.model.layers[1].input_layernorm.weight)


def test_expert_layout_gate_up_down(tok):
    # Unit post-attention norms: nothing folded, the expert tensors are the plain concatenation.
    ms = [tiny.tiny_llama(tokenizer=tok, hidden_size=H, intermediate_size=I, seed=s) for s in (1, 2)]
    fused = fuse(ms, top_k=1)
    for e, m in enumerate(ms):
        mlp, ex = m.model.layers[1].mlp, fused.model.layers[1].mlp.experts
        assert torch.equal(ex.gate_up_proj[e], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        assert torch.equal(ex.down_proj[e], mlp.down_proj.weight)


def test_copies_of_one_model_give_its_logits(tok, experts):
    dense = experts[1]
    fused = fuse([dense, copy.deepcopy(dense)], base=dense, top_k=2, router_init="random")
    ids = _ids(tok)
    torch.testing.assert_close(fused(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_base_and_mean_attention(tok, experts):
    base = _model(tok, seed=5)
    fused = fuse(experts, base=base, attention="base")
    assert torch.equal(fused.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(fused.model.embed_tokens.weight, base.model.embed_tokens.weight)
    fused = fuse(experts, base=base, attention="mean")
    want = torch.stack([m.model.layers[0].self_attn.o_proj.weight for m in experts]).mean(0)
    torch.testing.assert_close(fused.model.layers[0].self_attn.o_proj.weight, want)


@pytest.mark.parametrize("field,kw", [
    ("intermediate_size", {"intermediate_size": 48}),  # FFN width differs
    ("num_key_value_heads", {"num_kv_heads": 4}),  # GQA grouping differs
    ("vocab_size", {"vocab_size": 120}),  # tokenizer differs
    ("num_hidden_layers", {"num_layers": 3}),  # depth differs
])
def test_config_mismatch_names_field(tok, experts, field, kw):
    other = tiny.tiny_llama(tokenizer=tok, hidden_size=H, intermediate_size=kw.pop("intermediate_size", I), **kw)
    with pytest.raises(FusionError, match=field):
        fuse([experts[0], other])


def test_rejects_bad_arguments(tok, experts):
    with pytest.raises(FusionError, match="top_k"):
        fuse(experts, top_k=4)
    with pytest.raises(FusionError, match="router_init"):
        fuse(experts, router_init="ones")
    with pytest.raises(FusionError, match="prompts"):
        fuse(experts, router_init="hidden")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        fuse(["/tmp/no-such-dir-h3moe"], top_k=1)
    biased = tiny.tiny_llama(tokenizer=tok, hidden_size=H, intermediate_size=I)
    biased.config.attention_bias = True
    biased.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.randn(H))
    with pytest.raises(FusionError, match="attention_bias"):
        fuse([experts[0], biased])


def test_architectures_mixtral_does_not_reproduce_are_refused(tok):
    """Qwen3 (q/k norms) and Gemma (Llama's module names, but (1+w) norms and a scaled embedding) would lose
    what makes them themselves inside a MixtralForCausalLM: refused, naming why; check_architecture=False
    fuses them anyway; Mistral is Mixtral's own layer and fuses."""
    import transformers

    small = dict(vocab_size=len(tok), hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=H // 4, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small)).eval()
    with pytest.raises(FusionError, match="q_norm"):
        fuse([qwen3, qwen3], top_k=1)
    gemma = transformers.GemmaForCausalLM(transformers.GemmaConfig(**small)).eval()
    with pytest.raises(FusionError, match="model_type='gemma'"):
        fuse([gemma, gemma], top_k=1)
    assert fuse([gemma, gemma], top_k=1, check_architecture=False).config.num_local_experts == 2
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**small, sliding_window=None)).eval()
    ids = torch.randint(3, len(tok), (1, 9))
    fused = fuse([mistral, mistral], top_k=2)  # two copies, uniform router: the FFN is the model's own
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, mistral(ids).logits, rtol=1e-4, atol=1e-4)


def test_router_init_hidden_separates_tasks(tok):
    dense = tiny.tiny_llama(tokenizer=tok, hidden_size=H, intermediate_size=I, seed=3)
    prompts = [[r["prompt"] for r in tiny.make_records(t, 8, seed=1)] for t in tiny.TASKS]
    fused = fuse([dense] * 3, top_k=2, router_init="hidden", prompts=prompts, tokenizer=tok, names=tiny.TASKS)
    w = fused.model.layers[0].mlp.gate.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(3))
    batch = collate(sum((tiny.encoded(t, 16, tok, seed=7) for t in tiny.TASKS), []))
    acc = router_accuracy(fused, batch)
    zeros = router_accuracy(fuse([dense] * 3, top_k=2), batch)
    assert zeros["all"] == pytest.approx(1 / 3)  # uniform routing: argmax is expert 0
    assert acc["all"] >= 0.9, acc


def test_lora_adapters_are_merged(tok, tmp_path):
    peft = pytest.importorskip("peft")
    base = _model(tok, seed=21)
    adapters, wants = [], []
    for s in (1, 2):
        torch.manual_seed(s)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                              init_lora_weights=False)
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        mlp = pm.base_model.model.model.layers[1].mlp
        merged = {}
        for n in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, n)
            merged[n] = lin.base_layer.weight + 2.0 * lin.lora_B["default"].weight @ lin.lora_A["default"].weight
        wants.append(merged)
        adapters.append(pm)
    adapters[1].save_pretrained(tmp_path / "a1")
    fused = fuse([adapters[0], str(tmp_path / "a1")], base=base, top_k=2)
    w_norm = base.model.layers[1].post_attention_layernorm.weight
    for e, want in enumerate(wants):
        ex = fused.model.layers[1].mlp.experts
        torch.testing.assert_close(ex.gate_up_proj[e], torch.cat([want["gate_proj"], want["up_proj"]]) * w_norm,
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ex.down_proj[e], want["down_proj"], atol=1e-6, rtol=1e-5)
    assert hasattr(adapters[0].base_model.model.model.layers[1].mlp.gate_proj, "lora_A")  # caller's copy intact


def test_save_load_round_trip(tok, experts, tmp_path):
    fused = fuse(experts, top_k=2, router_init="random", names=tiny.TASKS)
    fused.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back) is transformers.MixtralForCausalLM
    assert list(back.config.h3fusion_experts) == list(tiny.TASKS)
    ids = _ids(tok)
    assert torch.equal(back(input_ids=ids).logits, fused(input_ids=ids).logits)
    out = back.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


# ------------------------------------------------------------------------------------------------ losses


def _rand_layers(E=3, L=2, dtype=torch.float64):
    ws = [(torch.randn(E, 2 * 6, 5, dtype=dtype), torch.randn(E, 5, 6, dtype=dtype)) for _ in range(L)]
    w0 = [tuple(t + 0.3 * torch.randn_like(t) for t in pair) for pair in ws]
    return ws, w0


def test_drift_gradient_equals_autograd():
    ws, w0 = _rand_layers()
    w0[1] = (ws[1][0].clone(), w0[1][1])  # layer 1's gate_up has not drifted: the norm's kink at 0
    gam = torch.rand(3, dtype=torch.float64) + 0.1
    a = [tuple(t.clone().requires_grad_() for t in pair) for pair in ws]
    b = [tuple(t.clone().requires_grad_() for t in pair) for pair in ws]
    ours = drift_reg(a, gam, w0)
    want = ref.drift_reg_ref(b, gam, w0)
    torch.testing.assert_close(ours, want)
    ours.backward()
    want.backward()
    for pa, pb, p0 in zip(a, b, w0):
        for ta, tb, t0 in zip(pa, pb, p0):
            torch.testing.assert_close(ta.grad, tb.grad)
            d = (tb.detach() - t0).reshape(3, -1)
            n = d.norm(dim=1, keepdim=True)
            analytic = torch.where(n > 0, gam[:, None] * d / n.clamp_min(1e-300), 0.0) / len(ws)
            torch.testing.assert_close(ta.grad.reshape(3, -1), analytic)
    assert not a[1][0].grad.any() and a[1][1].grad.abs().sum() > 0


def test_h3fusion_loss_is_the_sum_of_its_parts(tok, experts):
    fused = fuse(experts, top_k=2, router_init="random")
    with torch.no_grad():
        wd = fused.model.layers[0].mlp.experts.down_proj
        wd.add_(0.01 * torch.randn_like(wd))
    loss = H3FusionLoss(fused, gate_coef=0.7, gammas=[0.1, 0.2, 0.3], load_balancing_coef=0.05, z_coef=0.01,
                        variant="nll", backend="torch")
    with torch.no_grad():
        fused.model.layers[1].mlp.experts.gate_up_proj.mul_(1.01)  # drift after the snapshot
    b = collate(sum((tiny.encoded(t, 3, tok, seed=2) for t in tiny.TASKS), []))
    out = fused(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
    assert len(out.router_logits) == 2
    got = loss(out, b["labels"], b["task_labels"], b["attention_mask"])
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                           b["labels"][:, 1:].reshape(-1), ignore_index=-100)
    gate = ref.gating_loss_ref(out.router_logits, b["task_labels"], b["attention_mask"], "nll")
    drift = ref.drift_reg_ref(expert_params(fused), torch.tensor([0.1, 0.2, 0.3]), loss.initial)
    lb = ref.load_balancing_loss_ref(out.router_logits, 3, 2, b["attention_mask"])
    z = ref.z_loss_ref(out.router_logits, b["attention_mask"])
    want = lm + 0.7 * gate + drift + 0.05 * lb + 0.01 * z
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert drift > 0 and set(loss.parts) == {"lm", "gate", "drift", "lb", "z"}


def test_training_lowers_gating_loss_and_raises_router_accuracy(tok):
    ms = [_model(tok, seed=s) for s in (31, 32, 33)]
    fused = fuse(ms, top_k=2, router_init="random", names=tiny.TASKS)
    attn0 = fused.model.layers[0].self_attn.q_proj.weight.detach().clone()
    emb0 = fused.model.embed_tokens.weight.detach().clone()
    ex0 = fused.model.layers[0].mlp.experts.down_proj.detach().clone()
    freeze_for_fusion(fused)
    train = sum((tiny.encoded(t, 32, tok, seed=1) for t in tiny.TASKS), [])
    probe = collate(sum((tiny.encoded(t, 16, tok, seed=9) for t in tiny.TASKS), []))
    before = router_accuracy(fused, probe)
    hist = train_fusion(fused, train, steps=25, batch_size=24, lr=1e-3, router_lr=3e-2,
                        loss=H3FusionLoss(fused, gate_coef=1.0, gammas=0.01), progress=False)
    after = router_accuracy(fused, probe)
    gate = [h["gate"] for h in hist]
    assert sum(gate[-5:]) / 5 < sum(gate[:5]) / 5 - 0.05, gate
    assert after["all"] > before["all"] and after["all"] >= 0.9, (before, after)
    assert torch.equal(fused.model.layers[0].self_attn.q_proj.weight, attn0)  # attention frozen
    assert torch.equal(fused.model.embed_tokens.weight, emb0)  # embeddings frozen
    assert not torch.equal(fused.model.layers[0].mlp.experts.down_proj, ex0)  # experts train


@pytest.mark.parametrize("grad_accum,checkpointing", [(2, False), (3, True)])
def test_train_fusion_accumulates_micro_batches_under_checkpointing(tok, grad_accum, checkpointing):
    """train_fusion(grad_accum=n, gradient_checkpointing=...): a step's gradient is the mean over the batch's n
    interleaved micro-batches of each one's loss gradient, with and without recomputing the layers (one step,
    lr 0: the gradients are left in .grad); the loop reports the mean of the micro-batch losses and leaves the
    model as it came (no checkpointing, its cache setting back)."""
    from h3moe.fusion.data import batches

    fused = fuse([_model(tok, seed=s) for s in (41, 42, 43)], top_k=2, router_init="random", names=tiny.TASKS)
    freeze_for_fusion(fused)
    train = sum((tiny.encoded(t, 8, tok, seed=2) for t in tiny.TASKS), [])
    loss = H3FusionLoss(fused, gate_coef=1.0, gammas=0.01)
    params = [p for p in fused.parameters() if p.requires_grad]
    calls = []
    hook = fused.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # (the recompute stops early)
    hist = train_fusion(fused, train, steps=1, batch_size=6, lr=0.0, router_lr=0.0, loss=loss, seed=5,
                        progress=False, grad_accum=grad_accum, gradient_checkpointing=checkpointing)
    hook.remove()
    assert len(calls) == grad_accum * (2 if checkpointing else 1)  # checkpointing: recomputed in the backward
    got = [p.grad.clone() for p in params]
    assert not getattr(fused, "is_activation_checkpointing", None) and not any(
        getattr(m, "gradient_checkpointing", False) for m in fused.modules()) and fused.config.use_cache
    emb_hooks = fused.get_input_embeddings()._forward_hooks
    assert not emb_hooks and not getattr(fused, "_require_grads_hooks", None)  # checkpointing's input hook removed

    b = next(batches(train, 6, 1, torch.Generator().manual_seed(5)))
    for p in params:
        p.grad = None
    fused.train()
    total = 0.0
    for i in range(grad_accum):
        m = {k: v[i::grad_accum] for k, v in b.items()}
        out = fused(input_ids=m["input_ids"], attention_mask=m["attention_mask"], output_router_logits=True)
        part = loss(out, m["labels"], m["task_labels"], m["attention_mask"])
        (part / grad_accum).backward()
        total += float(part) / grad_accum
    fused.eval()
    assert hist[0]["loss"] == pytest.approx(total, rel=1e-5)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="grad_accum"):
        train_fusion(fused, train, steps=1, batch_size=6, grad_accum=4, progress=False)
    if checkpointing and hasattr(fused, "activation_checkpointing_enable"):  # the caller's own setting is kept
        fused.activation_checkpointing_enable()
        train_fusion(fused, train, steps=1, batch_size=6, progress=False, gradient_checkpointing=True)
        assert fused.is_activation_checkpointing
        fused.activation_checkpointing_disable()
    if checkpointing:  # a caller's own input hook (adapters) survives, the one checkpointing adds does not
        fused.disable_input_require_grads()  # (the caller's checkpointing above left its hook, as transformers does)
        fused.enable_input_require_grads()
        mine = list(emb_hooks)
        train_fusion(fused, train, steps=1, batch_size=6, progress=False, gradient_checkpointing=True)
        assert list(emb_hooks) == mine and len(mine) == 1 and len(fused._require_grads_hooks) == 1


@pytest.mark.parametrize("mixed", [False, True])
def test_trainer_runs_with_task_labels(tok, experts, tmp_path, mixed):
    """H3FusionTrainer; also as a real-size fine-tune sets it up (mixed): bf16 autocast over the fp32 model,
    gradient checkpointing and accumulation."""
    from h3moe.fusion import H3FusionTrainer

    fused = fuse(experts, top_k=2, router_init="random", names=tiny.TASKS)
    router0 = fused.model.layers[1].mlp.gate.weight.detach().clone()
    attn0 = fused.model.layers[1].self_attn.v_proj.weight.detach().clone()
    extra = dict(bf16=True, gradient_checkpointing=True, gradient_accumulation_steps=2) if mixed else {}
    if mixed:
        assert use_h3moe_experts(fused) == "h3moe"  # through h3moe.moe: autocast and checkpointing meet its ops
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=6,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True, **extra)
    data = sum((tiny.encoded(t, 6, tok, seed=4) for t in tiny.TASKS), [])
    trainer = H3FusionTrainer(model=fused, args=args, train_dataset=data, gate_coef=1.0, gammas=0.01)
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(fused.model.layers[1].mlp.gate.weight, router0)
    assert torch.equal(fused.model.layers[1].self_attn.v_proj.weight, attn0)
    assert set(trainer.h3_loss.parts) >= {"lm", "gate", "drift"}


def test_h3moe_experts_implementation_matches_eager(tok, experts):
    fused = fuse(experts, top_k=2, router_init="random")
    ids = _ids(tok)
    fused.set_experts_implementation("eager")
    want = fused(input_ids=ids).logits
    impl = use_h3moe_experts(fused)
    if impl != "h3moe":
        pytest.skip("the h3moe experts implementation is not registered")
    torch.testing.assert_close(fused(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_fused_model_h3moe_experts_and_fused_gating_loss(tok, dtype):
    """On CUDA: the fused model through h3moe's experts matches transformers' eager experts within a small
    multiple of eager's own error against fp32; the gating loss through the fused kernels (auto backend)
    equals the torch backend's, value and router gradient."""
    ms = [tiny.tiny_llama(tokenizer=tok, hidden_size=256, intermediate_size=512, num_heads=4, seed=s)
          for s in (41, 42, 43, 44)]
    fused32 = fuse(ms, top_k=2, router_init="random").cuda()
    fused = copy.deepcopy(fused32).to(dtype)
    ids = torch.randint(4, len(tok), (4, 64), device="cuda")
    fused32.set_experts_implementation("eager")
    with torch.no_grad():
        ref32 = fused32(input_ids=ids).logits.float()
        fused.set_experts_implementation("eager")
        eager = fused(input_ids=ids).logits.float()
        if use_h3moe_experts(fused) != "h3moe":
            pytest.skip("the h3moe experts implementation is not registered")
        got = fused(input_ids=ids).logits.float()
    assert torch.isfinite(got).all()
    assert (got - ref32).abs().max() <= 3 * (eager - ref32).abs().max() + 1e-4

    b = collate(sum((tiny.encoded(t, 4, tok, seed=5) for t in tiny.TASKS), []))
    b = {k: v.cuda() for k, v in b.items()}
    fused3 = fuse(ms[:3], top_k=2, router_init="random").cuda().to(dtype)
    grads, vals = [], []
    for backend in ("auto", "torch"):
        fused3.zero_grad(set_to_none=True)
        out = fused3(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
        loss = H3FusionLoss(fused3, gate_coef=1.0, backend=backend)
        val = loss(out, None, b["task_labels"], b["attention_mask"])
        val.backward()
        vals.append(val.detach())
        grads.append(fused3.model.layers[1].mlp.gate.weight.grad.float().clone())
    torch.testing.assert_close(vals[0], vals[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4 * grads[1].abs().max().item(), rtol=1e-3)
