"""Hash routing (Roller et al. 2021; DeepSeek-V4's first MoE layers, transformers 5.25's DeepseekV4HashRouter): the
experts are the frozen table's row tid2eid[input_id]; the weights are the live √softplus scores gathered there,
normalised and scaled, so the gate still trains. Checked against float64 formulas written here, with padding."""
import pytest
import torch

import deepseek_moe as dm
from deepseek_moe.testing import assert_close
from float64_reference import moe_rows

H, E, K, I, V = 16, 8, 2, 8, 50


def make_layer(**fields):
    base = dict(hidden_size=H, expert_hidden_size=I, num_routed_experts=E, num_shared_experts=1, top_k=K,
                score_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, aux_loss_alpha=0.01,
                hash_vocab_size=V, backend="torch", initializer_range=0.5, bias_update_speed=0.01)
    return dm.DeepSeekMoELayer(**{**base, **fields})


def by_formula(layer, x_TH, ids_T, table):
    p = {n: t.detach().double() for n, t in layer.state_dict().items() if t.is_floating_point()}
    W = p["gate.weight"].clone().requires_grad_()
    x = x_TH.double()
    s = torch.sqrt(torch.log1p(torch.exp(x @ W.T)))
    idx = table[ids_T]
    w = s.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * 1.5
    probs = s / s.sum(-1, keepdim=True)
    f = E / (K * x.shape[0]) * torch.bincount(idx.reshape(-1), minlength=E).double()
    return moe_rows(p, x, idx, w), 0.01 * (f * probs.mean(0)).sum(), idx, W


def test_hash_routing_against_float64_with_padding():
    torch.manual_seed(0)
    layer = make_layer()
    table = torch.stack([torch.randperm(E)[:K] for _ in range(V)])
    layer.load_state_dict({**layer.state_dict(), "gate.tid2eid": table})
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(torch.randn(E))  # steers nothing under hash routing
    x = torch.randn(3, 5, H)
    ids = torch.randint(0, V, (3, 5))
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3:] = True
    ids[mask] = 10 ** 6  # padded positions are never looked up
    with dm.record_routing(layer) as routes:
        y = layer(x, padding_mask=mask, input_ids=ids)
    y_ref, aux_ref, idx, W = by_formula(layer, x[~mask], ids[~mask], table)
    assert torch.equal(routes[""][0][~mask], idx) and (routes[""][0][mask] == -1).all()
    assert torch.equal(layer.tokens_per_expert, torch.bincount(idx.reshape(-1), minlength=E))
    assert_close(y[~mask], y_ref, 1e-5, "y")
    assert torch.equal(y[mask], torch.zeros_like(y[mask]))
    assert_close(layer.aux_loss, aux_ref, 1e-5, "aux loss from the table's load")
    r = torch.randn_like(y)
    ((y * r).sum() + layer.aux_loss).backward()
    ((y_ref * r[~mask].double()).sum() + aux_ref).backward()
    assert_close(layer.gate.weight.grad, W.grad, 1e-5, "gate gradient through the weights")
    bias = layer.gate.e_score_correction_bias.clone()
    layer.update_bias()  # a bias cannot change a hash choice: it does not move
    assert torch.equal(layer.gate.e_score_correction_bias, bias)
    assert int(layer.load_since_update.sum()) == 0


def test_the_context_the_keyword_replay_and_the_table_in_the_state_dict():
    torch.manual_seed(0)
    layer = make_layer()
    x, ids = torch.randn(2, 5, H), torch.randint(0, V, (2, 5))
    direct = layer(x, input_ids=ids)
    with dm.input_ids(ids):
        assert torch.equal(layer(x), direct)
    forced = torch.stack([torch.randperm(E)[:K] for _ in range(10)]).view(2, 5, K)
    with dm.input_ids(ids), dm.replay_routing(layer, {"": [forced]}), dm.record_routing(layer) as used:
        layer(x)
    assert torch.equal(used[""][0], forced)  # replayed ids win over the table
    state = layer.state_dict()
    assert state["gate.tid2eid"].dtype == torch.int64 and state["gate.tid2eid"].shape == (V, K)
    with torch.device("meta"):
        meta = make_layer()
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.gate.tid2eid, layer.gate.tid2eid)
    rows = layer.gate.tid2eid
    assert (rows.sort(-1).values[:, 1:] != rows.sort(-1).values[:, :-1]).all()  # K distinct experts per token
    counts = torch.bincount(rows.reshape(-1), minlength=E)
    assert counts.max() - counts.min() <= V * K // E  # the default table spreads the vocabulary


def test_every_bad_hash_input_is_a_clear_error():
    layer = make_layer()
    x = torch.randn(2, 5, H)
    with pytest.raises(ValueError, match="hash_vocab_size=50\\) needs the token ids"):
        layer(x)
    with pytest.raises(ValueError, match="input_ids has shape \\(2, 4\\); expected"):
        layer(x, input_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        layer(x, input_ids=torch.zeros(2, 5))
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[1, 3] = V
    with pytest.raises(ValueError, match="input_ids at position \\(1, 3\\) is 50, outside"):
        layer(x, input_ids=ids)
    bad = layer.gate.tid2eid.clone()
    bad[7] = torch.tensor([3, 3])
    layer.gate.tid2eid.copy_(bad)
    with pytest.raises(ValueError, match="gate.tid2eid\\[7\\] = \\[3, 3\\]"):
        layer(x, input_ids=torch.full((2, 5), 7))
    with pytest.raises(dm.ConfigError, match="hash_vocab_size"):
        make_layer(num_groups=4, topk_groups=2)
    with pytest.raises(dm.ConfigError, match="hash_vocab_size"):
        make_layer(hash_vocab_size=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_ids_context_must_cover_the_checkpoint_recompute(reentrant):
    """Checkpointing re-runs the forward in backward: inside the same `with dm.input_ids` block it routes by the
    same ids (the gradients of the plain forward); after the block, or inside another one (the next micro-batch's),
    a clear error instead of routing by no or other ids."""
    from torch.utils.checkpoint import checkpoint

    layer = make_layer()
    x = torch.randn(2, 6, H, requires_grad=True)  # reentrant checkpointing needs an input that requires grad
    ids, other = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 6))
    with dm.input_ids(ids):
        layer(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    with dm.input_ids(ids):
        checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    for name, p in layer.named_parameters():
        assert_close(p.grad, expected[name], 1e-6, f"grad {name}")
    with dm.input_ids(ids):
        y = checkpoint(layer, x, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match="after the `with dm.input_ids\\(ids\\)` block its forward ran in"):
        y.square().sum().backward()
    with dm.input_ids(ids):
        y = checkpoint(layer, x, use_reentrant=reentrant)
    with dm.input_ids(other), pytest.raises(RuntimeError, match="inside another `with dm.input_ids\\(ids\\)`"):
        y.square().sum().backward()
