"""pytest-benchmark suite of every case: h3moe's backends and the baselines, grouped per case and shape.

    pytest bench/test_bench_kernels.py --benchmark-only [--benchmark-json out.json]

On a GPU: real model shapes in bf16 (a selection; the driver, python -m bench, covers the whole grid).
Without one: the tiny CPU shapes in fp32. Implementations that cannot run here are skipped with the reason.
rel_err against the fp32 reference is in each row's extra_info, and checked against a loose bound.
"""
from __future__ import annotations

import pytest
import torch

from bench.cases import MODELS, TINY_MODELS, Case
from bench.impls import CANDIDATES

GPU = torch.cuda.is_available()
DTYPE = torch.bfloat16 if GPU else torch.float32

if GPU:
    GRID = [
        ("fwd", "mixtral", 16),  # decode: weight-bandwidth bound, 2 of 8 experts per token
        ("fwd", "mixtral", 4096),  # prefill: compute bound, ~1024 rows per expert
        ("fwd", "qwen3", 16),  # decode over many small experts: ~100 of 128 touched
        ("fwd", "qwen3", 4096),  # many experts, ~256 rows each
        ("fwd", "h3fusion", 4096),  # the H³Fusion model: 3 experts
        ("fwdbwd", "mixtral", 4096),  # training step of the experts
        ("fwdbwd", "olmoe", 4096),
        ("layer", "mixtral", 4096),
        ("route", "qwen3", 16384),
        ("gating", "h3fusion", 16384),
        ("nf4", "mixtral", 1),
        ("int8", "mixtral", 1),
    ]
    MODELSET = MODELS
else:
    GRID = [(c, m, 16) for c in ("route", "fwd", "fwdbwd", "layer", "gating", "nf4", "int8") for m in TINY_MODELS]
    MODELSET = TINY_MODELS

#: rel_err bound: a loose sanity bound (bf16 rounding of the output is ~4e-3); the GPU test tier is stricter.
MAX_ERR = 5e-2 if GPU else 1e-3


PARAMS = [(c, m, t, i) for c, m, t in GRID for i in CANDIDATES[c]]


@pytest.mark.parametrize("case,model,T,impl", PARAMS, ids=[f"{c}-{m}-T{t}-{i}" for c, m, t, i in PARAMS])
def test_kernel(benchmark, bench_impl, case, model, T, impl):
    c = Case(case, MODELSET[model], T, DTYPE)
    err = bench_impl(benchmark, c, impl, rounds=20 if GPU else 5, warmup_rounds=3 if GPU else 1)
    if case == "layer" and GPU:
        return  # bf16 router logits may pick other experts than the fp32 reference: no bound
    assert err < MAX_ERR
