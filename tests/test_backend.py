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


def _triton_interp_param():
    import importlib.util

    return pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                           reason="no triton"))


@pytest.mark.parametrize("backend", ["torch", _triton_interp_param()])
@pytest.mark.parametrize("compiled", [False, True])
def test_moe_under_autocast(monkeypatch, backend, compiled):
    """torch.autocast(bf16) over fp32 activations and expert weights (a model loaded in fp32, trained with
    mixed precision): the experts run in bf16, as autocast runs transformers' eager experts (F.linear), so the
    output is bf16 and equals the call with the inputs cast by hand; the fp32 leaves get fp32 gradients, equal
    to that call's. Also under torch.compile(fullgraph=True). Without autocast nothing is cast."""
    if backend == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    T, H, I, E, K = 6, 32, 16, 4, 2
    x = torch.randn(T, H, device=dev)
    wgu, wd = torch.randn(E, 2 * I, H, device=dev) * 0.2, torch.randn(E, H, I, device=dev) * 0.2
    r = h3moe.route(torch.randn(T, E, device=dev), K, backend="torch")

    def run(cast: bool):
        leaves = [t.detach().clone().requires_grad_() for t in (x, wgu, wd)]

        def f(a, b, c):
            if cast:
                return h3moe.moe(a.bfloat16(), b.bfloat16(), c.bfloat16(), r, backend=backend)
            with torch.autocast(dev, dtype=torch.bfloat16):
                return h3moe.moe(a, b, c, r, backend=backend)

        if compiled and not cast:
            torch._dynamo.reset()
            f = torch.compile(f, fullgraph=True, backend="aot_eager")
        y = f(*leaves)
        y.float().square().sum().backward()
        return y, [t.grad for t in leaves]

    y, grads = run(False)
    want, want_grads = run(True)
    torch._dynamo.reset()
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    assert torch.equal(y, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    assert h3moe.moe(x, wgu, wd, r, backend="torch").dtype == torch.float32  # no autocast: no cast


def test_autocast_casts_as_autocast_does():
    """autocast_inputs casts as autocast casts F.linear's operands: every floating tensor but fp64 to the
    region's dtype (fp16 under a bf16 region too); ints and fp64 stay; nothing outside a region."""
    from h3moe._amp import autocast_inputs

    ts = (torch.randn(2, 3), torch.randn(2, 3).half(), torch.randn(2, 3).double(), torch.arange(3),
          torch.randn(2).bfloat16())
    assert autocast_inputs(*ts) == ts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = autocast_inputs(*ts)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float64, torch.int64, torch.bfloat16]
    assert got[2] is ts[2] and got[3] is ts[3] and got[4] is ts[4] and torch.equal(got[1], ts[1].bfloat16())
    with torch.autocast("cpu", dtype=torch.float16):
        assert [t.dtype for t in autocast_inputs(*ts)][:2] == [torch.float16, torch.float16]


def test_quant_moe_under_autocast():
    """quant_moe under torch.autocast(bf16) takes fp32 activations in bf16 (the packed weights stay as they
    are): equal to the call with x cast by hand."""
    from h3moe.integrations.bitsandbytes import quantize_weight

    E, H, I, K, T = 4, 64, 32, 2, 5
    gu = quantize_weight(torch.randn(E, 2 * I, H) * 0.1, "nf4", 32).packed
    dn = quantize_weight(torch.randn(E, H, I) * 0.1, "nf4", 32).packed
    x, r = torch.randn(T, H), h3moe.route(torch.randn(T, E), K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = h3moe.quant_moe(x, gu, dn, r, backend="torch")
    assert y.dtype == torch.bfloat16 and torch.equal(y, h3moe.quant_moe(x.bfloat16(), gu, dn, r, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", _triton_interp_param()])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_moe_under_activation_checkpointing(monkeypatch, backend, recompute, reentrant):
    """h3moe.MoE inside torch.utils.checkpoint (transformers' gradient_checkpointing_enable; non-reentrant is
    torch's default): the same gradients as without it. Non-reentrant checkpointing recomputes on the first
    read of ctx.saved_tensors and raises on a second one (the Triton backward read them twice)."""
    from torch.utils.checkpoint import checkpoint

    if backend == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    m = h3moe.MoE(32, 16, 4, 2, backend=backend, recompute=recompute, device=dev)
    x = torch.randn(2, 5, 32, device=dev, requires_grad=True)
    params = [x, *m.parameters()]

    def grads(fn):
        for p in params:
            p.grad = None
        fn(x).square().sum().backward()
        return [p.grad.clone() for p in params]

    want = grads(m)
    got = grads(lambda inp: checkpoint(m, inp, use_reentrant=reentrant))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_device_guard(monkeypatch):
    """device_guard: the tensor's GPU made current only where it is not already (a layer on cuda:1 under
    transformers' device_map="auto"); a no-op for CPU tensors and for the current GPU."""
    import contextlib
    import types

    from h3moe import _backend

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on = lambda i: types.SimpleNamespace(device=torch.device("cuda", i))  # noqa: E731
    g = _backend.device_guard(on(1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    assert isinstance(_backend.device_guard(on(0)), contextlib.nullcontext)
    assert isinstance(_backend.device_guard(torch.zeros(1)), contextlib.nullcontext)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="no triton")
def test_triton_entry_points_enter_the_device_guard(monkeypatch):
    """Every Triton op's eager entry point runs inside device_guard(its input): route, sort_by_expert,
    route_with_gating, moe, quant_moe and the gating loss (interpreter on CPU: the guard is recorded)."""
    import contextlib

    from h3moe import _backend
    from h3moe.integrations.bitsandbytes import quantize_weight
    from h3moe.ops import triton_routing

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    seen = []
    monkeypatch.setattr(_backend, "device_guard", lambda t: seen.append(t) or contextlib.nullcontext())
    T, H, I, E, K = 4, 32, 32, 4, 2
    x, logits = torch.randn(T, H, device=dev), torch.randn(T, E, device=dev)

    def entered(fn, t):
        seen.clear()
        fn()
        assert any(s.data_ptr() == t.data_ptr() for s in seen), fn.__code__.co_firstlineno  # (a view of t counts)

    r = h3moe.route(logits, K, backend="triton")
    entered(lambda: h3moe.route(logits, K, backend="triton"), logits)
    entered(lambda: triton_routing.sort_by_expert(r.ids, E), r.ids)
    entered(lambda: h3moe.route_with_gating(logits, K, 2, backend="triton"), logits)
    wgu, wd = torch.randn(E, 2 * I, H, device=dev) * 0.1, torch.randn(E, H, I, device=dev) * 0.1
    entered(lambda: h3moe.moe(x, wgu, wd, r, backend="triton"), x)
    gu, dn = quantize_weight(wgu, "nf4", 32).packed, quantize_weight(wd, "nf4", 32).packed
    entered(lambda: h3moe.quant_moe(x, gu, dn, r, backend="triton"), x)
    layers = [logits.clone(), logits.clone()]
    entered(lambda: h3moe.gating_loss(layers, torch.tensor([0, 1], device=dev), backend="triton"), layers[0])


def test_swiglu_limit_leaves_cuda_for_triton(monkeypatch):
    """The cuda experts kernels have no clamped SwiGLU, no ungated experts, no relu2: h3moe.moe on the cuda
    backend (asked for or chosen) runs the Triton kernels with them instead."""
    from h3moe.ops import experts as ops_experts

    pytest.importorskip("triton")
    from h3moe.ops import triton_experts

    seen = []
    monkeypatch.setattr(_backend, "resolve", lambda b, dev, op: "cuda")
    monkeypatch.setattr(_backend, "runs", lambda name, op, dev: name == "triton")
    monkeypatch.setattr(ops_experts, "as_routing", lambda r, E, be: h3moe.route(torch.randn(3, E), 2))
    monkeypatch.setattr(triton_experts, "moe", lambda *a: seen.append(a[-1]) or a[0])
    x, wgu, wd = torch.randn(3, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4)
    for backend in ("cuda", "auto"):
        h3moe.moe(x, wgu, wd, None, backend=backend, swiglu_limit=2.5)
    assert seen == [2.5, 2.5]
    # nor ungated experts, nor relu2
    monkeypatch.setattr(triton_experts, "moe", lambda *a: seen.append((a[1].shape[1], a[4])) or a[0])
    h3moe.moe(x, wgu[:, :4], wd, None, backend="cuda", gated=False, activation="relu2")
    h3moe.moe(x, wgu, wd, None, backend="cuda", activation="relu2")
    h3moe.moe(x, wgu[:, :4], wd, None, backend="cuda", gated=False)  # ungated silu: by its shape alone
    assert seen[2:] == [(4, "relu2"), (8, "relu2"), (4, "silu")]
