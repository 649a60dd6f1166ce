"""Triton gating loss (h3moe.ops.triton_gating) against reference.gating_loss_ref: forward, gradients, and
that it keeps O(B·E), not O(T·E), memory for autograd.

Interpreter tier (tiny shapes: CPU under TRITON_INTERPRET=1, or CUDA where there is a GPU) and GPU tier (marker gpu).
"""
import pytest
import torch

pytest.importorskip("triton")

import h3moe  # noqa: E402
from h3moe import reference as ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter tier runs on the GPU where there is one


def _tg():
    from h3moe.ops import triton_gating

    return triton_gating


def _inputs(B, S, E, dtype, L, masked, label_kind, device=DEV, shape3d=False, empty_sample=False):
    layers = []
    for _ in range(L):
        g = (torch.randn(B, S, E, device=device) * 2).to(dtype)
        layers.append((g if shape3d else g.reshape(B * S, E)).requires_grad_())
    if label_kind == "hard":
        labels = torch.randint(0, E, (B,), device=device)
    else:
        labels = torch.softmax(torch.randn(B, E, device=device) * 2, dim=-1)
    mask = None
    if masked:
        mask = (torch.rand(B, S, device=device) > 0.3).long()
        mask[0, 0] = 1
        if empty_sample:
            mask[-1] = 0  # a sample with no real token: its count clamps to 1, p̄ = 0 ("nll" would be inf)
    return layers, labels, mask


def _grads(loss, layers):
    return torch.autograd.grad(loss, layers)


# (B, S, E, dtype, L, masked, variant, labels)
CASES = [
    (2, 5, 4, torch.float32, 1, False, "paper", "hard"),  # S < BLOCK_S: one tile, mostly padding
    (3, 37, 7, torch.float16, 2, True, "paper", "soft"),  # prime E, fp16, 2 layers, a fully masked sample
    (2, 40, 4, torch.float32, 3, True, "nll", "hard"),  # three layers, nll
    (4, 17, 2, torch.float16, 1, False, "nll", "soft"),  # E=2 (two fused models), soft targets
    (2, 1100, 4, torch.float32, 1, True, "paper", "hard"),  # S > BLOCK_S=512: three tiles per sample
    (2, 20, 64, torch.float32, 1, True, "nll", "soft"),  # E=64
    (2, 9, 5, torch.float64, 2, True, "paper", "soft"),  # fp64 logits: fp64 loss, as the reference
]


@pytest.mark.interpreter
@pytest.mark.parametrize("B,S,E,dtype,L,masked,variant,labels", CASES)
def test_gating_loss_matches_reference(B, S, E, dtype, L, masked, variant, labels):
    layers, y, mask = _inputs(B, S, E, dtype, L, masked, labels, empty_sample=masked and variant == "paper" and B > 2)
    loss = _tg().gating_loss(layers, y, mask, variant)
    loss_ref = ref.gating_loss_ref(layers, y, mask, variant)
    assert loss.dtype == loss_ref.dtype
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    grads, grads_ref = _grads(loss, layers), _grads(loss_ref, layers)
    for g, g0 in zip(grads, grads_ref):
        assert g.dtype == dtype and g.shape == g0.shape
        if dtype == torch.float16:
            torch.testing.assert_close(g, g0, rtol=2e-3, atol=1e-6)
        else:
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-9)
        assert g0.abs().max() > 0  # a nonzero gradient: the comparison is not vacuous
    if masked:
        m = mask.reshape(-1).bool()
        assert all((g.reshape(-1, E)[~m] == 0).all() for g in grads)  # padding gets no gradient


@pytest.mark.interpreter
def test_public_api_3d_and_stacked_layers():
    B, S, E, L = 2, 6, 4, 2
    layers, y, mask = _inputs(B, S, E, torch.float32, L, True, "hard", shape3d=True)
    stacked = torch.stack([g.detach() for g in layers]).requires_grad_()  # (L, B, S, E)
    loss = h3moe.gating_loss(stacked, y, mask, backend="triton")
    torch.testing.assert_close(loss, ref.gating_loss_ref(stacked, y, mask))
    (g,) = torch.autograd.grad(loss, stacked)
    (g0,) = torch.autograd.grad(ref.gating_loss_ref(stacked, y, mask), stacked)
    torch.testing.assert_close(g, g0)


@pytest.mark.interpreter
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int32])  # the kernel reads any dtype
def test_mean_router_probs(mask_dtype):
    layers, _, mask = _inputs(3, 10, 5, torch.float16, 2, True, "hard")
    mask = mask.to(mask_dtype)
    p = _tg().mean_router_probs(layers, 3, mask)
    torch.testing.assert_close(p, ref.mean_router_probs_ref(layers, 3, mask), rtol=1e-5, atol=1e-7)
    (g,) = torch.autograd.grad((p * torch.randn_like(p)).sum(), layers[0])
    assert (g.reshape(3, 10, 5)[~mask.bool()] == 0).all() and g.abs().max() > 0


def _saved_numels(fn):
    """numel and data_ptr of every tensor autograd saves while fn() runs."""
    saved = []

    def pack(t):
        saved.append((t.numel(), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.interpreter
def test_saves_no_token_by_expert_tensor():
    B, S, E, L = 2, 64, 8, 2
    layers, y, mask = _inputs(B, S, E, torch.float32, L, True, "soft")
    inputs = {g.untyped_storage().data_ptr() for g in layers}
    T = B * S
    for variant in ("paper", "nll"):
        saved = _saved_numels(lambda: _tg().gating_loss(layers, y, mask, variant))
        big = [(n, p) for n, p in saved if n >= T * E and p not in inputs]
        assert not big, f"the Triton path saved a (T, E)-sized tensor for backward: {big}"
        assert sum(n for n, p in saved if p not in inputs) <= 4 * L * (B * S + B * E) + 64
    # The check can fail: the eager reference keeps (T, E) fp32 probabilities alive.
    saved = _saved_numels(lambda: ref.gating_loss_ref(layers, y, mask, "paper"))
    assert any(n >= T * E and p not in inputs for n, p in saved)


@pytest.mark.interpreter
def test_opcheck():
    B, S, E = 2, 5, 3
    logits = torch.randn(B * S, E, device=DEV, requires_grad=True)
    mask = (torch.rand(B, S, device=DEV) > 0.3).float()
    torch.library.opcheck(torch.ops.h3moe.triton_gating_pbar.default, (logits, mask, B))
    torch.library.opcheck(torch.ops.h3moe.triton_gating_pbar.default, (logits, None, B))
    torch.library.opcheck(torch.ops.h3moe.triton_gating_pbar_bwd.default, (torch.randn(B, E, device=DEV), logits.detach(), mask, B))


# ---------------------------------------------------------------------------------------------------------
# GPU tier

# (B, S, E, L)
GPU_SHAPES = [
    (8, 2048, 4, 2),  # H3Fusion: 4 fused models, 2 layers, T=16384
    (8, 2048, 8, 1),  # E=8
    (4, 4096, 64, 2),  # fine-grained E=64
    (3, 1999, 7, 1),  # odd S, prime E
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,E,L", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("variant,labels", [("paper", "hard"), ("nll", "soft")])
def test_gpu_gating_loss(B, S, E, L, dtype, variant, labels):
    layers, y, mask = _inputs(B, S, E, dtype, L, True, labels, device="cuda")
    # Poison the allocator's free blocks (large and small pools): torch.empty in the op returns NaN bits.
    junk = [torch.full((1 << 26,), float("nan"), device="cuda")]
    junk += [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(64)]
    del junk
    loss = _tg().gating_loss(layers, y, mask, variant)
    grads = _grads(loss, layers)
    eager = ref.gating_loss_ref(layers, y, mask, variant)
    grads_eager = _grads(eager, layers)
    layers64 = [g.detach().double().requires_grad_() for g in layers]
    ref64 = ref.gating_loss_ref(layers64, y, mask, variant)
    grads64 = _grads(ref64, layers64)
    assert torch.isfinite(loss)
    assert (loss.double() - ref64).abs() <= 2 * (eager.double() - ref64).abs() + 1e-6
    for g, ge, g64 in zip(grads, grads_eager, grads64):
        assert not g.isnan().any()
        err = (g.double() - g64).abs().max()
        err_eager = (ge.double() - g64).abs().max()
        assert err <= 2 * err_eager + 1e-6 * g64.abs().max() + 1e-9, (err, err_eager)


@pytest.mark.gpu
def test_gpu_forward_memory_is_o_b_e():
    B, S, E, L = 8, 4096, 8, 2
    layers, y, mask = _inputs(B, S, E, torch.bfloat16, L, True, "hard", device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = _tg().gating_loss(layers, y, mask, "paper")
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base  # held from the forward until the backward
    peak = torch.cuda.max_memory_allocated() - base
    probs_bytes = B * S * E * 4  # one layer's (T, E) fp32 probabilities: what the eager path keeps per layer
    logits_bytes = sum(g.numel() * g.element_size() for g in layers)
    assert kept < probs_bytes / 4, (kept, probs_bytes)  # O(B·E) per layer kept, nothing (T, E)-sized
    # Transient: all layers go through one launch, so one concatenated copy of the logits in their own dtype
    # (bf16 here) and the repeated (L*B, S) mask exist during the forward; still under one fp32 (T, E) per layer.
    assert peak <= L * probs_bytes, (peak, logits_bytes, probs_bytes)
    assert torch.isfinite(loss)
