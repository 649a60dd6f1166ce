"""Timing, in the manner of triton.testing.do_bench, and the device ceilings measured in the same run.

GPU: one CUDA event pair per repetition (no host timing), run count picked from a first estimate so that
warmup and repetitions each take about the asked time, quantiles [0.5, 0.2, 0.8] of the per-rep times.
CPU: the same with time.perf_counter.
The callable takes the repetition index, so the caller can rotate among input sets (inputs that fit in L2
would otherwise be served from cache on every repetition but the first).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Timing", "do_bench", "measure_ceilings", "sync"]


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    p20: float
    p80: float
    reps: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def do_bench(
    fn: Callable[[int], object],
    device: torch.device,
    *,
    warmup_ms: float = 10.0,
    rep_ms: float = 50.0,
    min_reps: int = 5,
    max_reps: int = 200,
    flush_l2: bool = False,
) -> Timing:
    """Median and p20/p80 milliseconds of fn(i), i = 0, 1, 2, ... (already called once by the caller for
    its output and any compilation). flush_l2 (GPU): zero a 256 MB buffer before each repetition, outside
    its events, as triton.testing.do_bench does, for inputs too small for rotation to push out of L2."""
    i = 0
    if device.type == "cuda":
        cache = torch.empty(64 * 2**20, dtype=torch.int32, device=device) if flush_l2 else None
        sync(device)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(3):
            fn(i)
            i += 1
        e.record()
        sync(device)
        est = max(s.elapsed_time(e) / 3, 1e-3)
        for _ in range(max(1, int(warmup_ms / est))):
            fn(i)
            i += 1
        n = min(max_reps, max(min_reps, int(rep_ms / est)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for k in range(n):
            if cache is not None:
                cache.zero_()
            starts[k].record()
            fn(i)
            ends[k].record()
            i += 1
        sync(device)
        times = [a.elapsed_time(b) for a, b in zip(starts, ends)]
    else:
        t0 = time.perf_counter()
        fn(i)
        i += 1
        est = max((time.perf_counter() - t0) * 1e3, 1e-3)
        for _ in range(max(1, int(warmup_ms / est))):
            fn(i)
            i += 1
        n = min(max_reps, max(min_reps, int(rep_ms / est)))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
            i += 1
    med, p20, p80 = _quantiles(times)
    return Timing(med, p20, p80, len(times))


def measure_ceilings(device: torch.device, *, quick: bool = False) -> dict:
    """This device's ceilings, measured now: copy_GBps, a large device-to-device copy counting bytes read
    plus bytes written (1 GiB each way on GPU, 64 MiB on CPU); bf16_tflops, a large bf16 matmul
    (8192³ on GPU, 512³ on CPU). Also fp32_tflops on CPU (the smoke runs in fp32)."""
    out = {}
    if device.type == "cuda":
        n_copy, n_mm = (2**30 if not quick else 2**29), 8192
    else:
        n_copy, n_mm = 2**26, 512
    src = torch.empty(n_copy // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = do_bench(lambda i: dst.copy_(src), device, warmup_ms=20, rep_ms=100 if device.type == "cuda" else 50)
    out["copy_GBps"] = 2 * n_copy / (t.ms * 1e-3) / 1e9
    del src, dst
    dtypes = [("bf16_tflops", torch.bfloat16)] + ([("fp32_tflops", torch.float32)] if device.type != "cuda" else [])
    for key, dt in dtypes:
        a = torch.randn(n_mm, n_mm, device=device).to(dt)
        b = torch.randn(n_mm, n_mm, device=device).to(dt)
        a @ b
        t = do_bench(lambda i: a @ b, device, warmup_ms=50 if device.type == "cuda" else 5,
                     rep_ms=150 if device.type == "cuda" else 30)
        out[key] = 2.0 * n_mm**3 / (t.ms * 1e-3) / 1e12
        del a, b
    out["copy_bytes"] = 2 * n_copy
    out["matmul_n"] = n_mm
    return out
