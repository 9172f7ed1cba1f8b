"""DispatchPlan invariants (hypothesis) and exactness of the data-movement ops."""
import pytest
import torch
from hypothesis import given, strategies as st

from deepseek_moe.dispatch import build_plan, combine_rows, expert_capacity, gather_rows
from deepseek_moe.testing import make_topk


@st.composite
def plan_cases(draw):
    E = draw(st.integers(1, 256))
    K = draw(st.integers(1, min(E, 16)))
    T = draw(st.integers(0, 300))
    kind = draw(st.sampled_from(["balanced", "random", "skewed"]))
    capacity_factor = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    tied_affinity = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return T, E, K, kind, capacity_factor, tied_affinity, seed


def _plan(T, E, K, kind, capacity_factor, tied_affinity, seed):
    g = torch.Generator().manual_seed(seed)
    topk = make_topk(T, E, K, kind, generator=g)
    affinity = torch.rand(T, K, generator=g)
    if tied_affinity:
        affinity = (affinity * 3).floor()
    cap = None if capacity_factor is None else expert_capacity(T, K, E, capacity_factor)
    return topk, affinity, cap, build_plan(topk, affinity, E, cap, affinity)


@given(plan_cases())
def test_plan_holds_every_kept_pair_exactly_once_sorted_by_expert(case):
    T, E, K = case[:3]
    topk, _, _, plan = _plan(*case)
    kept = torch.nonzero(plan.keep_TK.reshape(-1)).squeeze(1)
    assert torch.equal(plan.pair_N.sort().values, kept)
    experts = topk.reshape(-1)[plan.pair_N]
    assert bool((experts[1:] >= experts[:-1]).all())
    assert torch.equal(plan.token_N, plan.pair_N // K)
    assert torch.equal(plan.counts_E, torch.bincount(experts, minlength=E))
    assert torch.equal(plan.offsets_E1[1:], torch.cumsum(plan.counts_E, 0)) and int(plan.offsets_E1[0]) == 0
    N = plan.pair_N.numel()
    assert int(plan.counts_E.sum()) == T * K - int(plan.num_dropped) == N
    assert int(plan.routed_counts_E.sum()) == T * K
    # slot_TK inverts the sort: kept pairs point at their sorted position, dropped pairs at the zero row N.
    slot = plan.slot_TK.reshape(-1)
    assert torch.equal(plan.pair_N[slot[kept]], kept)
    assert bool((slot[~plan.keep_TK.reshape(-1)] == N).all())


@given(plan_cases())
def test_capacity_never_exceeded_and_only_lowest_affinity_dropped(case):
    T, E, K, _, capacity_factor = case[:5]
    topk, affinity, cap, plan = _plan(*case)
    if capacity_factor is None:
        assert int(plan.num_dropped) == 0 and bool(plan.keep_TK.all())
        # Dropless: within each expert, tokens stay in order (stable sort).
        experts = topk.reshape(-1)[plan.pair_N]
        same = experts[1:] == experts[:-1]
        assert bool((plan.pair_N[1:][same] > plan.pair_N[:-1][same]).all())
        return
    assert bool((plan.counts_E <= cap).all())
    assert torch.equal(plan.counts_E, torch.clamp(plan.routed_counts_E, max=cap))
    for e in torch.unique(topk).tolist():
        mine = topk == e
        kept_aff = affinity[mine & plan.keep_TK]
        dropped_aff = affinity[mine & ~plan.keep_TK]
        if kept_aff.numel() and dropped_aff.numel():
            assert float(kept_aff.min()) >= float(dropped_aff.max())


def test_gather_and_combine_are_exact_mirrors():
    g = torch.Generator().manual_seed(1)
    T, E, K, H = 37, 8, 3, 5
    topk = make_topk(T, E, K, "skewed", generator=g, empty_experts=2)
    plan = build_plan(topk, torch.rand(T, K, generator=g), E)
    x = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    xs = gather_rows(x, plan)
    assert torch.equal(xs, x[plan.token_N])
    # combine(gather(x)) = K·x exactly when dropless.
    y = combine_rows(xs, plan)
    torch.testing.assert_close(y, K * x, rtol=0, atol=1e-12)
    # Backward of gather is combine and vice versa: compare with autograd through plain indexing.
    gy = torch.randn(T, H, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gx_ref,) = torch.autograd.grad(x[plan.token_N].index_select(0, plan.slot_TK.reshape(-1)).view(T, K, H)
                                    .sum(1), x, gy)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-12)
    torch.autograd.gradcheck(lambda t: combine_rows(gather_rows(t, plan), plan), (x,))


def test_combine_with_dropped_pairs_adds_zero():
    topk = torch.tensor([[0, 1], [0, 1], [0, 1]])
    affinity = torch.tensor([[0.9, 0.1], [0.5, 0.2], [0.1, 0.3]])
    plan = build_plan(topk, affinity, 2, capacity=2, affinity_TK=affinity)
    assert plan.keep_TK.tolist() == [[True, False], [True, True], [False, True]]
    o = torch.arange(1.0, 5.0).unsqueeze(1)  # the 4 kept rows
    y = combine_rows(o, plan)
    expected = torch.zeros(3, 1)
    for t in range(3):
        for k in range(2):
            if plan.keep_TK[t, k]:
                expected[t] += o[plan.slot_TK[t, k]]
    assert torch.equal(y, expected)


def test_capacity_requires_affinity():
    with pytest.raises(ValueError, match="affinity"):
        build_plan(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 1, capacity=1)


def test_masked_plan_keeps_only_the_marked_slots_and_checks_the_mask():
    topk = torch.tensor([[0, 2], [1, 0], [2, 1]])
    keep = torch.tensor([[True, False], [True, True], [False, True]])
    plan = build_plan(topk, torch.rand(3, 2), 3, keep_TK=keep)
    assert plan.pair_N.tolist() == [0, 3, 2, 5]  # expert 0: pairs 0, 3; expert 1: pairs 2, 5 (stable)
    assert plan.counts_E.tolist() == [2, 2, 0] and int(plan.num_dropped) == 0
    assert bool((plan.slot_TK[~keep] == 4).all())  # masked slots point at the zero row N
    with pytest.raises(ValueError, match="keep_TK must be a bool tensor"):
        build_plan(topk, torch.rand(3, 2), 3, keep_TK=keep.long())
    with pytest.raises(ValueError, match="cannot be combined"):
        build_plan(topk, torch.rand(3, 2), 3, capacity=1, affinity_TK=torch.rand(3, 2), keep_TK=keep)
