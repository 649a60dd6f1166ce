"""CPU smoke test of the whole benchmark driver (make test runs it): tiny shapes, every case, the JSON schema,
the Markdown, the chart, rel_err against the fp32 reference; plus the pieces the driver trusts (the fp32
loop reference, the timer, input rotation, the plans, the target evaluator). Runs in well under 30 s."""
from __future__ import annotations

import json
import time

import pytest
import torch

from bench import cases as C
from bench import report
from bench.driver import main
from bench.timing import do_bench
from h3moe import reference as ref


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops on a shared CPU: one thread avoids oversubscription stalls (the driver does the same).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("T,H,I,E,K", [
    (1, 32, 48, 4, 2),  # a single token
    (37, 64, 32, 8, 3),  # prime T, some experts likely unused
    (64, 16, 16, 16, 16),  # K = E: every expert on every token
])
def test_experts_fp32_equals_reference(T, H, I, E, K):
    # The big-shape reference must be reference.experts_ref's math: check it, and its gradients, in float64.
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    wgu = (torch.randn(E, 2 * I, H, dtype=torch.float64) / H**0.5).requires_grad_(True)
    wd = (torch.randn(E, H, I, dtype=torch.float64) / I**0.5).requires_grad_(True)
    w, ids = ref.route_ref(torch.randn(T, E, dtype=torch.float64), K)
    w = w.clone().requires_grad_(True)
    want = ref.experts_ref(x, wgu, wd, w, ids)
    got = C.experts_fp32(x, wgu, wd, w, ids)
    assert got.dtype == torch.float32
    assert C.rel_err(got, want) < 1e-6
    dy = torch.randn(T, H, dtype=torch.float64)
    g_want = torch.autograd.grad(want, (x, wgu, wd, w), dy)
    g_got = torch.autograd.grad(got, (x, wgu, wd, w), dy.float())
    for a, b in zip(g_got, g_want):
        assert C.rel_err(a, b) < 1e-5


def test_do_bench_cpu_measures_time():
    t = do_bench(lambda i: time.sleep(0.002), torch.device("cpu"), warmup_ms=1, rep_ms=10, min_reps=3, max_reps=5)
    assert 1.9 <= t.p20 <= t.ms <= t.p80 < 50
    assert 3 <= t.reps <= 5


def test_small_inputs_rotate_among_distinct_random_sets():
    from bench.driver import Runner

    class A:
        mode, interpreter, impls = "smoke", False, None

    c = C.Case("fwd", C.TINY_MODELS["tiny"], 16, torch.float32)
    sets = Runner(A, torch.device("cpu"), {}).input_sets(c)
    assert len(sets) > 1  # tiny inputs fit in L2: several sets
    for a, b in zip(sets, sets[1:]):
        assert not torch.equal(a["x"], b["x"]) and not torch.equal(a["w_gate_up"], b["w_gate_up"])
    for s in sets:
        for k in ("x", "w_gate_up", "w_down", "router"):  # never zeros
            assert (s[k] != 0).float().mean() > 0.99, k


def test_quick_plan_puts_targets_first_and_skips_eager_at_16384():
    p = C.plan("quick", torch.bfloat16)
    assert [c.key for c in p[:3]] == ["fwd/h3fusion/T=1/bf16", "fwd/h3fusion/T=16/bf16", "fwd/h3fusion/T=4096/bf16"]
    assert {c.model.name for c in p} == set(C.MODELS)
    assert {c.case for c in p} == set(C.CASES)
    big = [c for c in p if c.T == 16384 and c.case in ("fwd", "fwdbwd") and c.model.name == "mixtral"]
    assert big and all("hf:eager" in dict(c.skip) for c in big)
    assert {c.T for c in p if c.case == "nf4"} == {1, 16, 128}  # decode, and prefill's kernel families
    full = C.plan("full", torch.bfloat16)
    assert {c.T for c in full} == set(C.TOKENS) and not any(c.skip for c in full)


def _row(case, model, T, impl, ms, tflops=None, gbps=None):
    return {"case": case, "model": model, "tokens": T, "dtype": "bf16", "impl": impl, "ms": ms, "ms_p20": ms,
            "ms_p80": ms, "tflops": tflops, "gbps": gbps, "rel_err": 1e-3, "status": "ok"}


def test_targets_are_evaluated_from_rows():
    res = {"ceilings": {"copy_GBps": 3000.0, "bf16_tflops": 800.0}, "rows": [
        _row("fwd", "mixtral", 4096, "h3moe:triton", 1.0, tflops=500.0),
        _row("fwd", "mixtral", 4096, "hf:grouped_mm", 1.1),  # 1.1× < 1.2: missed
        _row("fwd", "mixtral", 4096, "hf:eager", 9.0),  # 9× ≥ 8: met
        _row("fwd", "mixtral", 1, "h3moe:triton", 0.1, gbps=2400.0),  # 80% of copy: met
        _row("nf4", "mixtral", 1, "h3moe:triton", 0.05),  # 2× bf16 < 2.5: missed
        _row("fwd", "mixtral", 1, "h3moe:triton+graph", 0.09),
        _row("nf4", "mixtral", 1, "h3moe:triton-load+graph", 0.03),  # a variant: against h3moe:triton+graph
        _row("fwdbwd", "mixtral", 4096, "h3moe:triton", 3.0),  # no baselines: n/a
    ]}
    targets = report.evaluate_targets(res)
    got = {(t["target"], t["tokens"]): (round(t["value"], 3) if t["value"] is not None else None, t["met"])
           for t in targets if "+graph" not in t["impl"]}
    variant = next(t for t in targets if t["impl"] == "h3moe:triton-load+graph")
    assert (round(variant["value"], 3), variant["met"]) == (3.0, True)
    assert variant["against"] == "fwd h3moe:triton+graph (bf16)"
    assert got[("fwd_vs_grouped_mm", 4096)] == (1.1, False)
    assert got[("fwd_vs_eager", 4096)] == (9.0, True)
    assert got[("fwd_matmul_frac", 4096)] == (0.625, True)
    assert got[("decode_bw_frac", 1)] == (0.8, True)
    assert got[("nf4_vs_bf16_decode", 1)] == (2.0, False)
    assert got[("fwdbwd_vs_eager", 4096)] == (None, None)
    md = report.targets_table({**res, "targets": report.evaluate_targets(res)})
    assert "**missed**" in md and "| met |" in md


def test_validate_flags_a_broken_row():
    res = {"gpu": "x", "torch": "x", "triton": None, "commit": "x",
           "ceilings": {"copy_GBps": 1.0, "bf16_tflops": 1.0},
           "rows": [_row("fwd", "tiny", 1, "h3moe:torch", 1.0, tflops=1.0)]}
    assert report.validate(res) == []
    res["rows"][0]["ms_p20"] = 2.0  # p20 above the median
    del res["rows"][0]["gbps"]
    probs = report.validate(res)
    assert any("p20" in p for p in probs) and any("gbps" in p for p in probs)


def test_cpu_smoke_driver_end_to_end(tmp_path):
    out = tmp_path / "smoke.json"
    rc = main(["--cpu-smoke", "--tokens", "1,16", "--out", str(out), "--plot", "--plot-combined"])
    res = json.loads(out.read_text())
    assert report.validate(res) == []
    assert rc == 0  # the driver's own smoke checks (every row ran, rel_err small) passed
    assert res["device"] == "cpu" and res["mode"] == "smoke" and not res["budget"]["truncated"]
    by = {}
    for r in res["rows"]:
        by.setdefault(r["case"], set()).add(r["impl"])
    for case in ("route", "fwd", "fwdbwd", "layer", "gating"):
        assert "h3moe:torch" in by.get(case, ()), case
    for case in ("fwd", "fwdbwd", "layer"):  # every baseline measured in the same run
        assert {"hf:eager", "hf:batched_mm", "hf:grouped_mm", "torch:grouped_mm"} <= by[case], case
    assert {"nf4", "int8"} <= set(by)  # bitsandbytes is in the test environment
    for r in res["rows"]:
        assert r["status"] == "ok", r
        lim = 1e-3 if r["case"] in C.QUANT_CASES else 1e-4
        assert r["rel_err"] < lim, r
        assert r["ms"] > 0 and (r["tflops"] or r["gbps"])
    md = out.with_suffix(".md").read_text()
    assert "## Targets" in md and "## Summary" in md and "h3moe:torch" in md
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_profile_experts_dry_run(tmp_path):
    """scripts/profile_experts.py (the GPU session's per-kernel breakdown) runs end to end: tiny shapes on CPU
    under the Triton interpreter, both backward forms, every role timed, candidates listed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "scripts", "profile_experts.py"), "--dry-run",
                           "--models", "tiny", "--tokens", "4", "--candidates", "--torch-profile", "tiny",
                           "--forms", "saved,recompute,lowp", "--quant", "nf4,int8", "--quant-tokens", "2",
                           "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "profile_experts.json").read_text())
    assert [(r["form"], r["recompute"]) for r in res["runs"]] == [("saved", False), ("recompute", True),
                                                                   ("lowp", False)]
    for i, run in enumerate(res["runs"]):
        roles = {r["role"] for r in run["rows"]}
        act = "bwd_act" if run["recompute"] else "bwd_act_saved"
        assert roles == {"gate_up", "down", act, "dx", "wgrad_gu", "wgrad_down"}, roles
        assert all(r["ms"] > 0 for r in run["rows"])
        assert set(run["candidates"]) == (roles if i == 0 else set())  # candidates: the first form only
    assert set(res["torch_profiles"][0]["tables"]) == {"h3moe:torch", "torch:grouped_mm"}
    # the quantized decode (T=2): nf4 by its default kernels (tensor cores) with both lookups, then by the other
    # decode kernel (GEMV), then the tensor cores with one K step of words in flight; int8 alike; every kernel
    # of the call timed, bytes counted
    got = [(q["format"], q["path"], q["lookup"].split()[0]) for q in res["quant"]]
    assert got == [("nf4", "tc", "shfl"), ("nf4", "tc", "load"), ("nf4", "gemv", "shfl"), ("nf4", "tc depth=1", "shfl"),
                   ("int8", "tc", "default"), ("int8", "gemv", "default"), ("int8", "tc depth=1", "default")]
    for q in res["quant"]:
        assert all(q["ms"][k] > 0 for k in ("total", "gate_up", "down", "combine")), q["ms"]
        assert 0 < q["bytes"]["down"] and abs(q["bytes"]["gate_up"] / q["bytes"]["down"] - 2) < 0.1  # 2I*H, H*I
        assert q["experts_touched"] >= 1
    assert res["copy_GBps"] > 0
    md = (tmp_path / "profile_experts.md").read_text()
    assert "| wgrad_gu |" in md and "torch backend vs torch grouped_mm" in md
    assert "Quantized decode, kernel by kernel" in md


def test_host_overhead_dry_run(tmp_path):
    """scripts/host_overhead.py (the GPU session's host-vs-device cost per decode call) runs end to end on CPU:
    a row per (model, T, op) with a positive host time, a cProfile per (model, T) whose share by place adds up
    to its functions' own time, and a budget that skips what it cannot start."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "scripts", "host_overhead.py")
    proc = subprocess.run([sys.executable, script, "--dry-run", "--models", "tiny,tiny-many", "--tokens", "1,3",
                           "--calls", "5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "host_overhead.json").read_text())
    got = [(r["model"], r["tokens"], r["op"]) for r in res["rows"]]
    assert got == [(m, t, op) for m in ("tiny", "tiny-many") for t in (1, 3) for op in ("moe:torch", "route:torch")]
    assert all(r["host_us"] > 0 and "error" not in r for r in res["rows"])
    assert len(res["profiles"]) == 4
    for p in res["profiles"]:
        assert p["op"] == "moe:torch" and p["by_where_us"]["h3moe"] > 0 and p["top"]
        assert sum(p["by_where_us"].values()) >= max(r["own_us"] for r in p["top"])
    assert "| tiny-many | 3 | moe:torch |" in (tmp_path / "host_overhead.md").read_text()
    proc = subprocess.run([sys.executable, script, "--dry-run", "--models", "tiny", "--tokens", "1", "--budget-s",
                           "0", "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and json.loads((tmp_path / "b" / "host_overhead.json").read_text())["skipped"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_rows_equal_eager_rows():
    """Decode rows replayed from a CUDA graph ('+graph') compute what the eager call computes, on every input
    set (each set has its own captured graph)."""
    from bench.driver import flatten
    from bench.impls import implementations

    dev = torch.device("cuda")
    for case in ("fwd", "nf4"):
        c = C.Case(case, C.MODELS["olmoe"], 4, torch.bfloat16)
        impls, skipped = implementations(c, dev)
        by = {i.name: i for i in impls}
        assert "h3moe:triton+graph" in by, skipped
        sets = C.input_sets(c, dev, C.make_weights(c.model, c.dtype, dev, seed=3))[:2]
        for s in sets:
            eager = flatten(case, by["h3moe:triton"].run(by["h3moe:triton"].prepare(s)))
            g = by["h3moe:triton+graph"]
            st = g.prepare(s)
            for _ in range(2):
                got = flatten(case, g.run(st))
                torch.cuda.synchronize()
                for a, b in zip(got, eager):
                    torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lowp_combine_row():
    """fwd from LOWP_MIN_T tokens on (K > 1) adds h3moe:triton-lowp: the slot rows in bf16 before their sum,
    within bf16 rounding of the default fp32 combine, and the variable set back afterwards."""
    import os

    from bench.driver import flatten
    from bench.impls import LOWP_MIN_T, implementations

    dev = torch.device("cuda")
    c = C.Case("fwd", C.MODELS["olmoe"], LOWP_MIN_T, torch.bfloat16)
    impls, skipped = implementations(c, dev)
    by = {i.name: i for i in impls}
    assert "h3moe:triton-lowp" in by, skipped
    s = C.input_sets(c, dev, C.make_weights(c.model, c.dtype, dev, seed=5))[0]
    before = os.environ.get("H3MOE_COMBINE")
    (lowp,) = flatten("fwd", by["h3moe:triton-lowp"].run(s))
    assert os.environ.get("H3MOE_COMBINE") == before
    (fp32,) = flatten("fwd", by["h3moe:triton"].run(s))
    assert not torch.equal(lowp, fp32)  # the rounding of 8 slot rows shows somewhere
    torch.testing.assert_close(lowp.float(), fp32.float(), rtol=2e-2, atol=2e-2 * fp32.float().abs().max().item())
    c1 = C.Case("fwd", C.MODELS["olmoe"], LOWP_MIN_T // 2, torch.bfloat16)
    assert "h3moe:triton-lowp" not in {i.name for i in implementations(c1, dev)[0]}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tma_rows():
    """fwd and fwdbwd from TMA_MIN_T tokens on, on sm_90+, add h3moe:triton-tma (H3MOE_TMA=1 around the
    forward and the backward): within bf16 rounding of the default rows; the variable set back afterwards."""
    import os

    from bench.driver import flatten
    from bench.impls import TMA_MIN_T, implementations

    dev = torch.device("cuda")
    for case in ("fwd", "fwdbwd"):
        c = C.Case(case, C.MODELS["olmoe"], TMA_MIN_T, torch.bfloat16)
        impls, skipped = implementations(c, dev)
        by = {i.name: i for i in impls}
        if torch.cuda.get_device_capability()[0] < 9:
            assert "h3moe:triton-tma" not in by
            continue
        assert "h3moe:triton-tma" in by, skipped  # a failed smoke run says why here
        s = C.input_sets(c, dev, C.make_weights(c.model, c.dtype, dev, seed=6))[0]
        before = os.environ.get("H3MOE_TMA")
        outs = {}
        for name in ("h3moe:triton-tma", "h3moe:triton"):
            impl = by[name]
            outs[name] = [t.float() for t in flatten(case, impl.run(impl.prepare(s)))]
        assert os.environ.get("H3MOE_TMA") == before
        for a, b in zip(outs["h3moe:triton-tma"], outs["h3moe:triton"]):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
        c1 = C.Case(case, C.MODELS["olmoe"], TMA_MIN_T // 2, torch.bfloat16)
        assert "h3moe:triton-tma" not in {i.name for i in implementations(c1, dev)[0]}


def test_compare_two_results(tmp_path, capsys):
    """python -m bench --compare OLD NEW: targets old → new (a target newly met is flagged), and the h3moe
    rows that moved, on two files differing in one row."""
    def res(ms_triton, commit):
        rows = [_row("fwdbwd", "mixtral", 4096, "h3moe:triton", ms_triton),
                _row("fwdbwd", "mixtral", 4096, "hf:grouped_mm", 20.0),
                _row("fwd", "mixtral", 4096, "h3moe:triton", 5.0)]
        return {"gpu": "G", "torch": "x", "triton": "x", "commit": commit, "ceilings": {"copy_GBps": 3000.0,
                "bf16_tflops": 700.0}, "rows": rows}

    (tmp_path / "old.json").write_text(json.dumps(res(28.0, "a")))
    (tmp_path / "new.json").write_text(json.dumps(res(16.0, "b")))
    assert main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 0
    out = capsys.readouterr().out
    assert "# G @ a → G @ b" in out
    line = next(l for l in out.splitlines() if l.startswith("| fwdbwd_vs_grouped_mm | mixtral | 4096 | h3moe:triton"))
    assert "0.714" in line and "1.25" in line and "**now met**" in line
    moved = [l for l in out.splitlines() if l.startswith("| fwdbwd | mixtral | 4096 | h3moe:triton")]
    assert len(moved) == 1 and "| 1.75 |" in moved[0]
    assert not any(l.startswith("| fwd | mixtral") for l in out.splitlines())  # unchanged row: not listed


def test_latest_record_picks_the_newest_of_the_same_gpu(tmp_path):
    from bench.driver import latest_record

    def put(name, gpu, date):
        (tmp_path / name).write_text(json.dumps({"gpu": gpu, "date": date, "device": "cuda", "rows": []}))

    put("h100-2026-11-27.json", "H100", "2026-11-27T17:00:00+00:00")
    put("h100-2026-11-27-run1.json", "H100", "2026-11-27T18:00:00+00:00")  # an earlier run of a day: skipped
    put("h100-2026-11-20.json", "H100", "2026-11-20T10:00:00+00:00")
    put("h200-2026-11-28.json", "H200", "2026-11-28T10:00:00+00:00")
    put("new.json", "H100", "2026-11-29T10:00:00+00:00")
    assert latest_record("H100", exclude=tmp_path / "new.json", directory=tmp_path).name == "h100-2026-11-27.json"
    assert latest_record("H200", directory=tmp_path).name == "h200-2026-11-28.json"
    assert latest_record("A100", directory=tmp_path) is None


def test_lookup_variant_rows_set_and_restore_the_variable(monkeypatch):
    """h3moe:triton-load / -shfl run quant_moe with H3MOE_W4_LOOKUP set for the call only (captured into the
    '+graph' row's graph at capture time), and name the lookup the default does not take at that T."""
    import os

    from bench import impls

    seen = []
    monkeypatch.setenv("H3MOE_W4_LOOKUP", "shfl")
    out = impls._with_env("H3MOE_W4_LOOKUP", "load", lambda v: seen.append(os.environ["H3MOE_W4_LOOKUP"]) or v, 7)
    assert out == (7,) and seen == ["load"] and os.environ["H3MOE_W4_LOOKUP"] == "shfl"
    monkeypatch.delenv("H3MOE_W4_LOOKUP")
    with pytest.raises(ZeroDivisionError):
        impls._with_env("H3MOE_W4_LOOKUP", "load", lambda: 1 / 0)
    assert "H3MOE_W4_LOOKUP" not in os.environ
    assert impls._default_w4_lookup(1) == impls._default_w4_lookup(128) == "shfl"  # GEMV, tensor cores
    # the decode-kernel variants: the tensor-core kernels at T=1, the GEMV at 2-16 tokens, none above
    assert [impls._other_quant_kernel(T) for T in (1, 2, 16, 17, 4096)] == ["tc", "gemv", "gemv", "dot", "dot"]
    monkeypatch.setenv("H3MOE_QUANT_KERNEL", "typo")
    with pytest.raises(ValueError, match="H3MOE_QUANT_KERNEL"):
        impls._other_quant_kernel(1)
