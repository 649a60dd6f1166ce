"""The slot combine (h3moe/ops/combine.py, h3moe/kernels/combine.py): y (T, H) = the sum of each token's R*K
rows of buf (R, T*K, H), in y's dtype. Interpreter tier (CPU) on tiny shapes; the GPU tier runs it inside the
experts and quantized experts tests."""
from __future__ import annotations

import pytest
import torch

from h3moe import _backend

triton = pytest.importorskip("triton")

from h3moe.ops import combine as oc  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (HAS_CUDA or _backend.interpreter_enabled()),
                                reason="needs a GPU or TRITON_INTERPRET=1")


def _ref(buf, T, K):
    R, _, H = buf.shape
    return buf.double().sum(dim=0).view(T, K, H).sum(dim=1)


class _PoisonTorch:
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))


@pytest.mark.interpreter
@pytest.mark.parametrize("R,T,K,H,buf_dt,y_dt", [
    (1, 5, 2, 40, torch.float32, torch.float16),  # H < BLOCK_H: masked columns
    (1, 3, 8, 1100, torch.float32, torch.float32),  # two column blocks, the second partial
    (4, 2, 2, 64, torch.float32, torch.bfloat16),  # split-K partials of the quantized decode
    (1, 4, 1, 16, torch.float16, torch.float16),  # K = 1
    (1, 3, 4, 32, torch.bfloat16, torch.bfloat16),  # 16-bit buffer, fp32 sum
])
def test_combine_equals_sum(R, T, K, H, buf_dt, y_dt, monkeypatch):
    monkeypatch.setattr(oc, "torch", _PoisonTorch())  # y starts as NaN: every element must be written
    buf = torch.randn(R, T * K, H, device=DEV).to(buf_dt)
    y = oc.combine(buf if R > 1 else buf[0], T, K, y_dt)
    assert y.shape == (T, H) and y.dtype == y_dt
    ref = _ref(buf, T, K)
    # fp32 sum of R*K terms, then one rounding to y's dtype
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[y_dt]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    assert torch.equal(oc.combine(buf if R > 1 else buf[0], T, K, y_dt), y)  # deterministic


@pytest.mark.interpreter
def test_combine_edges():
    assert oc.combine(torch.randn(0, 8, device=DEV), 0, 2, torch.float32).shape == (0, 8)
    # more rows per token than the kernel unrolls: torch sums, same result
    R, T, K, H = 2, 3, 20, 8
    buf = torch.randn(R, T * K, H, device=DEV)
    torch.testing.assert_close(oc.combine(buf, T, K, torch.float32).double(), _ref(buf, T, K), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="T\\*K"):
        oc.combine(torch.randn(7, 8, device=DEV), 3, 2, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("R,T,K,H,y_dt", [(1, 4096, 8, 2048, torch.bfloat16), (4, 1, 2, 4096, torch.bfloat16),
                                          (1, 70000, 2, 64, torch.float16)])  # T > 65535: the 1-D grid
def test_gpu_combine(R, T, K, H, y_dt):
    buf = torch.randn(R, T * K, H, device="cuda")
    y = oc.combine(buf, T, K, y_dt)
    ref = buf.sum(dim=0).view(T, K, H).sum(dim=1)
    torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=8e-3)
