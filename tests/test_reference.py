"""The eager references: fp64 gradchecks, parity with transformers' Mixtral block, the authors' gating loss."""
import pytest
import torch
import torch.nn.functional as F

from h3moe import reference as ref


def _experts(T, H, I, E, dtype=torch.float64):
    x = torch.randn(T, H, dtype=dtype)
    w_gate_up = torch.randn(E, 2 * I, H, dtype=dtype) / H**0.5
    w_down = torch.randn(E, H, I, dtype=dtype) / I**0.5
    return x, w_gate_up, w_down


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_ref_gradcheck(renormalize):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: ref.route_ref(l, 2, renormalize)[0], (logits,))


def test_route_ref_matches_definition():
    logits = torch.randn(9, 7)
    w, ids = ref.route_ref(logits, 3)
    p = torch.softmax(logits, -1)
    top = p.gather(1, ids)
    assert torch.equal(ids, torch.topk(p, 3, -1).indices)
    torch.testing.assert_close(w, top / top.sum(-1, keepdim=True))
    assert w.dtype == torch.float32 and ids.dtype == torch.int64


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_experts_ref_gradcheck(activation):
    x, wgu, wd = _experts(5, 6, 4, 3)
    logits = torch.randn(5, 3, dtype=torch.float64)
    weights, ids = ref.route_ref(logits, 2)
    args = [t.requires_grad_() for t in (x, wgu, wd, weights.detach().clone())]
    fn = lambda a, b, c, w: ref.experts_ref(a, b, c, w, ids, activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_experts_ref_matches_per_token_loop():
    x, wgu, wd = _experts(7, 8, 6, 4)
    w, ids = ref.route_ref(torch.randn(7, 4, dtype=torch.float64), 2)
    y = ref.experts_ref(x, wgu, wd, w, ids)
    for t in range(7):
        acc = torch.zeros(8, dtype=torch.float64)
        for k in range(2):
            e = ids[t, k]
            gate, up = (wgu[e] @ x[t]).chunk(2)
            acc += w[t, k] * (wd[e] @ (F.silu(gate) * up))
        torch.testing.assert_close(y[t], acc)


def test_route_and_experts_equal_transformers_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        y_hf = block(x)
        h = x.reshape(-1, 32)
        logits = h @ block.gate.weight.t()
        w, ids = ref.route_ref(logits, 2)
        y = ref.experts_ref(h, block.experts.gate_up_proj, block.experts.down_proj, w, ids).reshape(3, 5, 32)
    assert (y - y_hf).abs().max().item() <= 1e-5


def _authors_gating_loss(router_logits, labels):
    """The H3Fusion authors' trainer, written from its definition: softmax per layer, mean over each sample's
    tokens (dim 1), stack the layers and average, nn.CrossEntropyLoss against the task label."""
    B = labels.shape[0]
    probs = [torch.softmax(g.reshape(B, -1, g.shape[-1]).float(), dim=-1).mean(dim=1) for g in router_logits]
    gate = torch.stack(probs).mean(dim=0)
    return torch.nn.CrossEntropyLoss()(gate, labels)


def test_gating_loss_paper_equals_authors_formula():
    B, S, E, L = 4, 6, 3, 5
    layers = [torch.randn(B * S, E) * 3 for _ in range(L)]
    labels = torch.randint(0, E, (B,))
    got = ref.gating_loss_ref(layers, labels, attention_mask=None, variant="paper")
    torch.testing.assert_close(got, _authors_gating_loss(layers, labels))


def test_gating_loss_mask_excludes_padding_and_soft_labels():
    B, S, E = 3, 5, 4
    logits = torch.randn(B * S, E)
    mask = torch.ones(B, S)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    labels = torch.tensor([1, 0, 3])
    # Padding positions must not matter: change their logits, the loss stays.
    logits2 = logits.clone().reshape(B, S, E)
    logits2[mask == 0] = torch.randn(int((mask == 0).sum()), E) * 10
    a = ref.gating_loss_ref([logits], labels, mask)
    b = ref.gating_loss_ref([logits2.reshape(B * S, E)], labels, mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, ref.gating_loss_ref([logits2.reshape(B * S, E)], labels, None))
    soft = F.one_hot(labels, E).float()
    torch.testing.assert_close(ref.gating_loss_ref([logits], soft, mask), a)
    torch.testing.assert_close(ref.gating_loss_ref([logits], soft, mask, "nll"),
                               ref.gating_loss_ref([logits], labels, mask, "nll"))


@pytest.mark.parametrize("variant", ["paper", "nll"])
@pytest.mark.parametrize("masked", [False, True])
def test_gating_loss_gradcheck(variant, masked):
    B, S, E = 2, 3, 4
    layers = [torch.randn(B * S, E, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]) if masked else None
    labels = torch.tensor([2, 0])
    assert torch.autograd.gradcheck(lambda a, b: ref.gating_loss_ref([a, b], labels, mask, variant), layers)


def test_drift_reg_definition_and_gradcheck():
    E = 3
    gu = torch.randn(E, 4, 5, dtype=torch.float64, requires_grad=True)
    dn = torch.randn(E, 5, 2, dtype=torch.float64, requires_grad=True)
    gammas = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    gu0, dn0 = gu.detach() + 0.1 * torch.randn_like(gu), dn.detach() + 0.1 * torch.randn_like(dn)
    expected = sum(gammas[e] * ((gu[e] - gu0[e]).norm() + (dn[e] - dn0[e]).norm()) for e in range(E))
    # Two identical layers average to one layer's value.
    got = ref.drift_reg_ref([(gu, dn), (gu, dn)], gammas, initial=[(gu0, dn0), (gu0, dn0)])
    torch.testing.assert_close(got, expected)
    no_init = ref.drift_reg_ref((gu, dn), 0.5)
    torch.testing.assert_close(no_init, 0.5 * sum(gu[e].norm() + dn[e].norm() for e in range(E)))
    assert torch.autograd.gradcheck(lambda a, b: ref.drift_reg_ref([(a, b)], gammas, [(gu0, dn0)]), (gu, dn))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_equals_transformers(masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    B, S, E, K = 3, 4, 6, 2
    layers = tuple(torch.randn(B * S, E) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]) if masked else None
    torch.testing.assert_close(ref.load_balancing_loss_ref(layers, E, K, mask),
                               load_balancing_loss_func(layers, E, K, mask))


def test_load_balancing_and_z_loss_gradcheck():
    layers = [torch.randn(6, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda a, b: ref.load_balancing_loss_ref([a, b], 4, 2), layers)
    assert torch.autograd.gradcheck(lambda a, b: ref.z_loss_ref([a, b]), layers)
    g = layers[0].detach()
    torch.testing.assert_close(ref.z_loss_ref([g]), (torch.logsumexp(g, -1) ** 2).mean())
