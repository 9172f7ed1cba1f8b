"""Router replay: record_routing / replay_routing / layer(x, topk_idx=...).

The replayed forward is checked against a float64 computation by hand from the recorded ids and the live (perturbed)
router: w = s(x·Wᵀ) gathered at the ids, normalised and scaled as DeepSeek-V3 routes (arXiv 2412.19437 eq. 12-13),
y = shared(x) + Σ_k w_k · expert_{id_k}(x). The ids used are read back by recording inside the replay block.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import deepseek_moe as dm
from deepseek_moe.testing import assert_close, spawn_gloo
from float64_reference import moe_rows

H = 16


def make_layer(**fields):
    base = dict(hidden_size=H, expert_hidden_size=8, num_routed_experts=8, num_shared_experts=1, top_k=2,
                backend="torch")
    return dm.DeepSeekMoELayer(**{**base, **fields})


def by_hand(layer, x_AH, ids_AK):
    """(y_AH, router weight W as a float64 leaf) for the real rows (ids not -1), from the formulas."""
    cfg = layer.config
    p = {n: t.detach().double() for n, t in layer.state_dict().items()}
    W = p["gate.weight"].clone().requires_grad_()
    x = x_AH.detach().double()
    logits = x @ W.T
    s = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    w = s.gather(1, ids_AK.clamp(min=0))
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return moe_rows(p, x, ids_AK, w * cfg.routed_scaling_factor), W


CONFIGS = {
    "softmax": dict(),
    "sigmoid_groups_bias": dict(score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, num_groups=4,
                                topk_groups=2, group_score="top2_sum"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_replay_uses_the_recorded_ids_and_equals_a_float64_hand_computation(name):
    torch.manual_seed(0)
    layer = make_layer(**CONFIGS[name])
    model = torch.nn.Sequential(layer, torch.nn.Tanh(), make_layer(**CONFIGS[name]))
    x = torch.randn(3, 5, H)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3:] = True
    with dm.padding_mask(mask), dm.record_routing(model) as routes:
        model(x)
        model(x * 2)
    assert sorted(routes) == ["0", "2"] and len(routes["0"]) == 2
    ids = routes["0"][0]
    assert ids.dtype == torch.int64 and ids.shape == (3, 5, 2)
    assert (ids[mask] == -1).all() and (ids[~mask] >= 0).all()

    with torch.no_grad():  # the trainer's router is not the rollout's
        layer.gate.weight.add_(0.5 * torch.randn_like(layer.gate.weight))
        layer.gate.e_score_correction_bias.copy_(torch.randn(8))
    live = layer(x, padding_mask=mask)
    xr = x.clone().requires_grad_()
    with dm.padding_mask(mask), dm.replay_routing(model, routes), dm.record_routing(model) as used:
        y = layer(xr)
        model(x * 2)  # the second recorded call of layer "0"
    for key in routes:
        assert all(torch.equal(a, b) for a, b in zip(used[key], routes[key])), key
    y_ref, W = by_hand(layer, x.reshape(-1, H), ids.reshape(-1, 2))
    assert_close(y.reshape(-1, H), y_ref, 1e-5, "replayed y")
    r = torch.randn_like(y)
    (y * r).sum().backward()
    (y_ref * r.double().reshape(-1, H)).sum().backward()
    assert_close(layer.gate.weight.grad, W.grad, 1e-5, "router gradient")
    assert not torch.equal(live, y.detach())  # the perturbed router would have chosen otherwise


def test_losses_loads_bias_steps_and_capacity_see_the_replayed_ids():
    torch.manual_seed(0)
    layer = make_layer(score_func="sigmoid", norm_topk_prob=True, bias_update_speed=0.01, aux_loss_alpha=0.01,
                       capacity_factor=1.0)
    x = torch.randn(40, H)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
    ids[:30, 0] = 5  # expert 5 overloaded: capacity must drop some of its pairs
    ids[:30, 1] = torch.where(ids[:30, 1] == 5, 6, ids[:30, 1])
    y = layer(x, topk_idx=ids)
    routed = torch.bincount(ids.reshape(-1), minlength=8)
    capacity = dm.plan.expert_capacity(40, 2, 8, 1.0)
    assert torch.equal(layer.tokens_per_expert, routed.clamp(max=capacity))
    assert layer.last_stats["num_dropped"] == int((routed - capacity).clamp(min=0).sum()) > 0
    assert torch.equal(layer.load_since_update, routed)
    # The expert-level balance loss (DeepSeekMoE eq. 12-14) from the replayed ids and the live scores.
    s = torch.sigmoid(x.double() @ layer.gate.weight.detach().double().T)
    probs = s / s.sum(-1, keepdim=True)
    f = 8 / (2 * 40) * routed.double()
    assert_close(layer.aux_loss, 0.01 * (f * probs.mean(0)).sum(), 1e-5, "aux loss")
    before = layer.gate.e_score_correction_bias.clone()
    layer.update_bias()
    step = 0.01 * torch.sign(routed.float().mean() - routed.float())
    assert torch.equal(layer.gate.e_score_correction_bias, before + step)
    assert y.shape == x.shape


def test_recording_changes_no_output_and_no_gradient():
    torch.manual_seed(0)
    layer = make_layer(score_func="sigmoid")
    other = copy.deepcopy(layer)
    x = torch.randn(4, 6, H)
    y0 = other(x)
    y0.square().sum().backward()
    with dm.record_routing(layer) as routes:
        y1 = layer(x)
    y1.square().sum().backward()
    assert list(routes) == [""] and len(routes[""]) == 1
    assert torch.equal(y0, y1)
    for (n, a), b in zip(other.named_parameters(), layer.parameters()):
        assert torch.equal(a.grad, b.grad), n
    assert layer.route_tape is None


def test_topk_idx_argument_equals_the_context_replay():
    torch.manual_seed(0)
    layer = make_layer()
    x = torch.randn(2, 3, H)
    ids = torch.tensor([[[0, 1], [2, 3], [4, 5]], [[6, 7], [1, 0], [3, 2]]])
    direct = layer(x, topk_idx=ids)
    with dm.replay_routing(layer, {"": [ids]}):
        via_context = layer(x)
    assert torch.equal(direct, via_context)
    assert torch.equal(layer.tokens_per_expert, torch.bincount(ids.reshape(-1), minlength=8))


def _error(layer, x, ids, match, exc=ValueError, mask=None):
    with pytest.raises(exc, match=match):
        layer(x, padding_mask=mask, topk_idx=ids)


def test_every_bad_replay_is_a_clear_error_naming_the_layer():
    torch.manual_seed(0)
    layer = make_layer(num_groups=4, topk_groups=1, top_k=2)
    x = torch.randn(2, 3, H)
    good = torch.tensor([[[0, 1], [2, 3], [4, 5]], [[6, 7], [1, 0], [3, 2]]])
    _error(layer, x, good[:, :2], r"shape \(2, 2, 2\); expected .* \(2, 3, 2\)")
    _error(layer, x, good.float(), "integer tensor", TypeError)
    bad = good.clone()
    bad[1, 2, 1] = 8
    _error(layer, x, bad, r"position \(1, 2\) holds \[3, 8\]: expert ids must lie in \[0, 8\)")
    bad = good.clone()
    bad[0, 1, 0] = -1
    _error(layer, x, bad, r"-1 at position \(0, 1\), which is not padding")
    bad = good.clone()
    bad[1, 0] = torch.tensor([6, 6])
    _error(layer, x, bad, r"position \(1, 0\) repeats an expert: \[6, 6\]")
    bad = good.clone()
    bad[0, 2] = torch.tensor([1, 4])  # groups of 2 experts: 1 is in group 0, 4 in group 2
    _error(layer, x, bad, r"position \(0, 2\) picks experts \[1, 4\] in 2 groups, which group-limited routing "
                          r"\(num_groups=4, topk_groups=1\) could not have picked")
    device_limited = make_layer(num_devices=4, max_devices_per_token=1)
    _error(device_limited, x, bad, r"in 2 devices, which device-limited routing \(num_devices=4, "
                                   r"max_devices_per_token=1\)")
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 2] = True
    padded = good.clone()
    padded[0, 2] = -1
    layer(x, padding_mask=mask, topk_idx=padded)  # -1 at padding is what recording writes
    with dm.analysis.disabled_experts(layer, {"": [3]}):
        _error(layer, x, good, "cannot be combined with disabled experts")

    model = torch.nn.ModuleDict({"moe": layer})
    with dm.record_routing(model) as routes:
        model["moe"](x)
    bad_routes = {"moe": [routes["moe"][0].clone()]}
    bad_routes["moe"][0][0, 0, 0] = 99
    with dm.replay_routing(model, bad_routes):
        _error(layer, x, None, "DeepSeekMoELayer 'moe': topk_idx at position")
    with dm.replay_routing(model, routes):
        model["moe"](x)
        with pytest.raises(RuntimeError, match="'moe': forward call 2 inside replay_routing, but routes\\['moe'\\] "
                                               "holds 1"):
            model["moe"](x)
    with pytest.raises(ValueError, match=r"names \['layers.0.mlp'\], which no DeepSeekMoELayer"):
        with dm.replay_routing(model, {"layers.0.mlp": routes["moe"]}):
            pass
    with pytest.raises(ValueError, match="sequence of tensors"):
        with dm.replay_routing(model, {"moe": [routes["moe"][0].tolist()]}):
            pass
    with pytest.raises(ValueError, match="holds no DeepSeekMoELayer"):
        with dm.record_routing(torch.nn.Linear(2, 2)):
            pass


class Block(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.norm = torch.nn.LayerNorm(H)
        self.mlp = layer

    def forward(self, x):
        return x + self.mlp(self.norm(x))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("order", ["step_by_step", "two_forwards_then_backward"])
def test_checkpointed_reruns_use_the_ids_of_the_forward_they_rerun(reentrant, order):
    torch.manual_seed(0)
    block = Block(make_layer(score_func="sigmoid", aux_loss_alpha=0.0))
    plain = copy.deepcopy(block)
    xs = [torch.randn(2, 5, H, requires_grad=True) for _ in range(2)]
    with dm.record_routing(block) as routes:
        for x in xs:
            block(x)
    for m in (block, plain):
        with torch.no_grad():
            m.mlp.gate.weight.mul_(-1)  # every choice changes
    rs = [torch.randn(2, 5, H) for _ in range(2)]

    def losses(model, run):
        out = []
        with dm.replay_routing(model, {"mlp": routes["mlp"]}):
            for x, r in zip(xs, rs):
                loss = (run(model, x) * r).sum()
                if order == "step_by_step":
                    loss.backward()
                else:
                    out.append(loss)
            if out:
                sum(out).backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = losses(plain, lambda m, x: m(x))
    got = losses(block, lambda m, x: checkpoint(m, x, use_reentrant=reentrant))
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-6, "grad")


def test_a_rerun_after_the_replay_block_ended_is_an_error():
    layer = make_layer()
    block = Block(layer)
    x = torch.randn(2, 5, H, requires_grad=True)
    with dm.record_routing(block) as routes:
        block(x)
    with dm.replay_routing(block, routes):
        y = checkpoint(block, x, use_reentrant=False)
    with pytest.raises(RuntimeError, match="after its replay_routing block had ended"):
        y.sum().backward()


def test_replay_under_torch_compile_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(make_layer(score_func="sigmoid"), torch.nn.Tanh(), make_layer())
    x = torch.randn(3, 4, H)
    with dm.record_routing(model) as routes:
        model(x)
        model(x + 1)
    with torch.no_grad():
        model[0].gate.weight.mul_(-1)
    with dm.replay_routing(model, routes):
        eager = [model(x), model(x + 1)]
    compiled = torch.compile(model)
    with dm.replay_routing(model, routes), dm.record_routing(model) as used:
        got = [compiled(x), compiled(x + 1)]
    for a, b in zip(got, eager):
        assert_close(a, b, 1e-6, "compiled replay")
    assert all(torch.equal(a, b) for a, b in zip(used["0"], routes["0"]))
    layer = make_layer()
    step = torch.compile(lambda x, ids: layer(x, topk_idx=ids), fullgraph=True)
    ids = routes["2"][0]
    assert_close(step(x, ids), layer(x, topk_idx=ids), 1e-6, "fullgraph topk_idx")


def test_vllm_routed_experts_layout_round_trip():
    """docs/finetuning-and-rl.md: routes -> (tokens, layers, top_k) and back."""
    model = torch.nn.Sequential(make_layer(), make_layer())
    x = torch.randn(2, 5, H)
    with dm.record_routing(model) as routes:
        model(x)
    names = list(dm.moe_layers(model))
    routed_experts = torch.stack([routes[n][0].reshape(-1, 2) for n in names], dim=1)
    assert routed_experts.shape == (10, 2, 2)
    back = {n: [routed_experts[:, i].reshape(2, 5, 2)] for i, n in enumerate(names)}
    assert all(torch.equal(back[n][0], routes[n][0]) for n in names)


# --------------------------------------------------------------------------------- expert parallelism (gloo)

def _ep_worker(rank, world):
    torch.manual_seed(0)
    cfg = dict(num_routed_experts=8, score_func="sigmoid", norm_topk_prob=True, num_devices=world,
               max_devices_per_token=1)
    ref = make_layer(**cfg)
    layer = dm.parallel.shard_experts(copy.deepcopy(ref))
    x_all = torch.randn(world, 6, H)
    x = x_all[rank:rank + 1]
    with dm.record_routing(layer) as routes:
        layer(x)
    for m in (layer, ref):
        with torch.no_grad():
            m.gate.weight.mul_(-1)
    xr = x.clone().requires_grad_()
    with dm.replay_routing(layer, routes), dm.record_routing(layer) as used:
        y = layer(xr)
    assert torch.equal(used[""][0], routes[""][0])
    y.square().sum().backward()
    y_ref = ref(x, topk_idx=routes[""][0])  # the same ids on one process, every expert local
    assert_close(y, y_ref, 1e-5, f"rank {rank}: EP replay")
    y_hand, W = by_hand(ref, x.reshape(-1, H), routes[""][0].reshape(-1, 2))
    assert_close(y.reshape(-1, H), y_hand, 1e-5, f"rank {rank}: EP replay vs float64")


def test_replay_under_expert_parallelism_two_gloo_ranks():
    spawn_gloo(_ep_worker, 2)


def test_converted_transformers_model_records_and_replays():
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from deepseek_moe import hf
    from test_hf_fidelity import _batch, _model

    model = _model("deepseek_v3")
    hf.replace_moe_blocks(model)
    ids = _batch(1)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, -3:] = 0
    with dm.record_routing(model) as routes:
        model(ids, attention_mask=attention_mask)
    names = list(hf.moe_layers(model))
    assert sorted(routes) == sorted(names) and all(len(routes[n]) == 1 for n in names)
    for layer in hf.moe_layers(model).values():
        with torch.no_grad():
            layer.gate.weight.mul_(-1)
    model.train()
    with dm.replay_routing(model, routes), dm.record_routing(model) as used:
        out = model(ids, labels=ids)
    out.loss.backward()
    for n in names:
        assert torch.equal(used[n][0], routes[n][0]), n
        assert hf.moe_layers(model)[n].gate.weight.grad is not None


def test_nested_blocks_restore_the_layer_and_a_new_replay_starts_at_the_first_call():
    layer = make_layer()
    x = torch.randn(3, H)
    with dm.record_routing(layer) as outer:
        with dm.record_routing(layer) as inner:
            layer(x)
        layer(x * 2)
        with dm.replay_routing(layer, inner):
            layer(x * 3)  # replays inner[0]; recorded by outer as used
        with pytest.raises(ValueError, match="boom"):
            with dm.replay_routing(layer, inner):
                layer(x * 3)  # a new block: call 1 again, not call 2
                raise ValueError("boom")
    assert layer.route_tape is None or not layer.route_tape.active  # kept only to recognise late re-runs
    assert len(inner[""]) == 1 and len(outer[""]) == 4
    assert torch.equal(outer[""][2], inner[""][0]) and torch.equal(outer[""][3], inner[""][0])


def test_ids_recorded_under_inference_mode_replay_in_training():
    """Rollouts run under torch.inference_mode; the trainer's replay saves the ids for backward."""
    layer = make_layer()
    x = torch.randn(4, H)
    with torch.inference_mode(), dm.record_routing(layer) as routes:
        layer(x)
    assert routes[""][0].is_inference()
    with dm.replay_routing(layer, routes):
        y = layer(x)
    y.sum().backward()
    assert layer.gate.weight.grad.abs().sum() > 0


def _grads(layer):
    g = torch.cat([p.grad.flatten() for p in layer.parameters() if p.grad is not None])
    layer.zero_grad()
    return g


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_reruns_find_their_forward_whatever_runs_in_between(reentrant):
    """Re-runs matched to their original forward by its input: another forward between a checkpointed forward and
    its backward, backwards in forward order (accumulation), and one checkpoint around two calls of the layer."""
    torch.manual_seed(0)
    layer = make_layer(num_shared_experts=0, initializer_range=0.3, aux_loss_alpha=0.0)
    # Reentrant checkpointing needs an input that requires grad to build a graph at all.
    x0, x1 = torch.randn(6, H, requires_grad=True), torch.randn(6, H, requires_grad=True)
    ids0, ids1 = (torch.stack([torch.randperm(8)[:2] for _ in range(6)]) for _ in range(2))
    routes = {"": [ids0, ids1]}
    ckpt = lambda f, *a: checkpoint(f, *a, use_reentrant=reentrant)  # noqa: E731

    layer(x0, topk_idx=ids0).square().sum().backward()
    expected = _grads(layer)
    with dm.replay_routing(layer, routes):
        y0 = ckpt(layer, x0)
        with torch.no_grad():
            layer(x1)  # another training forward in between
        y0.square().sum().backward()
    assert_close(_grads(layer), expected, 1e-6, "forward in between")

    (layer(x0, topk_idx=ids0).square().sum() + layer(x1, topk_idx=ids1).square().sum()).backward()
    expected = _grads(layer)
    with dm.replay_routing(layer, routes):
        loss0, loss1 = ckpt(layer, x0).square().sum(), ckpt(layer, x1).square().sum()
        loss0.backward()  # backwards in forward order
        loss1.backward()
    assert_close(_grads(layer), expected, 1e-6, "accumulation")

    layer(layer(x0, topk_idx=ids0), topk_idx=ids1).square().sum().backward()
    expected = _grads(layer)
    with dm.replay_routing(layer, routes):
        ckpt(lambda t: layer(layer(t)), x0).square().sum().backward()  # one region, two calls
    assert_close(_grads(layer), expected, 1e-6, "two calls in one region")


def test_a_forward_that_raises_uses_up_no_call_and_copies_take_no_part():
    import pickle

    layer = make_layer()
    x = torch.randn(6, H)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(6)])
    with dm.replay_routing(layer, {"": [ids]}):
        with pytest.raises(ValueError, match="shape"):
            layer(x[:3])
        layer(x)  # still call 1
    with dm.record_routing(layer) as routes:
        layer(x)
        twin = copy.deepcopy(layer)
        twin(x)
        pickle.dumps(layer)
        layer(torch.randn(0, H))  # an empty input records a (0, K) entry
    assert twin.route_tape is None and len(routes[""]) == 2 and routes[""][1].shape == (0, 2)
    with dm.record_routing(twin) as again:
        twin(x)
    assert len(again[""]) == 1
    with pytest.raises(ValueError, match="got a tensor"):
        with dm.replay_routing(layer, {"": ids}):
            pass


def test_reruns_that_cannot_be_paired_with_their_forward_are_errors():
    """A re-run after the block ended (with another forward in between), identical inputs given different ids,
    and a recomputation that changes the input (dropout without the RNG state) each raise instead of guessing."""
    layer = make_layer()
    x = torch.randn(2, 4, H, requires_grad=True)
    ids1, ids2 = (torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(s))[:2]
                               for _ in range(8)]).view(2, 4, 2) for s in (1, 2))
    with dm.replay_routing(layer, {"": [ids1]}):
        y = checkpoint(layer, x, use_reentrant=False)
    layer(torch.randn(2, 4, H))  # a training forward outside any block
    with pytest.raises(RuntimeError, match="after its replay_routing block had ended"):
        y.sum().backward()

    with dm.replay_routing(layer, {"": [ids1, ids2]}):
        y1 = checkpoint(layer, x, use_reentrant=False)
        checkpoint(layer, x, use_reentrant=False)
        with pytest.raises(RuntimeError, match="equals that of forward calls \\[1, 2\\]"):
            y1.sum().backward()
    with dm.replay_routing(layer, {"": [ids1, ids1]}):  # the same ids: nothing to tell apart
        y1 = checkpoint(layer, x, use_reentrant=False)
        y2 = checkpoint(layer, x, use_reentrant=False)
        (y1.sum() + y2.sum()).backward()

    def noisy(t):
        return layer(F.dropout(t, 0.1, True))
    with dm.replay_routing(layer, {"": [ids1]}):
        y = checkpoint(noisy, x, use_reentrant=False, preserve_rng_state=False)
        with pytest.raises(RuntimeError, match="recomputation changed the input"):
            y.sum().backward()


def test_pending_forwards_are_taken_off_when_their_rerun_starts():
    """Non-reentrant checkpointing stops a re-run early, inside the layer's forward: nothing may pile up."""
    layer = make_layer()
    routes = {"": [torch.stack([torch.randperm(8)[:2] for _ in range(4)]) for _ in range(3)]}
    with dm.replay_routing(layer, routes):
        for i in range(3):
            checkpoint(layer, torch.randn(4, H, requires_grad=True), use_reentrant=False).sum().backward()
            assert layer.route_tape._pending == []
