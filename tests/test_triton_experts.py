"""Triton grouped SwiGLU experts (h3moe/ops/triton_experts.py, h3moe/kernels/experts.py).

Interpreter tier (CPU, TRITON_INTERPRET=1 from conftest): tiny shapes, fp32/fp16 (+ one bf16 case with the
interpreter upcast), forward and every gradient (x, w_gate_up, w_down, router logits through the routing
weights) against reference.experts_ref, opcheck of both custom ops, the decode tiles, T=0, the atomic
combine, the config files. GPU tier (marker gpu): realistic shapes in bf16/fp16/fp32, poisoned outputs,
torch.compile(fullgraph=True), CUDA graph capture.

Tolerance (flash-attention style): |triton - ref| <= 2 * |eager - ref| + atol, where ref is float64 and eager
is the reference run in the test dtype.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import h3moe
from h3moe import _backend
from h3moe.ops.routing import Routing, sort_by_expert
from h3moe.reference import experts_ref

triton = pytest.importorskip("triton")

from h3moe.ops import triton_experts as te  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
RUNS_HERE = HAS_CUDA or _backend.interpreter_enabled()
needs_triton = pytest.mark.skipif(not RUNS_HERE, reason="needs a GPU or TRITON_INTERPRET=1")
DEV = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _pinned_configs(monkeypatch):
    """Default configs (no autotuning compiles) unless a test asks for autotuning: keeps the GPU tier short."""
    monkeypatch.setenv("H3MOE_AUTOTUNE", "0")
    monkeypatch.delenv("H3MOE_ATOMIC_COMBINE", raising=False)
    monkeypatch.delenv("H3MOE_COMBINE", raising=False)


def _routing(logits: torch.Tensor, ids: torch.Tensor) -> Routing:
    """Routing whose weights are softmax(logits) at `ids`, renormalized: differentiable w.r.t. logits, with
    any expert assignment we want to test (empty experts, all tokens on one expert)."""
    p = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    w = torch.gather(p, 1, ids)
    w = w / w.sum(dim=-1, keepdim=True)
    counts, offsets, slots = sort_by_expert(ids, logits.shape[1])
    return Routing(w, ids, counts, offsets, slots)


def _ids(mode: str, T: int, E: int, K: int, logits: torch.Tensor) -> torch.Tensor:
    if mode == "topk":
        return torch.topk(logits, K, dim=-1).indices
    if mode == "skip_last":  # expert E-1 gets no token
        return torch.topk(logits[:, : E - 1], K, dim=-1).indices
    if mode == "one":  # every token on expert 1 (K == 1)
        return torch.ones(T, K, dtype=torch.long, device=logits.device)
    raise ValueError(mode)


def _inputs(T, H, I, E, dtype, device=DEV):
    x = torch.randn(T, H, device=device).to(dtype)
    wgu = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype)
    wd = (torch.randn(E, H, I, device=device) / I**0.5).to(dtype)
    logits = torch.randn(T, E, device=device)
    return x, wgu, wd, logits


def _run(fn, x, wgu, wd, logits, ids, act, dy, dtype):
    """fn's output and the gradients w.r.t. (x, w_gate_up, w_down, logits), all inputs cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, wgu, wd)]
    lg = logits.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    r = _routing(lg, ids)
    y = fn(*leaves, r, act)
    grads = torch.autograd.grad(y, (*leaves, lg), dy.to(y.dtype))
    return [y, *grads]


def _ref(x, wgu, wd, r, act):
    return experts_ref(x, wgu, wd, r.weights, r.ids, act)


def _assert_close(outs, eager, ref, atol, names=("y", "dx", "dw_gate_up", "dw_down", "dlogits")):
    for name, o, e, r in zip(names, outs, eager, ref):
        assert o.shape == r.shape, name
        assert torch.isfinite(o).all(), name
        o, e, r = o.double(), e.double(), r.double()
        scale = max(r.abs().max().item(), 1.0)  # inputs and gradients are O(1)
        err = (o - r).abs().max().item()
        bound = 2 * (e - r).abs().max().item() + atol * scale
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (eager {(e - r).abs().max().item():.3g})"


class _PoisonTorch:
    """torch, except that empty/empty_like return NaN-filled (floats) or -1-filled (ints) tensors: patched into
    h3moe.ops.triton_experts, every buffer its launchers allocate starts poisoned, so an element a kernel
    fails to write shows up as NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (T, H, I, E, K, dtype, activation, ids mode)
CASES = [
    (5, 24, 20, 7, 2, torch.float32, "silu", "topk"),  # T < BM, H and I not multiples of 16, prime E
    (9, 33, 20, 4, 1, torch.float16, "gelu", "topk"),  # K=1 (y written in place), odd H (masked K-loop)
    (6, 32, 16, 3, 3, torch.float32, "gelu_tanh", "topk"),  # K=E: every token on every expert
    (8, 32, 16, 5, 2, torch.float16, "relu", "skip_last"),  # an expert that gets no token
    (40, 24, 16, 4, 1, torch.float32, "silu", "one"),  # all tokens on one expert: 3 row tiles of BM=16
    (4, 32, 32, 4, 2, torch.bfloat16, "silu", "topk"),  # bf16: the interpreter upcasts tl.dot operands
    (70, 24, 80, 3, 2, torch.float16, "silu", "topk"),  # "small"/"large" tiles, GROUP_M=8 swizzle, 2 N tiles
    (3, 16, 16, 64, 8, torch.float32, "silu", "topk"),  # OLMoE-like decode: E=64 K=8, most experts empty
]


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("recompute", ["0", "1"], ids=["saved", "recompute"])
@pytest.mark.parametrize("T,H,I,E,K,dtype,act,mode", CASES)
def test_forward_and_grads(T, H, I, E, K, dtype, act, mode, recompute, monkeypatch):
    """Both backward forms: the gate/up pre-activation saved by the forward (default) or recomputed."""
    monkeypatch.setenv("H3MOE_RECOMPUTE", recompute)
    monkeypatch.setattr(te, "torch", _PoisonTorch())  # outputs and scratch buffers start as NaN
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    ids = _ids(mode, T, E, K, logits)
    dy = torch.randn(T, H, device=DEV)
    outs = _run(te.moe, x, wgu, wd, logits, ids, act, dy, dtype)
    ref = _run(_ref, x, wgu, wd, logits, ids, act, dy, torch.float64)
    eager = ref if dtype == torch.float32 and DEV == "cpu" else _run(_ref, x, wgu, wd, logits, ids, act, dy, dtype)
    assert outs[0].dtype == dtype
    if mode == "skip_last":  # the unused expert's weight gradients are exactly zero
        assert outs[2][E - 1].abs().max() == 0 and outs[3][E - 1].abs().max() == 0
    _assert_close(outs, eager, ref, ATOL[dtype])


# (T, H, I, E, K, mode): 16-bit rows of 16-byte multiples, as tensor descriptors need
TMA_CASES = [
    (6, 40, 24, 4, 2, "topk"),  # H % BK != 0: the descriptors zero-fill the K tail, the x gather is masked
    (70, 32, 80, 3, 2, "topk"),  # "small" tiles, 2 N tiles of I, an A tile ending inside its expert
    (8, 32, 16, 5, 2, "skip_last"),  # an empty expert: its descriptors load nothing, its dW is zeros
]


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("recompute", ["0", "1"], ids=["saved", "recompute"])
@pytest.mark.parametrize("T,H,I,E,K,mode", TMA_CASES)
def test_tma_descriptors_equal_pointer_loads(T, H, I, E, K, mode, recompute, monkeypatch):
    """H3MOE_TMA=1: every kernel reads its dense operands through per-expert tensor descriptors (zero past
    the expert's rows and the tensor's edges). The same tiles read the same values as the pointer loads, so
    the forward and every gradient equal H3MOE_TMA=0's to rounding, and stay within the reference's bound."""
    monkeypatch.setenv("H3MOE_RECOMPUTE", recompute)
    monkeypatch.setattr(te, "torch", _PoisonTorch())
    dtype = torch.float16
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    ids = _ids(mode, T, E, K, logits)
    dy = torch.randn(T, H, device=DEV)
    used = []
    real = te._use_tma
    monkeypatch.setattr(te, "_use_tma", lambda *a: used.append(real(*a)) or used[-1])
    outs = {}
    for mode_tma in ("0", "1"):
        monkeypatch.setenv("H3MOE_TMA", mode_tma)
        used.clear()
        outs[mode_tma] = _run(te.moe, x, wgu, wd, logits, ids, "silu", dy, dtype)
        # gate_up, down, the backward's act, d(x) and both weight gradients: all through descriptors or none
        assert used == [mode_tma == "1"] * 6, used
    for name, a, b in zip(("y", "dx", "dw_gate_up", "dw_down", "dlogits"), outs["0"], outs["1"]):
        # equal up to the order of the interpreter's sums (numpy reads a transposed tile in another order)
        assert (a.double() - b.double()).abs().max() <= 2**-10 * a.double().abs().max(), name
    ref = _run(_ref, x, wgu, wd, logits, ids, "silu", dy, torch.float64)
    eager = _run(_ref, x, wgu, wd, logits, ids, "silu", dy, dtype)
    _assert_close(outs["1"], eager, ref, ATOL[dtype])


@needs_triton
@pytest.mark.interpreter
def test_tma_only_where_it_can_run(monkeypatch):
    """Descriptors need 16-bit data, 16-byte aligned pointers and row strides; a config's TMA flag, or
    H3MOE_TMA=1, falls back to pointer loads elsewhere; H3MOE_TMA=0 turns every config's off."""
    from h3moe.kernels.experts import Config, Tma

    t = torch.randn(4, 64, device=DEV).half()
    plain, tma = Config(64, 64, 32), Tma(128, 128, 64, 8, 8, 3)
    assert tma.TMA and tma.hopper_only and not plain.TMA and "tma" in repr(tma)
    assert Config.from_dict(tma.as_dict()) == tma and "TMA" not in plain.as_dict()
    assert tma.with_tma(False)[:6] == tma[:6] and not tma.with_tma(False).TMA
    monkeypatch.setenv("H3MOE_TMA", "auto")
    assert te._use_tma(tma, (t,), (64,)) and not te._use_tma(plain, (t,), (64,))
    assert not te._use_tma(tma, (t,), (60,))  # 120-byte rows
    assert not te._use_tma(tma, (t.view(-1)[4:],), (64,))  # pointer 8 bytes off
    assert not te._use_tma(tma, (t.float(),), (64,))  # fp32: the candidates with TMA are 16-bit
    monkeypatch.setenv("H3MOE_TMA", "1")
    assert te._use_tma(plain, (t,), (64,))
    monkeypatch.setenv("H3MOE_TMA", "0")
    assert not te._use_tma(tma, (t,), (64,))
    monkeypatch.setenv("H3MOE_TMA", "yes")
    with pytest.raises(ValueError, match="H3MOE_TMA"):
        te._use_tma(tma, (t,), (64,))
    # the default (until a GPU run has checked them): the tuner leaves the Tma candidates out
    monkeypatch.delenv("H3MOE_TMA")
    assert te._tma_mode() == "0" and not te._use_tma(tma, (t,), (64,))
    large = te._candidates("wgrad_gu", 8192, 8, 2, False, 90)
    assert large and not any(c.TMA for c in large)
    monkeypatch.setenv("H3MOE_TMA", "auto")
    assert any(c.TMA for c in te._candidates("wgrad_gu", 8192, 8, 2, False, 90))
    assert not any(c.TMA for c in te._candidates("wgrad_gu", 8192, 8, 2, False, 80))  # Hopper only


@needs_triton
@pytest.mark.interpreter
def test_tma_smoke_child(monkeypatch, capsys):
    """tma_smoke()'s child (a GPU run's first look at the descriptor kernels, in a process of its own):
    forward and backward with and without descriptors agree -> "tma ok"; a difference exits with its name.
    Here on CPU tensors through the interpreter; tma_smoke() itself wants a GPU."""
    monkeypatch.delenv("H3MOE_TMA", raising=False)
    te._tma_smoke_child(shapes=((3, 32, 48, 3, 2),))
    assert capsys.readouterr().out.strip() == "tma ok"
    assert "H3MOE_TMA" not in os.environ  # restored
    real = te.moe
    monkeypatch.setattr(te, "moe", lambda *a, **kw: real(*a, **kw) * (1.5 if os.environ["H3MOE_TMA"] == "1" else 1))
    with pytest.raises(SystemExit, match="y differs"):
        te._tma_smoke_child(shapes=((3, 32, 48, 3, 2),))
    if not HAS_CUDA:
        assert te.tma_smoke() == "needs a CUDA GPU"


def test_tma_scratch_allocator():
    """Descriptors made on the device need Triton's scratch allocator: h3moe sets its torch one where none
    is set, in each thread (a ContextVar: autograd's backward thread starts without it), and leaves a
    user's own allocator in place."""
    import threading

    from triton.runtime import _allocation

    def user(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    seen = {}

    def body():
        seen["before"] = _allocation._allocator.get()
        seen["ok"] = te._ensure_allocator()
        seen["after"] = _allocation._allocator.get()
        triton.set_allocator(user)
        te._ensure_allocator()
        seen["user"] = _allocation._allocator.get()

    th = threading.Thread(target=body)
    th.start()
    th.join()
    assert isinstance(seen["before"], _allocation.NullAllocator)
    assert seen["ok"] and seen["after"] is te._scratch and seen["user"] is user


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("limited", [False, True], ids=["plain", "swiglu_limit"])
def test_saved_backward_epilogue_in_column_halves(monkeypatch, limited):
    """bwd_act_saved tiles from BN=128 run their epilogue in two column halves (the Hopper default
    128x128), in quarters with a swiglu_limit: forced here with a BN=128 config, on an I whose second tile has
    a partly and a wholly masked half, against the reference."""
    from h3moe.kernels.experts import Config

    real = te.config_for
    forced = Config(16, 128, 32, 1, 4, 2)
    monkeypatch.setattr(te, "config_for", lambda role, *a, **kw: forced if role == "bwd_act_saved" else real(role, *a, **kw))
    monkeypatch.setattr(te, "torch", _PoisonTorch())
    T, H, I, E, K = 9, 32, 160, 3, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    ids = torch.topk(logits, K, -1).indices
    dy = torch.randn(T, H, device=DEV)
    L = _limit_in_a_gap(x, wgu, ids, 0.4, 1.0) if limited else None
    outs = _run(lambda *a: te.moe(*a, swiglu_limit=L), x, wgu, wd, logits, ids, "silu", dy, torch.float32)
    ref = _run(lambda x, wgu, wd, r, act: experts_ref(x, wgu, wd, r.weights, r.ids, act, L), x, wgu, wd, logits,
               ids, "silu", dy, torch.float64)
    _assert_close(outs, ref, ref, ATOL[torch.float32])


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_routing_weights_without_grad(recompute, monkeypatch):
    """Routing weights that need no gradient (a frozen router): the backward skips the partial
    d(routing weight) (NEED_W=False: no (S, NB) buffer, no store); the other gradients are unchanged."""
    T, H, I, E, K = 7, 32, 24, 4, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    ids = torch.topk(logits, K, -1).indices
    dy = torch.randn(T, H, device=DEV)
    grads = {}
    for need_w in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, wgu, wd)]
        lg = logits.detach().clone().requires_grad_(need_w)
        y = te.moe(*leaves, _routing(lg, ids), "silu", recompute=recompute)
        grads[need_w] = torch.autograd.grad(y, leaves, dy)
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.interpreter
def test_precompile_forces_every_candidate():
    """precompile() (tune --precompile-jobs N) has child processes launch every candidate a tune would time,
    each forced on its role, so that the tuner finds them in Triton's cache: the work list holds each
    (role, config) of the regimes of the token counts once, and running it launches exactly those."""
    from h3moe.kernels import experts as k

    E, K, tokens = 4, 2, (1, 40)
    work = te._precompile_work(E, K, tokens)
    pairs = [(r, c) for r, c, _ in work]
    assert len(pairs) == len(set(pairs))
    for T in tokens:
        for role in te._TUNE_ROLES:
            assert set(k.candidate_configs(role, T * K, E, K)) <= {c for r, c in pairs if r == role}
    assert {r for r, _ in pairs} == set(te._TUNE_ROLES)
    assert [w for w in te._precompile_work(E, K, tokens, backward=False) if w[0] not in ("gate_up", "down")] == []
    orig = te.config_for
    launched = te._precompile_run(E, 32, 48, K, torch.float16, work)
    assert set(launched) == set(pairs)
    # a child process's side of it: its work as JSON (the configs' TMA flags included)
    spec = json.dumps({"E": E, "H": 32, "I": 48, "K": K, "dtype": "fp16", "backward": True,
                       "work": [(r, c.as_dict(), T) for r, c, T in work[:2]] + [("down", k.Tma(16, 64, 64).as_dict(), 1)]})
    calls = []
    real_run = te._precompile_run
    te._precompile_run = lambda *a: calls.append(a) or real_run(*a)
    try:
        te._precompile_child(spec)
    finally:
        te._precompile_run = real_run
    assert [(r, c, T) for r, c, T in calls[0][5]] == work[:2] + [("down", k.Tma(16, 64, 64), 1)]
    assert calls[0][5][-1][1].TMA and calls[0][4] == torch.float16
    assert os.environ.get("H3MOE_AUTOTUNE") == "0"  # the autouse fixture's value, restored
    assert te.config_for is orig


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_gradients_through_torch_grouped_mm(dtype, monkeypatch):
    """H3MOE_WGRAD_GMM=1: both weight gradients from torch's grouped matmul (a tuner candidate on sm_90,
    TORCH_GMM) instead of _wgrad_kernel: within the reference's bound, an expert with no row gets zeros;
    =0 never calls it."""
    monkeypatch.setattr(te, "torch", _PoisonTorch())
    T, H, I, E, K = 8, 32, 16, 5, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    ids = _ids("skip_last", T, E, K, logits)
    dy = torch.randn(T, H, device=DEV)
    calls = []
    real = te._wgrad_gmm
    monkeypatch.setattr(te, "_wgrad_gmm", lambda *a: calls.append(a[0].shape) or real(*a))
    outs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("H3MOE_WGRAD_GMM", mode)
        calls.clear()
        outs[mode] = _run(te.moe, x, wgu, wd, logits, ids, "silu", dy, dtype)
        assert calls == ([(T * K, 2 * I), (T * K, H)] if mode == "1" else [])
    assert outs["1"][2][E - 1].abs().max() == 0 and outs["1"][3][E - 1].abs().max() == 0
    for a, b in zip(outs["0"], outs["1"]):
        assert torch.equal(a, b) or (a.double() - b.double()).abs().max() <= 2**-7 * a.double().abs().max()
    ref = _run(_ref, x, wgu, wd, logits, ids, "silu", dy, torch.float64)
    eager = _run(_ref, x, wgu, wd, logits, ids, "silu", dy, dtype)
    _assert_close(outs["1"], eager, ref, ATOL[dtype] if dtype != torch.bfloat16 else 1e-2)


@needs_triton
@pytest.mark.interpreter
def test_torch_grouped_mm_candidate(tmp_path, monkeypatch):
    """TORCH_GMM joins the weight gradients' large-tile candidates on sm_90 in 16 bits (not on other GPUs,
    in fp32, in other regimes, or with H3MOE_WGRAD_GMM=0), and round-trips through a tuned file."""
    monkeypatch.delenv("H3MOE_WGRAD_GMM", raising=False)
    assert te._candidates("wgrad_gu", 8192, 8, 2, False, 90)[-1] == te.TORCH_GMM
    assert te._candidates("wgrad_down", 8192, 8, 2, False, 90)[-1] == te.TORCH_GMM
    for args in [("wgrad_gu", 8192, 8, 2, False, 80), ("wgrad_gu", 8192, 8, 2, True, 90),
                 ("wgrad_gu", 16, 8, 2, False, 90), ("dx", 8192, 8, 2, False, 90)]:
        assert te.TORCH_GMM not in te._candidates(*args), args
    assert te.TORCH_GMM not in [c for _, c, _ in te._precompile_work(8, 2, (4096,))]  # nothing to compile
    monkeypatch.setenv("H3MOE_WGRAD_GMM", "0")
    assert te.TORCH_GMM not in te._candidates("wgrad_gu", 8192, 8, 2, False, 90)
    monkeypatch.setenv("H3MOE_WGRAD_GMM", "2")
    with pytest.raises(ValueError, match="H3MOE_WGRAD_GMM"):
        te._candidates("wgrad_gu", 8192, 8, 2, False, 90)
    monkeypatch.setattr(te, "_TUNED", {("wgrad_gu", 8192, 4096, 14336, 8, 2, "bf16", "FAKE_GPU"): te.TORCH_GMM})
    monkeypatch.setattr(te, "_CONFIG_DIR", tmp_path)
    (path,) = te.save_tuned(tmp_path)
    assert json.loads(path.read_text())["wgrad_gu"]["K=2,S=8192"] == {"impl": "torch.grouped_mm"}
    assert te._from_json("wgrad_gu", ("wgrad_gu", 8192, 4096, 14336, 8, 2, "bf16", "FAKE_GPU")) is te.TORCH_GMM
    assert repr(te.TORCH_GMM) == "torch.grouped_mm" and not te.TORCH_GMM.TMA


def test_autotune_skips_a_failing_torch_gmm_and_takes_ties(monkeypatch):
    """The tuner over the weight gradients' candidates with TORCH_GMM among them: any error of torch's op is
    a skip (a Triton config's must be out of resources), and a tie of times picks the earlier candidate
    instead of comparing a Config with TORCH_GMM."""
    monkeypatch.setenv("H3MOE_AUTOTUNE", "1")
    monkeypatch.delenv("H3MOE_WGRAD_GMM", raising=False)
    monkeypatch.setattr(te, "_TUNED", {})
    monkeypatch.setattr(te, "_arch", lambda device: 90)
    monkeypatch.setattr(te, "_device_name", lambda device: "FAKE_GPU")
    monkeypatch.setattr(te, "_CONFIG_DIR", te._CONFIG_DIR / "no-such-dir")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cands = te._candidates("wgrad_gu", 8192, 8, 2, False, 90)
    assert cands[-1] == te.TORCH_GMM
    dev = torch.device("cuda")

    def failing(cfg):
        if cfg == te.TORCH_GMM:
            raise RuntimeError("Can't process more than 1024 groups")
        return 2.0 if cfg == cands[0] else 3.0

    assert te.config_for("wgrad_gu", 8192, 4096, 14336, 8, 2, torch.bfloat16, dev, failing) == cands[0]
    te._TUNED.clear()
    assert te.config_for("wgrad_gu", 8192, 4096, 14336, 8, 2, torch.bfloat16, dev, lambda cfg: 1.0) == cands[0]
    # where it cannot run as one kernel: not bf16 on the GPU, 1024 experts or more, fp32 anywhere
    left = torch.randn(64, 32, device=DEV).half()
    assert te._wgrad_gmm_runs(left, left, 8) == (DEV == "cpu")
    assert not te._wgrad_gmm_runs(left.bfloat16(), left.bfloat16(), 1024)
    assert not te._wgrad_gmm_runs(left.float(), left.float(), 8)


def _saved_shapes(fn):
    """Shapes of the tensors autograd saves while fn() runs its forward."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@needs_triton
@pytest.mark.interpreter
def test_saved_activation_vs_recompute(monkeypatch):
    """The default keeps h (S, 2I) for the backward; recompute=True keeps only the inputs; inference keeps
    nothing and allocates no h; the gradients of both forms agree (fp32: h is exact)."""
    T, H, I, E, K = 7, 32, 24, 4, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    ids = torch.topk(logits, K, -1).indices
    dy = torch.randn(T, H, device=DEV)
    grads = {}
    for recompute in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, wgu, wd)]
        lg = logits.detach().clone().requires_grad_()
        r = _routing(lg, ids)
        y, shapes = _saved_shapes(lambda: te.moe(*leaves, r, "silu", recompute=recompute))
        assert ((T * K, 2 * I) in shapes) != recompute, shapes
        grads[recompute] = torch.autograd.grad(y, (*leaves, lg), dy)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    calls = []
    real = te._fwd
    monkeypatch.setattr(te, "_fwd", lambda *a, **kw: calls.append(kw.get("save_h", False)) or real(*a, **kw))
    with torch.no_grad():
        te.moe(x.requires_grad_(), wgu, wd, _routing(logits, ids), "silu")
    assert calls == [False]
    # the public API and the module pass recompute through
    for recompute in (False, True):
        m = h3moe.MoE(H, I, E, K, backend="triton", recompute=recompute)
        calls.clear()
        _, shapes = _saved_shapes(lambda m=m: m(x.detach()))
        assert calls == [not recompute] and ((T * K, 2 * I) in shapes) != recompute
        calls.clear()
        h3moe.moe(x, m.gate_up_proj, m.down_proj, m.routing, backend="triton", recompute=recompute)
        assert calls == [not recompute]


@needs_triton
@pytest.mark.interpreter
def test_inference_skips_the_dispatcher(monkeypatch):
    """Eager inference runs the launcher directly (no custom-op dispatch), bit-identical to the op; with a
    gradient to record it takes the op."""
    T, H, I, E, K = 5, 32, 16, 4, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    r = _routing(logits, torch.topk(logits, K, -1).indices)
    op = torch.ops.h3moe.triton_experts_fwd(x, wgu, wd, r.weights, r.sorted_slots, r.offsets, "silu")
    calls = []
    real = te._fwd
    monkeypatch.setattr(te, "_fwd", lambda *a, **kw: calls.append("direct") or real(*a, **kw))
    with torch.no_grad():
        y = te.moe(x, wgu, wd, r, "silu")
    assert calls == ["direct"] and torch.equal(y, op)
    calls.clear()
    monkeypatch.setattr(te, "experts_fwd_saved", lambda *a: calls.append("op") or (real(*a[:7]), None))
    te.moe(x.requires_grad_(), wgu, wd, r, "silu")
    assert calls == ["op"]


@needs_triton
@pytest.mark.interpreter
def test_zero_tokens():
    x, wgu, wd, logits = _inputs(0, 16, 16, 3, torch.float32)
    x.requires_grad_()
    wgu.requires_grad_()
    r = _routing(logits.requires_grad_(), torch.zeros(0, 2, dtype=torch.long, device=DEV))
    y = te.moe(x, wgu, wd, r, "silu")
    assert y.shape == (0, 16)
    gx, gw = torch.autograd.grad(y.sum(), (x, wgu))
    assert gx.shape == (0, 16) and gw.shape == wgu.shape and gw.abs().max() == 0


@needs_triton
@pytest.mark.interpreter
def test_decode_tiles_and_public_api(monkeypatch):
    """Few rows per expert select BM=16 tiles (not 64); the result through h3moe.moe(backend='triton')."""
    from h3moe.kernels import experts as k

    T, H, I, E, K = 3, 32, 48, 8, 2
    assert k.default_config("gate_up", T * K, E, K).BM == 16
    assert k.default_config("down", T * K, E, K).BM == 16
    assert k.default_config("gate_up", 4096 * 2, 8, 2).BM == 128
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    r = h3moe.route(logits, K, backend="torch")
    y = h3moe.moe(x, wgu, wd, r, backend="triton")
    ref = experts_ref(x.double(), wgu.double(), wd.double(), r.weights.double(), r.ids)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.interpreter
def test_atomic_combine(monkeypatch):
    monkeypatch.setenv("H3MOE_ATOMIC_COMBINE", "1")
    T, H, I, E, K = 6, 16, 16, 3, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    r = _routing(logits, torch.topk(logits, K, -1).indices)
    y = te.moe(x, wgu, wd, r, "silu")
    ref = experts_ref(x.double(), wgu.double(), wd.double(), r.weights.double(), r.ids)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.interpreter
def test_lowp_combine(monkeypatch):
    """H3MOE_COMBINE=lowp: slot rows (forward) and d(x) rows (backward) in the activations' dtype, summed in
    fp32: within eager's own error of the float64 reference, deterministic; an unknown mode is refused."""
    monkeypatch.setenv("H3MOE_COMBINE", "lowp")
    monkeypatch.setattr(te, "torch", _PoisonTorch())
    T, H, I, E, K, dtype = 9, 32, 16, 4, 3, torch.float16
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    ids = torch.topk(logits, K, -1).indices
    dy = torch.randn(T, H, device=DEV)
    outs = _run(te.moe, x, wgu, wd, logits, ids, "silu", dy, dtype)
    ref = _run(_ref, x, wgu, wd, logits, ids, "silu", dy, torch.float64)
    eager = _run(_ref, x, wgu, wd, logits, ids, "silu", dy, dtype)
    _assert_close(outs, eager, ref, ATOL[dtype])
    again = _run(te.moe, x, wgu, wd, logits, ids, "silu", dy, dtype)
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    monkeypatch.setenv("H3MOE_COMBINE", "fp16")
    with pytest.raises(ValueError, match="H3MOE_COMBINE"):
        te.moe(x.to(dtype), wgu.to(dtype), wd.to(dtype), _routing(logits, ids), "silu")


@needs_triton
@pytest.mark.interpreter
def test_opcheck():
    T, H, I, E, K = 4, 16, 16, 3, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    r = _routing(logits, torch.topk(logits, K, -1).indices)
    args = (x.requires_grad_(), wgu.requires_grad_(), wd.requires_grad_(), r.weights.detach().requires_grad_(),
            r.sorted_slots, r.offsets, "silu")
    torch.library.opcheck(torch.ops.h3moe.triton_experts_fwd.default, args)
    torch.library.opcheck(torch.ops.h3moe.triton_experts_fwd_saved.default, args)
    _, h = te.experts_fwd_saved(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    assert h.shape == (T * K, 2 * I)
    dy = torch.randn(T, H, device=DEV)
    for saved in (None, h):
        bargs = (dy, x.detach(), wgu.detach(), wd.detach(), r.weights.detach(), r.sorted_slots, r.offsets,
                 "silu", True, True, False, True, saved)
        torch.library.opcheck(torch.ops.h3moe.triton_experts_bwd.default, bargs,
                              test_utils=("test_schema", "test_faketensor"))


@needs_triton
@pytest.mark.interpreter
def test_compile_fullgraph_aot_eager():
    """The op traces without a graph break and AOTAutograd derives its backward from the registered fake and
    autograd (aot_eager: no inductor C++ compile on CPU; the GPU tier compiles h3moe.MoE with inductor)."""
    from h3moe.ops.routing import sort_by_expert

    T, H, I, E, K = 6, 16, 16, 4, 2
    x, wgu, wd, _ = _inputs(T, H, I, E, torch.float32)
    router = torch.randn(E, H, device=DEV, requires_grad=True)
    params = (x.requires_grad_(), wgu.requires_grad_(), wd.requires_grad_(), router)

    def loss_fn(inp):
        w, ids = torch.topk(torch.softmax(inp @ router.t(), -1), K, -1)
        r = Routing(w, ids, *sort_by_expert(ids, E))
        return te.moe(inp, wgu, wd, r, "silu").square().sum()

    le = loss_fn(x)
    ge = torch.autograd.grad(le, params)
    torch._dynamo.reset()
    lc = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x)
    gc = torch.autograd.grad(lc, params)
    torch.testing.assert_close(lc, le)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_unsupported_dtype_raises():
    x = torch.randn(2, 8, dtype=torch.float64)
    wgu = torch.randn(2, 8, 8, dtype=torch.float64)
    wd = torch.randn(2, 8, 4, dtype=torch.float64)
    r = _routing(torch.randn(2, 2), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="fp16, bf16 and fp32"):
        te.moe(x, wgu, wd, r, "silu")
    with pytest.raises(ValueError, match="activation"):
        te.moe(x.float(), wgu.float(), wd.float(), r, "tanh")


def test_configs_json_roundtrip(tmp_path, monkeypatch):
    """A tuned JSON file is found by (E, H, I, dtype, device) and its nearest S-bucket entry is used;
    save_tuned writes what autotuning found; H3MOE_AUTOTUNE=0 pins the default."""
    from h3moe.kernels.experts import Config, default_config

    monkeypatch.setattr(te, "_CONFIG_DIR", tmp_path)
    te._load_json_at.cache_clear()
    name = te._json_name(8, 4096, 14336, "bf16", "FAKE_GPU")
    cfg = Config(64, 128, 32, 4, 4, 2)
    (tmp_path / name).write_text(json.dumps({"gate_up": {"K=2,S=8192": cfg.as_dict(),
                                                         "K=2,S=16": Config(16, 32, 64, 1, 4, 2).as_dict()}}))
    key = ("gate_up", te._s_bucket(6000), 4096, 14336, 8, 2, "bf16", "FAKE_GPU")
    assert te._from_json("gate_up", key) == cfg  # 6000 -> bucket 8192
    assert te._from_json("gate_up", key[:1] + (16,) + key[2:]).BM == 16
    assert te._from_json("down", key) is None  # role missing: falls back
    assert te._from_json("gate_up", key[:5] + (1,) + key[6:]) is None  # other K
    missing = ("gate_up", 8192, 4096, 14336, 7, 2, "bf16", "FAKE_GPU")
    assert te._from_json("gate_up", missing) is None  # no file for E=7
    # save_tuned merges into the file
    monkeypatch.setattr(te, "_TUNED", {("down", 8192, 4096, 14336, 8, 2, "bf16", "FAKE_GPU"): cfg})
    te.save_tuned(tmp_path)
    table = json.loads((tmp_path / name).read_text())
    assert set(table) == {"gate_up", "down"} and Config.from_dict(table["down"]["K=2,S=8192"]) == cfg
    te._load_json_at.cache_clear()
    monkeypatch.setenv("H3MOE_AUTOTUNE", "0")
    got = te.config_for("gate_up", 8192, 4096, 14336, 8, 2, torch.bfloat16, torch.device("cpu"))
    assert got == default_config("gate_up", 8192, 8, 2)


def test_tuned_files_apply_without_autotuning(tmp_path, monkeypatch):
    """H3MOE_AUTOTUNE=0 stops run-time benchmarking, not the committed tuned files; H3MOE_TUNED=0 ignores them."""
    from h3moe.kernels.experts import Config, default_config

    monkeypatch.setattr(te, "_CONFIG_DIR", tmp_path)
    monkeypatch.setattr(te, "_arch", lambda device: 90)
    monkeypatch.setattr(te, "_device_name", lambda device: "FAKE_GPU")
    te._load_json_at.cache_clear()
    cfg = Config(64, 128, 32, 4, 4, 2)
    (tmp_path / te._json_name(8, 4096, 14336, "bf16", "FAKE_GPU")).write_text(
        json.dumps({"down": {"K=2,S=8192": cfg.as_dict()}}))
    dev = torch.device("cuda")

    def bench(c):
        raise AssertionError("no benchmark with H3MOE_AUTOTUNE=0")

    args = ("down", 8192, 4096, 14336, 8, 2, torch.bfloat16, dev)
    monkeypatch.setenv("H3MOE_AUTOTUNE", "0")
    assert te.config_for(*args, bench) == cfg
    assert te.config_for("gate_up", *args[1:], bench) == default_config("gate_up", 8192, 8, 2)  # no entry
    monkeypatch.setenv("H3MOE_TUNED", "0")
    assert te.config_for(*args, bench) == default_config("down", 8192, 8, 2)
    te._load_json_at.cache_clear()


def test_autotune_selection(monkeypatch):
    """config_for on a (pretend) GPU: benchmarks the candidates once per shape key and keeps the fastest,
    skips a candidate that runs out of resources, and benchmarks nothing during CUDA graph capture."""
    from h3moe.kernels.experts import candidate_configs, default_config

    monkeypatch.setenv("H3MOE_AUTOTUNE", "1")
    monkeypatch.setattr(te, "_TUNED", {})
    monkeypatch.setattr(te, "_arch", lambda device: 90)
    monkeypatch.setattr(te, "_device_name", lambda device: "FAKE_GPU")
    monkeypatch.setattr(te, "_CONFIG_DIR", te._CONFIG_DIR / "no-such-dir")
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.delenv("H3MOE_TMA", raising=False)
    cands = te._candidates("down", 8192, 8, 2, False, 90)  # the default H3MOE_TMA=0: no Tma candidate
    assert len(cands) >= 2 and cands == [c for c in candidate_configs("down", 8192, 8, 2) if not c.TMA]
    timed = []

    class OutOfResources(Exception):
        pass

    def bench(cfg):
        timed.append(cfg)
        if cfg == cands[0]:
            raise OutOfResources("shared memory")
        return 1.0 if cfg == cands[-1] else 2.0

    dev = torch.device("cuda")
    args = ("down", 6000, 4096, 14336, 8, 2, torch.bfloat16, dev)
    assert te.config_for(*args, bench) == cands[-1]
    assert timed == cands
    assert te.config_for(*args, bench) == cands[-1] and len(timed) == len(cands)  # cached: no new benchmark
    capturing[0] = True
    got = te.config_for("down", 16, 4096, 14336, 8, 2, torch.bfloat16, dev, bench)  # untuned key, capturing
    assert got == default_config("down", 16, 8, 2) and len(timed) == len(cands)

    def broken(cfg):
        raise RuntimeError("a real bug")

    capturing[0] = False
    with pytest.raises(RuntimeError, match="a real bug"):  # only resource errors are skipped
        te.config_for("down", 256, 4096, 14336, 8, 2, torch.bfloat16, dev, broken)


def test_regimes_and_configs():
    from h3moe.kernels import experts as k

    assert k.regime(16, 8, 2) == "decode"  # T=8: 2 rows per expert
    assert k.regime(128, 64, 8) == "decode"  # T=16, E=64, K=8
    assert k.regime(8192, 8, 2) == "large"
    for role in k.KERNELS:
        for fp32 in (False, True):
            for c in k.all_configs(role, fp32):
                assert c.BM in (16, 32, 64, 128) and c.BK >= 16 and c.num_warps in (4, 8)
        for cands in k._CANDIDATES[role].values():  # each Tma candidate's fallback is compiled too
            assert all(c.with_tma(False) in cands for c in cands if c.TMA), role
    assert te._m_slots(1, 64, 16) == 1
    assert te._m_slots(100, 4, 16) == 11


def test_expert_too_large_for_int32_offsets_is_refused():
    """Offsets inside one expert's weights are int32 in the kernels: 2*I*H >= 2**31 is refused on the host
    (meta tensors: nothing is allocated)."""
    H, I, E, T, K = 65536, 16384, 2, 1, 1
    x = torch.empty(T, H, device="meta", dtype=torch.bfloat16)
    wgu = torch.empty(E, 2 * I, H, device="meta", dtype=torch.bfloat16)
    wd = torch.empty(E, H, I, device="meta", dtype=torch.bfloat16)
    r = Routing(torch.ones(T, K, device="meta"), torch.zeros(T, K, dtype=torch.long, device="meta"),
                torch.empty(E, dtype=torch.int32, device="meta"), torch.empty(E + 1, dtype=torch.int32, device="meta"),
                torch.empty(T * K, dtype=torch.int32, device="meta"))
    with pytest.raises(NotImplementedError, match="2\\*I\\*H"):
        te.moe(x, wgu, wd, r)


def test_config_beyond_the_gpu_falls_through_to_one_that_loads(monkeypatch):
    """A pinned config that does not load on this GPU (Triton raises OutOfResources on the host, e.g. the 110 KB
    decode tile on a ~100 KB sm_89 card) runs the next candidate instead, remembered per key and said once;
    other errors, and a key where nothing loads, raise."""
    from h3moe.kernels import experts as k

    class OutOfResources(Exception):  # what triton.runtime.errors raises, matched by name
        pass

    monkeypatch.setattr(te, "_FITS", {})
    dev = torch.device("cpu")
    S, H, I, E, K = 16, 256, 128, 8, 2  # decode regime: 3 gate_up candidates
    cands = k.candidate_configs("gate_up", S, E, K, False, 90)
    big = cands[0]
    tried = []

    def run(cfg):
        tried.append(cfg)
        if cfg == big:
            raise OutOfResources(f"out of resource: shared memory, Required: {cfg.BM * 6912}, Hardware limit: 101376")

    with pytest.warns(UserWarning, match="does not fit this GPU"):
        te._launch("gate_up", S, H, I, E, K, torch.bfloat16, dev, run)
    assert tried == [big, cands[1]]
    tried.clear()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        te._launch("gate_up", S, H, I, E, K, torch.bfloat16, dev, run)  # remembered: no retry, no warning
    assert tried == [cands[1]]

    # beyond the regime's candidates: the role's other tiles, largest staged tiles first (a "large"-regime
    # launch on a ~100 KB card, where every large tile is too big, lands on a smaller tile)
    S_large = 8192
    large = set(k.candidate_configs("dx", S_large, E, K, False, 89))
    tried.clear()

    def only_small(cfg):
        tried.append(cfg)
        if cfg in large:
            raise OutOfResources("out of resource: shared memory")

    monkeypatch.setattr(te, "_arch", lambda device: 89)
    with pytest.warns(UserWarning, match="does not fit this GPU"):
        te._launch("dx", S_large, H, I, E, K, torch.bfloat16, dev, only_small)
    assert tried[-1] not in large and not tried[-1].hopper_only and len(tried) == len(large) + 1

    def nothing_loads(cfg):
        raise OutOfResources("out of resource: shared memory")

    with pytest.raises(OutOfResources):
        te._launch("down", S, H, I, E, K, torch.bfloat16, dev, nothing_loads)

    def broken(cfg):
        raise RuntimeError("an unrelated failure")

    with pytest.raises(RuntimeError, match="unrelated"):
        te._launch("dx", S, H, I, E, K, torch.bfloat16, dev, broken)


# ---------------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------------


def _loop_ref(x, wgu, wd, r, act="silu", limit=None, gated=True):
    """Per-expert loop reference (memory friendly at realistic shapes), in the inputs' dtype."""
    weights, ids = r.weights, r.ids
    T, H = x.shape
    I = wd.shape[2]
    y = torch.zeros(T, H, device=x.device, dtype=torch.float32)
    for e in range(wgu.shape[0]):
        t, k = torch.nonzero(ids == e, as_tuple=True)
        if t.numel() == 0:
            y = y + 0 * (wgu[e].sum() + wd[e].sum())  # keep the graph connected
            continue
        h = x[t] @ wgu[e].t()
        a = h3moe.reference.glu_ref(h[:, :I], h[:, I:], act, limit) if gated else h3moe.reference.ACTIVATIONS[act](h)
        o = (a @ wd[e].t()).float() * weights[t, k, None].float()
        y = y.index_add(0, t, o)
    return y.to(x.dtype)


def _gpu_case(T, H, I, E, K, dtype, act="silu", grads=True):
    torch.manual_seed(T * 7 + E)
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32, "cuda")
    ids = torch.topk(logits, K, -1).indices
    dy = torch.randn(T, H, device="cuda")
    outs = _run(te.moe, x, wgu, wd, logits, ids, act, dy, dtype) if grads else None
    return x, wgu, wd, logits, ids, dy, outs


# GPU tier budget: the whole GPU session is a few minutes for every helper, so these tests pin the default
# configs (H3MOE_AUTOTUNE=0 by the autouse fixture: no tuning compiles) and share compiled kernels across
# cases where they can.
@pytest.mark.gpu
@pytest.mark.parametrize("T,H,I,E,K,dtype", [
    (4096, 4096, 14336, 8, 2, torch.bfloat16),  # Mixtral-8x7B prefill: large tiles, wgmma
    (16, 2048, 1024, 64, 8, torch.bfloat16),  # decode T=16, E=64, K=8: BM=16 tiles, many empty tile slots
    (1, 4096, 14336, 8, 2, torch.bfloat16),  # decode T=1: S=2 rows, two experts
    (333, 1000, 700, 7, 3, torch.float16),  # fp16, odd H and I (masked K-loops and N edges), prime E
    (256, 512, 768, 8, 2, torch.float32),  # fp32 (tf32x3 dots)
])
def test_gpu_accuracy(T, H, I, E, K, dtype):
    x, wgu, wd, logits, ids, dy, outs = _gpu_case(T, H, I, E, K, dtype)
    ref = _run(_loop_ref, x, wgu, wd, logits, ids, "silu", dy, torch.float32)
    eager = _run(_loop_ref, x, wgu, wd, logits, ids, "silu", dy, dtype)
    atol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    _assert_close(outs, eager, ref, atol)


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,I,E,K,dtype", [
    (333, 1000, 700, 7, 3, torch.float16),  # masked edges in both backward forms
    (1024, 2048, 1024, 8, 2, torch.bfloat16),  # "large" tiles: bwd_act (3 accumulators) vs bwd_act_saved
])
def test_gpu_recompute_form(T, H, I, E, K, dtype, monkeypatch):
    """The backward that recomputes gate/up (H3MOE_RECOMPUTE=1) is as accurate as the default, which reads
    the saved pre-activation (test_gpu_accuracy)."""
    monkeypatch.setenv("H3MOE_RECOMPUTE", "1")
    x, wgu, wd, logits, ids, dy, outs = _gpu_case(T, H, I, E, K, dtype)
    ref = _run(_loop_ref, x, wgu, wd, logits, ids, "silu", dy, torch.float32)
    eager = _run(_loop_ref, x, wgu, wd, logits, ids, "silu", dy, dtype)
    _assert_close(outs, eager, ref, {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype])


@pytest.mark.gpu
def test_gpu_lowp_combine(monkeypatch):
    """H3MOE_COMBINE=lowp at a many-expert shape (K=8 slot rows in bf16): within eager's error."""
    monkeypatch.setenv("H3MOE_COMBINE", "lowp")
    T, H, I, E, K = 512, 2048, 768, 64, 8
    x, wgu, wd, logits, ids, dy, outs = _gpu_case(T, H, I, E, K, torch.bfloat16)
    ref = _run(_loop_ref, x, wgu, wd, logits, ids, "silu", dy, torch.float32)
    eager = _run(_loop_ref, x, wgu, wd, logits, ids, "silu", dy, torch.bfloat16)
    _assert_close(outs, eager, ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,I,E,K,empty", [
    (300, 512, 384, 8, 2, False),  # "large" tiles
    (16, 2048, 1024, 64, 8, False),  # decode tiles (BM=16), many tile slots past the last tile
    (40, 512, 384, 8, 2, True),  # "small" tiles, experts 0 and 5 get no row: their weight gradients are zeros
])
def test_gpu_poisoned_outputs(T, H, I, E, K, empty):
    """Every element of every output buffer is written: fill the caching allocator's blocks with NaN first."""
    for _ in range(3):
        junk = torch.full((64 << 20,), float("nan"), device="cuda")
        del junk
        torch.manual_seed(T)
        x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32, "cuda")
        if empty:
            logits[:, [0, 5]] = -1e4
        ids = torch.topk(logits, K, -1).indices
        dy = torch.randn(T, H, device="cuda")
        outs = _run(te.moe, x, wgu, wd, logits, ids, "silu", dy, torch.bfloat16)
        for o in outs:
            assert torch.isfinite(o).all()
        if empty:  # outs: y, dx, d w_gate_up, d w_down, ... (as _run returns them)
            assert not bool((ids == 0).any() or (ids == 5).any())
            for o in outs:
                if o.dim() == 3 and o.shape[0] == E:
                    assert not o[[0, 5]].any() and o[1].abs().sum() > 0


@pytest.mark.gpu
def test_gpu_activations():
    for act in ("gelu", "gelu_tanh", "relu"):
        x, wgu, wd, logits, ids, dy, outs = _gpu_case(64, 512, 256, 8, 2, torch.bfloat16, act)
        ref = _run(_loop_ref, x, wgu, wd, logits, ids, act, dy, torch.float32)
        eager = _run(_loop_ref, x, wgu, wd, logits, ids, act, dy, torch.bfloat16)
        _assert_close(outs, eager, ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", ["0", "1"], ids=["saved", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_swiglu_limit(dtype, recompute, monkeypatch):
    """The clamped SwiGLU (DeepSeek-V4's swiglu_limit) at a real tile size, both backward forms."""
    monkeypatch.setenv("H3MOE_RECOMPUTE", recompute)
    T, H, I, E, K = 256, 512, 384, 8, 2
    torch.manual_seed(5)
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32, "cuda")
    ids = torch.topk(logits, K, -1).indices
    L = _limit_in_a_gap(x, wgu, ids, 0.5, 1.5)
    dy = torch.randn(T, H, device="cuda")
    fn = lambda *a: te.moe(*a, swiglu_limit=L)  # noqa: E731
    ref_fn = lambda *a: _loop_ref(*a, limit=L)  # noqa: E731
    outs = _run(fn, x, wgu, wd, logits, ids, "silu", dy, dtype)
    ref = _run(ref_fn, x, wgu, wd, logits, ids, "silu", dy, torch.float32)
    eager = _run(ref_fn, x, wgu, wd, logits, ids, "silu", dy, dtype)
    _assert_close(outs, eager, ref, {torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", ["0", "1"], ids=["saved", "recompute"])
def test_gpu_ungated_relu2(recompute, monkeypatch):
    """Ungated relu2 experts (Nemotron-H) in bf16 at a real tile size, both backward forms."""
    monkeypatch.setenv("H3MOE_RECOMPUTE", recompute)
    T, H, I, E, K = 512, 1024, 768, 16, 4
    torch.manual_seed(6)
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32, "cuda")
    wu = wgu[:, :I].contiguous()
    ids = torch.topk(logits, K, -1).indices
    dy = torch.randn(T, H, device="cuda")
    ref_fn = lambda *a: _loop_ref(*a, gated=False)  # noqa: E731
    outs = _run(te.moe, x, wu, wd, logits, ids, "relu2", dy, torch.bfloat16)
    ref = _run(ref_fn, x, wu, wd, logits, ids, "relu2", dy, torch.float32)
    eager = _run(ref_fn, x, wu, wd, logits, ids, "relu2", dy, torch.bfloat16)
    _assert_close(outs, eager, ref, 1e-2)


@pytest.mark.gpu
def test_gpu_autotune_then_cuda_graph(monkeypatch):
    """Autotuning benchmarks on the first call only; the forward then captures in a CUDA graph and replays
    to the eager result; H3MOE_ATOMIC_COMBINE=1 agrees with the deterministic combine."""
    monkeypatch.setenv("H3MOE_AUTOTUNE", "1")
    T, H, I, E, K = 64, 1024, 512, 8, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.bfloat16, "cuda")
    r = h3moe.route(logits, K, backend="torch")
    y0 = te.moe(x, wgu, wd, r, "silu")  # tunes
    y1 = te.moe(x, wgu, wd, r, "silu")
    assert torch.equal(y0, y1)  # deterministic
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        te.moe(x, wgu, wd, r, "silu")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = te.moe(x, wgu, wd, r, "silu")
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(yg, te.moe(x, wgu, wd, r, "silu"), rtol=0, atol=0)
    monkeypatch.setenv("H3MOE_ATOMIC_COMBINE", "1")
    torch.testing.assert_close(te.moe(x, wgu, wd, r, "silu"), yg, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    """h3moe.MoE(backend='triton') forward + backward under torch.compile(fullgraph=True): no graph break,
    same result and gradients as eager."""
    torch._dynamo.reset()
    m = h3moe.MoE(512, 256, 8, 2, backend="triton", device="cuda", dtype=torch.bfloat16)
    # 512 tokens, 128 rows per expert: the "large" tiles test_gpu_poisoned_outputs compiled already
    x = torch.randn(4, 128, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    params = (x, m.gate.weight, m.gate_up_proj, m.down_proj)

    def loss_fn(inp):
        return m(inp).float().square().sum()

    def grads(fn):
        for p in params:
            p.grad = None
        loss = fn(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    le, ge = grads(loss_fn)
    lc, gc = grads(torch.compile(loss_fn, fullgraph=True))  # backward compiled by AOTAutograd
    torch.testing.assert_close(lc, le, rtol=1e-3, atol=1e-3)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_wgrad_grouped_mm(monkeypatch):
    """H3MOE_WGRAD_GMM=1 (the weight gradients from torch's grouped matmul, sm_90 only): within eager's
    error at a large-tile shape, and exact zeros for two experts with no row after the allocator was filled
    with NaN (Blackwell's grouped_mm leaves garbage there, hence sm_90 only)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the grouped_mm weight gradient runs on sm_90 only")
    monkeypatch.setenv("H3MOE_WGRAD_GMM", "1")
    calls = []
    real = te._wgrad_gmm
    monkeypatch.setattr(te, "_wgrad_gmm", lambda *a: calls.append(1) or real(*a))
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk
    T, H, I, E, K = 1024, 1024, 768, 8, 2
    torch.manual_seed(3)
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32, "cuda")
    logits[:, [0, 5]] = -1e4
    ids = torch.topk(logits, K, -1).indices
    dy = torch.randn(T, H, device="cuda")
    outs = _run(te.moe, x, wgu, wd, logits, ids, "silu", dy, torch.bfloat16)
    assert len(calls) == 2
    assert not outs[2][[0, 5]].any() and not outs[3][[0, 5]].any() and outs[2][1].abs().sum() > 0
    ref = _run(_loop_ref, x, wgu, wd, logits, ids, "silu", dy, torch.float32)
    eager = _run(_loop_ref, x, wgu, wd, logits, ids, "silu", dy, torch.bfloat16)
    _assert_close(outs, eager, ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,I,E,K", [
    (2048, 1024, 768, 8, 2),  # "large" tiles: the Tma candidates' regime
    (333, 1004, 700, 7, 3),  # rows of 2008 and 1400 bytes: no descriptor can run, the same tiles without
])
def test_gpu_tma_descriptors(T, H, I, E, K, monkeypatch):
    """(Last in this file: the first GPU run of the descriptor kernels.) H3MOE_TMA=1 (tensor descriptors, TMA on sm_90+; pointer loads where they cannot run): within eager's
    error; the forward captures in a CUDA graph (the descriptors' scratch from the graph's pool) and replays
    to the eager result; a poisoned allocator shows no unwritten element."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors: sm_90+")
    why = te.tma_smoke()  # in a child process first: a fault there ends that process, not this file's run
    assert why is None, why
    monkeypatch.setenv("H3MOE_TMA", "1")
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk
    x, wgu, wd, logits, ids, dy, outs = _gpu_case(T, H, I, E, K, torch.bfloat16)
    ref = _run(_loop_ref, x, wgu, wd, logits, ids, "silu", dy, torch.float32)
    eager = _run(_loop_ref, x, wgu, wd, logits, ids, "silu", dy, torch.bfloat16)
    _assert_close(outs, eager, ref, 1e-2)
    xb, wgub, wdb = (t.to(torch.bfloat16) for t in (x, wgu, wd))
    r = h3moe.route(logits, K, backend="torch")
    y0 = te.moe(xb, wgub, wdb, r, "silu")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = te.moe(xb, wgub, wdb, r, "silu")
    xb.copy_(torch.randn_like(xb))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(yg, te.moe(xb, wgub, wdb, r, "silu"), rtol=0, atol=0)
    assert not torch.equal(yg, y0)


def _limit_in_a_gap(x, wgu, ids, lo, hi):
    """A swiglu_limit in [lo, hi] at least a gap away from every routed gate/up pre-activation's magnitude, so
    that rounding in the test dtype cannot move one across the clamp's kink."""
    h = torch.einsum("th,tknh->tkn", x.double(), wgu.double()[ids]).abs().flatten()  # (T*K*2I,)
    cands = torch.linspace(lo, hi, 200, dtype=torch.float64)
    gap = (h[None, :] - cands[:, None]).abs().min(dim=1).values
    return float(cands[gap.argmax()])


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("recompute", ["0", "1"], ids=["saved", "recompute"])
@pytest.mark.parametrize("dtype,act", [(torch.float32, "silu"), (torch.float16, "silu"), (torch.bfloat16, "gelu")])
def test_swiglu_limit_forward_and_grads(dtype, act, recompute, monkeypatch):
    """swiglu_limit (clamped SwiGLU, HAS_LIMIT): forward and every gradient against the clamped reference, in
    both backward forms, outputs poisoned; the clamp binds on both halves."""
    monkeypatch.setenv("H3MOE_RECOMPUTE", recompute)
    monkeypatch.setattr(te, "torch", _PoisonTorch())
    T, H, I, E, K = 9, 32, 24, 4, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    ids = _ids("topk", T, E, K, logits)
    L = _limit_in_a_gap(x, wgu, ids, 0.4, 1.0)
    pre = torch.einsum("th,tknh->tkn", x.double(), wgu.double()[ids])
    assert (pre[..., :I] > L).any() and (pre[..., I:].abs() > L).any()  # both clamps bind somewhere
    dy = torch.randn(T, H, device=DEV)
    fn = lambda *a: te.moe(*a, swiglu_limit=L)  # noqa: E731
    ref_fn = lambda x, wgu, wd, r, act: experts_ref(x, wgu, wd, r.weights, r.ids, act, L)  # noqa: E731
    outs = _run(fn, x, wgu, wd, logits, ids, act, dy, dtype)
    ref = _run(ref_fn, x, wgu, wd, logits, ids, act, dy, torch.float64)
    eager = ref if dtype == torch.float32 and DEV == "cpu" else _run(ref_fn, x, wgu, wd, logits, ids, act, dy, dtype)
    _assert_close(outs, eager, ref, ATOL[dtype])
    unclamped = _run(_ref, x, wgu, wd, logits, ids, act, dy, torch.float64)
    assert (unclamped[0] - ref[0]).abs().max() > 0.05


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_swiglu_limit_is_rounded_as_eager_clamps(recompute):
    """bf16 with a limit bf16 cannot hold (6.9 -> 6.90625): eager's torch.clamp compares in bf16, so a gate
    pre-activation of exactly bf16(6.9) is inside the bound and passes its gradient; the kernels agree."""
    T, H, I, E, L = 16, 16, 8, 1, 6.9
    x = torch.eye(T, device=DEV, dtype=torch.bfloat16)
    wgu = torch.zeros(E, 2 * I, H, device=DEV)
    wgu[0, :I], wgu[0, I:] = 6.90625, 0.5  # every gate = bf16(6.9) > fp32(6.9)
    wd = torch.randn(E, H, I, device=DEV) * 0.3
    wgu, wd = wgu.bfloat16(), wd.bfloat16()
    w, ids = torch.ones(T, 1, device=DEV), torch.zeros(T, 1, dtype=torch.long, device=DEV)
    dy = torch.randn(T, H, device=DEV).bfloat16()
    out = []
    for fn in (lambda a, b: experts_ref(x, a, b, w, ids, "silu", L),
               lambda a, b: h3moe.moe(x, a, b, (w, ids), backend="triton", swiglu_limit=L, recompute=recompute)):
        a, b = wgu.clone().requires_grad_(), wd.clone().requires_grad_()
        y = fn(a, b)
        y.backward(dy)
        out.append((y.float(), a.grad.float()))
    (ye, ge), (yk, gk) = out
    assert ge[0, :I].abs().sum() > 0  # eager passes the gate's gradient at the bound
    torch.testing.assert_close(gk, ge, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(yk, ye, rtol=2e-2, atol=2e-2)


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("recompute", ["0", "1"], ids=["saved", "recompute"])
@pytest.mark.parametrize("dtype,act,forced", [(torch.float32, "relu2", False), (torch.float16, "silu", False),
                                              (torch.float32, "relu2", True)])
def test_ungated_forward_and_grads(dtype, act, forced, recompute, monkeypatch):
    """Ungated experts (GATED=False, Nemotron-H's down(relu2(up))): w_up (E, I, H), h and dH one I wide;
    forward and every gradient against the reference, both backward forms, outputs poisoned; forced: a BN=128
    saved-backward tile (its epilogue in column halves) on an I with a partly and a wholly masked half."""
    from h3moe.kernels.experts import Config

    monkeypatch.setenv("H3MOE_RECOMPUTE", recompute)
    monkeypatch.setattr(te, "torch", _PoisonTorch())
    if forced:
        real = te.config_for
        cfg = Config(16, 128, 32, 1, 4, 2)
        monkeypatch.setattr(te, "config_for", lambda role, *a, **kw: cfg if role == "bwd_act_saved" else real(role, *a, **kw))
    T, H, I, E, K = 9, 32, 160 if forced else 24, 4, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    wu = wgu[:, :I].contiguous()  # (E, I, H)
    ids = _ids("topk", T, E, K, logits)
    dy = torch.randn(T, H, device=DEV)
    ref_fn = lambda x, wu, wd, r, act: experts_ref(x, wu, wd, r.weights, r.ids, act, gated=False)  # noqa: E731
    outs = _run(lambda *a: te.moe(*a), x, wu, wd, logits, ids, act, dy, dtype)
    ref = _run(ref_fn, x, wu, wd, logits, ids, act, dy, torch.float64)
    eager = ref if dtype == torch.float32 and DEV == "cpu" else _run(ref_fn, x, wu, wd, logits, ids, act, dy, dtype)
    assert outs[2].shape == (E, I, H)
    _assert_close(outs, eager, ref, ATOL[dtype])
    with pytest.raises(ValueError, match="gated"):
        te.moe(x, wu, wd, h3moe.route(logits, K), swiglu_limit=1.0)


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("gated", [True, False])
def test_compiles_with_dynamic_shapes_and_takes_zero_width(gated):
    """torch.compile(dynamic=True, fullgraph=True) traces the Triton experts, gated or not (their checks are
    comparisons of symbolic sizes); I=0 experts give zeros and empty gradients."""
    T, H, I, E, K = 6, 16, 8, 4, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float32)
    w_in = wgu if gated else wgu[:, :I].contiguous()
    r = h3moe.route(logits, K, backend="torch")
    f = torch.compile(lambda x, w1, w2: h3moe.moe(x, w1, w2, r, backend="triton", gated=gated), dynamic=True,
                      fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    try:
        torch.testing.assert_close(f(x, w_in, wd), h3moe.moe(x, w_in, wd, r, backend="torch", gated=gated))
    finally:
        torch._dynamo.reset()
    leaves = [x.clone().requires_grad_(), w_in[:, :0].clone().requires_grad_(), wd[:, :, :0].clone().requires_grad_()]
    y = h3moe.moe(*leaves, r, backend="triton", gated=gated)
    assert torch.equal(y, torch.zeros_like(x))
    y.sum().backward()
    assert leaves[1].grad.shape == (E, 0, H) and torch.equal(leaves[0].grad, torch.zeros_like(x))
