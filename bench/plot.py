"""Charts of a results file: per model shape, time and TFLOP/s / GB/s against token count for every
implementation, with the device's ceilings (measured in the same run) as horizontal lines.

    python -m bench --plot-only bench/results/<gpu>-<date>.json      # PNGs beside the JSON

Files: <stem>.png (all models: fwd time, fwd TFLOP/s, decode/fwd GB/s, fwd+bwd TFLOP/s; the README's chart)
and <stem>-<model>.png (every case of that model: time, TFLOP/s, GB/s). h3moe's backends are solid lines,
baselines dashed; colors are fixed per implementation across charts.
"""
from __future__ import annotations

from pathlib import Path

from .report import CASE_ORDER, IMPL_ORDER

__all__ = ["plot_results"]

_CASE_TITLE = {"fwd": "experts forward", "fwdbwd": "experts fwd+bwd", "layer": "MoE layer", "nf4": "NF4 decode",
               "int8": "int8 decode", "route": "routing", "gating": "gating loss fwd+bwd"}


def _style(impl: str):
    names = list(IMPL_ORDER)
    i = names.index(impl) if impl in names else len(names) + hash(impl) % 5
    import matplotlib

    color = matplotlib.colormaps["tab10"](i % 10)
    ours = impl.startswith("h3moe:")
    return dict(color=color, linestyle="-" if ours else "--", marker="o" if ours else "s",
                linewidth=2.0 if ours else 1.2, markersize=4, label=impl)


def _series(rows, case, model, metric):
    out = {}
    for r in rows:
        if r["case"] == case and r["model"] == model and r.get("status") == "ok" and r.get(metric):
            out.setdefault(r["impl"], []).append((r["tokens"], r[metric]))
    return {k: sorted(v) for k, v in sorted(out.items(), key=lambda kv: (list(IMPL_ORDER).index(kv[0])
                                                                          if kv[0] in IMPL_ORDER else 99))}


def _panel(ax, rows, case, model, metric, ceilings, title):
    series = _series(rows, case, model, metric)
    for impl, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, **_style(impl))
    ceil = {"tflops": ("bf16_tflops", "bf16 matmul"), "gbps": ("copy_GBps", "copy")}.get(metric)
    if ceil and ceilings.get(ceil[0]) and series:
        ax.axhline(ceilings[ceil[0]], color="black", linestyle=":", linewidth=1)
        ax.annotate(f"{ceil[1]} {ceilings[ceil[0]]:.0f}", xy=(0.01, ceilings[ceil[0]]),
                    xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    toks = sorted({t for pts in series.values() for t, _ in pts})
    if toks:
        ax.set_xticks(toks, [str(t) for t in toks])
        ax.minorticks_off()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("tokens", fontsize=8)
    ax.set_ylabel({"ms": "ms (median)", "tflops": "TFLOP/s", "gbps": "GB/s"}[metric], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.3)
    if not series:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", fontsize=8, color="gray")
    return series


def _legend(fig, axes):
    handles, labels = {}, {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    order = sorted(handles, key=lambda n: list(IMPL_ORDER).index(n) if n in IMPL_ORDER else 99)
    fig.legend([handles[n] for n in order], order, loc="lower center", ncol=min(6, max(1, len(order))), fontsize=8)


def plot_results(result: dict, json_path, *, combined_only: bool = False) -> list[Path]:
    """Draw the charts of `result` beside json_path; returns the PNG paths. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    rows = result.get("rows", [])
    ceil = result.get("ceilings", {})
    models = list(dict.fromkeys(r["model"] for r in rows))
    who = f"{result.get('gpu')} · {result.get('dtype')} · torch {result.get('torch')} · {result.get('date', '')[:10]}"
    written = []

    # The overview: one row per model.
    cols = [("fwd", "ms", "fwd: time"), ("fwd", "tflops", "fwd: TFLOP/s"), ("fwd", "gbps", "fwd: GB/s (weights touched)"),
            ("fwdbwd", "tflops", "fwd+bwd: TFLOP/s")]
    if models:
        fig, axes = plt.subplots(len(models), len(cols), figsize=(4.2 * len(cols), 3.0 * len(models) + 0.8),
                                 squeeze=False)
        for i, m in enumerate(models):
            for j, (case, metric, title) in enumerate(cols):
                _panel(axes[i][j], rows, case, m, metric, ceil, f"{m} — {title}")
        fig.suptitle(f"h3moe vs baselines — {who}", fontsize=10)
        _legend(fig, axes.flat)
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
        path = json_path.with_suffix(".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if combined_only:
        return written

    # One chart per model: every case it has, time / TFLOP/s / GB/s.
    for m in models:
        cases = [c for c in CASE_ORDER if any(r["case"] == c and r["model"] == m for r in rows)]
        fig, axes = plt.subplots(len(cases), 3, figsize=(13, 2.9 * len(cases) + 0.8), squeeze=False)
        for i, case in enumerate(cases):
            for j, metric in enumerate(("ms", "tflops", "gbps")):
                _panel(axes[i][j], rows, case, m, metric, ceil, f"{_CASE_TITLE.get(case, case)}: {metric}")
        fig.suptitle(f"{m} — {who}", fontsize=10)
        _legend(fig, axes.flat)
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
        path = json_path.with_name(f"{json_path.stem}-{m}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
