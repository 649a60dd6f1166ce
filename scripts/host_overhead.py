#!/usr/bin/env python
"""Host cost of one decode call (Python and kernel launches) against its device time, at real model shapes.

    python scripts/host_overhead.py --out OUT_DIR [--models qwen3,olmoe,mixtral] [--tokens 1,16] [--calls 200]

Why: an eager decode step (transformers' generate without CUDA graphs) pays the host cost of every MoE layer's
call: when that cost exceeds the kernels' time, the GPU waits on Python. The bench's eager rows then time the
host and its '+graph' rows the device; this script says how much of the gap is ours (Python in h3moe), how much
is the launcher (Triton's JIT dispatch, torch's ops) and whether it grows with the model (E, K), on the GPU the
bench ran on. For each model, token count T and op (h3moe.moe per backend, h3moe.route, quant_moe NF4):
  host_us    the wall time of N back-to-back calls with no sync, over N, on the same layer with H = I = 128
             (its kernels take a few µs: the device cannot be the limit): the rate at which Python issues the
             call, the same E, K and routing as the model
  eager_us   CUDA events around N back-to-back calls at the real shape, over N: max(host, device), roughly
  device_us  the real shape replayed from a CUDA graph (one capture of one call), over N replays
and one cProfile of N calls of the Triton moe at the small shape: the functions with the most own time,
grouped by where they live (h3moe / triton / torch / other).
Writes OUT_DIR/host_overhead.{json,md} and prints the Markdown. GPU only, except --dry-run: the torch backend
on CPU at tiny shapes, wall-clock only (CI checks the script runs).
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

#: H = I of the layer whose host cost is measured: its kernels are a few µs, far below any host cost.
SMALL = 128


def _experts(m, dev, dt, quant: bool) -> dict:
    """Model m's random experts (bench.cases.make_weights) and (quant) their NF4 packing, blocksize 64."""
    from bench.cases import make_weights

    w = make_weights(m, dt, dev, seed=m.E)
    w = {"wgu": w["w_gate_up"], "wd": w["w_down"]}
    if quant:
        from h3moe.integrations.bitsandbytes import quantize_weight

        w["nf4"] = (quantize_weight(w["wgu"], "nf4", 64).packed, quantize_weight(w["wd"], "nf4", 64).packed)
    return w


def _layer(w: dict, K: int, T: int, seed: int) -> dict:
    """w's experts with fresh x (T, H), router logits (T, E) and their routing."""
    import h3moe

    E, H = w["wgu"].shape[0], w["wgu"].shape[2]
    dev = w["wgu"].device
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(T, H, device=dev, generator=g).to(w["wgu"].dtype)
    logits = torch.randn(T, E, device=dev, generator=g)
    return {**w, "x": x, "logits": logits, "routing": h3moe.route(logits, K, backend="torch"), "K": K}


def _ops(layer: dict, backends: list[str]) -> dict:
    """name -> zero-argument call of one decode op on `layer`."""
    import h3moe

    ops = {}
    for b in backends:
        ops[f"moe:{b}"] = lambda b=b: h3moe.moe(layer["x"], layer["wgu"], layer["wd"], layer["routing"], backend=b)
        ops[f"route:{b}"] = lambda b=b: h3moe.route(layer["logits"], layer["K"], backend=b)
    if "nf4" in layer and "triton" in backends:  # (the torch fallback takes milliseconds per call)
        from h3moe.ops.quant import quant_moe

        gu, dn = layer["nf4"]
        ops["quant_moe nf4:triton"] = lambda: quant_moe(layer["x"], gu, dn, layer["routing"], backend="triton")
    return ops


def _wall_us(fn, n: int, cuda: bool) -> float:
    """Wall time of n back-to-back calls, no sync between them, over n (µs)."""
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    if cuda:
        torch.cuda.synchronize()
    return dt / n * 1e6


def _events_us(fn, n: int) -> float:
    """CUDA events around n back-to-back calls, over n (µs)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1e3


def _graph_us(fn, n: int) -> float | None:
    """fn replayed from a CUDA graph (the bench's capture: bench.impls._graphed, warm-up on a side stream
    first), n replays, over n (µs); None where the call cannot be captured."""
    from bench.impls import Impl, Skip, _graphed

    g = _graphed(Impl("op", lambda s: fn()))
    try:
        st = g.prepare({})
    except Skip:
        return None
    return _events_us(lambda: g.run(st), n)


def _where(filename: str, name: str) -> str:
    """h3moe / triton / torch (Python or its C ops) / other, for one cProfile entry (C functions have file "~")."""
    if filename == "~":
        return "torch" if "torch" in name else "triton" if "triton" in name else "other"
    f = filename.replace("\\", "/")
    for where in ("h3moe", "triton", "torch"):
        if f"/{where}/" in f:
            return where
    return "other"


def profile_calls(fn, n: int, top: int = 15) -> dict:
    """cProfile of n calls: µs per call by where the code lives, and the `top` functions by own time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    st = pstats.Stats(prof)
    by, rows = {}, []
    for (filename, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        where = _where(filename, name)
        by[where] = by.get(where, 0.0) + tt
        rows.append({"function": f"{os.path.basename(filename)}:{line}({name})", "where": where,
                     "calls_per_call": nc / n, "own_us": tt / n * 1e6, "cum_us": ct / n * 1e6})
    rows.sort(key=lambda r: -r["own_us"])
    return {"by_where_us": {k: v / n * 1e6 for k, v in sorted(by.items(), key=lambda kv: -kv[1])}, "top": rows[:top]}


def run(models: list, tokens: list[int], calls: int, dry: bool, budget_s: float = 1e9) -> dict:
    """The rows and profiles of the module docstring; no new (model, T) is started after budget_s."""
    import h3moe

    deadline = time.perf_counter() + budget_s
    cuda = torch.cuda.is_available() and not dry
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    status = h3moe.backends()
    backends = [b for b in ("triton", "cuda", "torch") if status[b].available] if cuda else ["torch"]
    res = {"gpu": torch.cuda.get_device_name() if cuda else "cpu (dry run)", "torch": torch.__version__,
           "commit": os.environ.get("H3MOE_COMMIT", "unknown"), "calls": calls, "rows": [], "profiles": [],
           "skipped": []}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    n_warm = 5
    quant = cuda  # the quantized Triton kernels: GPU only here (the interpreter would time numpy)
    for m in models:
        if time.perf_counter() > deadline:
            res["skipped"].append(f"{m.name} (budget)")
            continue
        w_small = _experts(dataclasses.replace(m, H=SMALL, I=SMALL), dev, dt, quant)
        w_real = _experts(m, dev, dt, quant) if cuda else w_small
        for T in tokens:
            if time.perf_counter() > deadline:
                res["skipped"].append(f"{m.name} T={T} (budget)")
                continue
            small, real = _layer(w_small, m.K, T, seed=T), _layer(w_real, m.K, T, seed=T)
            ops_small, ops_real = _ops(small, backends), _ops(real, backends)
            for name, fn in ops_small.items():  # (under no_grad, as transformers' generate runs them)
                row = {"model": m.name, "tokens": T, "E": m.E, "K": m.K, "op": name}
                try:
                    for _ in range(n_warm):
                        fn()
                    row["host_us"] = _wall_us(fn, calls, cuda)
                    if cuda:
                        fr = ops_real[name]
                        for _ in range(n_warm):
                            fr()
                        row["eager_us"] = _events_us(fr, calls)
                        row["device_us"] = _graph_us(fr, calls)
                except Exception as err:  # noqa: BLE001 — one op failing must not lose the others' rows
                    row["error"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
                res["rows"].append(row)
            main = "moe:triton" if "moe:triton" in ops_small else f"moe:{backends[0]}"
            prof = profile_calls(ops_small[main], calls)
            res["profiles"].append({"model": m.name, "tokens": T, "op": main, **prof})
            del ops_small, ops_real, small, real
        del w_small, w_real
        if cuda:
            torch.cuda.empty_cache()
    return res


def _f(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def markdown(res: dict) -> str:
    out = [f"# Host cost per decode call — {res['gpu']}", "",
           f"torch {res['torch']}, triton {res['triton']}, commit {res['commit']}, {res['calls']} calls per "
           f"figure. host: wall time per call on a layer with H = I = {SMALL} (the device idle); eager: CUDA events "
           "per call at the model's shape; device: the same call replayed from a CUDA graph. Where eager ≈ host "
           "> device, the eager decode waits on Python.", "",
           "| model | T | op | host µs | eager µs | device µs |", "|---|---:|---|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            out.append(f"| {r['model']} | {r['tokens']} | {r['op']} | {r['error']} | | |")
            continue
        out.append(f"| {r['model']} | {r['tokens']} | {r['op']} | {_f(r.get('host_us'))} | "
                   f"{_f(r.get('eager_us'))} | {_f(r.get('device_us'))} |")
    for p in res["profiles"]:
        out += ["", f"## cProfile: {p['op']}, {p['model']} (E, K of the model, H = I = {SMALL}), T={p['tokens']}",
                "", "µs per call by where the code lives (cProfile's own overhead included): " +
                ", ".join(f"{k} {v:.1f}" for k, v in p["by_where_us"].items()), "",
                "| function | where | calls per call | own µs | cumulative µs |", "|---|---|---:|---:|---:|"]
        for r in p["top"]:
            out.append(f"| `{r['function']}` | {r['where']} | {r['calls_per_call']:.1f} | {r['own_us']:.2f} | "
                       f"{r['cum_us']:.1f} |")
    if res.get("skipped"):
        out += ["", "Not measured: " + "; ".join(res["skipped"])]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="qwen3,olmoe,mixtral")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new (model, T) after this long")
    ap.add_argument("--dry-run", action="store_true", help="CPU, torch backend, tiny models (--models tiny)")
    a = ap.parse_args(argv)
    from bench.cases import MODELS, TINY_MODELS

    if not a.dry_run and not torch.cuda.is_available():
        print("host_overhead.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    table = TINY_MODELS if a.dry_run else MODELS
    models = [table[n] for n in a.models.split(",") if n]
    with torch.no_grad():  # as transformers' generate runs a decode step
        res = run(models, [int(t) for t in a.tokens.split(",") if t], a.calls, a.dry_run, a.budget_s)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (out / "host_overhead.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
