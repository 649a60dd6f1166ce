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
