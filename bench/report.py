"""The results file: its schema, the speed targets evaluated on it, and its Markdown tables.

JSON (one run): gpu, torch, triton, transformers, commit, date, device, mode, dtype, ceilings {copy_GBps,
bf16_tflops, ...}, rows [{case, model, tokens, dtype, impl, ms, ms_p20, ms_p80, tflops, gbps, rel_err,
...}], skipped [{case, model, tokens, impl, reason}], targets [...], budget {budget_s, elapsed_s,
truncated, not_run}.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

__all__ = ["ROW_FIELDS", "TOP_FIELDS", "validate", "evaluate_targets", "markdown", "short_table", "write",
           "load", "IMPL_ORDER", "targets_summary", "compare"]

TOP_FIELDS = ("gpu", "torch", "triton", "commit", "ceilings", "rows")
ROW_FIELDS = ("case", "model", "tokens", "dtype", "impl", "ms", "ms_p20", "ms_p80", "tflops", "gbps", "rel_err")

#: Column order and short names of the implementations in the tables and plots.
IMPL_ORDER = {
    "h3moe:torch": "torch", "h3moe:triton": "triton", "h3moe:triton-recompute": "tr-rc", "h3moe:triton-lowp": "tr-lowp",
    "h3moe:triton-tma": "tr-tma", "h3moe:cuda": "cuda",
    "hf:eager": "eager", "hf:batched_mm": "bmm", "hf:grouped_mm": "gmm", "hf:h3moe": "hf:h3",
    "torch:grouped_mm": "t.gmm", "torch:eager": "t.eager", "bnb:dequant+mm": "bnb",
    # decode rows replayed from a CUDA graph (bench.impls._with_graphs)
    "h3moe:torch+graph": "torch+g", "h3moe:triton+graph": "triton+g", "h3moe:cuda+graph": "cuda+g",
    "torch:grouped_mm+graph": "t.gmm+g",
    # quantized variants: the other nibble lookup (H3MOE_W4_LOOKUP), the other kernels (H3MOE_QUANT_KERNEL)
    "h3moe:triton-load": "tr-load", "h3moe:triton-shfl": "tr-shfl", "h3moe:triton-tc": "tr-tc",
    "h3moe:triton-gemv": "tr-gemv", "h3moe:triton-dot": "tr-dot", "h3moe:triton-load+graph": "tr-load+g", "h3moe:triton-tc+graph": "tr-tc+g",
    "h3moe:triton-gemv+graph": "tr-gemv+g",
}
CASE_ORDER = ("fwd", "fwdbwd", "layer", "nf4", "int8", "route", "gating")

#: The speed targets (issue 4), evaluated on GPU results; printed met / missed, never asserted in tests.
TARGETS = (
    # (id, case, tokens, kind, other, threshold, text)
    ("fwd_vs_grouped_mm", "fwd", (4096,), "speedup", "hf:grouped_mm", 1.2, "fwd at 4096 tokens ≥ 1.2× transformers grouped_mm"),
    ("fwd_vs_eager", "fwd", (4096,), "speedup", "hf:eager", 8.0, "fwd at 4096 tokens ≥ 8× eager"),
    ("fwd_matmul_frac", "fwd", (4096,), "flops_frac", None, 0.6, "fwd at 4096 tokens ≥ 60% of the measured bf16 matmul rate"),
    ("decode_bw_frac", "fwd", (1, 16), "bw_frac", None, 0.7, "decode (≤ 16 tokens) ≥ 70% of the measured copy bandwidth over the experts touched"),
    ("fwdbwd_vs_eager", "fwdbwd", (4096,), "speedup", "hf:eager", 3.0, "fwd+bwd at 4096 tokens ≥ 3× eager"),
    ("fwdbwd_vs_grouped_mm", "fwdbwd", (4096,), "speedup", "hf:grouped_mm", 1.2, "fwd+bwd at 4096 tokens ≥ 1.2× transformers grouped_mm"),
    ("nf4_vs_bf16_decode", "nf4", (1, 16), "vs_bf16", None, 2.5, "NF4 decode ≥ 2.5× h3moe's bf16 decode (same backend)"),
)


def _ok(row) -> bool:
    return row.get("ms") is not None and row.get("status", "ok") == "ok"


def validate(result: dict) -> list[str]:
    """Problems with a results dict against the schema (empty when it conforms)."""
    bad = [f"missing top-level field {k!r}" for k in TOP_FIELDS if k not in result]
    ceil = result.get("ceilings", {})
    for k in ("copy_GBps", "bf16_tflops"):
        v = ceil.get(k)
        if not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            bad.append(f"ceilings.{k}: expected a positive number, got {v!r}")
    for i, row in enumerate(result.get("rows", [])):
        for k in ROW_FIELDS:
            if k not in row:
                bad.append(f"rows[{i}] ({row.get('impl')}): missing {k!r}")
        if _ok(row):
            if not (row["ms_p20"] <= row["ms"] <= row["ms_p80"]) or row["ms"] <= 0:
                bad.append(f"rows[{i}] ({row['impl']}): expected 0 < p20 <= ms <= p80, got "
                           f"{row['ms_p20']}, {row['ms']}, {row['ms_p80']}")
            if row["rel_err"] is None or not math.isfinite(row["rel_err"]):
                bad.append(f"rows[{i}] ({row['impl']}): rel_err {row['rel_err']!r} is not finite")
            if row["tflops"] is None and row["gbps"] is None:
                bad.append(f"rows[{i}] ({row['impl']}): neither tflops nor gbps")
    return bad


def _index(rows):
    return {(r["case"], r["model"], r["tokens"], r["impl"]): r for r in rows if _ok(r)}


def evaluate_targets(result: dict) -> list[dict]:
    """Each target for each h3moe row it applies to: value, threshold, met (None where a baseline is missing)."""
    rows = result.get("rows", [])
    idx = _index(rows)
    ceil = result.get("ceilings", {})
    out = []
    for tid, case, tokens, kind, other, thr, text in TARGETS:
        for r in rows:
            if r["case"] != case or r["tokens"] not in tokens or not r["impl"].startswith("h3moe:") or not _ok(r):
                continue
            value, against = None, None
            if kind == "speedup":
                o = idx.get((case, r["model"], r["tokens"], other))
                against = other
                value = o["ms"] / r["ms"] if o else None
            elif kind == "flops_frac":
                against = f"bf16 matmul {ceil.get('bf16_tflops', 0):.0f} TFLOP/s"
                value = r["tflops"] / ceil["bf16_tflops"] if r.get("tflops") and ceil.get("bf16_tflops") else None
            elif kind == "bw_frac":
                against = f"copy {ceil.get('copy_GBps', 0):.0f} GB/s"
                value = r["gbps"] / ceil["copy_GBps"] if r.get("gbps") and ceil.get("copy_GBps") else None
            elif kind == "vs_bf16":  # a variant row (h3moe:triton-load+graph) against its backend's bf16 row
                base = re.sub(r"^(h3moe:[a-z]+)-[a-z0-9]+", r"\1", r["impl"])
                o = idx.get(("fwd", r["model"], r["tokens"], base))
                against = f"fwd {base} (bf16)"
                value = o["ms"] / r["ms"] if o else None
            out.append({
                "target": tid, "text": text, "model": r["model"], "tokens": r["tokens"], "impl": r["impl"],
                "against": against, "value": value, "threshold": thr,
                "met": None if value is None else bool(value >= thr),
            })
    return out


# ------------------------------------------------------------------------------------------ tables


def _f(v, nd=3) -> str:
    if v is None:
        return "—"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{nd}g}"


def _e(v) -> str:
    return "—" if v is None else f"{v:.1e}"


def _impl_key(name):
    keys = list(IMPL_ORDER)
    return (keys.index(name) if name in keys else len(keys), name)


def _groups(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r["model"], r["tokens"]), []).append(r)
    order = lambda k: (CASE_ORDER.index(k[0]) if k[0] in CASE_ORDER else 99, k[1], k[2])  # noqa: E731
    return [(k, groups[k]) for k in sorted(groups, key=order)]


def targets_table(result: dict) -> str:
    t = result.get("targets") or []
    if not t:
        return "_No target applies to these rows._\n"
    lines = ["| target | model | T | impl | value | needs | |", "|---|---|---:|---|---:|---:|---|"]
    for x in t:
        mark = "n/a (baseline missing)" if x["met"] is None else ("met" if x["met"] else "**missed**")
        lines.append(f"| {x['target']} | {x['model']} | {x['tokens']} | {x['impl']} | {_f(x['value'])} | "
                     f"{x['threshold']:g} | {mark} |")
    return "\n".join(lines) + "\n"


def targets_summary(result: dict) -> str:
    """Per target and h3moe implementation: how many (model, tokens) points meet it, and the worst one."""
    t = result.get("targets") or []
    if not t:
        return "_No target applies to these rows._\n"
    groups = {}
    for x in t:
        groups.setdefault((x["target"], x["impl"]), []).append(x)
    lines = ["| target | needs | impl | met | worst (model, T) |", "|---|---:|---|---:|---|"]
    for (tid, impl), xs in groups.items():
        have = [x for x in xs if x["value"] is not None]
        met = sum(bool(x["met"]) for x in have)
        worst = min(have, key=lambda x: x["value"]) if have else None
        w = f"{_f(worst['value'])} ({worst['model']}, {worst['tokens']})" if worst else "n/a (baseline missing)"
        lines.append(f"| {tid} | {xs[0]['threshold']:g} | {impl} | {met}/{len(have)} | {w} |")
    legend = "; ".join(f"{tid}: {text}" for tid, _, _, _, _, _, text in TARGETS)
    return "\n".join(lines) + "\n\n" + legend + ".\n"


def pivot_table(result: dict) -> str:
    """One line per (case, model, tokens): the median ms of every implementation, and the best h3moe's speed
    over transformers' grouped_mm and eager."""
    rows = result.get("rows", [])
    impls = sorted({r["impl"] for r in rows}, key=_impl_key)
    head = ["case", "model", "T"] + [IMPL_ORDER.get(i, i) for i in impls] + ["best h3moe", "×gmm", "×eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(impls) + 3)]
    for (case, model, T), grp in _groups(rows):
        by = {r["impl"]: r for r in grp}
        cells = []
        for i in impls:
            r = by.get(i)
            cells.append("" if r is None else (_f(r["ms"]) if _ok(r) else "err"))
        ours = [r for r in grp if r["impl"].startswith("h3moe:") and _ok(r)]
        best = min(ours, key=lambda r: r["ms"]) if ours else None
        gmm, eager = by.get("hf:grouped_mm"), by.get("hf:eager")
        sp = lambda o: _f(o["ms"] / best["ms"]) if best and o and _ok(o) else "—"  # noqa: E731
        lines.append(f"| {case} | {model} | {T} | " + " | ".join(cells) +
                     f" | {IMPL_ORDER.get(best['impl'], best['impl']) if best else '—'} | {sp(gmm)} | {sp(eager)} |")
    return "\n".join(lines) + "\n"


def full_table(result: dict) -> str:
    ceil = result.get("ceilings", {})
    lines = ["| case | model | T | impl | ms | p20–p80 | TFLOP/s | %matmul | GB/s | %copy | rel_err | reps |",
             "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (case, model, T), grp in _groups(result.get("rows", [])):
        for r in sorted(grp, key=lambda r: _impl_key(r["impl"])):
            if not _ok(r):
                lines.append(f"| {case} | {model} | {T} | {r['impl']} | {r.get('status', 'error')[:80]} "
                             "| | | | | | | |")
                continue
            pf = _f(100 * r["tflops"] / ceil["bf16_tflops"], 2) if r.get("tflops") and ceil.get("bf16_tflops") else "—"
            pb = _f(100 * r["gbps"] / ceil["copy_GBps"], 2) if r.get("gbps") and ceil.get("copy_GBps") else "—"
            lines.append(f"| {case} | {model} | {T} | {r['impl']} | {_f(r['ms'], 4)} | {_f(r['ms_p20'])}–"
                         f"{_f(r['ms_p80'])} | {_f(r['tflops'])} | {pf} | {_f(r['gbps'])} | {pb} | "
                         f"{_e(r['rel_err'])} | {r.get('reps', '')} |")
    return "\n".join(lines) + "\n"


def header(result: dict) -> str:
    c = result.get("ceilings", {})
    b = result.get("budget", {})
    lines = [
        f"# h3moe benchmark — {result.get('gpu')} — {result.get('date', '')}",
        "",
        f"torch {result.get('torch')}, triton {result.get('triton')}, transformers {result.get('transformers')}, "
        f"commit {result.get('commit')}, mode {result.get('mode')}, dtype {result.get('dtype')}.",
        f"Ceilings measured in this run: copy {_f(c.get('copy_GBps'))} GB/s (read + write), "
        f"bf16 matmul {_f(c.get('bf16_tflops'))} TFLOP/s"
        + (f", fp32 matmul {_f(c.get('fp32_tflops'))} TFLOP/s" if c.get("fp32_tflops") else "") + ".",
        f"Elapsed {_f(b.get('elapsed_s'))} s of a {_f(b.get('budget_s'))} s budget"
        + (f"; stopped early, {len(b.get('not_run', []))} cases not run." if b.get("truncated") else "."),
        "",
    ]
    if result.get("device") != "cuda":
        lines += ["_CPU run: the speed targets are for GPU results; shown here only to exercise the plumbing._", ""]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    skipped = result.get("skipped", [])
    uniq = {}
    for s in skipped:
        uniq.setdefault((s["impl"], s["reason"]), 0)
        uniq[(s["impl"], s["reason"])] += 1
    sk = "\n".join(f"- {impl}: {reason} ({n}×)" for (impl, reason), n in sorted(uniq.items())) or "- none"
    return (header(result) + "\n## Targets\n\n" + targets_summary(result) + "\n" + targets_table(result)
            + "\n## Summary (median ms)\n\n"
            + pivot_table(result) + "\n## All rows\n\n" + full_table(result) + "\n## Skipped\n\n" + sk + "\n")


def short_table(result: dict) -> str:
    """What the driver prints last: ceilings, targets, the per-case summary."""
    return (header(result) + "\nSummary (median ms):\n" + pivot_table(result) + "\nTargets:\n"
            + targets_summary(result))


def write(result: dict, path: Path) -> None:
    """JSON at path and Markdown beside it, each written whole (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for p, text in ((path, json.dumps(result, indent=1, default=str)), (path.with_suffix(".md"), markdown(result))):
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)


def load(path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------ comparison


def compare(old: dict, new: dict, *, min_change: float = 0.05) -> str:
    """Markdown: what changed between two results files (e.g. the last committed record and a new GPU run).

    1. Every target on every (model, T, impl) either file evaluates: old value, new value, met / missed.
    2. The h3moe rows measured in both (same case, model, T, impl) whose median time moved by more than
       `min_change` (relative), fastest gain first; speedup = old ms / new ms.
    The two runs should be on the same GPU type; the header says which devices and commits they came from."""
    def targets(res):
        return {(t["target"], t["model"], t["tokens"], t["impl"]): t for t in evaluate_targets(res)}

    to, tn = targets(old), targets(new)
    lines = [f"# {old.get('gpu')} @ {old.get('commit')} → {new.get('gpu')} @ {new.get('commit')}", ""]
    if old.get("gpu") != new.get("gpu"):
        lines += ["**Different GPUs: the times are not comparable.**", ""]
    lines += ["## Targets", "", "| target | model | T | impl | old | new | needs | |", "|---|---|---:|---|---:|---:|---:|---|"]
    for key in sorted(set(to) | set(tn), key=lambda k: (k[0], k[1], k[2], _impl_key(k[3]))):
        a, b = to.get(key), tn.get(key)
        va, vb = (x["value"] if x else None for x in (a, b))
        thr = (b or a)["threshold"]
        met = b["met"] if b else None
        mark = "—" if met is None else ("met" if met else "**missed**")
        if a and b and a["met"] is False and met:
            mark = "**now met**"
        elif a and b and a["met"] and met is False:
            mark = "**now missed**"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {_f(va)} | {_f(vb)} | {_f(thr)} | {mark} |")
    io, inew = _index(old.get("rows", [])), _index(new.get("rows", []))
    moved = []
    for key in set(io) & set(inew):
        if not key[3].startswith("h3moe:"):
            continue
        sp = io[key]["ms"] / inew[key]["ms"]
        if abs(sp - 1) > min_change:
            moved.append((sp, key))
    lines += ["", f"## h3moe rows that moved by more than {100 * min_change:.0f}% (speedup = old ms / new ms)", "",
              "| case | model | T | impl | old ms | new ms | speedup |", "|---|---|---:|---|---:|---:|---:|"]
    for sp, key in sorted(moved, key=lambda m: -m[0]):
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {_f(io[key]['ms'])} | {_f(inew[key]['ms'])} "
                     f"| {_f(sp)} |")
    if not moved:
        lines.append("| — | | | | | | |")
    return "\n".join(lines) + "\n"
