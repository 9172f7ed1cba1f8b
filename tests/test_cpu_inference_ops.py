"""The CPU inference implementations of backend "ext": strategy "decode" (csrc/cpu/expert_gemv.cpp), which selection
picks for inference on at most decode_tokens(dtype) tokens on the CPU, and strategy "blocks"
(csrc/cpu/expert_blocks.cpp) for inference on more. Each equals the truth: every pair's expert computed in float64
from the formulas (fp32 to rounding, bf16 within bf16 rounding), and the eager layer with padding, capacity,
group-limited sigmoid routing, the clamped SwiGLU and experts that receive no token."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import deepseek_moe as dm
from deepseek_moe.backends import DECODE_TOKENS, ExtBackend, decode_tokens, select
from deepseek_moe.backends.ext import blocks_supported, ensure_loaded
from deepseek_moe.plan import build_plan
from deepseek_moe.testing import assert_close, make_topk, ran_ops, require_extension


@pytest.fixture(scope="module", autouse=True)
def built():
    require_extension()


def needs_blocks(dtype):
    """bf16 blocks need oneDNN's bf16 micro-kernel (AMX, AVX-512 BF16) or AVX2 (widened to fp32); both CI machine
    kinds (Intel with AMX, AMD Zen 3) have one."""
    if not blocks_supported(dtype):
        pytest.skip(f"expert_blocks has no {dtype} micro-kernel on this CPU")


def by_formula(x, gate_up, down, topk, w, keep, limit):
    """Σ_k w · down(silu(min(g, L)) · clamp(u, −L, L)) over the kept pairs, in float64, expert by expert; and the
    scale of its rounding: the same sums over the terms' magnitudes (|down|·(|silu'(g)|·|u|·Σ|gate·x| +
    |silu(g)|·Σ|up·x| + |a|)·|w|), so that an output whose terms cancel is judged by the size of its terms."""
    I = down.shape[-1]
    y = torch.zeros(x.shape, dtype=torch.float64)
    scale = torch.zeros(x.shape, dtype=torch.float64)
    for e in topk[keep].unique().tolist():
        t, k = ((topk == e) & keep).nonzero(as_tuple=True)
        W, xt, wt = gate_up[e].double(), x[t].double(), w[t, k].double()[:, None]
        h, h_abs = xt @ W.T, xt.abs() @ W.abs().T
        g, u = h[:, :I], h[:, I:]
        if limit is not None:
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        gg = g.clone().requires_grad_()
        silu = F.silu(gg)
        (slope,) = torch.autograd.grad(silu.sum(), gg)
        a = silu.detach() * u
        D = down[e].double()
        y.index_add_(0, t, wt * (a @ D.T))
        a_scale = slope.abs() * u.abs() * h_abs[:, :I] + silu.detach().abs() * h_abs[:, I:] + a.abs()
        scale.index_add_(0, t, wt.abs() * (a_scale @ D.abs().T))
    return y, scale


@pytest.mark.parametrize("strategy", ["decode", "blocks"])
@given(T=st.integers(1, 300), E=st.integers(1, 12), K=st.integers(1, 6), H=st.integers(1, 150),
       I=st.integers(1, 70), empty=st.integers(0, 4), capacity=st.sampled_from([None, 0.5]),
       limit=st.sampled_from([None, 0.05, 1.0]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       shared=st.integers(0, 40), seed=st.integers(0, 2 ** 16))
def test_op_equals_a_float64_loop(strategy, T, E, K, H, I, empty, capacity, limit, dtype, shared, seed):
    """Widths that are no multiple of the vector length (16) and below it exercise the masked tails and the
    portable loops; more than 256 pairs of one expert (or of the shared experts) split it into pieces."""
    check_against_formula(strategy, T, E, K, H, I, empty, capacity, limit, dtype, shared, seed)


@pytest.mark.parametrize("T", [5, 24, 40, 300, 700])  # token columns 16, 32 + 16, and pieces of 256 pairs
@pytest.mark.parametrize("H,I,shared", [(64, 32, 0), (128, 64, 64), (32, 96, 32)])
def test_blocks_op_on_amx_tiles_equals_a_float64_loop(T, H, I, shared):
    """bf16 with H a multiple of 32 and every width of 32: GEMM 1 runs on the op's own AMX loop (where the CPU has
    AMX), 32 weight rows and 32 + 16 token columns at a time; pieces of one expert and the shared experts."""
    needs_blocks(torch.bfloat16)
    for seed, limit in ((0, None), (1, 0.05)):
        check_against_formula("blocks", T, 6, 2, H, I, 1, None, limit, torch.bfloat16, shared, seed)


@pytest.mark.parametrize("dtype,H,I", [(torch.bfloat16, 64, 32), (torch.bfloat16, 66, 34), (torch.float32, 40, 24)])
def test_blocks_op_is_bitwise_the_same_on_one_thread_and_two(dtype, H, I):
    """Each piece is computed whole by one thread and every y element receives its terms in a fixed order, so the
    thread count changes no bit (AMX loop, brgemm, fp32)."""
    needs_blocks(dtype)
    torch.manual_seed(0)
    T, E, K = 300, 6, 2
    plan = build_plan(make_topk(T, E, K, "random"), torch.rand(T, K), E)
    x = torch.randn(T, H).to(dtype)
    gate_up, down = (torch.randn(E, 2 * I, H) / 8).to(dtype), (torch.randn(E, H, I) / 8).to(dtype)
    shared = tuple((torch.randn(*shape) / 8).to(dtype) for shape in ((32, H), (32, H), (H, 32)))
    impl, threads = ExtBackend("blocks"), torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.inference_mode():
                outputs.append(impl.run(x, plan, gate_up, down, shared))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("dtype,T,H,I", [(torch.bfloat16, 1, 64, 32), (torch.bfloat16, 5, 70, 34),
                                         (torch.float32, 12, 130, 45)])
def test_decode_op_is_bitwise_the_same_alone_and_on_threads(dtype, T, H, I):
    """Each gate/up unit and each row of y (its terms summed in the segments' order) is one item's work, whichever
    thread takes it, so neither the thread count nor the shared-CPU watch (which runs calls on the calling thread
    alone) changes a bit. H = 70 and 130 leave a last item of 6 and 2 rows (under the 4 rows of one dot call); the
    units (6·I + 32) are no multiple of the item's 32."""
    torch.manual_seed(0)
    E, K = 6, 4
    plan = build_plan(make_topk(T, E, K, "random"), torch.rand(T, K), E)
    x = torch.randn(T, H).to(dtype)
    gate_up, down = (torch.randn(E, 2 * I, H) / 8).to(dtype), (torch.randn(E, H, I) / 8).to(dtype)
    shared = tuple((torch.randn(*shape) / 8).to(dtype) for shape in ((32, H), (32, H), (H, 32)))
    impl, threads = ExtBackend("decode"), torch.get_num_threads()
    watching = dm.ext.shared_cpu_watch()
    outputs = []
    try:
        for n, watch in ((1, True), (2, True), (2, False)):
            torch.set_num_threads(n)
            dm.ext.shared_cpu_watch(watch)
            with torch.inference_mode():
                outputs += [impl.run(x, plan, gate_up, down, shared) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
        dm.ext.shared_cpu_watch(watching)
    for y in outputs[1:]:
        assert torch.equal(outputs[0], y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E,H", [(0, 5, 16), (1, 1, 1), (1, 64, 1024), (2, 3, 7), (3, 4, 8), (4, 5, 17),
                                   (7, 64, 1024), (7, 17, 33), (16, 64, 70), (64, 64, 1024)])
def test_router_logits_are_float64_dots_to_rounding_the_same_bits_on_any_threads_and_in_any_batch(dtype, T, E, H):
    """router_logits (the decode step's gate GEMM) against x·Wᵀ in float64: within the fp32 rounding of a dot
    product of H terms (H·2⁻²⁴ of Σ|x·w|). Its bits do not change with the thread count, the shared-CPU watch, or
    the other tokens of the batch (ATen's linear on 2 threads differs from 1 thread's at T = 7 on the AMD CPU):
    each token alone gives the batch's row. x transposed in memory; 64 × 64 × 1024 multiply-adds run on threads;
    H = 7, 17, 33, 70 leave tails under one vector, E = 5, 17 blocks of fewer than 4 rows, T = 7 of fewer than 3
    tokens."""
    torch.manual_seed(T * 1000 + E + H)
    x = torch.randn(H, T).to(dtype).t()
    weight = torch.randn(E, H)
    op, threads, watching = torch.ops.deepseek_moe.router_logits, torch.get_num_threads(), dm.ext.shared_cpu_watch()
    outputs = []
    try:
        for n, watch in ((2, True), (1, True), (2, False)):
            torch.set_num_threads(n)
            dm.ext.shared_cpu_watch(watch)
            outputs.append(op(x, weight))
        torch.set_num_threads(threads)
        alone = [op(x[t:t + 1], weight) for t in range(T)]
    finally:
        torch.set_num_threads(threads)
        dm.ext.shared_cpu_watch(watching)
    logits = outputs[0]
    assert logits.dtype == torch.float32 and logits.shape == (T, E)
    truth = x.double() @ weight.double().T
    bound = (x.double().abs() @ weight.double().abs().T) * H * 2.0 ** -24
    assert ((logits.double() - truth).abs() <= bound).all()
    for other in outputs[1:] + ([torch.cat(alone)] if T else []):
        assert torch.equal(logits, other)
    assert torch.equal(op(x.float(), weight), logits)  # a 16-bit x widens exactly


@pytest.mark.parametrize("x,weight,message", [
    (torch.zeros(2, 8, dtype=torch.float64), torch.zeros(4, 8), "float32, bfloat16 or float16"),
    (torch.zeros(2, 8), torch.zeros(4, 8, dtype=torch.bfloat16), r"weight must be \(E, H\) float32"),
    (torch.zeros(2, 8), torch.zeros(4, 9), r"x must be \(T, H\) with H = 9"),
    (torch.zeros(8), torch.zeros(4, 8), r"x must be \(T, H\)")])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_router_logits_refuse_what_they_do_not_compute(x, weight, message, device):
    """The CPU kernel and the fake one (a traced graph, meta tensors) refuse alike."""
    ensure_loaded()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.deepseek_moe.router_logits(x.to(device), weight.to(device))


@pytest.mark.parametrize("score_func,E", [("softmax", 16), ("sigmoid", 11), ("sqrtsoftplus", 11)])
@pytest.mark.parametrize("fused", [True, False])
def test_a_decode_step_is_the_same_bits_on_one_thread_and_two_and_for_a_token_alone(fused, score_func, E,
                                                                                      monkeypatch):
    """The whole decode step (gate GEMM, scores, choice, experts, shared experts, combine), by its one op or stage by
    stage: neither the thread count nor the batch changes a bit of a token's output or its logits. 7 tokens: where
    ATen's linear on two threads and on one differ. 11 experts: ATen's sigmoid and softplus would compute a token's
    11 scores alone in their scalar tail and most of 77 in their vector body, bits apart (with these weights, in a
    score that top-6 chooses: the test fails with them)."""
    if not fused:
        monkeypatch.setattr(ExtBackend, "fused_step", lambda self, cfg: None)
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(hidden_size=256, expert_hidden_size=32, num_routed_experts=E, num_shared_experts=1,
                                top_k=6, initializer_range=0.1, backend="ext", score_func=score_func,
                                routed_scaling_factor=2.5).eval()
    x = torch.randn(1, 7, 256)
    seen = []
    layer.logits_probe.register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(2)
            y2, ran = ran_ops(lambda: layer(x))
            torch.set_num_threads(1)
            y1 = layer(x)
            torch.set_num_threads(threads)
            alone = torch.cat([layer(x[:, t:t + 1]) for t in range(7)], dim=1)
    finally:
        torch.set_num_threads(threads)
    assert {"deepseek_moe::router_logits", "deepseek_moe::expert_gemv"} <= ran
    assert ("deepseek_moe::fused_moe" in ran) == fused
    assert torch.equal(y2, y1) and torch.equal(y2, alone)
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], torch.cat(seen[2:]))


MS = 1_000_000  # ns


def replay_shared_cpu_policy(calls):
    """A fresh watch's choices for calls (start ms, lost ms, elapsed ms, work): whether each ran alone."""
    columns = [[round(c[i] * MS) for c in calls] for i in range(3)] + [[c[3] for c in calls]]
    return torch.ops.deepseek_moe._shared_cpu_policy(*columns)


def test_shared_cpu_watch_goes_alone_after_two_lost_calls_then_while_the_threads_mean_is_slower():
    """The decode op's policy (csrc/cpu/shared_cpu.h) on given times: before any call alone, two calls in a row that
    each lost >= 100 us and >= a quarter of their time (waiting for threads or descheduled) send the calls of the
    next 20 ms (at least 4 calls of that length) to the calling thread alone. A window's first call alone is left
    out of the running mean of the calls alone (the threads of the call before still spin). After that one lost call
    opens the next window where the calls on threads take longer per unit of work, on the mean, than the calls
    alone; the windows double up to 1.28 s. A call alone here does its work in 1 ms, a lost call on threads in 4."""
    calls_and_alone = [
        ((0, 2, 4, 1), False), ((5, 0.09, 4, 1), False),  # under 100 us lost: free
        ((10, 0.9, 4, 1), False),  # under a quarter lost: free
        ((15, 2, 4, 1), False), ((20, 2, 4, 1), False),  # two lost: alone from 24 until 24 + 20
        ((25, 0, 50, 1), True),  # the window's first call: not in the mean
        ((76, 0, 1, 1), False),  # free, no call alone counted yet: the next window halves, to 20 ms
        ((78, 2, 4, 1), False), ((83, 10, 25, 1), False),  # lost twice: 4 calls of 25 ms (100 ms), until 208
        ((109, 0, 1, 1), True), ((207, 0, 1, 1), True),  # the window's second call: the calls alone take 1 ms
        ((209, 2, 4, 1), False),  # the threads' mean is slower: one lost call opens the next window, 40 ms
        ((252, 0, 1, 1), True), ((253.5, 0, 1, 1), False)]
    assert replay_shared_cpu_policy([c for c, _ in calls_and_alone]) == [alone for _, alone in calls_and_alone]
    # One lost call after each window: windows of 20, 40, ... ms, then 1.28 s, no longer.
    calls, expected, t = [(0, 2, 4, 1), (5, 2, 4, 1), (10, 0, 1, 1), (12, 0, 1, 1)], [False, False, True, True], 29.5
    for k in range(1, 10):
        window = min(20 * 2 ** k, 1280)
        calls += [(t, 2, 4, 1), (t + 4 + window - 1.5, 0, 1, 1)]
        expected += [False, True]
        t += 4 + window + 0.5
    assert replay_shared_cpu_policy(calls) == expected


@pytest.mark.parametrize("free_ms,halved", [(0.2, True), (0.9, False)])
def test_shared_cpu_watch_halves_its_window_after_free_calls_only_where_the_threads_do_better(free_ms, halved):
    """After the first window (calls alone: 1 ms), six free calls on threads of 0.2 ms bring the threads' running mean
    (1/4 of each call) under the calls alone: the next window is halved (40 -> 20 ms). Free calls of 0.9 ms leave it
    above (4 ms of the lost calls still in it): the next window stays 40 ms."""
    calls = [(0, 2, 4, 1), (5, 2, 4, 1), (10, 0, 1, 1), (12, 0, 1, 1)]  # a window until 29, the next one 40 ms
    calls += [(30 + i, 0, free_ms, 1) for i in range(6)]
    calls += [(36, 2, 4, 1), (59, 0, 1, 1), (65, 0, 1, 1)]  # the threads' mean above 1 again: a window from 40
    assert replay_shared_cpu_policy(calls) == [False, False, True, True] + [False] * 6 + [False, True, not halved]


def test_shared_cpu_watch_keeps_the_threads_where_the_calling_thread_alone_is_slower():
    """Calls that lose half their time on threads (4 ms) but run slower still alone (10 ms for the same work: other
    parallel ops keep OpenMP's threads spinning) open one trial window; after it the threads stay, late or not,
    until the mean of the calls alone is 2.56 s old: a lost call then opens a 20 ms window to measure it again."""
    calls_and_alone = [((0, 2, 4, 1), False), ((5, 2, 4, 1), False), ((10, 0, 10, 1), True), ((21, 0, 8, 1), True),
                       ((31, 2, 4, 1), False), ((36, 2, 4, 1), False), ((41, 2, 4, 1), False), ((46, 2, 8, 2), False),
                       ((2580, 2, 4, 1), False),  # 2.55 s after the last call alone: not yet
                       ((2590, 2, 4, 1), False),  # 2.565 s: a window from 2594 until 2614
                       ((2595, 0, 10, 1), True), ((2606, 0, 7, 1), True), ((2615, 2, 4, 1), False),
                       ((2620, 2, 4, 1), False)]
    assert replay_shared_cpu_policy([c for c, _ in calls_and_alone]) == [alone for _, alone in calls_and_alone]
    # The same calls doing a third of the work each: slower than alone per unit of work, so the windows open.
    assert replay_shared_cpu_policy([(0, 2, 4, 1), (5, 2, 4, 1), (10, 0, 10, 3), (21, 0, 10, 3), (31, 2, 4, 1),
                                     (36, 0, 10, 3), (74, 0, 10, 3), (76, 2, 4, 1)]) == \
        [False, False, True, True, False, True, True, False]


@pytest.mark.parametrize("policy,on", [(None, True), ("PASSIVE", False), ("passive", False), ("ACTIVE", True)])
def test_shared_cpu_watch_starts_off_only_where_openmp_threads_wait_passively(policy, on):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", "import deepseek_moe as dm; print(dm.ext.shared_cpu_watch())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == str(on)


def test_shared_cpu_policy_replay_ignores_the_wait_policy_and_extreme_times():
    """The replay is of the policy whatever OMP_WAIT_POLICY says (a fresh watch switched on), and times near the
    int64 limit neither wrap nor flip a choice."""
    big = 2 ** 62
    assert torch.ops.deepseek_moe._shared_cpu_policy([0, 10 * MS, 20 * MS, 25 * MS], [big] * 4, [big] * 4,
                                                     [100] * 4) == [False, False, True, True]  # lost all: shared
    assert torch.ops.deepseek_moe._shared_cpu_policy([0, 10 * MS, 20 * MS, 25 * MS], [5 * MS] * 4, [10 * MS] * 4,
                                                     [100] * 4) == [False, False, True, True]
    late = 2 ** 63 - MS
    assert torch.ops.deepseek_moe._shared_cpu_policy([late - 3 * MS, late - MS, late], [MS] * 3, [2 * MS] * 3,
                                                     [1] * 3) == [False, False, True]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    code = ("import torch, deepseek_moe as dm; dm.ext.load(); ms = 10 ** 6; print(torch.ops.deepseek_moe."
            "_shared_cpu_policy([0, 10 * ms, 20 * ms, 25 * ms], [5 * ms] * 4, [10 * ms] * 4, [100] * 4))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[-2] == "[False, False, True, True]"


def test_shared_cpu_policy_replay_refuses_impossible_times_and_starts_on_threads_at_any_time():
    """Durations are not negative and a call loses at most its time (a negative one had wrapped a window's end to
    the int64 limit: every later call alone); a fresh watch has no window, also before time 0 of the clock."""
    policy = torch.ops.deepseek_moe._shared_cpu_policy
    for lost, elapsed, work in ((2 * MS, -4 * MS, 1), (-1, 4 * MS, 1), (5 * MS, 4 * MS, 1), (0, MS, -1)):
        with pytest.raises(RuntimeError, match="0 <= lost_ns <= elapsed_ns and work >= 0"):
            policy([0, 5 * MS, 3600 * 10 ** 9], [2 * MS, 2 * MS, lost], [4 * MS, 4 * MS, elapsed], [1, 1, work])
    assert policy([-2 ** 63, -1], [0, 0], [1, 1], [1, 1]) == [False, False]
    # Calls alone that took no time still count as measured (1 ns): the means decide, one late call opens a window.
    assert replay_shared_cpu_policy([(0, 2, 4, 1), (5, 2, 4, 1), (10, 0, 0, 1), (12, 0, 0, 1), (30, 2, 4, 1),
                                     (35, 0, 1, 1)]) == [False, False, True, True, False, True]


def test_shared_cpu_watch_switches():
    was = dm.ext.shared_cpu_watch()
    try:
        assert dm.ext.shared_cpu_watch(False) is was
        assert dm.ext.shared_cpu_watch() is False
        assert dm.ext.shared_cpu_watch(True) is False
        assert dm.ext.shared_cpu_watch() is True
        for bad in ("false", 1, 2.5):
            with pytest.raises(TypeError, match="True, False or None"):
                dm.ext.shared_cpu_watch(bad)
        assert dm.ext.shared_cpu_watch() is True
    finally:
        dm.ext.shared_cpu_watch(was)


@pytest.mark.parametrize("T,H,I", [(40, 32, 32), (40, 34, 34), (300, 96, 64)])
def test_blocks_op_rounds_its_fp32_sums_to_bf16_once_to_nearest_even(T, H, I):
    """A bf16 output of the blocks op is its fp32 sum rounded once, to nearest, ties to even (as torch's ``.to``),
    on the AMX loop (H, I multiples of 32) and brgemm (34). Gate/up rows 0 and 1 are equal, so every token's
    activations a0 = a1 (bf16: 8 significant bits); down row h holds 1 and c_h in columns 0 and 1, so y_h =
    a0 · (1 + c_h) exactly in fp32 (c_h has at most 3), with y_0 = a0. The c_h put the sums above, below and on
    the midpoint between two bf16 numbers, where truncating or rounding away would differ."""
    needs_blocks(torch.bfloat16)
    strategy = "blocks"
    torch.manual_seed(0)
    gate_up = torch.randn(1, 2 * I, H) / 4
    gate_up[0, 1], gate_up[0, I + 1] = gate_up[0, 0], gate_up[0, I]
    fractions = [0.0, 3 * 2 ** -9, 2 ** -8, 2 ** -7, 3 * 2 ** -8, 5 * 2 ** -10, -3 * 2 ** -9, -(2 ** -8)]
    c = torch.tensor([fractions[h % len(fractions)] for h in range(H)])
    down = torch.zeros(1, H, I)
    down[0, :, 0], down[0, :, 1] = 1.0, c
    x = torch.randn(T, H).bfloat16()
    plan = build_plan(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), 1)
    with torch.inference_mode():
        y = ExtBackend(strategy).run(x, plan, gate_up.bfloat16(), down.bfloat16(), None)
    a0 = y[:, :1].double()
    assert (a0 != 0).all()
    expected = (a0 * (1 + c.double())).float().bfloat16()  # exact in fp32, rounded by torch
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("strategy", ["decode", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,I", [(0, 4), (4, 0), (32, 0)])
def test_ops_with_empty_experts_or_hidden_size(strategy, dtype, H, I):
    """Experts of width 0 add nothing and the shared experts still do; H = 0 gives (T, 0). (brgemm refuses an empty
    product: the blocks op raised std::bad_alloc here.)"""
    if strategy == "blocks":
        needs_blocks(dtype)
    torch.manual_seed(0)
    T, E, S = 5, 3, 2
    plan = build_plan(torch.randint(0, E, (T, 2)), torch.rand(T, 2), E)
    x = torch.randn(T, H).to(dtype)
    gate, up, down = (torch.randn(*shape).to(dtype) for shape in ((S, H), (S, H), (H, S)))
    with torch.inference_mode():
        y = ExtBackend(strategy).run(x, plan, torch.randn(E, 2 * I, H).to(dtype), torch.randn(E, H, I).to(dtype),
                                     (gate, up, down))
    xd = x.double()
    want = (F.silu(xd @ gate.double().T) * (xd @ up.double().T)) @ down.double().T
    assert y.shape == (T, H) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


def check_against_formula(strategy, T, E, K, H, I, empty, capacity, limit, dtype, shared, seed):
    """The op's output on random tokens, routing and weights against :func:`by_formula`'s float64 truth, within a
    bound from the terms' magnitudes."""
    if strategy == "decode":
        T = 1 + T % DECODE_TOKENS
    else:
        needs_blocks(dtype)
        if dtype == torch.bfloat16:  # VNNI pairs: selection picks blocks for even sizes only
            H, I, shared = H + H % 2, I + I % 2, shared + shared % 2
    K = min(K, E)
    empty = min(empty, E - K)
    g = torch.Generator().manual_seed(seed)
    topk = make_topk(T, E, K, "random", generator=g, empty_experts=empty)
    w = torch.rand(T, K, generator=g)
    cap = None if capacity is None else max(1, int(capacity * T * K / E))
    plan = build_plan(topk, w, E, cap, w)
    x = torch.randn(T, H, generator=g).to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    weights = None
    if shared:  # the shared experts as one more GLU over every token, weight 1
        weights = ((torch.randn(shared, H, generator=g) * H ** -0.5).to(dtype),
                   (torch.randn(shared, H, generator=g) * H ** -0.5).to(dtype),
                   (torch.randn(H, shared, generator=g) * shared ** -0.5).to(dtype))
    impl = ExtBackend(strategy, dm.glu.glu_name("silu", limit))
    with torch.inference_mode():
        y = impl.run(x, plan, gate_up, down, weights)
    assert y.dtype == dtype and y.shape == (T, H)
    truth, scale = by_formula(x, gate_up, down, topk, w, plan.keep_TK, limit)
    if shared:
        every = torch.ones(T, 1, dtype=torch.bool)
        s_truth, s_scale = by_formula(x, torch.cat([weights[0], weights[1]])[None], weights[2][None],
                                      torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), every, limit)
        truth, scale = truth + s_truth, scale + s_scale
    err = (y.double() - truth).abs()
    # fp32 accumulation over H + I terms: a few hundred fp32 roundings of the terms' scale at most; bf16 adds the
    # output's own rounding (the inputs are bf16 already, the products exact in fp32), and blocks round a to bf16
    # between the GEMMs as the eager oracle does (relative 2^-9 of each term).
    bf16 = dtype == torch.bfloat16
    bound = 2e-5 * scale + (truth.abs() * 2 ** -8 if bf16 else 0) + 1e-30
    if bf16 and strategy == "blocks":
        bound = bound + scale * 2 ** -8
    assert bool((err <= bound).all()), f"{dtype}: worst error {float((err / bound).max()):.2f} of the bound"


@pytest.mark.parametrize("strategy", ["decode", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing", ["softmax", "sigmoid_groups"])
def test_layer_equals_the_eager_layer_with_padding_capacity_and_clamp(routing, dtype, strategy):
    if strategy == "blocks":
        needs_blocks(dtype)
    fields = dict(hidden_size=96, expert_hidden_size=40, num_routed_experts=16, num_shared_experts=1, top_k=4,
                  swiglu_limit=1.0, capacity_factor=1.0, initializer_range=0.1)
    if routing == "sigmoid_groups":
        fields.update(score_func="sigmoid", num_groups=4, topk_groups=2, norm_topk_prob=True,
                      routed_scaling_factor=2.5)
    torch.manual_seed(0)
    oracle = dm.DeepSeekMoELayer(**fields, backend="eager").to(dtype).eval()
    with torch.no_grad():
        oracle.gate.e_score_correction_bias[:3] = -50.0  # experts 0-2 receive no token
    layer = dm.DeepSeekMoELayer(**fields, backend="ext").to(dtype).eval()
    layer.load_state_dict(oracle.state_dict())
    S = 8 if strategy == "decode" else 80
    x = torch.randn(2, S, 96).to(dtype) * 2
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[1, 5:] = True  # 13 real tokens or 85
    if strategy == "decode":  # as many real tokens as a decode step of this dtype may have, at most 13
        mask.view(-1)[min(13, decode_tokens(dtype, (96, 40))):] = True
    with torch.inference_mode():
        y, y_ref = layer(x, padding_mask=mask), oracle(x, padding_mask=mask)
        impl = layer._implementation(x.device, dtype, int((~mask).sum()))
    assert impl.strategy == strategy
    # The oracle rounds h and a to bf16 between its GEMMs; the ops keep h in fp32.
    assert_close(y[~mask], y_ref[~mask], 1e-6 if dtype == torch.float32 else 1e-2, f"{routing} {dtype}")
    assert (y[mask] == 0).all()


def test_selection_picks_decode_for_a_few_tokens_and_blocks_for_more_in_inference_only():
    cpu = torch.device("cpu")
    assert select("ext", cpu, torch.float32, inference=True, decode=True).strategy == "decode"
    assert select("ext", cpu, torch.float32, inference=True).strategy == "blocks"
    assert select("ext", cpu, torch.float32, decode=True).strategy == "segments"  # a backward follows
    assert select("ext", cpu, torch.float32).strategy == "segments"
    assert select("ext", cpu, torch.float64, inference=True).strategy == "segments"  # no fp64 micro-kernel
    assert select("ext", cpu, torch.bfloat16, inference=True, sizes=(64, 33)).strategy == "segments"  # odd I
    layer = dm.DeepSeekMoELayer(hidden_size=32, expert_hidden_size=16, num_routed_experts=8, top_k=2,
                                backend="ext").eval()
    limit = decode_tokens(torch.float32)
    # fp32 blocks run here: decoding ends where they overtake the streaming op (later on a CPU without AVX-512)
    assert limit == (32 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 64)
    with torch.no_grad():
        layer(torch.randn(limit, 32))
        layer(torch.randn(limit + 1, 32))
    layer.train()
    layer(torch.randn(4, 32)).sum().backward()
    strategies = {key[3:]: impl.strategy for key, impl in layer._impls.items()}
    assert strategies == {(True, False, True): "decode", (True, False, False): "blocks",
                          (False, False, False): "segments"}


@given(T=st.integers(0, 70), E_per_group=st.sampled_from([4, 8]), groups=st.sampled_from([(1, 1), (4, 1), (4, 2), (8, 3)]),
       K=st.integers(1, 4), score=st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"]),
       group_score=st.sampled_from(["max", "top2_sum"]), norm=st.booleans(), scale=st.sampled_from([1.0, 2.5]),
       seed=st.integers(0, 2 ** 16))
def test_route_topk_equals_the_router(T, E_per_group, groups, K, score, group_score, norm, scale, seed):
    """The extension's choice after the gate GEMM (route_topk) against the Python router on the same logits: the
    same experts in the same order, the same scores, weights to fp32 rounding; biases large enough to change the
    choice."""
    G, kept = groups
    E = G * E_per_group
    K = min(K, kept * E_per_group)
    cfg = dm.MoEConfig(hidden_size=16, expert_hidden_size=8, num_routed_experts=E, top_k=K, score_func=score,
                       num_groups=G, topk_groups=kept, group_score=group_score, norm_topk_prob=norm,
                       routed_scaling_factor=scale, backend="ext")
    torch.manual_seed(seed)
    router = dm.DeepSeekMoELayer(cfg).eval().router
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.e_score_correction_bias.normal_(0, 0.3)
        x = torch.randn(T, 16)
        select = select_ext(cfg)
        want, got = router(x), router(x, select=select)
    assert torch.equal(got.topk_idx_TK, want.topk_idx_TK)
    assert torch.equal(got.scores_TE, want.scores_TE)
    torch.testing.assert_close(got.topk_weight_TK, want.topk_weight_TK, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("score,first,second", [
    ("sqrtsoftplus", -103.3, -129.4),  # ATen's vectorised softplus flushes both to 0: a tie; a scalar exp did not
    ("softmax", 0.00023544751456938684, 0.00023539556423202157),  # equal in ATen's softmax; a scalar exp: 1 ulp apart
    ("sigmoid", 1e-3, 1e-3 + 2e-10)])
def test_route_topk_scores_are_the_routers_bits(score, first, second):
    """route_topk's scores are the Python router's bits (the same ATen ops on the same logits), so two experts
    whose scores are equal, or an ulp apart, in one are so in the other, and both pick them in the same order."""
    E, T = 16, 3
    cfg = dm.MoEConfig(hidden_size=E, expert_hidden_size=2, num_routed_experts=E, num_shared_experts=0, top_k=E,
                       score_func=score, backend="ext")
    router = dm.DeepSeekMoELayer(cfg).eval().router
    torch.manual_seed(0)
    logits = torch.randn(T, E) * 4
    logits[:, 0], logits[:, 1] = first, second
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))  # logits = x
        want, got = router(logits), router(logits, select=select_ext(cfg))
    assert torch.equal(got.scores_TE, want.scores_TE)
    assert torch.equal(got.topk_idx_TK, want.topk_idx_TK)


@pytest.mark.parametrize("inputs", ["zero gate", "few levels", "saturated sigmoid", "a NaN token"])
@pytest.mark.parametrize("E,G,kept,K,group_score", [(16, 1, 1, 4, "max"), (64, 8, 3, 6, "top2_sum"),
                                                    (64, 4, 2, 6, "max"), (384, 1, 1, 6, "max")])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_topk_breaks_ties_as_the_router(inputs, E, G, kept, K, group_score, score):
    """Equal scores (a zero-initialised gate, a saturated sigmoid, logits on a few levels, NaN) pick the same
    experts in the same order as torch.topk in the Python router, so a layer computes one function with or without
    autograd (both top-k algorithms of torch's CPU kernel: selection for K·64 > E, partial sort for E = 384)."""
    cfg = dm.MoEConfig(hidden_size=8, expert_hidden_size=4, num_routed_experts=E, top_k=K, score_func=score,
                       num_groups=G, topk_groups=kept, group_score=group_score, norm_topk_prob=True, backend="ext")
    router = dm.DeepSeekMoELayer(cfg).eval().router
    x = torch.randint(-1, 2, (40, 8)).float()
    with torch.no_grad():
        if inputs == "zero gate":
            router.weight.zero_()
        elif inputs == "few levels":
            router.weight.copy_(torch.randint(-2, 3, router.weight.shape).float())
            router.e_score_correction_bias.copy_(torch.randint(0, 2, (E,)).float() * 0.5)
        elif inputs == "saturated sigmoid":
            router.weight.normal_(0, 30)
        else:
            x[3] = float("nan")
        want, got = router(x), router(x, select=select_ext(cfg))
    assert torch.equal(got.topk_idx_TK, want.topk_idx_TK)
    torch.testing.assert_close(got.topk_weight_TK, want.topk_weight_TK, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_a_saturated_router_gives_one_function_with_and_without_autograd():
    cfg = dm.MoEConfig(hidden_size=64, expert_hidden_size=32, num_routed_experts=16, top_k=4, score_func="sigmoid",
                       norm_topk_prob=True, backend="ext")
    layer = dm.DeepSeekMoELayer(cfg).eval()
    x = 100 * torch.randn(8, 64)  # logits far above 17: sigmoid(l) == 1.0 for many experts
    with torch.no_grad():
        inference = layer(x)
    assert_close(inference, layer(x).detach(), 1e-6, "no_grad against autograd")


def select_ext(cfg):
    select = ExtBackend("decode").selector(cfg)
    assert select is not None
    return select


def test_the_layer_routes_through_route_topk_only_where_it_applies():
    cfg = dm.MoEConfig(hidden_size=32, expert_hidden_size=16, num_routed_experts=16, top_k=2, num_groups=4,
                       topk_groups=2, score_func="sigmoid", norm_topk_prob=True, backend="ext")
    layer = dm.DeepSeekMoELayer(cfg).eval()
    x = torch.randn(5, 32)

    def ops(fn):
        with torch.profiler.profile() as prof:
            fn()
        return {e.name for e in prof.events()}
    with torch.no_grad():
        assert "deepseek_moe::route_topk" in ops(lambda: layer(x))
        assert "deepseek_moe::route_topk" not in ops(lambda: layer(x, topk_idx=torch.zeros(5, 2, dtype=torch.long)
                                                                   + torch.tensor([0, 1])))
        assert ExtBackend("segments").selector(cfg) is None  # a backward may follow: the router's own ops
        assert ExtBackend("decode").selector(cfg.replace(num_devices=4, max_devices_per_token=2)) is None
        assert select_ext(cfg)(torch.randn(2, 16, dtype=torch.float64), torch.zeros(16)) is None  # fp64 logits
        nan = torch.full((1, 16), float("nan"))
        assert select_ext(cfg)(nan, torch.zeros(16))[1].shape == (1, 2)  # NaN logits: a choice, not a crash
    assert "deepseek_moe::route_topk" not in ops(lambda: layer(x))  # with autograd


@pytest.mark.parametrize("strategy", ["decode", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["softmax", "sigmoid_groups_top2", "sqrtsoftplus_clamped", "shared_gate"])
def test_the_fused_step_is_the_pipeline_bit_for_bit(variant, dtype, strategy, monkeypatch):
    """fused_moe (gate GEMM, choice, plan, experts and combine in one op, the layer's input (B, S, H) as it comes,
    here not contiguous) against the same layer with the stages called one by one (the implementation offering no
    fused step): the same output bits and the same routing seen from outside: the logits a hook observes,
    tokens_per_expert and the recorded ids."""
    if strategy == "blocks":
        needs_blocks(dtype)
    fields = dict(hidden_size=64, expert_hidden_size=32, num_routed_experts=16, num_shared_experts=2, top_k=4,
                  initializer_range=0.1, backend="ext")
    fields.update({"softmax": {}, "shared_gate": dict(shared_expert_gate=True),
                   "sigmoid_groups_top2": dict(score_func="sigmoid", num_groups=4, topk_groups=2,
                                               group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5),
                   "sqrtsoftplus_clamped": dict(score_func="sqrtsoftplus", norm_topk_prob=True, swiglu_limit=0.5),
                   }[variant])
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(**fields).to(dtype).eval()
    with torch.no_grad():
        layer.gate.e_score_correction_bias.normal_()
    S = 2 if strategy == "decode" else 60
    x = torch.randn(S, 2, 64).to(dtype).transpose(0, 1)
    seen = []
    layer.logits_probe.register_forward_hook(lambda module, args, out: seen.append(out.clone()))

    def forward():
        with torch.inference_mode(), dm.record_routing(layer) as routes:
            y = layer(x)
        return y, layer.tokens_per_expert.clone(), routes[""][0]
    (y, load, ids), fused_ran = ran_ops(forward)
    monkeypatch.setattr(ExtBackend, "fused_step", lambda self, cfg: None)
    (y_ref, load_ref, ids_ref), staged_ran = ran_ops(forward)
    op = "deepseek_moe::" + ("expert_gemv" if strategy == "decode" else "expert_blocks")
    assert {"deepseek_moe::fused_moe", op} <= fused_ran
    assert "deepseek_moe::fused_moe" not in staged_ran and op in staged_ran
    assert y.shape == x.shape and torch.equal(y, y_ref)
    assert torch.equal(seen[0], seen[1]) and torch.equal(load, load_ref) and torch.equal(ids, ids_ref)
    assert ids.shape == (2, S, layer.config.top_k) and int(load.sum()) == 2 * S * layer.config.top_k


def ext_and_eager():
    """A small eval layer with backend "ext" and its eager twin with the same weights, and their fields."""
    fields = dict(hidden_size=32, expert_hidden_size=16, num_routed_experts=8, num_shared_experts=1, top_k=2,
                  initializer_range=0.1)
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(**fields, backend="ext").eval()
    oracle = dm.DeepSeekMoELayer(**fields, backend="eager").eval()
    oracle.load_state_dict(layer.state_dict())
    return fields, layer, oracle


def test_the_fused_step_runs_only_where_the_pipeline_would_compute_the_same():
    """Not with autograd, in training, with an override, replayed ids, padding, a PEFT wrapper on the experts, under
    autocast, with an fp64 router or fp64 tokens beside an fp32 router (the step's gate GEMM is fp32); each then
    equals the eager layer."""
    fields, layer, oracle = ext_and_eager()
    x = torch.randn(4, 32)
    fused = "deepseek_moe::fused_moe"

    def check(name, call, ref_call=None, expect_fused=False):
        got, ran = ran_ops(lambda: call(layer))
        assert (fused in ran) == expect_fused, name
        assert_close(got, (ref_call or call)(oracle), 1e-5, name)
    with torch.no_grad():
        check("eval", lambda m: m(x), expect_fused=True)
        ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
        check("replayed ids", lambda m: m(x, topk_idx=ids))
        mask = torch.tensor([False, True, False, False])
        check("padding", lambda m: m(x, padding_mask=mask))
        with dm.padding_mask(mask):
            check("padding from a block", lambda m: m(x))
        with dm.analysis.disabled_experts(layer, [0]), dm.analysis.disabled_experts(oracle, [0]):
            check("override", lambda m: m(x))
        layer.train(), oracle.train()
        check("training", lambda m: m(x))
        layer.eval(), oracle.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, ran = ran_ops(lambda: layer(x))
            assert fused not in ran
    check("autograd", lambda m: m(x))
    double = dm.DeepSeekMoELayer(**fields, backend="ext").double().eval()
    with torch.no_grad():
        _, ran = ran_ops(lambda: double(x.double()))
    assert fused not in ran
    x64 = x.double()
    mixed = dm.DeepSeekMoELayer(**fields, backend="ext").eval()
    mixed.experts.double(), mixed.shared_experts.double()  # a gate kept in fp32 beside fp64 experts
    mixed_oracle = dm.DeepSeekMoELayer(**fields, backend="eager").eval()
    mixed_oracle.load_state_dict(mixed.state_dict())
    mixed_oracle.experts.double(), mixed_oracle.shared_experts.double()
    with torch.no_grad():  # the router's gate then runs in fp64, not in the op's fp32
        got, ran = ran_ops(lambda: mixed(x64))
        assert fused not in ran
        assert_close(got, mixed_oracle(x64), 1e-12, "fp64 tokens, fp32 router")
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_parameters=["experts.gate_up_proj"], init_lora_weights=False)
    wrapped, wrapped_oracle = peft.get_peft_model(layer, config), peft.get_peft_model(oracle, config)
    wrapped_oracle.load_state_dict(wrapped.state_dict())
    with torch.no_grad():
        got, ran = ran_ops(lambda: wrapped(x))
        assert fused not in ran
        assert_close(got, wrapped_oracle(x), 1e-5, "LoRA on the experts")


class DoubledExperts(dm.experts.RoutedExperts):
    def forward(self, *args, **kwargs):
        return 2 * super().forward(*args, **kwargs)


@pytest.mark.parametrize("what", ["hook on gate", "pre-hook on experts", "hook on shared", "global hook",
                                  "routing_statistics", "subclass", "forward set on experts",
                                  "forward set on shared", "forward set on the probe"])
def test_the_fused_step_stands_in_only_for_modules_called_plainly(what):
    """A hook on the router, the experts or the shared experts (also a global one: FSDP2 gathers parameters in
    one, routing_statistics counts in one) runs, and a subclass's forward or one set on the instance (accelerate's
    hooks, which bring offloaded weights in) is called (on the routed experts alone, not on the shared experts'
    output as well): the modules are then called stage by stage, and the layer equals the eager layer doing the
    same. The logits probe only observes: with a forward of its own the routed step stays one op."""
    fields, layer, oracle = ext_and_eager()
    x = torch.randn(5, 32)
    calls = []
    handles = []
    for m in (layer, oracle):
        if what == "subclass":
            doubled = DoubledExperts(m.config)
            doubled.load_state_dict(m.experts.state_dict())
            m.experts = doubled
        elif what.startswith("forward set on"):
            module = {"forward set on experts": m.experts, "forward set on shared": m.shared_experts,
                      "forward set on the probe": m.logits_probe}[what]

            def counted(*args, _forward=module.forward, **kwargs):
                calls.append(what)
                out = _forward(*args, **kwargs)
                return out if what.endswith("probe") else 2 * out
            module.forward = counted
        elif what != "routing_statistics" and what != "global hook":
            module = {"hook on gate": m.gate, "pre-hook on experts": m.experts,
                      "hook on shared": m.shared_experts}[what]
            if what == "pre-hook on experts":
                handles.append(module.register_forward_pre_hook(lambda mod, args: calls.append(what)))
            else:
                handles.append(module.register_forward_hook(lambda mod, args, out: calls.append(what)))
    if what == "global hook":
        handles.append(torch.nn.modules.module.register_module_forward_hook(
            lambda mod, args, out: calls.append(type(mod).__name__)))
    try:
        if what == "routing_statistics":
            stats = {}
            for name, m in (("ext", layer), ("eager", oracle)):
                stats[name] = dm.analysis.routing_statistics(m, [x[None]])[""]
            assert stats["ext"].tokens == 5 and torch.equal(stats["ext"].load_E, stats["eager"].load_E)
            return
        with torch.no_grad():
            got, ran = ran_ops(lambda: layer(x))
            calls_ext = list(calls)
            assert_close(got, oracle(x), 1e-5, what)
    finally:
        for handle in handles:
            handle.remove()
    # A hook on the shared experts keeps only them out of the op: they are called, the routed step is fused.
    assert ("deepseek_moe::fused_moe" in ran) == (what in ("hook on shared", "forward set on shared",
                                                           "forward set on the probe"))
    if what == "global hook":
        assert {"Router", "RoutedExperts", "SharedExperts"} <= set(calls_ext)
    elif what != "subclass":
        assert calls_ext == [what]


def test_the_fused_step_declines_weights_on_another_device_or_in_another_dtype():
    """A router on the meta device raises the pipeline's ValueError; routed weights there raise RuntimeError naming
    the devices (the op's fake kernel would return empty tensors on x's device), also stage by stage; a down_proj
    in another dtype than gate_up_proj (the pipeline casts both to x's) runs stage by stage and equals the eager
    layer."""
    fields, layer, oracle = ext_and_eager()
    x = torch.randn(2, 3, 32)
    for m in (layer, oracle):
        m.experts.down_proj = torch.nn.Parameter(m.experts.down_proj.detach().to(torch.bfloat16))
    with torch.no_grad():
        got, ran = ran_ops(lambda: layer(x))
        assert "deepseek_moe::fused_moe" not in ran
        assert_close(got, oracle(x), 1e-5, "down_proj in bf16")
        meta_gate = dm.DeepSeekMoELayer(**fields, backend="ext").eval()
        meta_gate.gate.to("meta")
        with pytest.raises(ValueError, match="meta"):
            meta_gate(x)
        for fused in (True, False):
            meta_down = dm.DeepSeekMoELayer(**fields, backend="ext").eval()
            meta_down.experts.down_proj = torch.nn.Parameter(torch.empty_like(meta_down.experts.down_proj,
                                                                              device="meta"))
            with pytest.raises(RuntimeError, match="different devices"):
                meta_down(x) if fused else meta_down(x, padding_mask=torch.zeros(2, 3, dtype=torch.bool))


def test_the_fused_step_runs_after_a_replay_block_left_a_forward_unfinished():
    """A replay block whose training forward had no backward keeps what a late checkpointed re-run would need; an
    eval forward is never such a re-run, so it still runs as one op."""
    fields, layer, oracle = ext_and_eager()
    x = torch.randn(2, 3, 32)
    with torch.no_grad(), dm.record_routing(layer) as routes:
        layer(x)
    layer.train()
    with dm.replay_routing(layer, routes):
        layer(x)
    layer.eval()
    assert layer.route_tape.closed
    with torch.no_grad():
        got, ran = ran_ops(lambda: layer(x))
    assert "deepseek_moe::fused_moe" in ran
    assert_close(got, oracle(x), 1e-5, "after the replay block")


def test_an_eval_forwards_aux_loss_and_num_dropped_are_its_own():
    """They are zero after an eval forward and belong to the caller: adding into one in place changes no later
    forward's (the layer allocates them only when read)."""
    layer = dm.DeepSeekMoELayer(hidden_size=32, expert_hidden_size=16, num_routed_experts=8, top_k=2,
                                backend="ext").eval()
    with torch.no_grad():
        layer(torch.randn(3, 32))
        first, dropped = layer.aux_loss, layer.load_state.num_dropped
        first += 3.0
        dropped += 5
        layer(torch.randn(3, 32))
    assert float(layer.aux_loss) == 0.0 and layer.last_stats["num_dropped"] == 0
    assert layer.aux_loss.dtype == torch.float32 and layer.load_state.num_dropped.dtype == torch.int64


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_compiled_inference_forward_runs_the_inference_ops(dynamic):
    """torch.compile of an inference forward selects at trace time as eager mode does: the decode op for a decode
    step, the blocks op above (a recompile, guarded on the token count when it is symbolic), both inside the fused
    step, the segment loop with autograd; each equals the eager layer."""
    torch._dynamo.reset()
    layer = dm.DeepSeekMoELayer(hidden_size=32, expert_hidden_size=16, num_routed_experts=8, num_shared_experts=1,
                                top_k=2, backend="ext").eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    limit = decode_tokens(torch.float32)
    for tokens, op in ((1, "expert_gemv"), (limit, "expert_gemv"), (limit + 8, "expert_blocks")):
        x = torch.randn(tokens, 32)
        with torch.no_grad(), torch.profiler.profile() as prof:
            got = compiled(x)
        ran = {e.name for e in prof.events() if e.name.startswith("deepseek_moe::")}
        assert {f"deepseek_moe::{op}", "deepseek_moe::route_topk", "deepseek_moe::fused_moe"} <= ran, (tokens, ran)
        with torch.no_grad():
            assert_close(got, layer(x), 1e-6, f"{tokens} tokens")
    x = torch.randn(3, 32, requires_grad=True)
    layer.train()
    with torch.profiler.profile() as prof:
        torch.compile(layer, fullgraph=True)(x).sum().backward()
    assert "deepseek_moe::segment_mlp_fused" in {e.name for e in prof.events()}


@pytest.mark.parametrize("tokens", [3, 80])  # fp32: a decode step, and more than decode_tokens (32; 64 on AVX2)
@pytest.mark.parametrize("variant", ["fused", "shared_gate", "lora_on_shared", "jitter"])
def test_shared_experts_join_the_op_only_when_that_is_the_same_function(variant, tokens):
    """The inference ops add the shared experts in their own pass when they are plain; with a sigmoid gate on them
    (Qwen2-MoE), LoRA wrappers on their projections, or router jitter (a training forward without autograd: the
    routed experts see the jittered tokens, the shared experts the tokens themselves) they leave them to the layer.
    Each equals the eager layer."""
    fields = dict(hidden_size=64, expert_hidden_size=24, num_routed_experts=8, num_shared_experts=2, top_k=2,
                  shared_expert_gate=variant == "shared_gate", initializer_range=0.1,
                  router_jitter_noise=0.1 if variant == "jitter" else 0.0)
    torch.manual_seed(0)
    oracle = dm.DeepSeekMoELayer(**fields, backend="eager").train(variant == "jitter")
    layer = dm.DeepSeekMoELayer(**fields, backend="ext").train(variant == "jitter")
    layer.load_state_dict(oracle.state_dict())
    if variant == "lora_on_shared":
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
        layer, oracle = peft.get_peft_model(layer, config), peft.get_peft_model(oracle, config)
        oracle.load_state_dict(layer.state_dict())
    x = torch.randn(tokens, 64)
    base = layer.get_base_model() if variant == "lora_on_shared" else layer
    with torch.inference_mode():
        torch.manual_seed(1)
        y = layer(x)
        torch.manual_seed(1)  # the same jitter draw
        y_ref = oracle(x)
        impl = base._implementation(x.device, x.dtype, tokens)
        fused = base._fused_shared(impl, x.dtype, None) is not None
    assert impl.strategy == ("decode" if tokens <= decode_tokens(x.dtype) else "blocks")
    assert fused == (variant == "fused")
    assert_close(y, y_ref, 1e-6, variant)


@pytest.mark.parametrize("op", ["expert_gemv", "expert_blocks"])
def test_ops_refuse_tokens_and_counts_outside_the_batch(op):
    """The ops index x and y by the plan's tokens: a direct call with a bad one raises instead of reading or writing
    outside them."""
    T, E, H, I = 20, 2, 16, 8
    x, gate_up, down = torch.randn(T, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    token, weight = torch.arange(T), torch.ones(T)
    fn = getattr(torch.ops.deepseek_moe, op)
    fn(x, gate_up, down, token, weight, torch.tensor([T, 0]), None)
    for bad in (T, -1, 10 ** 8):
        t = token.clone()
        t[3] = bad
        with pytest.raises(RuntimeError, match=r"token_N\[3\] = .* outside \[0, T = 20\)"):
            fn(x, gate_up, down, t, weight, torch.tensor([T, 0]), None)
    with pytest.raises(RuntimeError, match="counts_E must be >= 0"):
        fn(x, gate_up, down, token, weight, torch.tensor([T + 5, -5]), None)


@pytest.mark.parametrize("op", ["expert_gemv", "expert_blocks", "segment_mlp_fused"])
def test_ops_refuse_a_nan_limit(op):
    """A NaN SwiGLU limit would drop out of the clamps' min and max (no clamp at all) where torch.clamp gives NaN: a
    direct call with one raises (the layer's config refuses it before)."""
    T, E, H, I = 4, 2, 16, 8
    x, gate_up, down = torch.randn(T, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    args = (x, gate_up, down, torch.arange(T), torch.ones(T), torch.tensor([T, 0]))
    fn = getattr(torch.ops.deepseek_moe, op)
    fn(*args, 1.0)
    with pytest.raises(RuntimeError, match="SwiGLU limit must not be NaN"):
        fn(*args, float("nan"))


@pytest.mark.parametrize("strategy", ["decode", "blocks"])
def test_shared_weights_of_any_layout_and_odd_width(strategy):
    """Shared-expert weights loaded as transposed views (``load_state_dict(assign=True)``) and, in bf16, an odd
    shared width (the blocks op pairs rows: the layer then adds the shared experts itself) run as eager does."""
    dtype = torch.bfloat16 if strategy == "blocks" else torch.float32
    if strategy == "blocks":
        needs_blocks(dtype)
    fields = dict(hidden_size=64, expert_hidden_size=32, num_routed_experts=8, num_shared_experts=1,
                  shared_expert_hidden_size=33, top_k=2, initializer_range=0.1)
    torch.manual_seed(0)
    oracle = dm.DeepSeekMoELayer(**fields, backend="eager").to(dtype).eval()
    layer = dm.DeepSeekMoELayer(**fields, backend="ext").to(dtype).eval()
    state = {k: (v.mT.contiguous().mT if k.startswith("shared_experts") else v) for k, v in oracle.state_dict().items()}
    layer.load_state_dict(state, assign=True)
    assert not layer.shared_experts.gate_proj.weight.is_contiguous()
    T = 8 if strategy == "decode" else 80  # above decode_tokens (12 in bf16; 64 on AVX2)
    x = torch.randn(T, 64).to(dtype)
    with torch.inference_mode():
        y, y_ref = layer(x), oracle(x)
        impl = layer._implementation(x.device, dtype, T)
        fused = layer._fused_shared(impl, dtype, None) is not None
    assert impl.strategy == strategy and fused == (strategy == "decode")
    assert_close(y, y_ref, 1e-6 if dtype == torch.float32 else 1e-2, strategy)


@pytest.mark.parametrize("strategy", ["decode", "blocks"])
def test_a_negative_limit_clamps_as_torch_clamp(strategy):
    """MoEConfig refuses swiglu_limit <= 0; the ops called directly still clamp in torch.clamp's order."""
    g = torch.Generator().manual_seed(0)
    T = 4 if strategy == "decode" else 40
    x, gate_up = torch.randn(T, 32, generator=g), torch.randn(3, 32, 32, generator=g)
    down = torch.randn(3, 32, 16, generator=g)
    topk = make_topk(T, 3, 2, "random", generator=g)
    w = torch.rand(T, 2, generator=g)
    plan = build_plan(topk, w, 3, None, w)
    with torch.inference_mode():
        y = ExtBackend(strategy, "silu@-1.0").run(x, plan, gate_up, down)
    truth, scale = by_formula(x, gate_up, down, topk, w, plan.keep_TK, -1.0)
    assert bool(((y.double() - truth).abs() <= 2e-5 * scale + 1e-30).all())


@pytest.mark.parametrize("op", ["expert_gemv", "expert_blocks"])
def test_ops_say_they_have_no_backward(op):
    """Called directly on tensors that need gradients, the inference ops raise at backward instead of leaving
    gradients silently unset."""
    x = torch.randn(20, 16, requires_grad=True)
    gate_up, down = torch.randn(2, 16, 16), torch.randn(2, 16, 8)
    y = getattr(torch.ops.deepseek_moe, op)(x, gate_up, down, torch.arange(20), torch.ones(20), torch.tensor([20, 0]),
                                            None)
    with pytest.raises(RuntimeError, match="inference only"):
        y.sum().backward()
