"""Test tiers: CPU (default), interpreter (Triton kernels under TRITON_INTERPRET=1 on CPU), compile
(ahead-of-time Triton compiles for sm_80/sm_90, no GPU), gpu (marker `gpu`, skipped without CUDA).

Without a GPU, Triton can only run its interpreter, so TRITON_INTERPRET=1 is set here, before anything
imports triton. The compile tier runs its compiles in a subprocess without it.
"""
import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs per test (a different stream for each test), reproducible from the test id.
    torch.manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    yield
