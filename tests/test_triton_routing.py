"""Triton routing (h3moe.ops.triton_routing) against the torch backend and reference.route_ref.

Interpreter tier (tiny shapes: CPU tensors under TRITON_INTERPRET=1, or CUDA tensors where there is a GPU) and GPU tier (marker gpu: realistic shapes, bf16/fp16/
fp32, poisoned outputs, CUDA-graph capture, torch.compile(fullgraph=True)).
"""
import pytest
import torch

pytest.importorskip("triton")

import h3moe  # noqa: E402
from h3moe import reference as ref  # noqa: E402
from h3moe.ops.routing import _route_torch, sort_by_expert  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _tr():
    from h3moe.ops import triton_routing

    return triton_routing


def distinct_logits(T, E, dtype, device=DEV, spacing=0.3, bias=None):
    """Rows of distinct logits (a random permutation of an evenly spaced ramp plus < spacing/3 of noise), so
    every row's order, and so torch.topk's, is unique: the ids must then match exactly."""
    ramp = torch.argsort(torch.rand(T, E, device=device), dim=1).float() * spacing
    x = ramp + torch.rand(T, E, device=device) * (spacing / 3) - (E * spacing) / 2
    if bias is not None:
        x = x + bias.to(device)
    return x.to(dtype)


def assert_routing_equal(r, r0, exact_ids=True):
    torch.testing.assert_close(r.weights, r0.weights, rtol=2e-6, atol=2e-7)
    assert r.weights.dtype == r0.weights.dtype and r.ids.dtype == torch.int64
    assert r.counts.dtype == r.offsets.dtype == r.sorted_slots.dtype == torch.int32
    if exact_ids:
        assert torch.equal(r.ids, r0.ids)
    counts, offsets, slots = sort_by_expert(r.ids, r.counts.shape[0])
    assert torch.equal(r.counts, counts)
    assert torch.equal(r.offsets, offsets)
    assert torch.equal(r.sorted_slots, slots)


# (T, E, K, dtype, renormalize)
CASES = [
    (5, 8, 2, torch.float32, True),  # T < BLOCK_T: one block, mostly padding rows
    (37, 7, 3, torch.float16, True),  # prime E (padded to 8 with -inf), fp16 logits
    (23, 7, 1, torch.float32, True),  # K=1: renormalized weights are all 1
    (19, 7, 7, torch.float32, False),  # K=E: every expert, no renormalization
    (150, 256, 2, torch.float32, True),  # largest E; 19 blocks of 8 > BLOCK_B=16: the scan loops twice
    (70, 64, 8, torch.float16, True),  # several blocks of 32: cross-block prefix, K=8 (K_PAD=8)
    (9, 5, 3, torch.float64, True),  # fp64 logits: fp64 weights, as the torch backend
]


@pytest.mark.interpreter
@pytest.mark.parametrize("T,E,K,dtype,renorm", CASES)
def test_route_matches_torch(T, E, K, dtype, renorm):
    x = distinct_logits(T, E, dtype)
    r = _tr().route(x, K, renorm)
    assert_routing_equal(r, _route_torch(x, K, renorm))
    w_ref, ids_ref = ref.route_ref(x, K, renorm)
    torch.testing.assert_close(r.weights, w_ref, rtol=2e-6, atol=2e-7)


@pytest.mark.interpreter
def test_route_dispatch_and_noncontiguous():
    x = distinct_logits(40, 6, torch.float32).t().contiguous().t()  # (T, E) with column stride T
    assert x.stride(1) != 1
    r = h3moe.route(x, 2, backend="triton")
    assert_routing_equal(r, _route_torch(x, 2, True))


@pytest.mark.interpreter
def test_expert_with_no_tokens_and_all_on_one():
    T, E = 33, 7
    bias = torch.zeros(E)
    bias[2] = -50.0  # expert 2 never picked
    bias[5] = 50.0  # expert 5 always first
    x = distinct_logits(T, E, torch.float32, bias=bias)
    r = _tr().route(x, 1, True)
    assert_routing_equal(r, _route_torch(x, 1, True))
    assert r.counts[5].item() == T and r.counts.sum().item() == T
    assert torch.equal(r.sorted_slots, torch.arange(T, dtype=torch.int32, device=DEV))
    r = _tr().route(x, 3, False)
    assert_routing_equal(r, _route_torch(x, 3, False))
    assert r.counts[2].item() == 0 and r.counts[5].item() == T


@pytest.mark.interpreter
def test_ties_go_to_lowest_index():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], device=DEV)
    r = _tr().route(x, 3, True)
    assert r.ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    torch.testing.assert_close(r.weights, torch.full((2, 3), 1 / 3, device=DEV))


@pytest.mark.interpreter
def test_random_ties_consistent():
    # Logits on a coarse grid: many exact ties. Tie order may differ from torch.topk's (unspecified);
    # the selected probabilities and the metadata of our ids must still be right.
    T, E, K = 41, 6, 3
    x = (torch.randint(0, 4, (T, E), device=DEV).float() * 0.5).to(torch.float16)
    r = _tr().route(x, K, False)
    r0 = _route_torch(x, K, False)
    assert_routing_equal(r, r0, exact_ids=False)
    p = torch.softmax(x.float(), dim=-1)
    torch.testing.assert_close(torch.gather(p, 1, r.ids), r.weights, rtol=1e-6, atol=1e-7)
    assert (r.ids.sort(dim=1).values.diff(dim=1) > 0).all()  # K distinct experts per token


@pytest.mark.interpreter
def test_no_tokens():
    x = torch.randn(0, 5, device=DEV)
    r = _tr().route(x, 2, True)
    assert r.weights.shape == (0, 2) and r.ids.shape == (0, 2) and r.sorted_slots.shape == (0,)
    assert torch.equal(r.counts, torch.zeros(5, dtype=torch.int32, device=DEV))
    assert torch.equal(r.offsets, torch.zeros(6, dtype=torch.int32, device=DEV))


# (T, E, K, dtype, renormalize)
GRAD_CASES = [
    (13, 7, 2, torch.float32, True),  # prime E, renormalized
    (13, 7, 2, torch.float32, False),  # without renormalization
    (10, 5, 5, torch.float64, True),  # K=E: the renormalized weights are the softmax itself
    (21, 8, 1, torch.float16, True),  # K=1 renormalized: weights are constant 1, gradient is 0
    (21, 8, 3, torch.float16, False),  # fp16 logits, fp16 gradient
]


@pytest.mark.interpreter
@pytest.mark.parametrize("T,E,K,dtype,renorm", GRAD_CASES)
def test_route_backward(T, E, K, dtype, renorm):
    x = distinct_logits(T, E, dtype).requires_grad_()
    x0 = x.detach().clone().requires_grad_()
    g = torch.randn(T, K, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEV)
    (_tr().route(x, K, renorm).weights * g).sum().backward()
    (_route_torch(x0, K, renorm).weights * g).sum().backward()
    assert x.grad.dtype == dtype
    if dtype == torch.float16:
        torch.testing.assert_close(x.grad, x0.grad, rtol=1e-3, atol=1e-5)
    else:
        torch.testing.assert_close(x.grad, x0.grad)
    if K == 1 and renorm:
        assert x.grad.abs().max() < 1e-6
    else:
        assert x.grad.abs().max() > 1e-3  # not a vacuous comparison


@pytest.mark.interpreter
def test_opcheck():
    x = distinct_logits(11, 5, torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.h3moe.triton_route.default, (x, 2, True))
    ids = _route_torch(x.detach(), 2, True).ids
    torch.library.opcheck(torch.ops.h3moe.triton_route_bwd.default, (torch.randn(11, 2, device=DEV), x.detach(), ids, False))


@pytest.mark.interpreter
def test_torch_compile_traces_fullgraph():
    x = distinct_logits(12, 6, torch.float32).requires_grad_()

    def f(logits):
        r = _tr().route(logits, 2, True)
        return r.weights, r.sorted_slots

    w, slots = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    r0 = _route_torch(x.detach(), 2, True)
    torch.testing.assert_close(w, r0.weights)
    assert torch.equal(slots, r0.sorted_slots)
    w.sum().backward()  # renormalized weights sum to 1: the gradient is ~0, but it must flow
    assert x.grad is not None and x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------------------
# GPU tier


def _poison_allocator():
    """Fill the caching allocator's free blocks, large pool and small (<= 1 MiB) pool, with NaN bits, so
    torch.empty in the op hands back poison (0x7fc00000 as int32: an out-of-range count or slot)."""
    junk = [torch.full((1 << 26,), float("nan"), device="cuda")]
    junk += [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(64)]
    del junk


def _assert_gpu_routing(r, x, K, renorm):
    r0 = _route_torch(x, K, renorm)
    torch.testing.assert_close(r.weights, r0.weights, rtol=1e-5, atol=1e-6)
    # Ties (frequent with bf16 logits) may be ordered differently: compare the selected probabilities.
    p = torch.softmax(x.double() if x.dtype == torch.float64 else x.float(), dim=-1)
    torch.testing.assert_close(torch.gather(p, 1, r.ids), torch.gather(p, 1, r0.ids), rtol=1e-5, atol=1e-7)
    assert (r.ids.sort(dim=1).values.diff(dim=1) > 0).all()
    counts, offsets, slots = sort_by_expert(r.ids, x.shape[1])
    assert torch.equal(r.counts, counts) and torch.equal(r.offsets, offsets) and torch.equal(r.sorted_slots, slots)


# (T, E, K)
GPU_SHAPES = [
    (16384, 8, 2),  # Mixtral
    (16384, 64, 8),  # fine-grained
    (16384, 128, 8),  # Qwen3-MoE-like
    (16383, 128, 2),  # T not a multiple of BLOCK_T
    (1, 256, 8),  # decode: one token, largest E
]


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("renorm", [True, False])
def test_gpu_route(T, E, K, dtype, renorm):
    x = (torch.randn(T, E, device="cuda") * 2).to(dtype)
    _poison_allocator()
    r = _tr().route(x, K, renorm)
    for t in (r.weights, r.ids, r.counts, r.offsets, r.sorted_slots):
        assert not t.double().isnan().any()
    _assert_gpu_routing(r, x, K, renorm)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_route_backward(dtype):
    T, E, K = 8192, 64, 8
    x = (torch.randn(T, E, device="cuda") * 2).to(dtype).requires_grad_()
    g = torch.randn(T, K, device="cuda")

    def weights_at(logits, ids):  # renormalized softmax at the given experts: the fp64 reference per choice
        p = torch.softmax(logits.double(), -1).gather(1, ids)
        return p / p.sum(-1, keepdim=True)

    r = _tr().route(x, K, True)
    (r.weights * g).sum().backward()
    xe = x.detach().clone().requires_grad_()  # eager torch, same dtype
    re = _route_torch(xe, K, True)
    (re.weights * g).sum().backward()
    # bf16 logits tie often (E=64 values of 8-bit mantissa); the kernel and torch.topk may then choose
    # different, equally valid experts, so each is checked against the fp64 reference for its own choice.
    errs = []
    for grad, ids in ((x.grad, r.ids), (xe.grad, re.ids)):
        x64 = x.detach().double().requires_grad_()
        (weights_at(x64, ids) * g.double()).sum().backward()
        errs.append((grad.double() - x64.grad).abs().max())
    err, err_eager = errs
    assert err <= 2 * err_eager + 1e-6, (err, err_eager)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 32, 4096])  # one launch (BLOCK_T = 32 at E = 64), two launches
def test_gpu_cuda_graph_capture(T):
    E, K = 64, 8
    static_x = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _tr().route(static_x, K, True)  # warm-up (compiles the kernels)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises on any host synchronization
        r = _tr().route(static_x, K, True)
    for _ in range(2):
        static_x.copy_(torch.randn(T, E, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        _assert_gpu_routing(r, static_x, K, True)


_WARM_THEN_CAPTURE = """
import sys, torch
from h3moe.ops import triton_routing as tr
from h3moe.kernels import routing as kr
warm_T, cap_T, E, K = map(int, sys.argv[1:])
logits = torch.randn(warm_T, E, device="cuda", dtype=torch.bfloat16)
tr.route(logits, K)  # the only warm-up, at one token count
tr.sort_by_expert(torch.randint(0, E, (warm_T, K), device="cuda"), E)
torch.cuda.synchronize()
x = torch.randn(cap_T, E, device="cuda", dtype=torch.bfloat16)
ids = torch.randint(0, E, (cap_T, K), device="cuda")
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):  # a kernel first loaded here would raise
    r = tr.route(x, K)
    c, o, s = tr.sort_by_expert(ids, E)
g.replay()
torch.cuda.synchronize()
p = torch.softmax(x.float(), -1)
got = torch.sort(torch.gather(p, 1, r.ids), -1, descending=True).values  # the top-k probabilities (ties aside)
assert torch.allclose(got, torch.topk(p, K, dim=-1).values, rtol=1e-5, atol=1e-7), "ids"
assert torch.equal(torch.sort(r.sorted_slots.long()).values, torch.arange(cap_T * K, device="cuda")), "slots"
assert int(o[-1]) == cap_T * K and torch.equal(c.long(), torch.bincount(ids.flatten(), minlength=E)), "sort"
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("warm_T,cap_T", [(1, 4096), (4096, 1)])
def test_gpu_one_warm_up_covers_both_routing_paths(warm_T, cap_T):
    """In a fresh process (no kernel loaded yet), one warm-up at a decode token count lets a capture at a
    prefill count run, and the other way round, though the two take different kernels (one launch at T <=
    BLOCK_T, two beyond): the first call loads both (_load_both)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _WARM_THEN_CAPTURE, str(warm_T), str(cap_T), "64", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    T, E, K = 4096, 128, 8
    x = torch.randn(T, E, device="cuda", dtype=torch.bfloat16).requires_grad_()
    g = torch.randn(T, K, device="cuda")

    @torch.compile(fullgraph=True)
    def f(logits):
        r = _tr().route(logits, K, True)
        return r.weights * 2.0, r.ids, r.counts, r.offsets, r.sorted_slots

    w, ids, counts, offsets, slots = f(x)
    _assert_gpu_routing(h3moe.Routing(w.detach() / 2, ids, counts, offsets, slots), x.detach(), K, True)
    (w * g).sum().backward()
    xe = x.detach().clone().requires_grad_()
    (_tr().route(xe, K, True).weights * 2.0 * g).sum().backward()
    torch.testing.assert_close(x.grad, xe.grad)


@pytest.mark.interpreter
@pytest.mark.parametrize("T,E,K,mode", [
    (37, 8, 2, "topk"),  # one block of BLOCK_T = 64 tokens
    (150, 16, 4, "topk"),  # three blocks
    (100, 64, 8, "dups"),  # four blocks of 32, K = 8 with repeats
    (20, 6, 3, "dups"),  # a token naming an expert twice (given ids need not come from a top-k)
    (9, 300, 2, "topk"),  # E > 256: the torch function
    (0, 8, 2, "topk"),
])
def test_sort_by_expert_from_ids_equals_torch(T, E, K, mode):
    """The Triton counting sort of given ids (transformers' experts interface) equals the torch function:
    counts, offsets and the stable order of the slots."""
    from h3moe.ops import triton_routing as tr
    from h3moe.ops.routing import sort_by_expert as torch_sort

    g = torch.Generator().manual_seed(T + E)
    if mode == "dups":
        ids = torch.randint(0, E, (T, K), generator=g)
    else:
        ids = torch.topk(torch.randn(T, E, generator=g), K, dim=-1).indices
    ids = ids.to(DEV)
    got = tr.sort_by_expert(ids.to(torch.int32), E)
    want = torch_sort(ids, E)
    for a, b in zip(got, want):
        assert a.dtype == torch.int32 and torch.equal(a.cpu(), b.cpu())


def check_nan_rows_route_every_slot(r, logits, bad, K):
    """Rows `bad` of logits hold a NaN or inf (fp16 overflow in training: the row's softmax is NaN). They still
    pick K distinct experts in range, with NaN weights (the layer's output turns NaN, which AMP's grad scaler
    detects and skips), and every slot has its row of sorted_slots (an unwritten row would send the experts
    kernels to a garbage token: an illegal address that takes the CUDA context down). The other rows are
    routed as from clean logits."""
    T, E = logits.shape
    good = torch.ones(T, dtype=torch.bool)
    good[bad] = False
    ids = r.ids.cpu()
    assert ((ids >= 0) & (ids < E)).all()
    assert all(len(set(row.tolist())) == K for row in ids)
    assert r.weights[bad].isnan().all() and not r.weights[good.to(r.weights.device)].isnan().any()
    assert torch.equal(torch.sort(r.sorted_slots.cpu().long()).values, torch.arange(T * K))
    counts, offsets, slots = sort_by_expert(r.ids, E)
    assert torch.equal(r.counts, counts) and torch.equal(r.offsets, offsets) and torch.equal(r.sorted_slots, slots)
    clean = _route_torch(logits[good.to(logits.device)], K, True)
    torch.testing.assert_close(r.weights[good.to(r.weights.device)], clean.weights, rtol=1e-5, atol=1e-6)
    assert torch.equal(r.ids[good.to(r.ids.device)], clean.ids)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, under the interpreter
@pytest.mark.parametrize("T,E,K", [(5, 8, 2), (70, 64, 8)])  # one block; several blocks
def test_nan_rows_still_route_every_slot(T, E, K):
    logits = distinct_logits(T, E, torch.float32)
    logits[1, 3] = float("nan")
    logits[T - 1, 0] = float("inf")
    check_nan_rows_route_every_slot(_tr().route(logits, K), logits, [1, T - 1], K)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("T,E,K,dtype", [(1, 8, 2, torch.bfloat16), (4096, 64, 8, torch.bfloat16),
                                         (3000, 8, 2, torch.float16)])
def test_gpu_nan_rows_still_route_every_slot(backend, T, E, K, dtype):
    """check_nan_rows_route_every_slot on both GPU backends, at decode and training sizes (the cuda kernel
    ranks NaN the same way)."""
    from h3moe import _backend

    if not _backend.runs(backend, "route", torch.device("cuda")):
        pytest.skip(f"{backend} routing does not run here")
    logits = distinct_logits(T, E, torch.float32, device="cuda")
    bad = [0] if T == 1 else [0, T // 2, T - 1]
    logits[bad[0], E // 2] = float("nan")
    if T > 1:
        logits[bad[1], 0] = float("inf")
        logits[bad[2], :] = float("-inf")  # all -inf: 0/0
    logits = logits.to(dtype)
    check_nan_rows_route_every_slot(h3moe.route(logits, K, backend=backend), logits.float(), bad, K)


@pytest.mark.interpreter
@pytest.mark.parametrize("E,K", [(8, 2), (64, 8), (7, 7)])
def test_one_block_routing_is_one_launch(monkeypatch, E, K):
    """Where one program holds every token (T <= BLOCK_T: decode), route and sort_by_expert (ids with
    repeats) sort in that program: no scatter launch, no ticket memset, and the same outputs, bit for bit, as
    the two-launch path."""
    from h3moe.kernels import routing as kr
    from h3moe.ops import triton_routing as tr

    T = kr.block_t_for(triton_next_pow2(E))  # the most tokens one block holds
    logits = torch.randn(T, E, device=DEV)
    g = torch.Generator().manual_seed(E)
    ids = torch.randint(0, E, (T, K), generator=g).to(DEV)
    ids[0, :2] = 1  # a token naming one expert twice

    def run():
        r = tr.route(logits, K)
        return (r.weights, r.ids, r.counts, r.offsets, r.sorted_slots, *tr.sort_by_expert(ids, E))

    scatters, zeros = [], []
    real_scatter, real_zeros = kr.route_scatter_kernel, torch.zeros

    class Counted:
        def __getitem__(self, grid):
            scatters.append(grid)
            return real_scatter[grid]

    monkeypatch.setattr(kr, "route_scatter_kernel", Counted())
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: zeros.append(a) or real_zeros(*a, **k))
    one = run()
    assert not scatters and not zeros, (scatters, zeros)
    monkeypatch.setattr(tr, "ONE_BLOCK", False)
    two = run()
    assert len(scatters) == 2 and len(zeros) == 2
    for a, b in zip(one, two):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # and both equal the torch functions
    want = sort_by_expert(one[1], E)
    assert all(torch.equal(x, y) for x, y in zip(one[2:5], want))


@pytest.mark.interpreter
def test_first_call_loads_both_routing_paths(monkeypatch):
    """The first GPU call of a routing shape family also runs the path it did not take (one launch at T <=
    BLOCK_T, two beyond) once, on a dummy input: a warm-up at one token count then covers the others under a
    CUDA graph capture, where Triton cannot load a kernel. Later calls of the family run their own path only.
    (The GPU is faked: under the interpreter every launch is a CPU call.)"""
    from h3moe.kernels import routing as kr
    from h3moe.ops import triton_routing as tr

    monkeypatch.setattr(tr, "_on_gpu", lambda t: True)
    monkeypatch.setattr(tr, "_BOTH", set())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    launches = []
    for name in ("route_topk_kernel", "route_scatter_kernel", "ids_histogram_kernel"):
        real = getattr(kr, name)

        class Counted:
            def __getitem__(self, grid, real=real, name=name):
                launches.append((name, grid[0]))
                return real[grid]

        monkeypatch.setattr(kr, name, Counted())
    E, K = 8, 2
    bt = kr.block_t_for(8)
    logits = torch.randn(1, E, device=DEV)
    rng = torch.get_rng_state()
    tr.route(logits, K)  # one block; then the dummy call's two blocks
    assert launches == [("route_topk_kernel", 1), ("route_topk_kernel", 2), ("route_scatter_kernel", 2)]
    assert torch.equal(torch.get_rng_state(), rng)  # the dummy inputs draw nothing from the user's RNG
    launches.clear()
    tr.route(torch.randn(3 * bt, E, device=DEV), K)  # same family: its own two launches only
    assert launches == [("route_topk_kernel", 3), ("route_scatter_kernel", 3)]
    launches.clear()
    tr.route(torch.randn(2, E, device=DEV), K, renormalize=False)  # another family
    assert len(launches) == 3
    launches.clear()
    ids = torch.randint(0, E, (3 * bt, K), device=DEV)
    tr.sort_by_expert(ids, E)  # two blocks, then the dummy call's one
    assert launches == [("ids_histogram_kernel", 3), ("route_scatter_kernel", 3), ("ids_histogram_kernel", 1)]
    launches.clear()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    tr.sort_by_expert(ids[:, :1], E)  # a new family met inside a capture: nothing extra is launched there
    assert len(launches) == 2


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


@pytest.mark.interpreter
def test_moe_with_an_ids_pair_sorts_on_triton(monkeypatch):
    """h3moe.moe(..., (weights, ids), backend="triton") builds the sort metadata with the Triton kernels."""
    from h3moe.ops import triton_routing as tr

    calls = []
    real = tr._sort_by_expert_impl
    monkeypatch.setattr(tr, "_sort_by_expert_impl", lambda *a: calls.append(1) or real(*a))
    T, H, I, E, K = 5, 16, 16, 4, 2
    x = torch.randn(T, H, device=DEV)
    wgu = torch.randn(E, 2 * I, H, device=DEV) / 4
    wd = torch.randn(E, H, I, device=DEV) / 4
    w, ids = torch.topk(torch.softmax(torch.randn(T, E, device=DEV), -1), K, dim=-1)
    with torch.no_grad():
        y = h3moe.moe(x, wgu, wd, (w, ids), backend="triton")
    assert calls == [1]
    ref = h3moe.reference.experts_ref(x.double(), wgu.double(), wd.double(), w.double(), ids)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_sort_by_expert_opcheck():
    from h3moe.ops import triton_routing as tr

    ids = torch.topk(torch.randn(6, 8), 2, dim=-1).indices.to(DEV)
    torch.library.opcheck(torch.ops.h3moe.triton_sort_by_expert.default, (ids, 8))
    assert tr._sort_by_expert is not None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,E,K", [(4096, 128, 8), (16384, 8, 2), (1, 64, 8)])
def test_gpu_sort_by_expert_from_ids(T, E, K):
    from h3moe.ops import triton_routing as tr

    ids = torch.topk(torch.randn(T, E, device="cuda"), K, dim=-1).indices
    for i in (ids, torch.randint(0, E, (T, K), device="cuda")):  # top-k ids, and ids with repeats
        for a, b in zip(tr.sort_by_expert(i, E), sort_by_expert(i, E)):
            assert torch.equal(a, b)
