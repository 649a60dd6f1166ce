"""Routing fused with the gating-loss sums: h3moe.route_with_gating (triton, cuda, torch backends) and
h3moe.ops.losses.gating_loss_from_psums, against reference.route_ref + mean_router_probs_ref / gating_loss_ref.

Interpreter tier (tiny shapes: CPU tensors under TRITON_INTERPRET=1, or CUDA tensors where there is a GPU) and
GPU tier (marker gpu: realistic shapes, bf16/fp32, poisoned outputs, triton vs cuda vs an fp64 reference).
"""
import pytest
import torch

pytest.importorskip("triton")

import h3moe  # noqa: E402
from h3moe import reference as ref  # noqa: E402
from h3moe.ops.losses import gating_loss_from_psums  # noqa: E402
from h3moe.ops.routing import _route_with_gating_torch, sort_by_expert  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _tr():
    from h3moe.ops import triton_routing

    return triton_routing


def distinct_logits(T, E, dtype, device=DEV, spacing=0.3):
    """Rows of distinct logits (a random permutation of an evenly spaced ramp plus < spacing/3 of noise): every
    row's order, and so torch.topk's, is unique, so the ids must match exactly."""
    ramp = torch.argsort(torch.rand(T, E, device=device), dim=1).float() * spacing
    x = ramp + torch.rand(T, E, device=device) * (spacing / 3) - (E * spacing) / 2
    return x.to(dtype)


def make_mask(B, S, device=DEV, dtype=torch.int64, empty_row=False):
    """(B, S) mask with random padding; every sample keeps >= 1 token unless empty_row (then sample 0 has none)."""
    m = torch.rand(B, S, device=device) > 0.35
    m[:, 0] = True
    if empty_row:
        m[0] = False
    return m.to(dtype)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tol(dtype):
    return dict(rtol=1e-3, atol=1e-5) if dtype == torch.float16 else {}


# (B, S, E, K, dtype, renormalize, mask): mask None, or the mask's dtype
CASES = [
    (2, 5, 8, 2, torch.float32, True, torch.int64),  # S < BLOCK_T: sample-aligned blocks shrink to 8 tokens
    (3, 13, 7, 1, torch.float16, True, None),  # prime E, K=1, no mask, S not a multiple of the block
    (2, 9, 7, 7, torch.float32, False, torch.float32),  # K=E: every expert; fp32 mask
    (1, 70, 64, 8, torch.float16, True, torch.bool),  # one sample over 3 blocks of 32: cross-block prefix; bool mask
    (17, 5, 5, 3, torch.float32, True, torch.int64),  # 17 blocks > BLOCK_B=16: the scan loops twice
    (4, 3, 5, 3, torch.float64, True, torch.int64),  # fp64 logits: fp64 weights and psum
]


@pytest.mark.interpreter
@pytest.mark.parametrize("B,S,E,K,dtype,renorm,mask_dt", CASES)
def test_forward_matches_reference(B, S, E, K, dtype, renorm, mask_dt):
    T = B * S
    x = distinct_logits(T, E, dtype)
    mask = None if mask_dt is None else make_mask(B, S, dtype=mask_dt)
    r, psum = _tr().route_with_gating(x, K, B, mask, renormalize=renorm)
    w_ref, ids_ref = ref.route_ref(x, K, renorm)
    torch.testing.assert_close(r.weights, w_ref, rtol=2e-6, atol=2e-7)
    assert r.weights.dtype == w_ref.dtype and psum.dtype == _acc(dtype) and psum.shape == (B, E)
    assert torch.equal(r.ids, ids_ref)
    counts, offsets, slots = sort_by_expert(r.ids, E)
    assert torch.equal(r.counts, counts) and torch.equal(r.offsets, offsets) and torch.equal(r.sorted_slots, slots)
    n_b = torch.full((B, 1), float(S), dtype=psum.dtype, device=DEV) if mask is None else (
        mask.to(psum.dtype).sum(1, keepdim=True).clamp_min(1))
    torch.testing.assert_close(psum / n_b, ref.mean_router_probs_ref(x, B, mask), rtol=1e-6, atol=1e-7)
    # The same as the plain route(): the sample-aligned partition changes nothing in the routing.
    r0 = _tr().route(x, K, renorm)
    assert torch.equal(r.weights, r0.weights) and torch.equal(r.ids, r0.ids)
    assert torch.equal(r.sorted_slots, r0.sorted_slots) and torch.equal(r.offsets, r0.offsets)


@pytest.mark.interpreter
def test_empty_sample_and_no_tokens_and_3d_logits():
    B, S, E, K = 3, 6, 5, 2
    x = distinct_logits(B * S, E, torch.float32)
    mask = make_mask(B, S, empty_row=True)  # sample 0 has no real token: its psum row is 0
    r, psum = h3moe.route_with_gating(x.view(B, S, E), K, B, mask, backend="triton")
    assert torch.equal(psum[0], torch.zeros(E, device=DEV))
    torch.testing.assert_close(psum[1:], (torch.softmax(x, -1) * mask.reshape(-1, 1)).view(B, S, E).sum(1)[1:])
    assert r.weights.shape == (B * S, K)
    r, psum = _tr().route_with_gating(torch.randn(0, E, device=DEV), K, 2)
    assert psum.shape == (2, E) and torch.equal(psum, torch.zeros(2, E, device=DEV))
    assert torch.equal(r.offsets, torch.zeros(E + 1, dtype=torch.int32, device=DEV))


def _fused_loss(layers, K, B, mask, renorm, variant, labels, g, backend):
    """Σ_l Σ weights_l·g_l + gating loss from the L layers' psums, through h3moe.route_with_gating."""
    psums, top = [], 0
    for x, gl in zip(layers, g):
        r, psum = h3moe.route_with_gating(x, K, B, mask, renormalize=renorm, backend=backend)
        psums.append(psum)
        top = top + (r.weights * gl).sum()
    return top + gating_loss_from_psums(psums, labels, mask, variant, seq_len=layers[0].shape[0] // B)


def _reference_loss(layers, K, B, mask, renorm, variant, labels, g):
    top = sum((ref.route_ref(x, K, renorm)[0] * gl).sum() for x, gl in zip(layers, g))
    return top + ref.gating_loss_ref(layers, labels, mask, variant)


# (B, S, E, K, dtype, renormalize, masked, variant, labels)
GRAD_CASES = [
    (2, 6, 7, 2, torch.float32, True, True, "paper", "hard"),  # prime E, masked, paper variant
    (2, 6, 7, 2, torch.float32, False, False, "nll", "soft"),  # no mask, nll with soft targets, no renorm
    (3, 5, 5, 5, torch.float64, True, True, "nll", "hard"),  # K=E: renormalized weights are the softmax
    (2, 11, 8, 1, torch.float16, True, True, "paper", "soft"),  # K=1 renormalized: only the gating term flows
    (2, 11, 8, 3, torch.float16, False, False, "paper", "hard"),  # fp16 logits, fp16 gradient
]


def _labels(kind, B, E):
    if kind == "hard":
        return torch.randint(0, E, (B,), device=DEV)
    return torch.softmax(torch.randn(B, E, device=DEV), -1)


@pytest.mark.interpreter
@pytest.mark.parametrize("B,S,E,K,dtype,renorm,masked,variant,labels", GRAD_CASES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_matches_reference(B, S, E, K, dtype, renorm, masked, variant, labels, backend):
    L, T = 2, B * S
    layers = [distinct_logits(T, E, dtype).requires_grad_() for _ in range(L)]
    layers0 = [x.detach().clone().requires_grad_() for x in layers]
    mask = make_mask(B, S) if masked else None
    y = _labels(labels, B, E)
    g = [torch.randn(T, K, dtype=_acc(dtype), device=DEV) for _ in range(L)]
    loss = _fused_loss(layers, K, B, mask, renorm, variant, y, g, backend)
    loss0 = _reference_loss(layers0, K, B, mask, renorm, variant, y, g)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    loss.backward()
    loss0.backward()
    for x, x0, gl in zip(layers, layers0, g):
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad, x0.grad, **_tol(dtype))
        assert x.grad.abs().max() > 1e-3  # not a vacuous comparison
        if masked:  # padding tokens get only the top-k gradient
            pad = mask.reshape(-1) == 0
            x1 = x0.detach().clone().requires_grad_()
            (ref.route_ref(x1, K, renorm)[0] * gl).sum().backward()
            torch.testing.assert_close(x.grad[pad], x1.grad[pad], **_tol(dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("use", ["weights", "psum"])
def test_backward_with_one_output_used(use):
    # Only one of the two outputs reaches the loss: the backward kernel runs with only that gradient.
    B, S, E, K = 2, 7, 6, 2
    x = distinct_logits(B * S, E, torch.float32).requires_grad_()
    x0 = x.detach().clone().requires_grad_()
    mask = make_mask(B, S)
    g = torch.randn(B * S, K, device=DEV)
    gp = torch.randn(B, E, device=DEV)
    r, psum = _tr().route_with_gating(x, K, B, mask, renormalize=False)
    w0, _ = ref.route_ref(x0, K, False)
    p0 = (torch.softmax(x0, -1) * mask.reshape(-1, 1)).view(B, S, E).sum(1)
    ((r.weights * g).sum() if use == "weights" else (psum * gp).sum()).backward()
    ((w0 * g).sum() if use == "weights" else (p0 * gp).sum()).backward()
    torch.testing.assert_close(x.grad, x0.grad)
    assert x.grad.abs().max() > 1e-3


def _saved(fn):
    """(numel, storage pointer, dtype) of every tensor autograd saves while fn() runs."""
    saved = []

    def pack(t):
        saved.append((t.numel(), t.untyped_storage().data_ptr(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.interpreter
def test_saves_nothing_token_by_expert_but_the_logits():
    B, S, E, K, L = 2, 16, 8, 2, 2
    T = B * S
    layers = [distinct_logits(T, E, torch.float32).requires_grad_() for _ in range(L)]
    logits_ptrs = {x.untyped_storage().data_ptr() for x in layers}
    mask, y = make_mask(B, S), torch.randint(0, E, (B,), device=DEV)
    g = [torch.randn(T, K, device=DEV) for _ in range(L)]
    for backend, fused in (("triton", True), ("torch", False)):
        saved = _saved(lambda: _fused_loss(layers, K, B, mask, True, "paper", y, g, backend))
        big = [s for s in saved if s[0] >= T * E and s[1] not in logits_ptrs]
        if fused:
            assert not big, f"route_with_gating saved a (T, E)-sized tensor besides the logits: {big}"
            assert any(p in logits_ptrs for _, p, _ in saved)  # the logits themselves are saved
            # what else is kept is O(T*K + T + B*E) per layer: ids, weights, g, the mask, psum
            assert sum(n for n, p, _ in saved if p not in logits_ptrs) <= L * (3 * T * K + T + 4 * B * E) + 64
        else:  # the check can fail: the torch fallback keeps the (T, E) probabilities
            assert big


@pytest.mark.interpreter
def test_torch_fallback_and_dispatch():
    B, S, E, K = 3, 4, 6, 2
    x = distinct_logits(B * S, E, torch.float32)
    mask = make_mask(B, S)
    r_t, p_t = h3moe.route_with_gating(x, K, B, mask, backend="triton")
    r_c, p_c = h3moe.route_with_gating(x, K, B, mask, backend="torch")
    r_a, p_a = h3moe.route_with_gating(x, K, B, mask)  # auto on CPU: torch
    for r, p in ((r_c, p_c), (r_a, p_a)):
        torch.testing.assert_close(r.weights, r_t.weights)
        assert torch.equal(r.ids, r_t.ids) and torch.equal(r.sorted_slots, r_t.sorted_slots)
        torch.testing.assert_close(p, p_t)
    w0, ids0 = ref.route_ref(x, K)
    torch.testing.assert_close(r_c.weights, w0)
    torch.testing.assert_close(p_c / mask.sum(1, keepdim=True), ref.mean_router_probs_ref(x, B, mask))
    r, p = _route_with_gating_torch(x.double(), K, B, None, True)
    assert p.dtype == torch.float64 and torch.equal(r.ids, ids0)
    xl = distinct_logits(B * S, 300, torch.float32)  # E > 256: beyond the kernel's tile, the torch code runs
    r, p = h3moe.route_with_gating(xl, K, B, mask, backend="triton")
    r0, p0 = _route_with_gating_torch(xl, K, B, mask, True)
    assert torch.equal(r.ids, r0.ids) and torch.equal(p, p0)
    with pytest.raises(ValueError, match="num_samples"):
        h3moe.route_with_gating(x, K, 5)
    with pytest.raises(ValueError, match="attention_mask"):
        h3moe.route_with_gating(x, K, B, mask[:, :3])
    with pytest.raises(ValueError, match="top_k"):
        h3moe.route_with_gating(x, E + 1, B)
    with pytest.raises(ValueError, match="seq_len"):
        gating_loss_from_psums([p_c], torch.zeros(B, dtype=torch.long, device=DEV))


@pytest.mark.interpreter
def test_gating_loss_from_psums_matches_cuda_copy():
    from h3moe.ops import cuda

    B, S, E = 3, 5, 4
    layers = [torch.randn(B * S, E, device=DEV) for _ in range(2)]
    mask = make_mask(B, S)
    y = torch.randint(0, E, (B,), device=DEV)
    psums = [_route_with_gating_torch(x, 1, B, mask, True)[1] for x in layers]
    for variant in ("paper", "nll"):
        a = gating_loss_from_psums(psums, y, mask, variant)
        torch.testing.assert_close(a, cuda.gating_loss_from_psums(psums, y, mask, variant))
        torch.testing.assert_close(a, ref.gating_loss_ref(layers, y, mask, variant))


@pytest.mark.interpreter
def test_opcheck():
    B, S, E, K = 2, 5, 5, 2
    x = distinct_logits(B * S, E, torch.float32).requires_grad_()
    mask = make_mask(B, S).reshape(-1)
    op = torch.ops.h3moe.triton_route_gating.default
    torch.library.opcheck(op, (x, K, True, B, mask))
    torch.library.opcheck(op, (x, K, False, B, None))
    bwd = torch.ops.h3moe.triton_route_gating_bwd.default
    ids = ref.route_ref(x.detach(), K)[1]
    gw, gp = torch.randn(B * S, K, device=DEV), torch.randn(B, E, device=DEV)
    for args in ((gw, gp, mask), (None, gp, None), (gw, None, None)):
        torch.library.opcheck(bwd, (x.detach(), ids, *args, B, True))


@pytest.mark.interpreter
def test_torch_compile_traces_fullgraph():
    B, S, E, K = 2, 6, 6, 2
    x = distinct_logits(B * S, E, torch.float32).requires_grad_()
    mask = make_mask(B, S)

    def f(logits):
        r, psum = _tr().route_with_gating(logits, K, B, mask)
        return r.weights, r.sorted_slots, psum

    w, slots, psum = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    r0, p0 = _route_with_gating_torch(x.detach(), K, B, mask, True)
    torch.testing.assert_close(w, r0.weights)
    assert torch.equal(slots, r0.sorted_slots)
    torch.testing.assert_close(psum, p0)
    (psum * torch.randn(B, E, device=DEV)).sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------
# GPU tier

GPU = "cuda"


def _poison_allocator():
    """Fill the caching allocator's free blocks (large and small pools) with NaN bits: torch.empty in the op
    hands back poison (0x7fc00000 as int32: an out-of-range count or slot)."""
    junk = [torch.full((1 << 26,), float("nan"), device=GPU)]
    junk += [torch.full((1 << 17,), float("nan"), device=GPU) for _ in range(64)]
    del junk


def _cuda_ok(x, K):
    from h3moe.ops import cuda

    return cuda.supports("route", x, top_k=K)[0]


def _check_gpu_forward(r, psum, x, K, B, mask, renorm):
    """Routing against torch (ties allowed: compared through the selected fp64 probabilities), psum against
    an fp64 reference with an error at most a small multiple of eager fp32's."""
    p64 = torch.softmax(x.double(), -1)
    w0, ids0 = ref.route_ref(x, K, renorm)
    torch.testing.assert_close(r.weights, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p64.gather(1, r.ids), p64.gather(1, ids0), rtol=1e-5, atol=1e-7)
    assert (r.ids.sort(dim=1).values.diff(dim=1) > 0).all()
    counts, offsets, slots = sort_by_expert(r.ids, x.shape[1])
    assert torch.equal(r.counts, counts) and torch.equal(r.offsets, offsets) and torch.equal(r.sorted_slots, slots)
    T = x.shape[0]
    m = torch.ones(T, 1, dtype=torch.float64, device=x.device) if mask is None else mask.reshape(T, 1).double()
    ps64 = (p64 * m).view(B, -1, x.shape[1]).sum(1)
    eager = (torch.softmax(x.float(), -1) * m.float()).view(B, -1, x.shape[1]).sum(1)
    assert not psum.isnan().any()
    err, err_eager = (psum.double() - ps64).abs().max(), (eager.double() - ps64).abs().max()
    assert err <= 4 * err_eager + 1e-6 * ps64.abs().max(), (err, err_eager)


# (B, S, E, K)
GPU_SHAPES = [
    (8, 2048, 8, 2),  # Mixtral-like, T=16384
    (4, 4096, 64, 8),  # fine-grained
    (16, 1023, 128, 8),  # S not a multiple of BLOCK_T: a padded block per sample
    (2, 4096, 256, 8),  # largest E: BLOCK_T=8, 1024 programs
    (64, 1, 8, 2),  # one token per sample (decode-like): BLOCK_T shrinks to 8, one program per sample
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,E,K", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [True, False])
def test_gpu_forward(B, S, E, K, dtype, masked):
    x = (torch.randn(B * S, E, device=GPU) * 2).to(dtype)
    mask = make_mask(B, S, device=GPU) if masked else None
    _poison_allocator()
    r, psum = h3moe.route_with_gating(x, K, B, mask, backend="triton")
    for t in (r.weights, r.ids, r.counts, r.offsets, r.sorted_slots, psum):
        assert not t.double().isnan().any()
    _check_gpu_forward(r, psum, x, K, B, mask, True)
    r2, psum2 = h3moe.route_with_gating(x, K, B, mask, backend="triton")
    assert torch.equal(psum, psum2)  # deterministic: per-block partials summed in a fixed order, no atomics
    r0, p0 = h3moe.route_with_gating(x, K, B, mask, backend="torch")
    torch.testing.assert_close(psum, p0, rtol=1e-5, atol=1e-4)
    if _cuda_ok(x, K):
        _poison_allocator()
        rc, pc = h3moe.route_with_gating(x, K, B, mask, backend="cuda")
        _check_gpu_forward(rc, pc, x, K, B, mask, True)
        torch.testing.assert_close(psum, pc, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(r.weights, rc.weights, rtol=1e-5, atol=1e-6)


def _weights_at(logits, ids, renorm=True):
    """Softmax (renormalized) at given experts: the fp64 reference for a given choice of experts."""
    p = torch.softmax(logits.double(), -1).gather(1, ids)
    return p / p.sum(-1, keepdim=True) if renorm else p


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,S,E,K", [(4, 2048, 64, 8), (8, 1000, 8, 2)])
@pytest.mark.parametrize("variant", ["paper", "nll"])
def test_gpu_backward(dtype, B, S, E, K, variant):
    L, T = 2, B * S
    layers = [(torch.randn(T, E, device=GPU) * 2).to(dtype).requires_grad_() for _ in range(L)]
    mask = make_mask(B, S, device=GPU)
    y = torch.randint(0, E, (B,), device=GPU)
    g = [torch.randn(T, K, device=GPU) for _ in range(L)]

    def run(backend):
        xs = [x.detach().clone().requires_grad_() for x in layers]
        psums, top, ids = [], 0, []
        for x, gl in zip(xs, g):
            r, p = h3moe.route_with_gating(x, K, B, mask, backend=backend)
            psums.append(p)
            ids.append(r.ids)
            top = top + (r.weights * gl).sum()
        (top + gating_loss_from_psums(psums, y, mask, variant)).backward()
        return [x.grad for x in xs], ids

    def ref64(ids):  # fp64 reference of the same loss for this backend's choice of experts (bf16 ties)
        xs = [x.detach().double().requires_grad_() for x in layers]
        top = sum((_weights_at(x, i) * gl.double()).sum() for x, i, gl in zip(xs, ids, g))
        (top + ref.gating_loss_ref(xs, y, mask, variant)).backward()
        return [x.grad for x in xs]

    _poison_allocator()
    grads, ids = run("triton")
    grads_eager, ids_eager = run("torch")
    backends = [(grads, ids)] + ([run("cuda")] if _cuda_ok(layers[0], K) else [])
    errs_eager = [(ge.double() - g64).abs().max() for ge, g64 in zip(grads_eager, ref64(ids_eager))]
    for gr, i in backends:
        for gx, g64, err_eager in zip(gr, ref64(i), errs_eager):
            assert gx.dtype == dtype and not gx.isnan().any()
            err = (gx.double() - g64).abs().max()
            assert err <= 2 * err_eager + 1e-6 * g64.abs().max() + 1e-9, (err, err_eager)


@pytest.mark.gpu
def test_gpu_saves_no_token_by_expert_tensor():
    B, S, E, K = 8, 2048, 128, 8
    x = torch.randn(B * S, E, device=GPU, dtype=torch.bfloat16).requires_grad_()
    mask = make_mask(B, S, device=GPU)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    r, psum = h3moe.route_with_gating(x, K, B, mask, backend="triton")
    loss = r.weights.sum() + psum.square().sum()
    torch.cuda.synchronize()
    # Kept until the backward: (T, K) weights fp32, ids int64, slots int32 (16 bytes per slot), psum and small
    # metadata. A (T, E) bf16 copy (256 bytes per token here) or fp32 probabilities (512) would not fit.
    kept = torch.cuda.memory_allocated() - base
    assert kept < B * S * (K * 16 + 8) + (1 << 16), kept
    loss.backward()
    assert not x.grad.isnan().any()


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    B, S, E, K = 4, 1024, 64, 8
    static_x = torch.randn(B * S, E, device=GPU, dtype=torch.bfloat16)
    mask = make_mask(B, S, device=GPU)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _tr().route_with_gating(static_x, K, B, mask)  # warm-up (compiles the kernels)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises on any host synchronization
        r, psum = _tr().route_with_gating(static_x, K, B, mask)
    for _ in range(2):
        static_x.copy_(torch.randn(B * S, E, device=GPU, dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        _check_gpu_forward(r, psum, static_x, K, B, mask, True)
