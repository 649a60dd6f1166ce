"""The benchmark driver: python -m bench (also `h3moe bench`).

Runs the plan (bench/cases.py) of cases × model shapes × token counts, every implementation of each
(bench/impls.py) on the same inputs, measures this device's ceilings in the same run, and writes one JSON
plus a Markdown table beside it (rewritten as it goes, at most every 5 s, and on SIGTERM: a run cut short
still leaves its results).
Without CUDA (or with --cpu-smoke) it runs the smoke plan: tiny shapes, fp32, all cases, schema and
rel_err checked, exit status 1 on a problem.

Examples:
    python -m bench                              # GPU: the full plan → bench/results/<gpu>-<date>.json
    python -m bench --quick --budget-s 180 --out /tmp/o/bench.json --plot
    python -m bench --cases fwd,fwdbwd --models mixtral --tokens 1,4096
    python -m bench --cpu-smoke --out /tmp/smoke.json
    python -m bench --plot-only bench/results/h100-80gb-hbm3-2026-11-27.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

from . import cases as C
from . import report
from .impls import Skip, clear_caches, implementations
from .timing import do_bench, measure_ceilings, sync

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: CPU smoke acceptance: fp32 implementations against the fp32 reference.
SMOKE_REL_ERR = 1e-4
#: Quantized rows compare against their own dequantized weights: same math, a little more rounding.
SMOKE_REL_ERR_QUANT = 1e-3


class _Stop(Exception):
    pass


def _on_term(signum, frame):  # noqa: ARG001
    raise _Stop(f"signal {signum}")


# ------------------------------------------------------------------------------------ environment


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return None


def _commit() -> str:
    if os.environ.get("H3MOE_COMMIT"):
        return os.environ["H3MOE_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} threads)"


def slug(name: str) -> str:
    s = name.lower().replace("nvidia ", "")
    s = re.sub(r"\(.*?\)", "", s)
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "device"


# ------------------------------------------------------------------------------------------ running


def flatten(case: str, outs) -> tuple:
    """Implementation outputs → the tuple the reference returns (route: weights sorted per token; lists of
    per-layer gradients concatenated)."""
    flat = []
    for o in outs:
        if isinstance(o, (list, tuple)):
            o = torch.cat([t.reshape(-1) for t in o])
        flat.append(o)
    if case == "route":
        flat = [flat[0].float().sort(dim=1).values]
    return tuple(flat)


class Runner:
    def __init__(self, args, device: torch.device, ceilings: dict):
        self.args, self.device, self.ceilings = args, device, ceilings
        self._weights_key, self._weights = None, None
        smoke = args.mode == "smoke"
        self.timing = dict(warmup_ms=1.0, rep_ms=3.0, min_reps=3, max_reps=20) if smoke else (
            dict(warmup_ms=10.0, rep_ms=40.0, min_reps=5, max_reps=100) if args.mode == "quick"
            else dict(warmup_ms=25.0, rep_ms=100.0, min_reps=10, max_reps=200))

    def weights(self, c: C.Case):
        key = (c.model.name, c.dtype)
        if key != self._weights_key:
            self._weights = None
            clear_caches()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._weights = C.make_weights(c.model, c.dtype, self.device, seed=zlib.crc32(c.model.name.encode()) % 1000)
            self._weights_key = key
        return self._weights

    def input_sets(self, c: C.Case) -> list[dict]:
        return C.input_sets(c, self.device, self.weights(c) if c.case not in ("route", "gating") else None)

    def run_case(self, c: C.Case, emit) -> tuple[list[dict], list[dict]]:
        args, dev = self.args, self.device
        impls, skipped = implementations(c, dev, interpreter=args.interpreter, only=args.impls)
        base = {"case": c.case, "model": c.model.name, "tokens": c.T, "dtype": C.dtype_name(c.dtype),
                "H": c.model.H, "I": c.model.I, "E": c.model.E, "K": c.model.K}
        skips = [{**{k: base[k] for k in ("case", "model", "tokens")}, "impl": n, "reason": r} for n, r in skipped]
        if not impls:
            return [], skips
        sets = self.input_sets(c)
        touched = C.experts_touched(sets[0]["ids"], c.model.E) if "ids" in sets[0] else None
        fl = C.flops(c)
        nb = C.bytes_moved(c, touched or 0)
        refs: dict = {}
        rows = []
        for impl in impls:
            row = {**base, "impl": impl.name, "ms": None, "ms_p20": None, "ms_p80": None, "tflops": None,
                   "gbps": None, "rel_err": None, "sets": len(sets), "experts_touched": touched}
            states = None
            try:
                states = [impl.prepare(s) for s in sets]
                outs = flatten(c.case, impl.run(states[0]))
                sync(dev)
                if impl.ref_key not in refs:
                    try:
                        deq = impl.dequantized(sets[0]) if impl.dequantized else None
                        refs[impl.ref_key] = C.reference_outputs(c, sets[0], deq)
                    except torch.OutOfMemoryError:
                        raise RuntimeError("the fp32 reference ran out of memory") from None
                err, parts = C.compare(outs, refs[impl.ref_key])
                del outs
                n = len(states)
                # Rotation keeps small inputs out of L2 where the sets together exceed it; else flush.
                flush = dev.type == "cuda" and C.input_bytes(sets[0]) * n < 4 * C.L2_BYTES
                row["l2_flush"] = flush
                t = do_bench(lambda i: impl.run(states[i % n]), dev, flush_l2=flush, **self.timing)
                row.update(ms=t.ms, ms_p20=t.p20, ms_p80=t.p80, reps=t.reps, rel_err=err,
                           rel_err_parts=parts, status="ok")
                row["tflops"] = fl / (t.ms * 1e-3) / 1e12 if fl else None
                row["gbps"] = nb / (t.ms * 1e-3) / 1e9
                if row["tflops"] and self.ceilings.get("bf16_tflops"):
                    row["frac_matmul"] = row["tflops"] / self.ceilings["bf16_tflops"]
                if self.ceilings.get("copy_GBps"):
                    row["frac_copy"] = row["gbps"] / self.ceilings["copy_GBps"]
            except Skip as e:
                skips.append({**{k: base[k] for k in ("case", "model", "tokens")}, "impl": impl.name,
                              "reason": str(e)})
                continue
            except torch.OutOfMemoryError:
                row["status"] = "error: out of memory"
            except _Stop:
                raise
            except Exception as e:  # noqa: BLE001 — one implementation failing must not stop the run
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                row["status"] = f"error: {type(e).__name__}: {msg[:200]}"
            finally:
                states = None
                if dev.type == "cuda" and row.get("status", "").startswith("error"):
                    torch.cuda.empty_cache()
            rows.append(row)
            emit(row)
        return rows, skips


def _line(row) -> str:
    if row.get("status") != "ok":
        return f"{row['case']:7s} {row['model']:10s} T={row['tokens']:<6d} {row['impl']:18s} {row.get('status')}"
    th = f"{row['tflops']:8.1f} TFLOP/s" if row.get("tflops") else " " * 15
    return (f"{row['case']:7s} {row['model']:10s} T={row['tokens']:<6d} {row['impl']:18s} {row['ms']:9.4f} ms "
            f"[{row['ms_p20']:.4f}, {row['ms_p80']:.4f}] {th} {row['gbps']:9.1f} GB/s  err {row['rel_err']:.1e}")


# -------------------------------------------------------------------------------------------- main


def latest_record(gpu: str | None, exclude: Path | None = None, directory: Path | None = None) -> Path | None:
    """The newest results file of GPU `gpu` in bench/results/ (by its `date` field; a file ending in -runN
    is an earlier run of a day and never the newest record)."""
    best = None
    for path in sorted((directory or RESULTS_DIR).glob("*.json")):
        if exclude is not None and path.resolve() == Path(exclude).resolve():
            continue
        if re.search(r"-run\d+\.json$", path.name):
            continue
        try:
            res = report.load(path)
        except (OSError, ValueError):
            continue
        if res.get("gpu") == gpu and res.get("device", "cuda") == "cuda":
            if best is None or str(res.get("date", "")) > best[0]:
                best = (str(res.get("date", "")), path)
    return best[1] if best else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="the GPU check's plan: targets first, then the curves")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, every case; checks the results")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop adding cases after this many seconds (the JSON is still written)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (Markdown beside it); default "
                   "bench/results/<gpu>-<date>.json")
    p.add_argument("--cases", type=lambda s: tuple(s.split(",")), default=None, help=f"of {','.join(C.CASES)}")
    p.add_argument("--models", type=lambda s: tuple(s.split(",")), default=None,
                   help=f"of {','.join(C.MODELS)} (smoke: {','.join(C.TINY_MODELS)})")
    p.add_argument("--tokens", type=lambda s: tuple(int(x) for x in s.split(",")), default=None)
    p.add_argument("--impls", type=lambda s: tuple(s.split(",")), default=None,
                   help="keep implementations whose name contains one of these (e.g. h3moe,grouped_mm)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--interpreter", action="store_true", help="also time Triton on CPU tensors (with TRITON_INTERPRET=1 set)")
    p.add_argument("--plot", action="store_true", help="draw PNG charts beside the JSON after the run")
    p.add_argument("--plot-combined", action="store_true", help="with --plot / --plot-only: only the overview chart")
    p.add_argument("--plot-only", type=Path, default=None, metavar="JSON", help="only draw the charts of a results file")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--compare", type=Path, nargs=2, default=None, metavar=("OLD", "NEW"),
                   help="print what changed between two results files (targets, h3moe rows) and exit")
    p.add_argument("--compare-latest", type=Path, default=None, metavar="NEW",
                   help="--compare with the newest record of the same GPU committed in bench/results/")
    p.add_argument("--device", default=None, help="cuda (default where there is one) or cpu (real shapes on a "
                   "CPU: slow, for checking the driver); --cpu-smoke implies cpu")
    args = p.parse_args(argv)
    for name, known in (("cases", C.CASES), ("models", (*C.MODELS, *C.TINY_MODELS))):
        bad = [x for x in (getattr(args, name) or ()) if x not in known]
        if bad:
            p.error(f"--{name}: unknown {bad}; expected some of {list(known)}")
    return args


def main(argv=None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(report.compare(report.load(args.compare[0]), report.load(args.compare[1])), end="")
        return 0
    if args.compare_latest:
        new = report.load(args.compare_latest)
        old = latest_record(new.get("gpu"), exclude=args.compare_latest)
        if old is None:
            print(f"no committed record of {new.get('gpu')} in {RESULTS_DIR}")
            return 0
        print(f"(against {old.name})")
        print(report.compare(report.load(old), new), end="")
        return 0
    if args.plot_only:
        from .plot import plot_results

        for f in plot_results(report.load(args.plot_only), args.plot_only, combined_only=args.plot_combined):
            print(f"wrote {f}")
        return 0
    if args.list:  # the plan only: no device needed
        mode = "smoke" if args.cpu_smoke else ("quick" if args.quick else "full")
        for c in C.plan(mode, C.parse_dtype(args.dtype), cases=args.cases, models=args.models, tokens=args.tokens):
            print(c.key, "(skips " + ", ".join(n for n, _ in c.skip) + ")" if c.skip else "")
        return 0
    if args.cpu_smoke or (args.device is None and not torch.cuda.is_available()):
        if not args.cpu_smoke:
            print("no CUDA device: running the CPU smoke plan (tiny shapes, fp32)")
        args.mode, device = "smoke", torch.device("cpu")
    else:
        args.mode, device = ("quick" if args.quick else "full"), torch.device(args.device or "cuda")
    if args.mode == "smoke":
        # Tiny ops: one thread avoids the oversubscription stalls a shared CPU gives multi-threaded torch.
        torch.set_num_threads(1)
    dtype = C.parse_dtype(args.dtype)
    cases = C.plan(args.mode, dtype, cases=args.cases, models=args.models, tokens=args.tokens)
    budget = args.budget_s if args.budget_s is not None else {"smoke": 120.0, "quick": 180.0, "full": 3600.0}[args.mode]
    name = device_name(device)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or RESULTS_DIR / f"{slug(name) if device.type == 'cuda' else 'cpu'}-{date}.json"

    t0 = time.time()
    prev = signal.signal(signal.SIGTERM, _on_term)
    torch.manual_seed(0)
    ceilings = measure_ceilings(device, quick=args.mode != "full")
    print(f"{name}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['bf16_tflops']:.1f} TFLOP/s",
          flush=True)
    result = {
        "gpu": name, "device": device.type, "torch": torch.__version__, "triton": _version("triton"),
        "transformers": _version("transformers"), "h3moe": _version("h3moe"), "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "mode": args.mode,
        "dtype": C.dtype_name(dtype if args.mode != "smoke" else torch.float32),
        "backends": {k: str(v) for k, v in __import__("h3moe").backends().items()},
        "ceilings": ceilings, "rows": [], "skipped": [], "targets": [],
        "budget": {"budget_s": budget, "elapsed_s": 0.0, "truncated": False, "not_run": []},
        "reference": "fp32 (TF32 off) from the same rounded inputs: reference.experts_ref where its gathered "
                     "weights are small, else bench.cases.experts_fp32 (same math, a loop over experts)",
    }
    runner = Runner(args, device, ceilings)
    stopped = None
    last_write = 0.0
    try:
        for n, c in enumerate(cases):
            if time.time() - t0 > budget:
                result["budget"]["truncated"] = True
                result["budget"]["not_run"] = [x.key for x in cases[n:]]
                print(f"budget of {budget:.0f} s spent: {len(cases) - n} cases not run", flush=True)
                break
            rows, skips = runner.run_case(c, lambda r: print(_line(r), flush=True))
            result["rows"] += rows
            result["skipped"] += skips
            result["budget"]["elapsed_s"] = time.time() - t0
            if time.time() - last_write > 5:  # partial results on disk, for a run that gets cut short
                report.write(result, out)
                last_write = time.time()
    except (_Stop, KeyboardInterrupt) as e:
        stopped = str(e) or "interrupted"
        result["budget"]["truncated"] = True
        done = {(r["case"], r["model"], r["tokens"]) for r in result["rows"]}
        result["budget"]["not_run"] = [x.key for x in cases if (x.case, x.model.name, x.T) not in done]
        print(f"stopped ({stopped}): writing what was measured", flush=True)
    finally:
        signal.signal(signal.SIGTERM, prev)
    result["budget"]["elapsed_s"] = time.time() - t0
    result["targets"] = report.evaluate_targets(result)
    report.write(result, out)
    print()
    print(report.short_table(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if args.plot:
        try:
            from .plot import plot_results

            for f in plot_results(result, out, combined_only=args.plot_combined):
                print(f"wrote {f}")
        except ImportError as e:
            print(f"no plot: {e} (draw later with python -m bench --plot-only {out})")
    problems = report.validate(result)
    if args.mode == "smoke":
        problems += smoke_problems(result, {c.case for c in cases})
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems or stopped else 0


def smoke_problems(result: dict, planned=C.CASES) -> list[str]:
    """The CPU smoke's checks beyond the schema: every planned case produced rows (quantized ones where any
    quantized implementation exists here), every row ran, rel_err small."""
    bad = []
    got = {r["case"] for r in result["rows"]}
    quant_ok = any(r["case"] in C.QUANT_CASES for r in result["rows"])
    for case in (c for c in C.CASES if c in planned):
        if case not in got and not (case in C.QUANT_CASES and not quant_ok):
            bad.append(f"case {case!r}: no rows")
    for r in result["rows"]:
        if r.get("status") != "ok":
            bad.append(f"{r['case']}/{r['model']}/T={r['tokens']}/{r['impl']}: {r.get('status')}")
            continue
        lim = SMOKE_REL_ERR_QUANT if r["case"] in C.QUANT_CASES else SMOKE_REL_ERR
        if r["rel_err"] > lim:
            bad.append(f"{r['case']}/{r['model']}/T={r['tokens']}/{r['impl']}: rel_err {r['rel_err']:.2e} > {lim:g}")
    return bad
