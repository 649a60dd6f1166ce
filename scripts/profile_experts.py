#!/usr/bin/env python
"""Per-kernel times of the Triton experts, forward + backward, at real model shapes (GPU only).

    python scripts/profile_experts.py --out OUT_DIR [--models mixtral,qwen3] [--tokens 4096,16]
                                      [--candidates] [--budget-s 120]

Where the fwd+bwd time goes, kernel role by kernel role (the roles of h3moe/kernels/experts.py: gate_up,
down, bwd_act_saved / bwd_act, dx, wgrad_gu, wgrad_down), so that tuning aims at the kernel that lags: for
each (model, T, backward form) one fwd+bwd with fresh random inputs, every launch bracketed by CUDA events
(device time, no host sync between launches), the rest of the op (K-sum of the slot buffer, d(weight) sums,
allocations) as "other", the FLOPs of each role, its TFLOP/s and its fraction of a bf16 matmul measured in the
same run. With --candidates, every candidate config of every role is also timed at its launch (the data
`python -m h3moe.ops.triton_experts` autotunes on; the table shows the pinned default beside the best).

With --quant nf4,int8 (and --quant-tokens, default 1,16), the quantized decode too: one quant_moe call per
(model, T, format, 4-bit lookup), its gate_up kernel, down kernel and combine kernel bracketed by CUDA events,
each kernel's bytes of packed weights touched, its GB/s and its fraction of a device-to-device copy measured in
the same run, and "other" (Python and launch gaps inside the call). The bench times whole calls; this says
which kernel of the call lags.

Writes OUT_DIR/profile_experts.{json,md} and prints the Markdown. Needs CUDA (exits 2 without it), except
--dry-run: tiny shapes on CPU under TRITON_INTERPRET=1, wall-clock times (CI checks the script runs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# FLOPs of each role in units of S*H*I (S = T*K rows): see the header of h3moe/kernels/experts.py.
ROLE_FLOPS = {"gate_up": 4, "down": 2, "bwd_act_saved": 2, "bwd_act": 6, "dx": 4, "wgrad_gu": 4, "wgrad_down": 2}


class _Mark:
    """A point in time on the device stream (a CUDA event), or on the host clock off the GPU (dry run)."""

    def __init__(self, cuda: bool):
        self.ev = torch.cuda.Event(enable_timing=True) if cuda else None
        if cuda:
            self.ev.record()
        else:
            self.t = time.perf_counter()

    def ms_to(self, other: "_Mark") -> float:
        return self.ev.elapsed_time(other.ev) if self.ev is not None else (other.t - self.t) * 1e3


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _matmul_tflops(cuda: bool, dtype=torch.bfloat16, n=8192) -> float:
    if not cuda:
        dtype, n = torch.float32, 256
    dev = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(cuda)
    reps = 20
    m0 = _Mark(cuda)
    for _ in range(reps):
        a @ b
    m1 = _Mark(cuda)
    _sync(cuda)
    return 2 * n**3 * reps / (m0.ms_to(m1) * 1e-3) / 1e12


class _Recorder:
    """Patched over triton_experts._launch: times every launch with CUDA events (and, with candidates, every
    candidate config of that launch with triton.testing.do_bench)."""

    def __init__(self, te, candidates: bool, cuda: bool):
        self.te, self.candidates, self.cuda = te, candidates, cuda
        self.events: list[tuple[str, str, _Mark, _Mark]] = []
        self.cands: dict[str, list[tuple[str, float]]] = {}

    def __call__(self, role, S, H, I, E, K, dtype, device, run):
        if self.candidates and role not in self.cands:
            from triton.testing import do_bench

            def bench(fn):
                if self.cuda:
                    return do_bench(fn, warmup=5, rep=25)
                t = time.perf_counter()
                fn()
                return (time.perf_counter() - t) * 1e3

            fp32 = dtype == torch.float32
            out = []
            for c in self.te._candidates(role, S, E, K, fp32, self.te._arch(device)):
                try:
                    out.append((repr(c), bench(lambda c=c: run(c))))
                except Exception as err:  # noqa: BLE001 — out of resources on this GPU: record and go on
                    out.append((repr(c), f"{type(err).__name__}"))
            self.cands[role] = out
        cfg = self.te.config_for(role, S, H, I, E, K, dtype, device)
        m0 = _Mark(self.cuda)
        run(cfg)
        self.events.append((role, repr(cfg), m0, _Mark(self.cuda)))


def _device() -> tuple[bool, torch.device, torch.dtype]:
    """(cuda, device, dtype) of the profile: bf16 on the GPU, fp32 in the CPU dry run."""
    cuda = torch.cuda.is_available()
    return cuda, torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32


def _weights(m, g: torch.Generator, dt: torch.dtype, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random experts of model shape m: w_gate_up (E, 2I, H), w_down (E, H, I) in dt, drawn from g."""
    E, H, I = m.E, m.H, m.I
    wgu = (torch.randn(E, 2 * I, H, device=g.device, generator=g) / H**0.5).to(dt).requires_grad_(grad)
    wd = (torch.randn(E, H, I, device=g.device, generator=g) / I**0.5).to(dt).requires_grad_(grad)
    return wgu, wd


def _experts_inputs(m, T: int, seed: int):
    """Fresh random fwd+bwd inputs of model shape m at T tokens: x, w_gate_up, w_down (leaves needing grad),
    router logits (T, E) fp32 and dy (T, H)."""
    _, dev, dt = _device()
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(T, m.H, device=dev, generator=g).to(dt).requires_grad_()
    wgu, wd = _weights(m, g, dt, grad=True)
    logits = torch.randn(T, m.E, device=dev, generator=g)
    dy = torch.randn(T, m.H, device=dev, generator=g).to(dt)
    return x, wgu, wd, logits, dy


def profile_one(m, T: int, recompute: bool, candidates: bool, reps: int = 3) -> dict:
    from h3moe.ops import triton_experts as te
    from h3moe.ops.routing import Routing, sort_by_expert

    cuda = _device()[0]
    H, I, E, K = m.H, m.I, m.E, m.K
    S = T * K
    x, wgu, wd, logits, dy = _experts_inputs(m, T, T * 1000 + E)
    w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    w = w.requires_grad_()
    routing = Routing(w, ids, *sort_by_expert(ids, E))

    def step():
        for t in (x, wgu, wd, w):
            t.grad = None
        y = te.moe(x, wgu, wd, routing, "silu", recompute=recompute)
        y.backward(dy)

    step()  # compile
    _sync(cuda)
    rec = _Recorder(te, candidates, cuda)
    te._launch, saved_launch = rec, te._launch
    try:
        if candidates:  # one untimed pass that times every candidate of every role
            step()
            _sync(cuda)
            rec.candidates = False
        per_role: dict[tuple[str, str], list[float]] = {}
        totals, others = [], []
        for _ in range(reps):
            rec.events.clear()
            m0 = _Mark(cuda)
            step()
            m1 = _Mark(cuda)
            _sync(cuda)
            totals.append(m0.ms_to(m1))
            for role, cfg, a, b in rec.events:
                per_role.setdefault((role, cfg), []).append(a.ms_to(b))
            others.append(totals[-1] - sum(a.ms_to(b) for _, _, a, b in rec.events))
    finally:
        te._launch = saved_launch
    rows = []
    for (role, cfg), ts in per_role.items():
        ms = sorted(ts)[len(ts) // 2]
        flops = ROLE_FLOPS.get(role, 0) * S * H * I
        rows.append({"role": role, "config": cfg, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12 if ms else None})
    total = sorted(totals)[len(totals) // 2]
    return {"model": m.name, "tokens": T, "recompute": recompute, "total_ms": total,
            "other_ms": sorted(others)[len(others) // 2], "rows": rows, "candidates": rec.cands,
            "flops": 18 * S * H * I}  # nominal (the bench's): the recompute's extra 4*S*H*I not counted


def torch_profile(m, T: int, top: int = 12) -> dict:
    """torch.profiler's kernel table of one fwd+bwd of the torch backend and of torch's grouped_mm called
    directly (bench's torch:grouped_mm): where the torch backend's time differs from the plain grouped_mm."""
    from torch.profiler import ProfilerActivity, profile

    import h3moe
    from bench.impls import torch_grouped_mm_experts

    cuda = _device()[0]
    x, wgu, wd, logits, dy = _experts_inputs(m, T, T + m.E)
    routing = h3moe.route(logits, m.K, backend="torch")
    w = routing.weights.detach().requires_grad_()
    import dataclasses

    routing = dataclasses.replace(routing, weights=w)
    fns = {"h3moe:torch": lambda: h3moe.moe(x, wgu, wd, routing, backend="torch"),
           "torch:grouped_mm": lambda: torch_grouped_mm_experts(x, wgu, wd, w, routing.ids)}
    out = {}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, fn in fns.items():
        for t in (x, wgu, wd, w):
            t.grad = None
        fn().backward(dy)  # warm up
        _sync(cuda)
        with profile(activities=acts) as prof:
            for t in (x, wgu, wd, w):
                t.grad = None
            fn().backward(dy)
            _sync(cuda)
        attr = "self_device_time_total" if cuda else "self_cpu_time_total"
        ev = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0) or 0, reverse=True)
        out[name] = [{"name": e.key[:90], "count": e.count, "ms": (getattr(e, attr, 0) or 0) / 1e3}
                     for e in ev[:top]]
    return {"model": m.name, "tokens": T, "tables": out}


def _copy_gbps(cuda: bool) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), measured here."""
    n = 2**28 if cuda else 2**20  # 1 GiB of fp32 on the GPU
    dev = "cuda" if cuda else "cpu"
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync(cuda)
    reps = 10
    m0 = _Mark(cuda)
    for _ in range(reps):
        b.copy_(a)
    m1 = _Mark(cuda)
    _sync(cuda)
    return 2 * a.numel() * 4 * reps / (m0.ms_to(m1) * 1e-3) / 1e9


def _packed_bytes(p, experts: int, rows: int) -> int:
    """Bytes of `rows` weight rows of `experts` experts of Packed p (E, N, Kd): packed values and scales."""
    E, N, Kd = p.shape
    if p.quant_type == "int8":
        return experts * rows * (Kd + 4)
    per_weight = 0.5 + (1 if p.nested else 4) / p.blocksize
    return int(experts * rows * Kd * per_weight)


def quant_profile(m, fmt: str, T: int, lookup: str | None, weights: dict, path: str | None = None,
                  depth: int | None = None) -> dict:
    """One quant_moe call (format fmt, T tokens, 4-bit lookup forced by H3MOE_W4_LOOKUP unless None) timed kernel
    by kernel: gate_up, down (its kernel alone) and combine, each bracketed by CUDA events, median of reps calls
    with fresh routing. path None: the kernels quant_moe picks; "tc" / "gemv" / "dot": those kernels forced
    (H3MOE_QUANT_KERNEL); depth: the tensor-core kernels' K steps of words in flight (H3MOE_QUANT_TC_DEPTH).
    weights caches the quantized experts per (model, fmt)."""
    from h3moe.integrations import bitsandbytes as hb
    from h3moe.kernels import quant as kq
    from h3moe.ops import quant as oq

    cuda, dev, dt = _device()
    if not cuda:
        dt = torch.float16  # the dry run: fp16 reaches the tensor-core kernels (the interpreter's bf16 dot is wrong)
    H, I, E, K = m.H, m.I, m.E, m.K
    key = (m.name, fmt)
    if key not in weights:
        weights.clear()  # one model's experts at a time
        w_gu, w_dn = _weights(m, torch.Generator(device=dev).manual_seed(E * 7 + H), dt)
        weights[key] = (hb.quantize_weight(w_gu, fmt, 64).packed, hb.quantize_weight(w_dn, fmt, 64).packed)
        del w_gu, w_dn
    gu, dn = weights[key]
    g = torch.Generator(device=dev).manual_seed(T * 31 + E)
    reps, sets = (20, 4) if cuda else (2, 1)  # the dry run: the interpreter takes seconds per call
    inputs = []
    for _ in range(sets):  # a few input sets, cycled: fresh routing, the same shapes
        x = torch.randn(T, H, device=dev, generator=g).to(dt)
        logits = torch.randn(T, E, device=dev, generator=g)
        import h3moe

        inputs.append((x, h3moe.route(logits, K, backend="torch")))
    events: list[tuple[str, _Mark, _Mark]] = []

    def timed(name, fn):
        def wrapper(*a, **k):
            m0 = _Mark(cuda)
            out = fn(*a, **k)
            events.append((name, m0, _Mark(cuda)))
            return out
        return wrapper

    names = {"_w4_gate_up_impl": "gate_up", "_w8_gate_up_impl": "gate_up", "_w4_down_impl": "down+combine",
             "_w8_down_impl": "down+combine", "combine": "combine"}
    saved = {n: getattr(oq, n) for n in names}
    old_env = {v: os.environ.get(v) for v in ("H3MOE_W4_LOOKUP", "H3MOE_QUANT_KERNEL", "H3MOE_QUANT_TC_DEPTH")}
    if lookup:
        os.environ["H3MOE_W4_LOOKUP"] = lookup
    if path is not None:
        os.environ["H3MOE_QUANT_KERNEL"] = path
    if depth is not None:
        os.environ["H3MOE_QUANT_TC_DEPTH"] = str(depth)
    # name what runs (a forced path the call cannot take, e.g. tc with fp32 activations, is not claimed)
    path = kq.quant_kernel(T, dt in (torch.float16, torch.bfloat16))
    try:
        for n, label in names.items():
            setattr(oq, n, timed(label, saved[n]))
        for x, r in inputs:  # compile
            oq.quant_moe(x, gu, dn, r, backend="triton")
        _sync(cuda)
        per: dict[str, list[float]] = {}
        for i in range(reps):
            x, r = inputs[i % len(inputs)]
            events.clear()
            m0 = _Mark(cuda)
            oq.quant_moe(x, gu, dn, r, backend="triton")
            m1 = _Mark(cuda)
            _sync(cuda)
            t = {name: a.ms_to(b) for name, a, b in events}
            t["down"] = t.pop("down+combine") - t["combine"]
            t["total"] = m0.ms_to(m1)
            t["other"] = t["total"] - t["gate_up"] - t["down"] - t["combine"]
            for k, v in t.items():
                per.setdefault(k, []).append(v)
    finally:
        for n in names:
            setattr(oq, n, saved[n])
        for v, old in old_env.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
    ms = {k: sorted(v)[len(v) // 2] for k, v in per.items()}
    touched = [int(torch.unique(r.ids).numel()) for _, r in inputs]
    n_exp = sorted(touched)[len(touched) // 2]
    nbytes = {"gate_up": _packed_bytes(gu, n_exp, 2 * I), "down": _packed_bytes(dn, n_exp, H)}
    if not cuda and lookup:
        lookup += " (interpreter: load)"
    if depth is not None:
        path += f" depth={depth}"
    return {"model": m.name, "tokens": T, "format": fmt, "path": path, "lookup": lookup or "default",
            "experts_touched": n_exp,
            "ms": ms, "bytes": nbytes,
            "gbps": {k: nbytes[k] / (ms[k] * 1e-3) / 1e9 if ms[k] > 0 else None for k in nbytes}}


def markdown(res: dict) -> str:
    peak = res["bf16_tflops"]
    out = [f"# Triton experts, per-kernel fwd+bwd times ({res['gpu']}, bf16)", "",
           f"torch {res['torch']}, triton {res['triton']}, commit {res['commit']}; bf16 matmul measured "
           f"{peak:.0f} TFLOP/s. Each launch bracketed by CUDA events; median of the repetitions.", ""]
    for p in res["runs"]:
        form = {"saved": "saved h", "recompute": "recompute", "lowp": "saved h, 16-bit slot rows",
                "atomic": "saved h, atomic combine"}.get(p.get("form"), p.get("form"))
        other = p["other_ms"]
        out += [f"## {p['model']} T={p['tokens']} ({form}): {p['total_ms']:.3f} ms, "
                f"{p['flops'] / (p['total_ms'] * 1e-3) / 1e12:.0f} TFLOP/s nominal", "",
                "| role | config | ms | TFLOP/s | % matmul |", "|---|---|---:|---:|---:|"]
        for r in p["rows"]:
            tf = r["tflops"]
            out.append(f"| {r['role']} | {r['config']} | {r['ms']:.3f} | {tf:.0f} | {100 * tf / peak:.0f}% |"
                       if tf else f"| {r['role']} | {r['config']} | {r['ms']:.3f} | — | — |")
        out.append(f"| other (sums, copies, gaps) | | {other:.3f} | | |")
        if p["candidates"]:
            out += ["", "Candidates (ms, do_bench):", ""]
            for role, cands in p["candidates"].items():
                cells = ", ".join(f"{c}: {t:.3f}" if isinstance(t, float) else f"{c}: {t}" for c, t in cands)
                out.append(f"- {role}: {cells}")
        out.append("")
    if res.get("quant"):
        copy = res["copy_GBps"]
        out += [f"## Quantized decode, kernel by kernel (copy {copy:.0f} GB/s measured)", "",
                "| model | T | format | kernels | lookup | experts | total ms | gate_up ms | GB/s | % copy | down ms | "
                "GB/s | % copy | combine ms | other ms |",
                "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for q in res["quant"]:
            ms, bw = q["ms"], q["gbps"]
            cells = [q["model"], str(q["tokens"]), q["format"], q["path"], q["lookup"], str(q["experts_touched"]),
                     f"{ms['total']:.4f}"]
            for k in ("gate_up", "down"):
                cells += [f"{ms[k]:.4f}", f"{bw[k]:.0f}" if bw[k] else "—",
                          f"{100 * bw[k] / copy:.0f}%" if bw[k] else "—"]
            cells += [f"{ms['combine']:.4f}", f"{ms['other']:.4f}"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    for tp in res.get("torch_profiles", []):
        out += [f"## torch backend vs torch grouped_mm, {tp['model']} T={tp['tokens']} (torch.profiler, top kernels)",
                ""]
        for name, rows in tp["tables"].items():
            out += [f"{name}:", "", "| kernel | calls | ms |", "|---|---:|---:|"]
            out += [f"| {r['name']} | {r['count']} | {r['ms']:.3f} |" for r in rows]
            out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="mixtral,h3fusion,qwen3,olmoe")
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--forms", default="saved,recompute",
                    help="of saved (the default backward), recompute (H3MOE_RECOMPUTE=1), lowp "
                         "(H3MOE_COMBINE=lowp), atomic (H3MOE_COMBINE=atomic); candidates are timed in the first")
    ap.add_argument("--candidates", action="store_true", help="also time every candidate config of each role")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this long")
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny models (--models tiny)")
    ap.add_argument("--torch-profile", default="", help="models whose torch backend and torch grouped_mm fwd+bwd "
                                                      "get a torch.profiler kernel table (at the first --tokens)")
    ap.add_argument("--quant", default="", help="quantized formats (nf4,int8) whose decode is profiled kernel by "
                                              "kernel at --quant-tokens (4-bit: both lookups)")
    ap.add_argument("--quant-tokens", default="1,16")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if a.dry_run:
        if cuda or os.environ.get("TRITON_INTERPRET") != "1":
            print("profile_experts --dry-run: runs on CPU under TRITON_INTERPRET=1 only")
            return 2
    elif not cuda:
        print("profile_experts: needs a CUDA GPU")
        return 2
    os.environ.setdefault("H3MOE_AUTOTUNE", "0")
    import triton

    from bench.cases import MODELS, TINY_MODELS

    models = TINY_MODELS if a.dry_run else MODELS
    forms = a.forms.split(",")
    bad = set(forms) - {"saved", "recompute", "lowp", "atomic"}
    if bad:
        ap.error(f"--forms: unknown {sorted(bad)}")
    t0 = time.time()
    res = {"gpu": torch.cuda.get_device_name() if cuda else "cpu (dry run)", "torch": torch.__version__,
           "triton": triton.__version__, "commit": os.environ.get("H3MOE_COMMIT", "unknown"),
           "bf16_tflops": _matmul_tflops(cuda), "runs": []}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in a.models.split(","):
        for T in (int(t) for t in a.tokens.split(",") if t):  # --tokens "": no fwd+bwd runs
            for form in forms:
                if time.time() - t0 > a.budget_s:
                    print(f"budget: skipping {name} T={T} {form}")
                    continue
                env = {"lowp": ("H3MOE_COMBINE", "lowp"), "atomic": ("H3MOE_COMBINE", "atomic")}.get(form)
                if env:
                    os.environ[env[0]] = env[1]
                try:
                    run = profile_one(models[name], T, form == "recompute", a.candidates and form == forms[0])
                finally:
                    if env:
                        del os.environ[env[0]]
                run["form"] = form
                res["runs"].append(run)
                if cuda:
                    torch.cuda.empty_cache()
                (out / "profile_experts.json").write_text(json.dumps(res, indent=1))
    res["quant"] = []
    qfmts = [f for f in a.quant.split(",") if f]
    if set(qfmts) - {"nf4", "fp4", "int8"}:
        ap.error(f"--quant: unknown {sorted(set(qfmts) - {'nf4', 'fp4', 'int8'})}")
    if qfmts:
        res["copy_GBps"] = _copy_gbps(cuda)
        cache: dict = {}
        for name in a.models.split(","):
            for fmt in qfmts:
                for T in (int(t) for t in a.quant_tokens.split(",")):
                    # decode: the kernels quant_moe picks (4-bit: with both lookups), then the other decode
                    # kernel (GEMV / tensor cores: the GEMV's cost grows with the rows per expert, one FFMA per
                    # weight per row; the tensor cores' does not; 4-bit: with the shuffle)
                    from h3moe.kernels.quant import GEMV_MAX_T

                    lk1 = None if fmt == "int8" else "shfl"
                    runs = [(None, lk, None) for lk in ((None,) if fmt == "int8" else ("shfl", "load"))]
                    if T <= GEMV_MAX_T:
                        runs += [("gemv" if T > 1 else "tc", lk1, None)]
                    if T > 1:  # the tensor-core kernels with one K step of words in flight instead of two
                        runs += [("tc", lk1, 1)]
                    for path, lookup, depth in runs:
                        if time.time() - t0 > a.budget_s:
                            print(f"budget: skipping the quantized profile of {name} {fmt} T={T} {path}")
                            continue
                        res["quant"].append(quant_profile(models[name], fmt, T, lookup, cache, path, depth))
                        (out / "profile_experts.json").write_text(json.dumps(res, indent=1))
        cache.clear()
        if cuda:
            torch.cuda.empty_cache()
    res["torch_profiles"] = []
    for name in filter(None, a.torch_profile.split(",")):
        if time.time() - t0 > a.budget_s:
            print(f"budget: skipping the torch profile of {name}")
            continue
        res["torch_profiles"].append(torch_profile(models[name], int((a.tokens or "4096").split(",")[0])))
        (out / "profile_experts.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "profile_experts.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
