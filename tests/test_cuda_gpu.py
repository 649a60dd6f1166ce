"""csrc/ kernels on the GPU (marker gpu): each entry point against h3moe/reference.py, with fresh random
inputs and poisoned outputs (NaN / -7 before the kernel writes, so every element must be written), its
custom op through the public API and autograd, opcheck, and one small case under compute-sanitizer.

Each test names the kernel it checks (route_fwd, sort_by_expert, route_bwd, psum, moe_fwd), so a failure
pinpoints it. Raw calls go through the C ABI (h3moe._lib.call) with buffers this file allocates.
"""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import h3moe
from h3moe import _lib
from h3moe import reference as ref
from h3moe.ops.routing import sort_by_expert

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
DEV = "cuda"
NAN = float("nan")
POISON_I = -7
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACT = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@pytest.fixture(autouse=True, scope="module")
def _need_lib():
    ok, why = _lib.status()
    if not ok:
        pytest.fail(f"the GPU machine must build libh3moe_cuda.so (pip install -e . with nvcc): {why}")
    from h3moe.ops import cuda  # noqa: F401


def _stream():
    return torch.cuda.current_stream().cuda_stream


def distinct_logits(T, E, dtype):
    """(T, E) logits with well-separated values in every row, exact in bf16/fp16 (a random permutation of a
    1/16 grid, plus a random integer shift per row; fp32 adds noise below half a step), so top-k has no
    near-ties and ids compare exactly with torch.topk."""
    perm = torch.argsort(torch.rand(T, E, device=DEV), dim=1).float()  # (T, E) permutations of 0..E-1
    x = (perm - E / 2) / (16 if E <= 128 else 32)  # 256 experts: step 1/32, |x| <= 4 (exact in bf16)
    x = x + torch.randint(-2, 3, (T, 1), device=DEV).float()  # integer shift keeps the grid exact
    if dtype == torch.float32:
        x = x + torch.rand(T, E, device=DEV) * 0.01
    return x.to(dtype)


def raw_route_fwd(logits, K, renorm, B=0, mask=None, psum_base=None):
    """h3moe_route_fwd with poisoned outputs (NaN weights, -7 ids / metadata / workspace)."""
    T, E = logits.shape
    lib = _lib.load()
    w = torch.full((T, K), NAN, device=DEV)
    ids = torch.full((T, K), POISON_I, dtype=torch.int64, device=DEV)
    counts = torch.full((E,), POISON_I, dtype=torch.int32, device=DEV)
    offsets = torch.full((E + 1,), POISON_I, dtype=torch.int32, device=DEV)
    sorted_slots = torch.full((T * K,), POISON_I, dtype=torch.int32, device=DEV)
    psum = psum_base.clone() if psum_base is not None else None
    wsb = lib.h3moe_sort_workspace_bytes(T * K, E)
    ws = torch.full((max(1, wsb // 4),), POISON_I, dtype=torch.int32, device=DEV)
    p = lambda t: t.data_ptr() if t is not None and t.numel() else None  # noqa: E731
    _lib.call("h3moe_route_fwd", logits.data_ptr(), DT[logits.dtype], T, E, K, int(renorm), p(w), p(ids),
              T // B if B else 1, p(mask), p(psum), p(counts) if K else None, p(offsets) if K else None,
              p(sorted_slots), p(ws), ws.numel() * 4, _stream())
    torch.cuda.synchronize()
    return w, ids, counts, offsets, sorted_slots, psum


ROUTE_SHAPES = [
    (1, 8, 2, torch.bfloat16, True),  # decode: one token
    (37, 8, 2, torch.float32, True),  # T not a multiple of the 8 warps of a block
    (257, 64, 6, torch.float16, False),  # 2 experts per lane, no renormalization
    (1000, 256, 8, torch.bfloat16, True),  # E and K at the kernel's limits (8 experts per lane)
    (64, 33, 1, torch.float32, True),  # E not a multiple of 32: padded lanes; K = 1
    (2048, 128, 4, torch.bfloat16, True),  # S = 8192 rows: 8 sort chunks of 1024
    (3000, 3, 3, torch.float32, False),  # K == E, tiny E; chunk boundaries inside a token's slots
]


@pytest.mark.parametrize("T,E,K,dtype,renorm", ROUTE_SHAPES)
def test_route_fwd_and_sort_by_expert_raw(T, E, K, dtype, renorm):
    logits = distinct_logits(T, E, dtype)
    w, ids, counts, offsets, sorted_slots, _ = raw_route_fwd(logits, K, renorm)
    w_ref, ids_ref = ref.route_ref(logits, K, renorm)
    assert torch.equal(ids, ids_ref), "route_fwd: top-k ids differ from torch.topk"
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7, msg="route_fwd: weights")
    c_ref, o_ref, s_ref = sort_by_expert(ids_ref, E)
    assert torch.equal(counts, c_ref), "sort_by_expert: counts"
    assert torch.equal(offsets, o_ref), "sort_by_expert: offsets"
    assert torch.equal(sorted_slots, s_ref), "sort_by_expert: sorted_slots (stable order)"


@pytest.mark.parametrize("S,E", [
    (1, 4),  # one row
    (1024, 16),  # exactly one chunk
    (5000, 1000),  # many experts, most with 0-10 rows; 5 chunks
    (70000, 7),  # 69 chunks, heavy experts
])
def test_sort_by_expert_raw(S, E):
    ids = torch.randint(0, E, (S,), device=DEV)
    lib = _lib.load()
    counts = torch.full((E,), POISON_I, dtype=torch.int32, device=DEV)
    offsets = torch.full((E + 1,), POISON_I, dtype=torch.int32, device=DEV)
    sorted_slots = torch.full((S,), POISON_I, dtype=torch.int32, device=DEV)
    wsb = lib.h3moe_sort_workspace_bytes(S, E)
    ws = torch.full((wsb // 4,), POISON_I, dtype=torch.int32, device=DEV)
    _lib.call("h3moe_sort_by_expert", ids.data_ptr(), S, E, counts.data_ptr(), offsets.data_ptr(),
              sorted_slots.data_ptr(), ws.data_ptr(), wsb, _stream())
    c_ref, o_ref, s_ref = sort_by_expert(ids, E)
    assert torch.equal(counts, c_ref) and torch.equal(offsets, o_ref)
    assert torch.equal(sorted_slots, s_ref), "sort_by_expert: not the stable order"


@pytest.mark.parametrize("T,E,K,dtype,renorm", ROUTE_SHAPES)
def test_route_api_forward_and_backward(T, E, K, dtype, renorm):
    logits = distinct_logits(T, E, dtype).requires_grad_()
    r = h3moe.route(logits, K, renormalize=renorm, backend="cuda")
    logits_ref = logits.detach().float().requires_grad_()
    w_ref, ids_ref = ref.route_ref(logits_ref, K, renorm)
    assert torch.equal(r.ids, ids_ref)
    torch.testing.assert_close(r.weights, w_ref, rtol=2e-6, atol=1e-7)
    dw = torch.randn(T, K, device=DEV)
    (r.weights * dw).sum().backward()
    (w_ref * dw).sum().backward()
    assert logits.grad.dtype == dtype
    g_ref = logits_ref.grad
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (logits.grad.float() - g_ref).abs().max().item()
    # Absolute floor: with K=1 and renormalization the exact gradient is 0 and both sides are rounding noise.
    assert err <= tol * g_ref.abs().max().item() + 1e-6, f"route_bwd: max error {err}"


def test_route_beyond_limits_falls_back():
    logits = torch.randn(16, 300, device=DEV)  # E > 256
    r = h3moe.route(logits, 2, backend="cuda")
    w_ref, ids_ref = ref.route_ref(logits, 2)
    assert torch.equal(r.ids, ids_ref)
    torch.testing.assert_close(r.weights, w_ref)


def test_route_empty():
    r = h3moe.route(torch.randn(0, 8, device=DEV), 2, backend="cuda")
    assert r.weights.shape == (0, 2) and r.counts.sum().item() == 0 and r.offsets.tolist() == [0] * 9


@pytest.mark.parametrize("B,S,E,masked", [
    (1, 1, 8, False),  # one token
    (4, 100, 8, True),  # padding mask
    (3, 257, 64, False),  # S not a multiple of the 8 tokens a warp sums
    (8, 64, 256, True),  # E at the limit
])
def test_psum_accumulation_raw(B, S, E, masked):
    T = B * S
    logits = torch.randn(T, E, device=DEV).to(torch.bfloat16)
    mask = (torch.rand(T, device=DEV) > 0.3).float() if masked else None
    base = torch.randn(B, E, device=DEV)  # psum is added to, not overwritten
    *_, psum = raw_route_fwd(logits, 0, False, B=B, mask=mask, psum_base=base)
    p = torch.softmax(logits.float(), -1) * (mask[:, None] if masked else 1)
    want = base + p.reshape(B, S, E).sum(1)
    torch.testing.assert_close(psum, want, rtol=1e-5, atol=1e-4, msg="psum accumulation")


@pytest.mark.parametrize("variant", ["paper", "nll"])
@pytest.mark.parametrize("masked,soft,dtype", [
    (False, False, torch.float32),  # authors' setting: no mask, class labels
    (True, False, torch.bfloat16),  # padding, bf16 logits
    (True, True, torch.float16),  # soft targets
])
def test_gating_loss_forward_and_backward(variant, masked, soft, dtype):
    L, B, S, E = 3, 4, 50, 8
    layers = [torch.randn(B, S, E, device=DEV).to(dtype).requires_grad_() for _ in range(L)]
    labels = torch.softmax(torch.randn(B, E, device=DEV), -1) if soft else torch.randint(0, E, (B,), device=DEV)
    mask = None
    if masked:
        mask = torch.ones(B, S, device=DEV, dtype=torch.long)
        mask[1, 30:] = 0
        mask[3, 5:] = 0
    loss = h3moe.gating_loss(layers, labels, mask, variant=variant, backend="cuda")
    refs = [g.detach().float().requires_grad_() for g in layers]
    loss_ref = ref.gating_loss_ref(refs, labels, mask, variant)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_ref.backward()
    for g, gr in zip(layers, refs):
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        err = (g.grad.float() - gr.grad).abs().max().item()
        assert err <= tol * gr.grad.abs().max().item() + 1e-9, f"route_bwd (gating term): {err}"


def test_route_with_gating_one_backward():
    from h3moe.ops import cuda

    B, S, E, K = 4, 33, 16, 2
    logits = torch.randn(B * S, E, device=DEV, requires_grad=True)
    mask = (torch.rand(B, S, device=DEV) > 0.2).long()
    labels = torch.randint(0, E, (B,), device=DEV)
    r, psum = cuda.route_with_gating(logits, K, B, mask)
    loss = cuda.gating_loss_from_psums([psum], labels, mask, "paper")
    dw = torch.randn(B * S, K, device=DEV)
    ((r.weights * dw).sum() + loss).backward()
    lr = logits.detach().clone().requires_grad_()
    w_ref, ids_ref = ref.route_ref(lr, K)
    assert torch.equal(r.ids, ids_ref)
    loss_ref = ref.gating_loss_ref([lr], labels, mask, "paper")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    ((w_ref * dw).sum() + loss_ref).backward()
    torch.testing.assert_close(logits.grad, lr.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# experts
MOE_SHAPES = [
    (1, 256, 128, 8, 2, torch.bfloat16, "silu"),  # decode, one token: 6 of 8 experts empty
    (4, 512, 256, 8, 2, torch.float16, "silu"),  # decode
    (64, 1024, 512, 8, 2, torch.bfloat16, "silu"),  # decode upper bound: S = 16E, one m16 tile per chunk
    (65, 1024, 512, 8, 2, torch.bfloat16, "gelu"),  # past it: two m16 tiles per chunk; erf GELU
    (300, 256, 40, 16, 4, torch.bfloat16, "gelu_tanh"),  # I = 40: k tail (down) and column tail (gate_up)
    (33, 72, 64, 4, 1, torch.float16, "relu"),  # H = 72: k tail (gate_up) and column tail (down); K = 1
    (512, 128, 96, 64, 6, torch.bfloat16, "silu"),  # many experts, several empty
    (7, 64, 32, 3, 3, torch.float16, "silu"),  # K == E
]


def _experts_inputs(T, H, I, E, K, dtype):
    x = torch.randn(T, H, device=DEV).to(dtype)
    wgu = (torch.randn(E, 2 * I, H, device=DEV) / math.sqrt(H)).to(dtype)
    wd = (torch.randn(E, H, I, device=DEV) / math.sqrt(I)).to(dtype)
    r = h3moe.route(torch.randn(T, E, device=DEV), K, backend="torch")
    return x, wgu, wd, r


def _check_moe(y, x, wgu, wd, r, act, what):
    y32 = ref.experts_ref(x.float(), wgu.float(), wd.float(), r.weights, r.ids, act)
    y_eager = ref.experts_ref(x, wgu, wd, r.weights, r.ids, act)
    assert not y.isnan().any(), f"{what}: unwritten (NaN-poisoned) elements"
    err = (y.float() - y32).abs().max().item()
    eager_err = (y_eager.float() - y32).abs().max().item()
    assert err <= 2 * eager_err + 1e-3, f"{what}: max error {err} vs eager {x.dtype} {eager_err}"


def raw_moe_fwd(x, wgu, wd, r, act, split_k):
    """h3moe_moe_fwd with a NaN-poisoned y and an all-0xFF (NaN) workspace."""
    T, H = x.shape
    E, I, K = wd.shape[0], wd.shape[2], r.top_k
    lib = _lib.load()
    wsb = lib.h3moe_moe_workspace_bytes(DT[x.dtype], T, H, I, E, K, split_k)
    ws = torch.full((wsb,), 255, dtype=torch.uint8, device=DEV)
    y = torch.full((T, H), NAN, device=DEV, dtype=x.dtype)
    _lib.call("h3moe_moe_fwd", x.data_ptr(), DT[x.dtype], T, H, I, E, K, wgu.data_ptr(), wd.data_ptr(),
              r.weights.data_ptr(), r.offsets.data_ptr(), r.sorted_slots.data_ptr(), ACT[act], split_k,
              ws.data_ptr(), wsb, y.data_ptr(), _stream())
    torch.cuda.synchronize()
    act_ws = ws[: T * K * I * x.element_size()].view(x.dtype).view(T * K, I)  # first region of the workspace
    return y, act_ws


@pytest.mark.parametrize("split_k", [0, 1, 3])  # automatic, none, forced (with uneven k ranges)
@pytest.mark.parametrize("T,H,I,E,K,dtype,act", MOE_SHAPES)
def test_moe_fwd_raw_poisoned(T, H, I, E, K, dtype, act, split_k):
    x, wgu, wd, r = _experts_inputs(T, H, I, E, K, dtype)
    y, act_ws = raw_moe_fwd(x, wgu, wd, r, act, split_k)
    assert not act_ws.isnan().any(), "moe_fwd gate_up (+ split-K activation): rows of act(gate)·up unwritten"
    # gate_up alone: act(gate)·up of each sorted row, against fp32 math on the same inputs
    rows = r.sorted_slots.long()
    tok = rows // K
    e_of_row = r.ids.reshape(-1)[rows]
    h = torch.einsum("sh,snh->sn", x[tok].float(), wgu[e_of_row].float())
    a32 = ref.ACTIVATIONS[act](h[:, :I]) * h[:, I:]
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    err = (act_ws.float() - a32).abs().max().item()
    assert err <= tol * (a32.abs().max().item() + 1), f"moe_fwd gate_up: max error {err}"
    _check_moe(y, x, wgu, wd, r, act, "moe_fwd (down + combine)")


def test_moe_fwd_decode_split_k_is_deterministic():
    x, wgu, wd, r = _experts_inputs(2, 2048, 1024, 8, 2, torch.bfloat16)  # automatic split-K engages
    y1, _ = raw_moe_fwd(x, wgu, wd, r, "silu", 0)
    y2, _ = raw_moe_fwd(x, wgu, wd, r, "silu", 0)
    assert torch.equal(y1, y2)
    _check_moe(y1, x, wgu, wd, r, "silu", "moe_fwd decode split-K")


@pytest.mark.parametrize("T,H,I,E,K,dtype,act", MOE_SHAPES[:4])
def test_moe_api_inference_and_training_fallback(T, H, I, E, K, dtype, act):
    x, wgu, wd, r = _experts_inputs(T, H, I, E, K, dtype)
    with torch.no_grad():
        y = h3moe.moe(x, wgu, wd, r, activation=act, backend="cuda")
    _check_moe(y, x, wgu, wd, r, act, "moe (cuda op)")
    # with autograd on, the cuda backend hands moe on (forward-only kernels) and gradients still flow
    xg = x.clone().requires_grad_()
    y2 = h3moe.moe(xg, wgu, wd, r, activation=act, backend="cuda")
    y2.float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_opcheck():
    from h3moe.ops import cuda  # noqa: F401

    logits = torch.randn(40, 16, device=DEV, requires_grad=True)
    mask = (torch.rand(40, device=DEV) > 0.5).float()
    torch.library.opcheck(torch.ops.h3moe.cuda_route_fwd.default, (logits, 2, True, 4, mask))
    x, wgu, wd, r = _experts_inputs(8, 64, 32, 4, 2, torch.bfloat16)
    torch.library.opcheck(torch.ops.h3moe.cuda_moe_fwd.default,
                          (x, wgu, wd, r.weights, r.offsets, r.sorted_slots, "silu"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_runs_on_a_side_stream():
    x, wgu, wd, r = _experts_inputs(16, 256, 128, 8, 2, torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        y = h3moe.moe(x, wgu, wd, r, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    _check_moe(y, x, wgu, wd, r, "silu", "moe on a side stream")


def test_cuda_graph_capture_route_and_moe():
    """No entry point synchronizes with the host: routing + experts replay from a CUDA graph."""
    T, H, I, E, K = 8, 256, 128, 8, 2
    x = torch.randn(T, H, device=DEV).bfloat16()
    logits = torch.randn(T, E, device=DEV)
    wgu = (torch.randn(E, 2 * I, H, device=DEV) / math.sqrt(H)).bfloat16()
    wd = (torch.randn(E, H, I, device=DEV) / math.sqrt(I)).bfloat16()

    def step():
        r = h3moe.route(logits, K, backend="cuda")
        return h3moe.moe(x, wgu, wd, r, backend="cuda"), r

    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # warm up (module loading) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_graph, r_graph = step()
        logits.copy_(torch.randn(T, E, device=DEV))  # new inputs, same buffers
        x.copy_(torch.randn(T, H, device=DEV).bfloat16())
        g.replay()
        torch.cuda.synchronize()
        y_eager, r_eager = step()
    assert torch.equal(r_graph.ids, r_eager.ids) and torch.equal(r_graph.sorted_slots, r_eager.sorted_slots)
    assert torch.equal(y_graph, y_eager)  # deterministic kernels: bitwise equal


def test_compute_sanitizer_memcheck():
    exe = shutil.which("compute-sanitizer")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/cuda-13.0"):
        if not exe and home and Path(home, "bin", "compute-sanitizer").exists():
            exe = str(Path(home, "bin", "compute-sanitizer"))
    if not exe:
        pytest.skip("compute-sanitizer not found")
    proc = subprocess.run([exe, "--tool", "memcheck", "--error-exitcode", "3", sys.executable,
                           str(ROOT / "scripts" / "cuda_sanitizer_case.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ERROR SUMMARY: 0 errors" in out and "sanitizer case ok" in out, out[-4000:]
