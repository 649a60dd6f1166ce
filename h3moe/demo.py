"""`make demo`: h3moe's backends on one MoE layer, then H³Fusion end to end on tiny models.

1. One small MoE layer through every backend available here: max error against reference.experts_ref and
   time per forward.
2. H³Fusion: a tiny Llama base (random init, briefly trained on a mix of three synthetic character tasks);
   three "aligned" experts, each the base with its FFNs fine-tuned on one task (helpful = echo,
   harmless = refuse, honest = arithmetic); fuse them into a Mixtral MoE (attention frozen from the base);
   fine-tune router and experts a few dozen steps with the LM loss + gating loss + drift regularizer on
   the fastest backend; print the router's accuracy per task and each model's task accuracy before and
   after, a few generations, and a save/load round trip.

Runs in about a minute on 2 CPU cores (seconds on a GPU). H3MOE_DEMO_QUICK=1 shrinks it for smoke tests.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import torch


def _p(*a):
    print(*a, flush=True)


def _time_ms(fn, device, reps=5) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return 1e3 * sorted(ts)[len(ts) // 2]


def backend_table(device) -> str:
    """Rows: backend, available, max |y - experts_ref| / max |ref|, ms per route+moe forward."""
    import h3moe
    from h3moe import reference as ref

    T, H, I, E, K = (256, 128, 256, 8, 2) if device.type == "cpu" else (4096, 1024, 2048, 8, 2)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    wr = (torch.randn(E, H, generator=g) / H**0.5).to(device, dtype)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device, dtype)
    wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(device, dtype)
    logits = x @ wr.t()
    w_ref, ids_ref = ref.route_ref(logits, K)
    # experts_ref gathers a (2I, H) weight per token: chunk the tokens to bound its memory.
    y_ref = torch.cat([ref.experts_ref(x[i:i + 32].float(), wgu.float(), wd.float(), w_ref[i:i + 32], ids_ref[i:i + 32])
                       for i in range(0, T, 32)])
    _p(f"MoE layer T={T} H={H} I={I} E={E} K={K} {str(dtype).replace('torch.', '')} on {device.type}:")
    _p(f"  {'backend':8s} {'max err / max|ref|':>18s} {'ms/forward':>11s}")
    best, best_ms = "torch", float("inf")
    for name, st in h3moe.backends().items():
        if not st.available:
            _p(f"  {name:8s} {'-':>18s} {'-':>11s}   not here: {st.reason}")
            continue
        if name == "triton" and device.type != "cuda":
            _p(f"  {name:8s} {'-':>18s} {'-':>11s}   skipped: the Triton interpreter (tests only) is slow")
            continue
        try:
            def fwd():
                r = h3moe.route(logits, K, backend=name)
                return h3moe.moe(x, wgu, wd, r, backend=name)

            err = float((fwd().float() - y_ref).abs().max() / y_ref.abs().max())
            ms = _time_ms(fwd, device)
        except Exception as e:  # noqa: BLE001 - report and go on
            _p(f"  {name:8s} {'-':>18s} {'-':>11s}   failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        _p(f"  {name:8s} {err:18.2e} {ms:11.3f}")
        if ms < best_ms:
            best, best_ms = name, ms
    return best


def _acc_row(name, accs, tasks):
    return f"  {name:18s} " + " ".join(f"{accs[t]:>9.0%}" for t in tasks)


def main() -> int:
    t_start = time.perf_counter()
    quick = os.environ.get("H3MOE_DEMO_QUICK", "0") not in ("", "0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Tiny models: with 2 (possibly shared) cores, intra-op thread sync costs more than the math.
        torch.set_num_threads(1)
    torch.manual_seed(0)

    _p("== 1. h3moe backends ==")
    best = backend_table(device)
    _p(f"fastest here: {best}\n")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    from h3moe.fusion import (
        H3FusionLoss,
        collate,
        freeze_for_fusion,
        fuse,
        router_accuracy,
        train_fusion,
        use_h3moe_experts,
    )
    from h3moe.fusion import tiny
    from h3moe.fusion.data import char_tokenizer

    tasks = tiny.TASKS
    steps_base, steps_expert, steps_fuse = (10, 10, 5) if quick else (200, 150, 40)
    n_train = 32 if quick else 512

    _p("== 2. H³Fusion on tiny Llama models ==")
    tok = char_tokenizer()
    train = {t: tiny.encoded(t, n_train, tok, seed=1) for t in tasks}
    test = {t: tiny.encoded(t, 64, tok, seed=2) for t in tasks}
    mix = [e for t in tasks for e in train[t]]

    t0 = time.perf_counter()
    base = tiny.tiny_llama(tokenizer=tok, hidden_size=64, intermediate_size=128, num_layers=2, seed=0).to(device)
    tiny.train_lm(base, mix, steps=steps_base, batch_size=32, lr=3e-3, progress=True, desc="base (all tasks)")
    experts = []
    for t in tasks:
        m = copy.deepcopy(base)
        ffn = [p for n, p in m.named_parameters() if ".mlp." in n or "post_attention_layernorm" in n]
        tiny.train_lm(m, train[t], steps=steps_expert, batch_size=32, lr=3e-3, params=ffn, seed=1,
                      progress=True, desc=f"expert {t} (FFN only)")
        experts.append(m)
    _p(f"trained base and {len(experts)} experts in {time.perf_counter() - t0:.1f}s\n")

    def accs(model):
        return {t: tiny.task_accuracy(model, test[t]) for t in tasks}

    _p("task accuracy (whole response right, greedy):")
    _p(f"  {'model':18s} " + " ".join(f"{t:>9s}" for t in tasks))
    _p(_acc_row("base", accs(base), tasks))
    for t, m in zip(tasks, experts):
        _p(_acc_row(f"expert {t}", accs(m), tasks))

    probe = collate([e for t in tasks for e in test[t]])
    prompts = [[r["prompt"] for r in tiny.make_records(t, 16, seed=3)] for t in tasks]
    hidden = fuse(experts, base=base, top_k=2, router_init="hidden", names=tasks, prompts=prompts, tokenizer=tok)
    r_hidden = router_accuracy(hidden, probe)
    del hidden
    fused = fuse(experts, base=base, top_k=2, router_init="zeros", names=tasks)
    impl = use_h3moe_experts(fused)
    _p(_acc_row("fused, zero router", accs(fused), tasks))

    freeze_for_fusion(fused)  # router + experts train; attention, embeddings, norms, lm_head frozen
    before = router_accuracy(fused, probe)
    loss = H3FusionLoss(fused, gate_coef=1.0, gammas=0.01, variant="paper", backend="auto")
    t0 = time.perf_counter()
    hist = train_fusion(fused, mix, steps=steps_fuse, batch_size=32, lr=1e-3, router_lr=3e-2, loss=loss,
                        progress=True, desc="H³Fusion fine-tune")
    dt = time.perf_counter() - t0
    after = router_accuracy(fused, probe)
    _p(_acc_row("fused, trained", accs(fused), tasks))
    from h3moe import _backend

    be = {op: _backend.resolve("auto", device, op) for op in ("moe", "gating_loss")}
    _p(f"\nfine-tuned the fusion {steps_fuse} steps in {dt:.1f}s on {device.type} (transformers experts "
       f"implementation: {impl}, h3moe backend: moe={be['moe']}, gating_loss={be['gating_loss']})")
    f, l = hist[0], hist[-1]
    _p("  loss: " + ", ".join(f"{k} {f[k]:.3f} -> {l[k]:.3f}" for k in ("lm", "gate", "drift")))
    _p("router accuracy per task (argmax of the router probabilities averaged over a sample's tokens and layers):")
    _p(f"  {'':18s} " + " ".join(f"{t:>9s}" for t in tasks) + f" {'all':>9s}")
    for name, r in (("zero init", before), ("hidden init", r_hidden), ("after training", after)):
        _p(f"  {name:18s} " + " ".join(f"{r.get(i, 0):>9.0%}" for i in range(len(tasks))) + f" {r['all']:>9.0%}")

    _p("\ngenerations of the trained fusion (greedy):")
    samples = [tiny.make_records(t, 1, seed=11)[0]["prompt"] for t in tasks for _ in (0,)]
    samples += [tiny.make_records(t, 2, seed=12)[1]["prompt"] for t in tasks]
    enc = tok(samples, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        out = fused.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    for p, o in zip(samples, out):
        _p(f"  {p!r:28s} -> {tok.decode(o[enc['input_ids'].shape[1]:], skip_special_tokens=True)!r}")

    with tempfile.TemporaryDirectory() as d:
        from transformers import AutoModelForCausalLM

        fused.save_pretrained(d)
        back = AutoModelForCausalLM.from_pretrained(d).to(device).eval()
        with torch.no_grad():
            same = torch.equal(back(**enc).logits, fused(**enc).logits)
    _p(f"\nsave_pretrained -> AutoModelForCausalLM.from_pretrained ({type(back).__name__}): "
       f"identical logits: {same}")
    _p(f"demo done in {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
