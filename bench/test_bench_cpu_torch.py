"""The torch backend's CPU speed against transformers' eager loop and grouped_mm (issue 2, item 5), fp32.

    pytest bench/test_bench_cpu_torch.py --benchmark-only

Slow (hundreds of MB of fp32 weights, tens of seconds): not part of CI. pytest-benchmark groups the rows per
shape and token count (its table shows each row relative to the fastest); the terminal summary at the end
prints h3moe:torch's ratio to each baseline.
"""
from __future__ import annotations

import pytest
import torch

from bench.cases import Case, Model

SHAPES = [
    Model("mixtral-cpu", 1024, 3584, 8, 2, 1, "Mixtral-shaped, scaled down (H=1024, I=3584, E=8, K=2)"),  # few big experts
    Model("many-cpu", 512, 256, 64, 8, 1, "many experts (H=512, I=256, E=64, K=8)"),  # many small experts, K=8
]
CASES = [
    (SHAPES[0], 16),  # decode-like: 32 rows over 8 experts
    (SHAPES[0], 512),  # prefill: 1024 rows, ~128 per expert
    (SHAPES[1], 16),  # 128 rows over 64 experts: most experts get 1-3 rows
    (SHAPES[1], 256),  # 2048 rows, ~32 per expert
]
IMPLS = ["h3moe:torch", "hf:eager", "hf:grouped_mm"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU comparison (GPU: test_bench_kernels.py)")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,T", CASES, ids=[f"{m.name}-T{t}" for m, t in CASES])
def test_cpu_torch_backend(benchmark, bench_impl, model, T, impl):
    err = bench_impl(benchmark, Case("fwd", model, T, torch.float32), impl, rounds=5, warmup_rounds=1)
    assert err < 1e-4  # fp32 against the fp32 reference
