"""Backend discovery and selection."""
import pytest
import torch

import h3moe
from h3moe import _backend


def test_backends_report_why():
    b = h3moe.backends()
    assert set(b) == {"torch", "triton", "cuda"}
    assert b["torch"].available
    for s in b.values():
        assert s.reason  # every status says what it runs on or why not
    if not torch.cuda.is_available():
        assert not b["cuda"].available and ("GPU" in b["cuda"].reason or "built" in b["cuda"].reason
                                            or "H3MOE_CUDA" in b["cuda"].reason)


def test_auto_on_cpu_is_torch():
    assert _backend.resolve("auto", torch.device("cpu"), "moe") == "torch"


def test_explicit_unavailable_backend_raises_with_reason():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(h3moe.BackendUnavailable, match="cuda"):
        h3moe.route(torch.randn(4, 3), 2, backend="cuda")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        h3moe.route(torch.randn(4, 3), 2, backend="numpy")


def test_env_override(monkeypatch):
    monkeypatch.setenv("H3MOE_BACKEND", "torch")
    assert _backend.resolve("auto", torch.device("cpu"), "route") == "torch"
    monkeypatch.setenv("H3MOE_BACKEND", "bogus")
    with pytest.raises(ValueError):
        _backend.resolve("auto", torch.device("cpu"), "route")


def test_eager_direct_only_for_plain_eager_inference():
    """The dispatcher bypass (inference calls run an op's implementation directly) applies to plain eager
    tensors with no gradient to record, and never under compile, fake tensors, meta tensors or functorch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 4)
    w = torch.nn.Parameter(torch.randn(4, 4))
    assert _backend.eager_direct(x, None)
    assert not _backend.eager_direct(x, w)  # w requires grad and grad mode is on
    with torch.no_grad():
        assert _backend.eager_direct(x, w)
    with torch.inference_mode():
        assert _backend.eager_direct(torch.randn(2, 2))
    assert not _backend.eager_direct(torch.empty(2, device="meta"))
    with FakeTensorMode():
        assert not _backend.eager_direct(torch.empty(2))
    seen = []
    torch.func.vmap(lambda t: seen.append(_backend.eager_direct(t)) or t)(x)
    assert seen == [False]

    def f(t):
        seen.append(_backend.eager_direct(t))
        return t + 1

    torch._dynamo.reset()
    torch.compile(f, backend="eager", fullgraph=True)(x)
    assert seen[-1] is False
