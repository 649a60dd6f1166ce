"""pytest-benchmark plumbing for the suites under bench/ (pytest bench/ --benchmark-only).

`bench_impl(benchmark, case, impl)` times one implementation of one bench.cases.Case through
pytest-benchmark (synchronizing the GPU after each round, rotating input sets), records its rel_err against
the fp32 reference in extra_info, and notes its median for the summary of speed ratios printed at the end
(h3moe's rows against transformers' eager and grouped_mm in the same group).
"""
from __future__ import annotations

import itertools

import pytest
import torch

_MEDIANS: dict[str, dict[str, float]] = {}


@pytest.fixture
def bench_impl():
    from bench import cases as C
    from bench.driver import flatten
    from bench.impls import implementations
    from bench.timing import sync

    def run(benchmark, case, impl_name: str, *, rounds: int = 10, warmup_rounds: int = 2):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        impls, skipped = implementations(case, device)
        impl = next((i for i in impls if i.name == impl_name), None)
        if impl is None:
            pytest.skip(dict(skipped).get(impl_name, f"{impl_name} does not run {case.case} here"))
        weights = None
        if case.case not in ("route", "gating"):
            weights = C.make_weights(case.model, case.dtype, device, seed=7)
        sets = C.input_sets(case, device, weights)
        states = [impl.prepare(s) for s in sets]
        outs = flatten(case.case, impl.run(states[0]))
        refs = C.reference_outputs(case, sets[0], impl.dequantized(sets[0]) if impl.dequantized else None)
        err, _ = C.compare(outs, refs)
        del outs, refs
        group = f"{case.case} {case.model.name} T={case.T} {C.dtype_name(case.dtype)}"
        benchmark.group = group
        benchmark.extra_info.update(rel_err=err, impl=impl_name, case=case.case, model=case.model.name,
                                    tokens=case.T, flops=C.flops(case))
        counter = itertools.count()
        n = len(states)

        def step():
            impl.run(states[next(counter) % n])
            sync(device)

        benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            _MEDIANS.setdefault(group, {})[impl_name] = stats.stats.median
        return err

    return run


def pytest_terminal_summary(terminalreporter):
    if not _MEDIANS:
        return
    tr = terminalreporter
    tr.section("h3moe speed ratios (median time of the baseline / median time of h3moe; > 1: h3moe faster)")
    for group, med in _MEDIANS.items():
        ours = {k: v for k, v in med.items() if k.startswith("h3moe:")}
        for name, t in ours.items():
            parts = [f"{base} {med[base] / t:.2f}×" for base in ("hf:eager", "hf:grouped_mm",
                                                                                   "hf:batched_mm", "torch:grouped_mm")
                     if base in med]
            tr.write_line(f"{group:34s} {name:14s} vs " + ", ".join(parts))
