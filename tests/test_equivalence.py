"""Every experts implementation through both dispatchers against the reference, driven by hypothesis over
(T, E, K, H, I, capacity, dtype) at small sizes: the output and every gradient (x, both expert weights, the gate
weights) against the eager reference through the local dispatcher; the reference itself against a float64
per-pair loop that uses neither the sort nor the dispatcher; and the data movement of both dispatchers exact.

The all-to-all dispatcher runs here in a one-process gloo group: its exchange is then the identity, but the plan
of the received rows, the masking of device capacity and the (T, W) combine run as on W ranks (tests/test_parallel.py
runs them on 2 and 4 processes).
"""
import importlib.util
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from deepseek_moe.backends import EagerBackend, ExtBackend, TorchBackend, TritonBackend
from deepseek_moe.backends.eager import expert_loop
from deepseek_moe.backends.grouped import _grouped_mm, grouped_mm_shape_reason
from deepseek_moe.dispatch import LocalDispatcher, combine_rows, gather_rows
from deepseek_moe.parallel import AllToAllDispatcher
from deepseek_moe.router import Routing
from deepseek_moe.testing import assert_close, make_topk

from conftest import interpreted_examples

# bf16: the implementations round at different points (the reference rounds each pair's output to bf16 before the
# fp32 combine; the fused loops weigh in fp32); at these tiny sizes a gate-weight gradient is a dot product over a
# handful of terms that can cancel, so its relative error reaches a few 2^-8 (tests/test_backends.py holds bf16 to
# 1e-2 at realistic sizes).
TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float64: 1e-12}
NAMES = ("y", "grad_x", "grad_gate_up", "grad_down", "grad_weight")


def _implementations():
    impls = {"torch:segments": TorchBackend("segments")}
    if _grouped_mm is not None and hasattr(F, "grouped_mm"):
        impls["torch:grouped_mm"] = TorchBackend("grouped_mm")
    from deepseek_moe import ext
    if ext.sources() or ext.has_prebuilt():  # a source checkout (built just in time, ~30 s once) or a build
        from deepseek_moe.backends import ext as ext_backend
        ext_backend.ensure_loaded()
        impls["ext:segments"] = ExtBackend("segments")
        if "torch:grouped_mm" in impls:
            impls["ext:grouped_mm"] = ExtBackend("grouped_mm")
    return impls


IMPLS = _implementations()


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process gloo group for the all-to-all dispatcher, torn down after the module."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


@st.composite
def problems(draw, dtypes=(torch.float32, torch.bfloat16)):
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, min(E, 5)))
    T = draw(st.integers(0, 40))
    # H, I >= 4: a relative RMS over a weight gradient's elements then averages over several sums of products (a
    # single element can cancel to nearly 0, where any rounding difference is relatively large).
    H = draw(st.integers(4, 24))
    I = draw(st.integers(4, 12))
    kind = draw(st.sampled_from(["balanced", "random", "skewed"]))
    capacity = draw(st.one_of(st.none(), st.floats(0.1, 1.5)))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    return T, E, K, H, I, kind, capacity, dtype, seed


def _tensors(T, E, K, H, I, kind, capacity, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    topk = make_topk(T, E, K, kind, generator=g)
    scores = torch.rand(T, E, generator=g)
    routing = Routing(topk, scores.gather(1, topk).requires_grad_(), scores, scores.log())
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype).requires_grad_()
    down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype).requires_grad_()
    grad_y = torch.randn(T, H, generator=g).to(dtype)
    return routing, x, gate_up, down, grad_y


def _pipeline(dispatcher, impl, routing, x, gate_up, down, grad_y):
    """The dispatcher around ``impl.run`` (as the layer runs it), and the gradients of <y, grad_y>."""
    y, _ = dispatcher(x, routing, lambda x_in, plan: impl.run(x_in, plan, gate_up, down), impl, training=True)
    grads = torch.autograd.grad(y, (x, gate_up, down, routing.topk_weight_TK), grad_y, allow_unused=True)
    return (y,) + tuple(torch.zeros_like(t) if g is None else g
                        for g, t in zip(grads, (x, gate_up, down, routing.topk_weight_TK)))


def _check(out, ref, dtype, label, dot_scale=None):
    """assert_close on every tensor; the gate-weight gradient, a dot product <o, grad_y> per pair that can cancel
    to nearly 0, against ``dot_scale`` (T, K) = <|o|, |grad_y|> when given (relative RMS of the error to it)."""
    for name, a, b in zip(NAMES, out, ref):
        assert a.dtype == b.dtype, f"{label}/{name}: dtype {a.dtype} vs {b.dtype}"
        if name == "grad_weight" and dot_scale is not None and a.numel():
            err = ((a - b).double().square().mean().sqrt() / dot_scale.double().square().mean().sqrt().clamp_min(1e-30))
            assert err <= TOL[dtype], f"{label}/{name}: error {float(err):.3e} of the terms' scale > {TOL[dtype]:.1e}"
        else:
            assert_close(a, b, TOL[dtype], f"{label}/{name}")


def _dot_scale(routing, x, gate_up, down, grad_y, capacity):
    """<|o|, |grad_y|> per (t, k) slot: the scale of each gate-weight gradient's terms (0 for dropped pairs)."""
    dispatcher = LocalDispatcher(gate_up.shape[0], capacity)
    acc = torch.promote_types(x.dtype, torch.float32)
    x_in, plan = _handed_to_experts(dispatcher, x.detach().to(acc), routing)[:2]
    with torch.no_grad():
        o_NH = expert_loop(gather_rows(x_in, plan), plan.counts_list(), gate_up.to(acc), down.to(acc), "silu")
        scale_N = (o_NH.abs().float() * grad_y.abs().float()[plan.token_N]).sum(1)
        return torch.zeros(plan.topk_idx_TK.numel()).index_copy_(0, plan.pair_N, scale_N).view_as(plan.topk_idx_TK)


def _handed_to_experts(dispatcher, x, routing):
    """(the rows and the plan the dispatcher hands to the experts, its Dispatched)."""
    seen = []
    _, d = dispatcher(x, routing, lambda x_in, plan: seen.append((x_in, plan)) or x_in.new_zeros(x_in.shape),
                      EagerBackend(), training=True)
    return seen[0] + (d,)


def _dispatchers(E, capacity, group):
    local = LocalDispatcher(E, capacity)
    yield "local", local
    if group is not None:
        yield "all_to_all", AllToAllDispatcher(group, E, capacity)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=problems())
def test_every_implementation_and_dispatcher_matches_the_reference(case, one_rank_group):
    T, E, K, H, I, kind, capacity, dtype, seed = case
    ref = _pipeline(LocalDispatcher(E, capacity), EagerBackend(), *_tensors(*case))
    scale = _dot_scale(*_tensors(*case), capacity)
    for name, impl in IMPLS.items():
        if name.endswith("grouped_mm") and grouped_mm_shape_reason(H, I, dtype):
            continue  # selection never picks grouped_mm for these shapes
        for where, dispatcher in _dispatchers(E, capacity, one_rank_group):
            _check(_pipeline(dispatcher, impl, *_tensors(*case)), ref, dtype, f"{name}/{where}", scale)
    # The reference's own dispatch through the all-to-all dispatcher.
    _check(_pipeline(AllToAllDispatcher(one_rank_group, E, capacity), EagerBackend(), *_tensors(*case)), ref, dtype,
           "eager/all_to_all", scale)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@settings(max_examples=interpreted_examples(), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=problems())
def test_triton_through_both_dispatchers_matches_the_reference(case, one_rank_group):
    """Few examples: on CPU the kernels run in Triton's interpreter."""
    T, E, K, H, I, kind, capacity, dtype, seed = case
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
    ref = _pipeline(LocalDispatcher(E, capacity), EagerBackend(), *_tensors(*case))
    scale = _dot_scale(*_tensors(*case), capacity)
    for where, dispatcher in _dispatchers(E, capacity, one_rank_group):
        _check(_pipeline(dispatcher, TritonBackend(), *_tensors(*case)), ref, dtype, f"triton/{where}", scale)


@settings(deadline=None)
@given(case=problems(dtypes=(torch.float64,)))
def test_reference_equals_a_float64_loop_over_pairs(case):
    """The eager pipeline against Σ_k w · down(silu(gate x) · up x) over the kept pairs, computed pair by pair in
    float64 from the routing alone (no sort, no dispatcher)."""
    T, E, K, H, I, kind, capacity, dtype, seed = case
    routing, x, gate_up, down, grad_y = _tensors(*case)
    dispatcher = LocalDispatcher(E, capacity)
    y = _pipeline(dispatcher, EagerBackend(), routing, x, gate_up, down, grad_y)
    keep = dispatcher.plan(routing, EagerBackend(), training=True).keep_TK
    w = routing.topk_weight_TK
    rows = [torch.zeros(H, dtype=torch.float64) for _ in range(T)]
    for t, k in keep.nonzero().tolist():
        e = int(routing.topk_idx_TK[t, k])
        h = gate_up[e] @ x[t]
        rows[t] = rows[t] + w[t, k] * (down[e] @ (F.silu(h[:I]) * h[I:]))
    expected = torch.stack(rows) if T else x * 0.0
    grads = torch.autograd.grad(expected, (x, gate_up, down, w), grad_y, allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, gate_up, down, w)))
    _check(y, (expected,) + grads, torch.float64, "eager vs float64 loop", _dot_scale(routing, x, gate_up, down, grad_y,
                                                                                    capacity))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=problems(dtypes=(torch.float32, torch.bfloat16, torch.float64)),
       device_capacity=st.one_of(st.none(), st.floats(0.2, 2.0)))
def test_dispatch_data_movement_is_exact(case, device_capacity, one_rank_group):
    """What each dispatcher hands to the experts is exactly the kept pairs' token rows in expert order (the weights
    exactly the gate weights); its combine of rows o is exactly Σ_k w · o in fp32, in slot order."""
    T, E, K, H, I, kind, capacity, dtype, seed = case
    routing, x, _, _, _ = _tensors(*case)
    for where, dispatcher in _dispatchers(E, capacity, one_rank_group):
        if where == "all_to_all":
            dispatcher.device_capacity_factor = device_capacity
        x_in, plan, d = _handed_to_experts(dispatcher, x.detach(), routing)
        x_NH = gather_rows(x_in, plan)
        if where == "local":
            assert torch.equal(x_NH, x.detach()[plan.token_N])
            expected_w = routing.topk_weight_TK.reshape(-1)[plan.pair_N]
        else:  # one rank: the received rows are the token rows in (rank, token) order, i.e. the tokens that send
            token_U = d.exchange.token_U
            assert torch.equal(x_NH, x.detach()[token_U][plan.token_N])
            sent_plan = d.plan
            # every kept received pair carries its token's gate weight for that expert
            w_sent = routing.topk_weight_TK.detach().reshape(-1)[sent_plan.pair_N]
            experts_sent = routing.topk_idx_TK.reshape(-1)[sent_plan.pair_N]
            tokens_sent = sent_plan.token_N
            lookup = {(int(t), int(e)): float(v) for t, e, v in zip(tokens_sent, experts_sent, w_sent)}
            got = plan.weight_TK.detach().reshape(-1)[plan.pair_N]
            experts_recv = plan.topk_idx_TK.reshape(-1)[plan.pair_N]
            expected_w = torch.tensor([lookup[(int(token_U[t]), int(e))] for t, e in zip(plan.token_N, experts_recv)],
                                      dtype=got.dtype)
            assert torch.equal(got, expected_w)
            dropped = int(plan.keep_TK.numel() - plan.keep_TK.sum()) - int((plan.topk_idx_TK.numel()
                                                                               - sent_plan.pair_N.numel()))
            assert int(d.num_dropped) == int(sent_plan.num_dropped) + max(dropped, 0)
            continue
        assert torch.equal(plan.weight_TK.reshape(-1)[plan.pair_N], expected_w)
        o = torch.randn(plan.pair_N.numel(), H).to(dtype)
        acc = torch.promote_types(dtype, torch.float32)
        o_pad, w = torch.cat([o, o.new_zeros(1, H)]).to(acc), plan.weight_TK.detach().to(acc)
        expected = torch.zeros(T, H, dtype=acc)
        for k in range(K):
            expected = expected + w[:, k:k + 1] * o_pad[plan.slot_TK[:, k]]
        assert torch.equal(combine_rows(o, plan, weighted=True).detach(), expected.to(dtype))
        assert torch.equal(gather_rows(x.detach(), plan), x_NH)
