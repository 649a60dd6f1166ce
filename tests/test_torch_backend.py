"""The torch backend against the references: forward and every gradient; the public API's checks."""
import pytest
import torch

import h3moe
from h3moe import reference as ref
from h3moe.ops.routing import sort_by_expert

CASES = [
    # (T, H, I, E, K)
    (1, 8, 6, 4, 2),  # a single token
    (5, 16, 12, 7, 1),  # prime E, k=1
    (9, 10, 7, 5, 5),  # k=E, odd H and I
    (33, 24, 20, 8, 2),  # Mixtral-like routing on a tiny layer
    (17, 12, 8, 16, 4),  # more experts than tokens per slot: some get none
]


def _inputs(T, H, I, E, dtype):
    x = torch.randn(T, H, dtype=dtype)
    w_gate_up = (torch.randn(E, 2 * I, H) / H**0.5).to(dtype)
    w_down = (torch.randn(E, H, I) / I**0.5).to(dtype)
    logits = torch.randn(T, E, dtype=dtype)
    return x, w_gate_up, w_down, logits


@pytest.mark.parametrize("T,H,I,E,K", CASES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_equals_reference(T, H, I, E, K, renormalize):
    logits = torch.randn(T, E)
    r = h3moe.route(logits, K, renormalize=renormalize, backend="torch")
    w, ids = ref.route_ref(logits, K, renormalize)
    assert torch.equal(r.ids, ids)
    torch.testing.assert_close(r.weights, w)
    # Metadata: rows sorted by expert, stable in token order, counts/offsets consistent.
    flat = ids.reshape(-1)
    assert torch.equal(r.counts, torch.bincount(flat, minlength=E).int())
    assert torch.equal(r.offsets[1:], torch.cumsum(r.counts, 0).int()) and r.offsets[0] == 0
    assert torch.equal(flat[r.sorted_slots.long()], torch.sort(flat, stable=True).values)
    for e in range(E):
        seg = r.sorted_slots[r.offsets[e]:r.offsets[e + 1]]
        assert torch.all(seg[1:] > seg[:-1])


def _assert_same_fwd_bwd(y, y_ref, leaves, leaves_ref, names=("x", "w_gate_up", "w_down", "logits")):
    """y equals y_ref, and so does every leaf's gradient after one random backward through both."""
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name, a, b in zip(names, leaves, leaves_ref):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("T,H,I,E,K", CASES)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_moe_forward_and_grads_fp64(T, H, I, E, K, activation):
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, wgu, wd, logits)]
    leaves_ref = [t.clone().requires_grad_() for t in (x, wgu, wd, logits)]

    r = h3moe.route(leaves[3], K, backend="torch")
    y = h3moe.moe(leaves[0], leaves[1], leaves[2], r, activation=activation, backend="torch")
    w, ids = ref.route_ref(leaves_ref[3], K)
    y_ref = ref.experts_ref(leaves_ref[0], leaves_ref[1], leaves_ref[2], w, ids, activation)
    _assert_same_fwd_bwd(y, y_ref, leaves, leaves_ref)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_moe_lower_precision_grouped_mm(dtype, tol):
    T, H, I, E, K = 64, 32, 48, 8, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, dtype)
    r = h3moe.route(logits, K, backend="torch")
    y = h3moe.moe(x, wgu, wd, r, backend="torch")
    y_ref = ref.experts_ref(x.double(), wgu.double(), wd.double(), r.weights.double(), r.ids)
    assert y.dtype == dtype
    rel = ((y.double() - y_ref).norm() / y_ref.norm()).item()
    assert rel < tol, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_weight_grads_arrive_in_the_weights_layout(dtype):
    """The expert weight gradients leave the op in the weights' own (row-major) layout: AccumulateGrad keeps
    them as they are instead of copying them into that layout (GBs per layer at real shapes)."""
    T, H, I, E, K = 64, 32, 48, 8, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, dtype)
    wgu.requires_grad_()
    wd.requires_grad_()
    seen = {}
    wgu.register_hook(lambda g: seen.__setitem__("gate_up", g.is_contiguous()))
    wd.register_hook(lambda g: seen.__setitem__("down", g.is_contiguous()))
    r = h3moe.route(logits, K, backend="torch")
    h3moe.moe(x, wgu, wd, r, backend="torch").float().square().sum().backward()
    assert seen == {"gate_up": True, "down": True}


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_glu_gradcheck_fp64(activation):
    """The torch backend's fused act(gate)*up autograd (one d(h) buffer) against finite differences."""
    from h3moe.ops.experts import _GLU

    h = torch.randn(7, 10, dtype=torch.float64)
    if activation == "relu":  # keep finite differences away from the kink
        h = h + 0.1 * torch.sign(h)
    h.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _GLU.apply(t, activation), (h,))
    torch.testing.assert_close(_GLU.apply(h, activation), ref.ACTIVATIONS[activation](h[:, :5]) * h[:, 5:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_glu_silu_backward_rounds_as_eager_autograd(dtype):
    """16-bit SwiGLU: the backward's fused path (silu_backward, one product per half, written into d(h)'s
    halves) equals eager autograd of silu(gate) * up bit for bit, on a non-contiguous incoming gradient."""
    from h3moe.ops.experts import _GLU

    g = torch.Generator().manual_seed(3)
    h = torch.randn(33, 2 * 40, generator=g).to(dtype)
    da = torch.randn(40, 33, generator=g).to(dtype).t()  # (S, I), transposed strides
    mine = h.clone().requires_grad_()
    _GLU.apply(mine, "silu").backward(da)
    eager = h.clone().requires_grad_()
    (torch.nn.functional.silu(eager[:, :40]) * eager[:, 40:]).backward(da)
    assert mine.grad.dtype == dtype and mine.grad.is_contiguous()
    assert torch.equal(mine.grad, eager.grad)
    # and within 16-bit rounding of the fp64 derivative
    want = h.double().requires_grad_()
    (torch.nn.functional.silu(want[:, :40]) * want[:, 40:]).backward(da.double())
    torch.testing.assert_close(mine.grad.double(), want.grad, rtol=2e-2, atol=2e-2)


def test_moe_gradcheck_fp64():
    T, H, I, E, K = 6, 5, 4, 3, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float64)
    args = [t.requires_grad_() for t in (x, wgu, wd, logits)]

    def fn(x, wgu, wd, logits):
        return h3moe.moe(x, wgu, wd, h3moe.route(logits, K, backend="torch"), backend="torch")

    assert torch.autograd.gradcheck(fn, args)


def test_moe_edge_routings():
    T, H, I, E, K = 12, 8, 6, 5, 2
    x, wgu, wd, _ = _inputs(T, H, I, E, torch.float32)
    # All tokens on experts 3 and 1; the others get none.
    ids = torch.tensor([[3, 1]] * T)
    w = torch.rand(T, K)
    y = h3moe.moe(x, wgu, wd, (w, ids), backend="torch")
    torch.testing.assert_close(y, ref.experts_ref(x, wgu, wd, w, ids))
    # T = 0.
    r = h3moe.route(torch.randn(0, E), K, backend="torch")
    y0 = h3moe.moe(x[:0], wgu, wd, r, backend="torch")
    assert y0.shape == (0, H)


def test_sort_by_expert_int32_ids():
    ids = torch.randint(0, 6, (10, 3), dtype=torch.int32)
    c, o, s = sort_by_expert(ids, 6)
    c2, o2, s2 = sort_by_expert(ids.long(), 6)
    assert torch.equal(c, c2) and torch.equal(o, o2) and torch.equal(s, s2)


def test_moe_module_keeps_router_logits_and_matches_reference():
    m = h3moe.MoE(16, 12, 6, 2, backend="torch").double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y = m(x)
    assert y.shape == x.shape and m.router_logits.shape == (10, 6)
    y_ref, logits = ref.moe_ref(x.reshape(-1, 16), m.gate.weight, m.gate_up_proj, m.down_proj, 2)
    torch.testing.assert_close(y.reshape(-1, 16), y_ref)
    torch.testing.assert_close(m.router_logits, logits)
    loss = h3moe.gating_loss([m.router_logits], torch.tensor([1, 4])) + y.square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_losses_equal_reference():
    layers = [torch.randn(12, 5) for _ in range(3)]
    labels = torch.tensor([0, 4, 2])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    torch.testing.assert_close(h3moe.gating_loss(layers, labels, mask, backend="torch"),
                               ref.gating_loss_ref(layers, labels, mask))
    torch.testing.assert_close(h3moe.load_balancing_loss(layers, 5, 2), ref.load_balancing_loss_ref(layers, 5, 2))
    torch.testing.assert_close(h3moe.z_loss(layers, mask), ref.z_loss_ref(layers, mask))
    w = torch.randn(5, 3, 4)
    torch.testing.assert_close(h3moe.drift_reg([w], 0.1), ref.drift_reg_ref([w], 0.1))


# ---- bad input raises ValueError naming the argument --------------------------------------------------

def _good():
    x, wgu, wd, logits = _inputs(4, 8, 6, 3, torch.float32)
    return x, wgu, wd, h3moe.route(logits, 2, backend="torch")


@pytest.mark.parametrize("mutate,name", [
    (lambda a: {**a, "x": a["x"][None]}, "x"),  # wrong rank
    (lambda a: {**a, "x": a["x"].long()}, "x"),  # integer x
    (lambda a: {**a, "w_gate_up": a["w_gate_up"][:, :, :5]}, "w_gate_up"),  # mismatched H
    (lambda a: {**a, "w_gate_up": a["w_gate_up"][:, :11]}, "w_gate_up"),  # odd 2I
    (lambda a: {**a, "w_down": a["w_down"][:, :, :5]}, "w_down"),  # mismatched I
    (lambda a: {**a, "w_down": a["w_down"][:2]}, "w_down"),  # mismatched E
    (lambda a: {**a, "w_down": a["w_down"][0]}, "w_down"),  # wrong rank
    (lambda a: {**a, "routing": (a["routing"].weights[:3], a["routing"].ids[:3])}, "routing"),  # wrong T
    (lambda a: {**a, "activation": "tanh"}, "activation"),
])
def test_moe_bad_input(mutate, name):
    x, wgu, wd, r = _good()
    args = mutate({"x": x, "w_gate_up": wgu, "w_down": wd, "routing": r, "activation": "silu"})
    with pytest.raises(ValueError, match=name):
        h3moe.moe(args["x"], args["w_gate_up"], args["w_down"], args["routing"], activation=args["activation"])


@pytest.mark.parametrize("k", [0, 6, -1, 2.0, True])
def test_route_bad_top_k(k):
    with pytest.raises(ValueError, match="top_k"):
        h3moe.route(torch.randn(4, 5), k)


def test_route_bad_logits():
    with pytest.raises(ValueError, match="logits"):
        h3moe.route(torch.randn(2, 4, 5), 2)
    with pytest.raises(ValueError, match="logits"):
        h3moe.route(torch.randint(0, 3, (4, 5)), 2)


def test_module_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        h3moe.MoE(8, 4, 3, 4)
    with pytest.raises(ValueError, match="hidden_size"):
        h3moe.MoE(0, 4, 3, 2)
    m = h3moe.MoE(8, 4, 3, 2)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 7))


def test_gating_loss_bad_input():
    with pytest.raises(ValueError, match="labels"):
        h3moe.gating_loss([torch.randn(6, 4)], torch.ones(3, 5))
    with pytest.raises(ValueError, match="variant"):
        h3moe.gating_loss([torch.randn(6, 4)], torch.tensor([0, 1]), variant="x")
    with pytest.raises(ValueError, match="router_logits"):
        h3moe.gating_loss([], torch.tensor([0, 1]))


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_swiglu_limit_fp64(activation):
    """swiglu_limit (DeepSeek-V4's clamped SwiGLU): the torch backend's forward and every gradient equal the
    reference's (its autograd through torch.clamp) in fp64; finite differences agree away from the kinks; the
    clamp binds (the output differs from the unclamped one)."""
    from h3moe.ops.experts import _GLU

    T, H, I, E, K, L = 12, 16, 10, 4, 2, 0.7
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, wgu, wd, logits)]
    leaves_ref = [t.clone().requires_grad_() for t in (x, wgu, wd, logits)]
    r = h3moe.route(leaves[3], K, backend="torch")
    y = h3moe.moe(*leaves[:3], r, activation=activation, backend="torch", swiglu_limit=L)
    w, ids = ref.route_ref(leaves_ref[3], K)
    y_ref = ref.experts_ref(*leaves_ref[:3], w, ids, activation, L)
    torch.testing.assert_close(y, y_ref)
    assert (y_ref - ref.experts_ref(x, wgu, wd, w.detach(), ids, activation)).abs().max() > 0.1
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "logits"), leaves, leaves_ref):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, n=name: f"d{n}: {m}")
    h = torch.randn(7, 20, dtype=torch.float64) * 2
    h = torch.where((h.abs() - L).abs() < 0.05, h + 0.1, h).requires_grad_()  # away from the clamps' kinks
    assert torch.autograd.gradcheck(lambda t: _GLU.apply(t, activation, L), (h,))


@pytest.mark.parametrize("limit", [0, -1.0, float("inf"), float("nan"), True, "7"])
def test_bad_swiglu_limit(limit):
    x, wgu, wd, logits = _inputs(3, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="swiglu_limit"):
        h3moe.moe(x, wgu, wd, h3moe.route(logits, 1), swiglu_limit=limit)


def test_moe_module_swiglu_limit_and_quantized():
    """h3moe.MoE(swiglu_limit=L) runs the clamped SwiGLU (= moe_ref with L), and keeps it once quantized."""
    torch.manual_seed(0)
    m = h3moe.MoE(32, 16, 4, 2, swiglu_limit=0.5)
    x = torch.randn(7, 32)
    want, _ = ref.moe_ref(x, m.gate.weight, m.gate_up_proj, m.down_proj, 2, swiglu_limit=0.5)
    torch.testing.assert_close(m(x), want)
    assert (want - ref.moe_ref(x, m.gate.weight, m.gate_up_proj, m.down_proj, 2)[0]).abs().max() > 0.05
    assert "swiglu_limit=0.5" in repr(m)
    h3moe.quantize(m, "int8")
    wq, _ = ref.moe_ref(x, m.gate.weight, m.gate_up_proj.dequantize(), m.down_proj.dequantize(), 2,
                        swiglu_limit=0.5)
    torch.testing.assert_close(m(x), wq, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="swiglu_limit"):
        h3moe.MoE(32, 16, 4, 2, swiglu_limit=-1)


@pytest.mark.parametrize("activation", ["relu2", "gelu"])
def test_ungated_experts_fp64(activation):
    """gated=False (Nemotron-H): w_up (E, I, H), y = Σ w · down(act(up)); forward and every gradient equal the
    reference in fp64; gradcheck; the shape and flag checks."""
    T, H, I, E, K = 8, 12, 10, 4, 2
    x, wgu, wd, logits = _inputs(T, H, I, E, torch.float64)
    wu = wgu[:, :I].contiguous()
    leaves = [t.clone().requires_grad_() for t in (x, wu, wd, logits)]
    leaves_ref = [t.clone().requires_grad_() for t in (x, wu, wd, logits)]
    y = h3moe.moe(*leaves[:3], h3moe.route(leaves[3], K, backend="torch"), activation=activation, gated=False,
                  backend="torch")
    w, ids = ref.route_ref(leaves_ref[3], K)
    y_ref = ref.experts_ref(*leaves_ref[:3], w, ids, activation, gated=False)
    _assert_same_fwd_bwd(y, y_ref, leaves, leaves_ref, ("x", "w_up", "w_down", "logits"))
    args = [t.detach().clone().requires_grad_() for t in (x, wu, wd)]
    r = h3moe.route(logits, K, backend="torch")
    assert torch.autograd.gradcheck(
        lambda *a: h3moe.moe(*a, r, activation=activation, gated=False, backend="torch"), args)
    with pytest.raises(ValueError, match="gated"):
        h3moe.moe(x, wu, wd, r, gated=False, swiglu_limit=1.0)
    with pytest.raises(ValueError, match="intermediate size"):
        h3moe.moe(x, wgu, wd, r, gated=False)  # (E, 2I, H) is not an ungated w_up
