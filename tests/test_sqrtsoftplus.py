"""DeepSeek-V4's affinities s = √softplus(x·Wᵀ) (transformers 5.25's DeepseekV4TopKRouter, scoring_func
"sqrtsoftplus"): the bias picks the experts and never weights them, weights normalised over the chosen experts
and scaled by routed_scaling_factor. Checked against float64 formulas written here, with padding."""
import pytest
import torch

import deepseek_moe as dm
from deepseek_moe.invariant import deterministic_algorithms
from deepseek_moe.testing import assert_close
from float64_reference import moe_rows

H, E, K, I = 16, 8, 2, 8


def make_layer(**fields):
    base = dict(hidden_size=H, expert_hidden_size=I, num_routed_experts=E, num_shared_experts=1, top_k=K,
                score_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, aux_loss_alpha=0.01,
                z_loss_coef=1e-3, backend="torch", initializer_range=0.5)
    return dm.DeepSeekMoELayer(**{**base, **fields})


def by_formula(layer, x_TH):
    """(y_TH, aux, topk_idx, W) in float64 for the real tokens x_TH, W the router weight as a leaf."""
    p = {n: t.detach().double() for n, t in layer.state_dict().items()}
    W = p["gate.weight"].clone().requires_grad_()
    x = x_TH.double()
    logits = x @ W.T
    s = torch.sqrt(torch.log1p(torch.exp(logits)))  # √softplus
    idx = (s.detach() + p["gate.e_score_correction_bias"]).topk(K, dim=-1).indices
    w = s.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * 1.5
    probs = s / s.sum(-1, keepdim=True)  # the balance losses' P: scores normalised per token
    f = E / (K * x.shape[0]) * torch.bincount(idx.reshape(-1), minlength=E).double()
    aux = 0.01 * (f * probs.mean(0)).sum() + 1e-3 * torch.logsumexp(logits, -1).square().mean()
    return moe_rows(p, x, idx, w), aux, idx, W


def test_sqrt_softplus_routing_output_losses_and_router_gradient_against_float64():
    torch.manual_seed(0)
    layer = make_layer()
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(torch.randn(E) * 0.3)
    x = torch.randn(3, 5, H)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[2, 2:] = True
    x[mask] = 1e4  # garbage at padding must not leak
    y = layer(x, padding_mask=mask)
    y_ref, aux_ref, idx, W = by_formula(layer, x[~mask])
    assert torch.equal(layer.tokens_per_expert, torch.bincount(idx.reshape(-1), minlength=E))
    assert torch.equal(y[mask], torch.zeros_like(y[mask]))
    assert_close(y[~mask], y_ref, 1e-5, "y")
    assert_close(layer.aux_loss, aux_ref, 1e-5, "aux loss")
    r = torch.randn_like(y)
    ((y * r).sum() + layer.aux_loss).backward()
    ((y_ref * r[~mask].double()).sum() + aux_ref).backward()
    assert_close(layer.gate.weight.grad, W.grad, 1e-5, "router gradient")


def test_sqrt_softplus_is_bitwise_batch_invariant_and_keeps_large_logits_finite():
    torch.manual_seed(0)
    layer = make_layer(initializer_range=3.0).eval()  # logits beyond softplus's threshold of 20
    x = torch.randn(40, H)
    with deterministic_algorithms(), torch.no_grad():
        batch = layer(x)
        alone = torch.cat([layer(x[t:t + 1]) for t in range(40)])
        assert (layer.gate(x).logits_TE.abs() > 20).any()
    assert torch.equal(alone, batch)
    assert_close(batch, layer(x), 1e-5, "invariant vs ATen softplus")
    train = make_layer(initializer_range=3.0)
    with deterministic_algorithms():
        out = train(x)
        (out.square().mean() + train.aux_loss).backward()
    assert torch.isfinite(train.gate.weight.grad).all()


@pytest.mark.parametrize("invariant", [False, True])
def test_a_logit_where_softplus_underflows_gives_the_float64_router_gradient(invariant):
    """Below x ≈ −104 softplus is exactly 0 in fp32 and torch's √ has an infinite derivative there: the router's
    whole weight gradient came out NaN (even for an expert no token picked). The float64 formula's gradient is
    finite, and its entries for that expert (e^(x/2)/2 ≈ 1e-26 of the others) are 0 in fp32."""
    torch.manual_seed(0)
    layer = make_layer(aux_loss_alpha=0.0, z_loss_coef=0.0)
    x = torch.randn(6, H)
    with torch.no_grad():
        layer.gate.weight[E - 1] = -200.0 * x[0] / x[0].square().sum()  # token 0's logit for the last expert: −200
    context = deterministic_algorithms() if invariant else torch.enable_grad()
    with context:
        y = layer(x)
        assert layer.gate(x).logits_TE[0, E - 1].item() == pytest.approx(-200.0, abs=1e-3)
        y.square().sum().backward()
    want, _, _, W = by_formula(layer, x)
    want.square().sum().backward()
    assert torch.isfinite(layer.gate.weight.grad).all()
    assert_close(layer.gate.weight.grad, W.grad, 1e-5, "router gradient")


def test_the_score_function_is_validated():
    with pytest.raises(dm.ConfigError, match="score_func"):
        make_layer(score_func="softplus")
