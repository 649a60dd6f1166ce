"""Time the cuda backend against triton and torch: moe forward (inference) over decode and prefill token
counts, and routing. Prints a table and writes JSON (argv[1], default $OUT/cuda_bench.json or
./cuda_bench.json). Routing is computed once outside the moe timing. Weights are bf16.

    python scripts/cuda_decode_bench.py [out.json]

The decode regime (T <= 64) is what the cuda experts kernel is built for (weight streaming, split-K);
the GB/s column is the weight bytes of the experts actually hit divided by the time.
"""
import json
import math
import os
import sys

import torch

import h3moe
from h3moe import _backend

SHAPES = {  # name: (H, I, E, K)
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen-moe-a2.7b": (2048, 1408, 60, 4),
    "small": (1024, 512, 8, 2),
}
TOKENS = (1, 4, 16, 64, 512, 4096)


def bench(fn, reps=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2] * 1e3  # median, microseconds


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "cuda_bench.json")
    dev = torch.device("cuda")
    print(h3moe.backends())
    backends = [b for b in ("cuda", "triton", "torch") if _backend._can_run(b, "moe", dev)[0]]
    rows = []
    for name, (H, I, E, K) in SHAPES.items():
        torch.manual_seed(0)
        wgu = (torch.randn(E, 2 * I, H, device=dev) / math.sqrt(H)).bfloat16()
        wd = (torch.randn(E, H, I, device=dev) / math.sqrt(I)).bfloat16()
        for T in TOKENS:
            x = torch.randn(T, H, device=dev).bfloat16()
            logits = torch.randn(T, E, device=dev)
            r = h3moe.route(logits, K, backend="torch")
            hit = int((r.counts > 0).sum())
            wbytes = hit * 3 * I * H * 2
            row = {"shape": name, "T": T, "H": H, "I": I, "E": E, "K": K}
            ys = {}
            with torch.no_grad():
                for be in backends:
                    try:
                        ys[be] = h3moe.moe(x, wgu, wd, r, backend=be)
                        us = bench(lambda: h3moe.moe(x, wgu, wd, r, backend=be))
                        row[f"moe_{be}_us"] = round(us, 1)
                        row[f"moe_{be}_GBs"] = round(wbytes / us / 1e3, 1)
                    except Exception as e:  # noqa: BLE001  (record, keep going)
                        row[f"moe_{be}_us"] = f"error: {type(e).__name__}: {str(e)[:120]}"
                for be in ("cuda", "triton", "torch"):
                    if _backend._can_run(be, "route", dev)[0]:
                        row[f"route_{be}_us"] = round(bench(lambda: h3moe.route(logits, K, backend=be)), 1)
            if "cuda" in ys and "torch" in ys:
                row["cuda_vs_torch_maxdiff"] = float((ys["cuda"].float() - ys["torch"].float()).abs().max())
            rows.append(row)
            print(row, flush=True)
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"{'shape':>16} {'T':>5} " + " ".join(f"{b:>14}" for b in backends) + "   (moe fwd, us | GB/s)")
    for row in rows:
        cells = []
        for b in backends:
            us, gbs = row.get(f"moe_{b}_us"), row.get(f"moe_{b}_GBs", "")
            cells.append(f"{us:>7} |{gbs:>5}" if isinstance(us, float) else f"{'err':>14}")
        print(f"{row['shape']:>16} {row['T']:>5} " + " ".join(cells))


if __name__ == "__main__":
    main()
