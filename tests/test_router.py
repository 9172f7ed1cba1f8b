"""Routing correctness as properties over configurations and inputs drawn by hypothesis."""
import pytest
import torch
from hypothesis import given, strategies as st

import deepseek_moe as dm
from deepseek_moe import invariant
from deepseek_moe.router import Router, select_experts


@st.composite
def routing_cases(draw):
    E = draw(st.integers(1, 256))
    divisors = [g for g in range(1, E + 1) if E % g == 0 and g <= 16]
    G = draw(st.sampled_from(divisors))
    topk_groups = draw(st.integers(1, G))
    per_group = E // G
    K = draw(st.integers(1, min(E, topk_groups * per_group)))
    group_score = draw(st.sampled_from(["max", "top2_sum"] if per_group >= 2 else ["max"]))
    cfg = dm.MoEConfig(hidden_size=4, expert_hidden_size=2, num_routed_experts=E, num_shared_experts=0, top_k=K,
                       num_groups=G, topk_groups=topk_groups, group_score=group_score,
                       score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
                       norm_topk_prob=draw(st.booleans()),
                       routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 16.0])))
    T = draw(st.integers(0, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    tied = draw(st.booleans())
    with_bias = draw(st.booleans())
    return cfg, T, seed, tied, with_bias


def _route(cfg, T, seed, tied, with_bias):
    g = torch.Generator().manual_seed(seed)
    router = Router(cfg)
    if tied:  # a few integer values: many exactly tied logits
        router.weight.data = torch.randint(-1, 2, router.weight.shape, generator=g).float()
        x = torch.randint(-1, 2, (T, cfg.hidden_size), generator=g).float()
    else:
        router.weight.data = torch.randn(router.weight.shape, generator=g)
        x = torch.randn(T, cfg.hidden_size, generator=g)
    if with_bias:
        router.e_score_correction_bias.copy_(torch.randn(cfg.num_routed_experts, generator=g) * 0.1)
    return router, router(x)


@given(routing_cases())
def test_each_token_gets_k_distinct_experts(case):
    cfg, T, *_ = case
    _, r = _route(*case)
    assert r.topk_idx_TK.shape == (T, cfg.top_k)
    assert r.topk_idx_TK.dtype == torch.int64
    if T:
        assert int(r.topk_idx_TK.min()) >= 0 and int(r.topk_idx_TK.max()) < cfg.num_routed_experts
        srt = r.topk_idx_TK.sort(dim=1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all())


@given(routing_cases())
def test_picked_experts_lie_in_kept_groups_and_are_the_best_there(case):
    cfg, T, *_ = case
    router, r = _route(*case)
    if T == 0:
        return
    E, G = cfg.num_routed_experts, cfg.num_groups
    choice = r.scores_TE + router.e_score_correction_bias
    grouped = choice.view(T, G, E // G)
    gscore = grouped.amax(-1) if cfg.group_score == "max" else grouped.topk(min(2, E // G), -1).values.sum(-1)
    threshold = gscore.topk(cfg.topk_groups, dim=-1).values[:, -1:]
    picked_groups = r.topk_idx_TK // (E // G)
    # Every picked group is one of the topk_groups best (ties included), and no more groups than allowed.
    assert bool((gscore.gather(1, picked_groups) >= threshold).all())
    n_groups = torch.stack([torch.unique(row).numel() * torch.ones(()) for row in picked_groups])
    assert bool((n_groups <= cfg.topk_groups).all())
    # Within the picked groups no unpicked expert beats a picked one on (score + bias).
    in_picked_group = torch.zeros(T, G, dtype=torch.bool).scatter_(1, picked_groups, True)
    eligible = in_picked_group.repeat_interleave(E // G, dim=1)
    chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, r.topk_idx_TK, True)
    worst_chosen = choice.masked_fill(~chosen, float("inf")).amin(-1)
    best_other = choice.masked_fill(chosen | ~eligible, float("-inf")).amax(-1)
    assert bool((worst_chosen >= best_other).all())


@given(routing_cases())
def test_bias_changes_only_the_choice_never_the_weight_formula(case):
    cfg, T, *_ = case
    _, r = _route(*case)
    w = r.scores_TE.gather(1, r.topk_idx_TK)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scaling_factor
    assert torch.equal(r.topk_weight_TK, w)
    if cfg.score_func == "softmax":
        assert torch.equal(r.scores_TE, r.logits_TE.softmax(-1))
    else:  # position-invariant arithmetic (deepseek_moe.invariant): within two ulps of the true sigmoid
        assert torch.allclose(r.scores_TE.double(), r.logits_TE.double().sigmoid(), rtol=3e-7, atol=0)


@given(routing_cases())
def test_weights_nonnegative_and_normalised_sum(case):
    cfg, T, *_ = case
    _, r = _route(*case)
    assert bool((r.topk_weight_TK >= 0).all())
    if cfg.norm_topk_prob and T:
        sums = r.topk_weight_TK.sum(-1)
        torch.testing.assert_close(sums, torch.full_like(sums, cfg.routed_scaling_factor), rtol=1e-5, atol=1e-6)


@given(routing_cases(), st.data())
def test_excluded_experts_count_for_nothing_in_the_group_choice(case, data):
    """Against a per-token loop: a group ranks by (how many of its top 2 are left, their sum) or by the best
    expert left; every picked group is among the topk_groups best by that key (ties included), and no expert
    left in a picked group beats a picked one. Each group keeps enough experts that K can always be picked."""
    cfg, T, seed, tied, with_bias = case
    T = min(T, 24)
    E, G, K = cfg.num_routed_experts, cfg.num_groups, cfg.top_k
    per_group, need = E // G, -(-K // cfg.topk_groups)
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(0, 3, (T, E), generator=g).float() / 2 if tied else torch.rand(T, E, generator=g))
    bias = torch.randn(E, generator=g) * 0.1 if with_bias else torch.zeros(E)
    excluded = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T):
        for group in range(G):
            drop = data.draw(st.integers(0, per_group - need))
            chosen = torch.randperm(per_group, generator=g)[:drop] + group * per_group
            excluded[t, chosen] = True
    idx = select_experts(scores, bias, cfg, excluded)
    choice = scores + bias
    for t in range(T):
        keys = []
        for group in range(G):
            left = sorted((float(choice[t, e]) for e in range(group * per_group, (group + 1) * per_group)
                           if not excluded[t, e]), reverse=True)
            keys.append((min(2, len(left)), sum(left[:2])) if cfg.group_score == "top2_sum" else
                        (len(left) > 0, left[0] if left else 0.0))
        threshold = sorted(keys, reverse=True)[cfg.topk_groups - 1]
        picked = idx[t].tolist()
        assert not any(bool(excluded[t, e]) for e in picked)
        groups = {e // per_group for e in picked}
        assert len(groups) <= cfg.topk_groups and all(keys[group] >= threshold for group in groups)
        others = [float(choice[t, e]) for group in groups for e in range(group * per_group, (group + 1) * per_group)
                  if e not in picked and not excluded[t, e]]
        assert min(float(choice[t, e]) for e in picked) >= max(others, default=float("-inf"))


def test_a_group_with_one_expert_left_ranks_by_that_expert():
    """top2_sum: groups 0-2 keep one expert each (0.95, 0.3, 0.25), group 3 keeps two (0.4 + 0.5): group 3 first,
    then group 0 by its expert's score, not by position."""
    cfg = dm.MoEConfig(hidden_size=4, expert_hidden_size=4, num_routed_experts=8, top_k=2, num_groups=4,
                       topk_groups=2, group_score="top2_sum", score_func="sigmoid")
    scores = torch.tensor([[0.1, 0.95, 0.1, 0.3, 0.1, 0.25, 0.4, 0.5], [0.1, 0.25, 0.1, 0.3, 0.1, 0.95, 0.4, 0.5]])
    excluded = torch.tensor([[True, False, True, False, True, False, False, False]] * 2)
    assert select_experts(scores, torch.zeros(8), cfg, excluded).tolist() == [[1, 7], [5, 7]]


def test_gate_runs_in_fp32_under_bf16_input_and_autocast():
    cfg = dm.MoEConfig(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2)
    router = Router(cfg)
    x = torch.randn(5, 16)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x)
    assert r.logits_TE.dtype == torch.float32 and r.topk_weight_TK.dtype == torch.float32
    torch.testing.assert_close(r.logits_TE, ref.logits_TE)


def test_bias_steers_selection():
    cfg = dm.MoEConfig(hidden_size=8, expert_hidden_size=4, num_routed_experts=4, top_k=1, score_func="sigmoid")
    router = Router(cfg)
    x = torch.randn(32, 8)
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
    r = router(x)
    assert bool((r.topk_idx_TK == 2).all())
    torch.testing.assert_close(r.topk_weight_TK[:, 0], r.scores_TE[:, 2])


@pytest.mark.parametrize("M", [2, 3])
def test_device_limited_routing_spans_at_most_M_devices(M):
    cfg = dm.MoEConfig(hidden_size=16, expert_hidden_size=8, num_routed_experts=32, top_k=6, num_devices=8,
                       max_devices_per_token=M)
    scores = torch.rand(200, 32)
    idx = select_experts(scores, torch.zeros(32), cfg)
    devices_per_token = torch.tensor([len(set((row // 4).tolist())) for row in idx])
    assert int(devices_per_token.max()) <= M
    # The kept devices are those with the best expert: the token's overall best expert is always chosen.
    assert bool((idx[:, 0] == scores.argmax(dim=1)).all())
    unlimited = select_experts(scores, torch.zeros(32), cfg.replace(max_devices_per_token=None))
    assert int(torch.tensor([len(set((row // 4).tolist())) for row in unlimited]).max()) > M


@given(E=st.sampled_from([8, 12, 16, 24, 32]), G=st.sampled_from([2, 4, 8]), D=st.sampled_from([2, 4, 8]),
       M=st.integers(1, 7), topk_groups=st.integers(1, 8), K=st.integers(1, 8),
       group_score=st.sampled_from(["max", "top2_sum"]), seed=st.integers(0, 2**16))
def test_group_and_device_limits_together_keep_every_pick_inside_both(E, G, D, M, topk_groups, K, group_score, seed):
    """Every config the validation accepts leaves each token K experts inside its kept groups on its kept
    devices: no pick of a -inf (dropped) expert, at most M devices and topk_groups groups."""
    try:
        cfg = dm.MoEConfig(hidden_size=4, expert_hidden_size=2, num_routed_experts=E, top_k=K, num_groups=G,
                           topk_groups=topk_groups, group_score=group_score, num_devices=D, max_devices_per_token=M)
    except ValueError:
        return
    scores = torch.rand(64, E, generator=torch.Generator().manual_seed(seed))
    idx = select_experts(scores, torch.zeros(E), cfg)
    kept_devices = scores.view(64, D, E // D).amax(-1).topk(M, dim=-1).indices
    assert all(set((row // (E // D)).tolist()) <= set(kept.tolist()) for row, kept in zip(idx, kept_devices))
    assert int(torch.tensor([len(set((row // (E // G)).tolist())) for row in idx]).max()) <= topk_groups
    assert bool((idx.sort(dim=1).values.diff(dim=1) > 0).all())


def test_device_limit_needs_enough_experts():
    with pytest.raises(ValueError, match="max_devices_per_token"):
        dm.MoEConfig(hidden_size=16, expert_hidden_size=8, num_routed_experts=16, top_k=6, num_devices=8,
                     max_devices_per_token=2)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_balancing_bias_cancels_a_shared_preference(score_func):
    """Every token prefers expert 0 by a shared offset, and token t prefers expert t mod E by less: the balancing
    bias must cancel the shared part, so each expert gets exactly T/E tokens (MaxVio 0)."""
    from deepseek_moe.router import balancing_bias

    T, E = 64, 8
    cfg = dm.MoEConfig(hidden_size=4, expert_hidden_size=4, num_routed_experts=E, top_k=1, score_func=score_func)
    own_TE = torch.nn.functional.one_hot(torch.arange(T) % E, E).double() * 0.01
    shared_E = torch.linspace(0.3, 0.0, E, dtype=torch.float64)
    scores_TE = shared_E + own_TE
    bias_E, before, after = balancing_bias(scores_TE, torch.zeros(E, dtype=torch.float64), cfg)
    assert before == E - 1 and after == 0.0
    assert torch.equal(select_experts(scores_TE, bias_E, cfg)[:, 0], torch.arange(T) % E)


def test_balancing_bias_cannot_split_identical_tokens():
    from deepseek_moe.router import balancing_bias

    E, K = 16, 2
    cfg = dm.MoEConfig(hidden_size=4, expert_hidden_size=4, num_routed_experts=E, top_k=K)
    scores_TE = torch.rand(E).expand(32, E)
    bias_E, before, after = balancing_bias(scores_TE, torch.zeros(E), cfg)
    assert before == after == E / K - 1


def test_calibrate_bias_balances_inputs_that_share_a_direction_and_skips_padding():
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(hidden_size=32, expert_hidden_size=8, num_routed_experts=16, top_k=2,
                                num_shared_experts=1, score_func="sigmoid", num_groups=4, topk_groups=2)
    x = torch.randn(4, 128, 32) + 4 * torch.randn(32)
    pad = torch.zeros(4, 128, dtype=torch.bool)
    pad[:, 100:] = True
    x[pad] = 100.0  # padded positions: one identical huge token that would dominate the load if counted
    weight = layer.gate.weight.clone()
    stats = layer.calibrate_bias(x, padding_mask=pad)
    assert stats["max_vio_before"] > 2 and stats["max_vio_after"] < 0.3
    assert torch.equal(layer.gate.weight, weight)
    layer.eval()
    layer(x[:, :100])
    assert layer.last_stats["max_vio"] == pytest.approx(stats["max_vio_after"])


def test_calibrate_bias_skips_non_finite_tokens_and_validates_iterations():
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(hidden_size=32, expert_hidden_size=8, num_routed_experts=16, top_k=2)
    x = torch.randn(256, 32) + 4 * torch.randn(32)
    clean = layer.calibrate_bias(x)
    bias = layer.gate.e_score_correction_bias.clone()
    layer.gate.e_score_correction_bias.zero_()
    with_nan = torch.cat([x, torch.full((1, 32), float("nan"))])
    assert layer.calibrate_bias(with_nan) == clean
    assert torch.equal(layer.gate.e_score_correction_bias, bias)
    with pytest.raises(ValueError, match="iterations"):
        layer.calibrate_bias(x, iterations=0)


def test_balancing_bias_counts_exactly_for_bf16_scores_and_reaches_balance_from_a_far_bias():
    from deepseek_moe.router import balancing_bias

    torch.manual_seed(0)
    E = 64
    cfg = dm.MoEConfig(hidden_size=4, expert_hidden_size=4, num_routed_experts=E, top_k=6, score_func="sigmoid",
                       num_groups=8, topk_groups=4, group_score="top2_sum")
    scores_TE = (torch.randn(4096, E) + torch.randn(E)).sigmoid()
    exact = torch.bincount(select_experts(scores_TE.bfloat16().float(), torch.zeros(E), cfg).flatten(),
                           minlength=E).double()
    _, before, _ = balancing_bias(scores_TE.bfloat16(), torch.zeros(E), cfg)
    assert before == (exact.max() / exact.mean() - 1).item()
    far_E = torch.empty(E).uniform_(2.0, 5.0)  # a bias like the ones DeepSeek-V3 learns
    _, before, after = balancing_bias(scores_TE, far_E, cfg)
    assert before > 5 and after < 0.1


@pytest.mark.parametrize("score_func", ["sigmoid", "sqrtsoftplus"])
def test_sigmoid_and_sqrt_softplus_scores_are_a_tokens_own_bits_in_every_mode_and_their_gradient_is_exact(score_func):
    """Outside the deterministic mode too, a token's scores are the same bits alone and at any place of any batch
    (ATen's CPU sigmoid and softplus compute the tail of their range with other code than the vector body: the
    scores of 77 rows of 11 experts differed from each row's alone); the router computes them so. The gradient
    against float64 autograd of the textbook formulas, logits beyond softplus's threshold of 20 included, and
    where exp(−x) overflows fp32 (x < −88: 1 / (1 + exp(−x)) differentiated as written gives 0 · ∞ = NaN)."""
    torch.manual_seed(0)
    score = invariant.sigmoid if score_func == "sigmoid" else invariant.sqrt_softplus
    extremes = torch.tensor([[-1e4, -200, -100, -89, -30, 0, 30, 89, 100, 200, 1e4]], dtype=torch.float64)
    logits = torch.cat([torch.randn(77, 11, dtype=torch.float64) * 12, extremes])
    z = logits.float().requires_grad_()
    batch = score(z)
    with torch.no_grad():
        alone = torch.cat([score(z[t:t + 1]) for t in range(78)])
        behind = score(torch.cat([torch.randn(5, 11), z]))[5:]
    assert torch.equal(alone, batch) and torch.equal(behind, batch)
    cfg = dm.MoEConfig(hidden_size=16, expert_hidden_size=4, num_routed_experts=11, num_shared_experts=0, top_k=3,
                       score_func=score_func)
    router, x = Router(cfg), torch.randn(77, 16)
    routing = router(x)
    assert torch.equal(routing.scores_TE, score(routing.logits_TE))
    z64 = z.detach().double().requires_grad_()  # the truth of the fp32 logits
    want = z64.sigmoid() if score_func == "sigmoid" else torch.nn.functional.softplus(z64).sqrt()
    g = torch.randn(78, 11, dtype=torch.float64)
    (batch * g.float()).sum().backward()
    (want * g).sum().backward()
    assert torch.allclose(batch.double(), want, rtol=3e-7, atol=1e-20)  # absolute: fp32 subnormals below −87
    # 1 - s cancels in fp32 where the sigmoid saturates (as in torch.sigmoid's backward): an ulp of 1, absolute.
    # float64's own √softplus gradient is 0 · ∞ where its softplus underflows (x = −1e4): the truth there is ~0.
    assert torch.isfinite(z.grad).all()
    truth = torch.nan_to_num(z64.grad, nan=0.0)
    assert torch.allclose(z.grad.double(), truth, rtol=1e-5, atol=1e-6)
