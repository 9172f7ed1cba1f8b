"""Balance losses: closed forms at uniform routing and at collapse, seq vs batch, which parameters learn."""
import math

import pytest
import torch

import deepseek_moe as dm
from deepseek_moe import losses as L
from deepseek_moe.testing import make_topk

ALPHA = 0.37


def _uniform(T, E, K):
    return torch.full((T, E), 1.0 / E), make_topk(T, E, K, "balanced")


@pytest.mark.parametrize("T,E,K", [(64, 8, 2), (96, 64, 6), (10, 5, 5)])
def test_expert_loss_uniform_gives_alpha(T, E, K):
    probs, topk = _uniform(T, E, K)
    assert L.expert_balance_loss(probs, topk, ALPHA).item() == pytest.approx(ALPHA, rel=1e-6)
    assert L.expert_balance_loss(probs, topk, ALPHA, num_sequences=4 if T % 4 == 0 else 1).item() \
        == pytest.approx(ALPHA, rel=1e-6)


@pytest.mark.parametrize("E,K", [(8, 1), (8, 2), (64, 6)])
def test_expert_loss_total_collapse_gives_alpha_E_over_K(E, K):
    T = 32
    probs = torch.zeros(T, E)
    probs[:, :K] = 1.0 / K
    topk = torch.arange(K).expand(T, K)
    assert L.expert_balance_loss(probs, topk, ALPHA).item() == pytest.approx(ALPHA * E / K, rel=1e-6)


def test_seq_variant_differs_from_batch_when_sequences_disagree():
    # Sequence 0 sends everything to expert 0, sequence 1 to expert 1: balanced over the batch, not per sequence.
    E, S = 2, 8
    probs = torch.cat([torch.tensor([[1.0, 0.0]]).expand(S, E), torch.tensor([[0.0, 1.0]]).expand(S, E)])
    topk = torch.cat([torch.zeros(S, 1, dtype=torch.long), torch.ones(S, 1, dtype=torch.long)])
    assert L.expert_balance_loss(probs, topk, 1.0, num_sequences=1).item() == pytest.approx(1.0)
    assert L.expert_balance_loss(probs, topk, 1.0, num_sequences=2).item() == pytest.approx(E)
    with pytest.raises(ValueError, match="num_sequences"):
        L.expert_balance_loss(probs, topk, 1.0, num_sequences=3)


def test_device_loss_closed_forms():
    T, E, K, D = 64, 16, 4, 4
    probs, topk = _uniform(T, E, K)
    assert L.device_balance_loss(probs, topk, D, ALPHA).item() == pytest.approx(ALPHA, rel=1e-6)
    # Everything on device 0's experts, probability spread over them: f'_0 = D, P'_0 = 1 -> α·D.
    probs = torch.zeros(T, E)
    probs[:, :E // D] = D / E
    topk = torch.arange(K).expand(T, K)
    assert L.device_balance_loss(probs, topk, D, ALPHA).item() == pytest.approx(ALPHA * D, rel=1e-6)


def test_comm_loss_closed_forms():
    T, E, D, M = 64, 16, 4, 2
    per = E // D
    probs = torch.full((T, E), 1.0 / E)
    # Token t sends to devices (t mod D) and (t+1 mod D): every token reaches M devices, devices evenly used.
    t = torch.arange(T)
    topk = torch.stack([(t % D) * per, ((t + 1) % D) * per], dim=1)
    assert L.comm_balance_loss(probs, topk, D, M, ALPHA).item() == pytest.approx(ALPHA, rel=1e-6)
    # All traffic to device 0 with all probability there: f''_0 = D/M, P''_0 = 1.
    probs = torch.zeros(T, E)
    probs[:, 0] = 1.0
    topk = torch.tensor([[0, 1]]).expand(T, 2)
    assert L.comm_balance_loss(probs, topk, D, M, ALPHA).item() == pytest.approx(ALPHA * D / M, rel=1e-6)


def test_sequence_wise_loss_uses_raw_topk_and_normalised_scores():
    T, E, K = 12, 6, 2
    scores = torch.rand(T, E) + 0.1
    ref_topk = scores.topk(K, dim=-1).indices
    probs = scores / scores.sum(-1, keepdim=True)
    expected = L.expert_balance_loss(probs, ref_topk, ALPHA, num_sequences=3)
    assert L.sequence_balance_loss(scores, K, ALPHA, num_sequences=3).item() == pytest.approx(expected.item())
    uniform = torch.full((T, E), 0.3)
    # Ties: topk of equal scores still picks K experts per token; P is exactly 1/E, so the loss is α·Σf/E = α.
    assert L.sequence_balance_loss(uniform, K, ALPHA).item() == pytest.approx(ALPHA, rel=1e-6)


def test_z_loss_closed_form():
    logits = torch.zeros(5, 8)
    assert L.router_z_loss(logits, 0.1).item() == pytest.approx(0.1 * math.log(8) ** 2, rel=1e-6)


def test_empty_batch_losses_are_zero():
    probs, topk = torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.long)
    for value in (L.expert_balance_loss(probs, topk, 1.0), L.device_balance_loss(probs, topk, 2, 1.0),
                  L.comm_balance_loss(probs, topk, 2, 1, 1.0), L.sequence_balance_loss(probs, 2, 1.0),
                  L.router_z_loss(probs, 1.0)):
        assert value.item() == 0.0


def test_only_the_router_gets_gradient_from_aux_loss():
    cfg = dm.MoEConfig(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2, num_devices=2,
                       aux_loss_alpha=0.01, device_loss_alpha=0.01, comm_loss_alpha=0.01, max_devices_per_token=1,
                       seq_aux=True, seq_balance_alpha=0.01, z_loss_coef=0.001)
    layer = dm.DeepSeekMoELayer(cfg)
    layer(torch.randn(2, 6, 16))
    layer.aux_loss.backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert grads.pop("gate.weight").abs().sum() > 0
    assert all(g is None for g in grads.values()), [n for n, g in grads.items() if g is not None]


def test_layer_aux_loss_sums_enabled_terms_and_is_zero_in_eval():
    cfg = dm.MoEConfig(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2, aux_loss_alpha=0.01,
                       z_loss_coef=0.001)
    layer = dm.DeepSeekMoELayer(cfg)
    x = torch.randn(3, 4, 16)
    layer(x)
    r = layer.gate(x.reshape(-1, 16))
    expected = (L.expert_balance_loss(r.scores_TE, r.topk_idx_TK, 0.01) + L.router_z_loss(r.logits_TE, 0.001))
    assert layer.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert layer.aux_loss.requires_grad
    layer.eval()
    layer(x)
    assert layer.aux_loss.item() == 0.0 and not layer.aux_loss.requires_grad
    model = torch.nn.Sequential(layer, dm.DeepSeekMoELayer(cfg))
    model.train()
    model(x)
    assert dm.aux_loss(model).item() == pytest.approx(model[0].aux_loss.item() + model[1].aux_loss.item())


def test_load_stats():
    s = L.load_stats(torch.tensor([2, 2, 2, 2]))
    assert s == {"max_vio": 0.0, "cv": 0.0}
    s = L.load_stats(torch.tensor([4, 0, 0, 0]))
    assert s["max_vio"] == pytest.approx(3.0) and s["cv"] == pytest.approx(math.sqrt(3))
    assert L.load_stats(torch.zeros(4, dtype=torch.long)) == {"max_vio": 0.0, "cv": 0.0}


def test_bias_update_direction():
    bias = torch.zeros(4)
    L.update_bias_(bias, torch.tensor([10, 2, 2, 2]), 0.1)
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])


def test_aux_loss_free_balancing_lowers_max_vio():
    torch.manual_seed(0)
    cfg = dm.MoEConfig(hidden_size=32, expert_hidden_size=8, num_routed_experts=16, num_shared_experts=0,
                       top_k=2, score_func="sigmoid", norm_topk_prob=True, aux_loss_alpha=0.0,
                       bias_update_speed=0.002)
    layer = dm.DeepSeekMoELayer(cfg)
    with torch.no_grad():
        layer.gate.weight.normal_(0, 32 ** -0.5)
    # A shared offset in every token makes some experts systematically preferred: a skewed router.
    x = torch.randn(1024, 32) + 1.5 * torch.randn(32)
    layer(x)
    before = layer.last_stats["max_vio"]
    for _ in range(300):
        layer(x)
        layer.update_bias()
    layer(x)
    after = layer.last_stats["max_vio"]
    assert before > 3.0, before
    assert after < 0.2, (before, after)
    assert int(layer.load_since_update.sum()) == x.shape[0] * cfg.top_k  # one forward since the last update
