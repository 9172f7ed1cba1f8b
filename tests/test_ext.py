"""The compiled extension (csrc/): its routing sort and combine equal the torch ops, their gradients equal
autograd's, and the layer with backend="ext" equals the eager reference. CI builds the CPU extension just in
time."""
import os
import shutil
import subprocess

import pytest
import torch
from hypothesis import given, strategies as st

import deepseek_moe as dm
from deepseek_moe import ext
from deepseek_moe.backends.ext import blocks_supported
from deepseek_moe.backends import EagerBackend, ExtBackend, TorchBackend, select
from deepseek_moe.backends import ext as ext_backend
from deepseek_moe.dispatch import build_plan, combine_rows, expert_capacity
from deepseek_moe.testing import assert_close, make_topk, require_extension

from test_backends import TOL, _problem, _run


@pytest.fixture(scope="module", autouse=True)
def built():
    require_extension()


def _plan_fields(plan):
    return {k: getattr(plan, k) for k in ("pair_N", "token_N", "slot_TK", "counts_E", "offsets_E1",
                                          "routed_counts_E", "keep_TK", "num_dropped")}


@given(T=st.integers(0, 70), E=st.integers(1, 20), K=st.integers(1, 16), empty=st.integers(0, 5),
       kind=st.sampled_from(["balanced", "random", "skewed"]), seed=st.integers(0, 2**16))
def test_route_plan_equals_build_plan(T, E, K, empty, kind, seed):
    K = min(K, E - min(empty, E - 1))
    empty = min(empty, E - K)
    g = torch.Generator().manual_seed(seed)
    topk = make_topk(T, E, K, kind, generator=g, empty_experts=empty)
    weight = torch.rand(T, K, generator=g)
    ours, ref = ext_backend.route_plan(topk, weight, E), build_plan(topk, weight, E)
    for name, value in _plan_fields(ref).items():
        assert torch.equal(_plan_fields(ours)[name], value), name


@given(T=st.integers(0, 40), E=st.integers(1, 12), K=st.integers(1, 12), H=st.integers(1, 40),
       capacity=st.sampled_from([None, 0.5, 1.0]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_combine_equals_torch_combine(T, E, K, H, capacity, seed, dtype):
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    topk = make_topk(T, E, K, "skewed", generator=g)
    weight = torch.rand(T, K, generator=g)
    cap = None if capacity is None or T == 0 else expert_capacity(T, K, E, capacity)
    plan = build_plan(topk, weight, E, cap, weight)
    o = torch.randn(plan.pair_N.numel(), H, generator=g).to(dtype)
    assert torch.equal(ext_backend.combine(o, plan), combine_rows(o, plan))
    # Weighted: the same fp32 sum in slot order, dropped pairs (slot == N) adding nothing.
    o_pad = torch.cat([o, o.new_zeros(1, H)]).to(torch.promote_types(dtype, torch.float32))
    w = plan.weight_TK.to(o_pad.dtype)
    expected = torch.zeros(T, H, dtype=o_pad.dtype)
    for k in range(K):
        expected = expected + w[:, k:k + 1] * o_pad[plan.slot_TK[:, k]]
    assert torch.equal(ext_backend.combine(o, plan, weighted=True), expected.to(dtype))
    assert_close(combine_rows(o, plan, weighted=True), expected.to(dtype), TOL[dtype], "torch weighted combine")


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_gradients_equal_autograd_of_torch_ops(capacity):
    T, E, K, H = 37, 8, 3, 24
    topk = make_topk(T, E, K, "skewed", empty_experts=2)
    weight = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    cap = None if capacity is None else expert_capacity(T, K, E, capacity)
    plan = build_plan(topk, weight, E, cap, weight.detach())
    o = torch.randn(plan.pair_N.numel(), H, dtype=torch.float64, requires_grad=True)
    g_o = torch.randn(T, H, dtype=torch.float64)
    a, b = ext_backend.combine(o, plan), combine_rows(o, plan)
    assert torch.equal(torch.autograd.grad(a, o, g_o)[0], torch.autograd.grad(b, o, g_o)[0])
    # Weighted combine: gradients of o and of the gate weights, against autograd of the explicit sum, and the
    # torch combine's.
    assert torch.autograd.gradcheck(lambda o, w: torch.ops.deepseek_moe.combine(o, plan.slot_TK, w), (o, weight))
    a, b = ext_backend.combine(o, plan, weighted=True), combine_rows(o, plan, weighted=True)
    for ga, gb in zip(torch.autograd.grad(a, (o, weight), g_o), torch.autograd.grad(b, (o, weight), g_o)):
        assert_close(ga, gb, 1e-12, "weighted combine gradient")


def _run_own_plan(backend, topk, weight, capacity, x, gate_up, down, grad_y):
    plan = backend.plan(topk, weight, gate_up.shape[0], capacity, weight.detach())
    y = backend.run(x, plan, gate_up, down)
    grads = torch.autograd.grad(y, (x, gate_up, down, weight), grad_y, allow_unused=True)
    return (y,) + tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, gate_up, down, weight)))


CASES = [
    (64, 8, 2, "balanced", 0, None),
    (97, 16, 4, "skewed", 5, None),
    (33, 64, 6, "random", 0, None),
    (50, 8, 2, "skewed", 2, 0.5),
    (1, 4, 4, "random", 0, None),
]


@pytest.mark.parametrize("strategy", ["segments", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,kind,empty,cap", CASES)
def test_ext_backend_matches_eager(strategy, dtype, T, E, K, kind, empty, cap):
    problem = _problem(T, E, K, 24, 16, dtype, kind, empty, cap)
    out = _run_own_plan(ExtBackend(strategy), *problem)
    ref = _run(EagerBackend(), *problem)
    for name, a, b in zip(("y", "grad_x", "grad_gate_up", "grad_down", "grad_weight"), out, ref):
        assert_close(a, b, TOL[dtype], f"ext/{strategy}/{dtype}/{name}")


@pytest.mark.parametrize("T,E,K,kind,empty,cap", CASES)
def test_ext_grouped_mm_equals_torch_grouped_mm(T, E, K, kind, empty, cap):
    """The grouped_mm strategy is the torch backend's pipeline with the counting-sort plan and the extension's
    weighted combine: the same GEMMs, a combine that may round differently."""
    problem = _problem(T, E, K, 24, 16, torch.float32, kind, empty, cap)
    ours, ref = _run_own_plan(ExtBackend("grouped_mm"), *problem), _run_own_plan(TorchBackend("grouped_mm"), *problem)
    for name, a, b in zip(("y", "grad_x", "grad_gate_up", "grad_down", "grad_weight"), ours, ref):
        assert_close(a, b, 1e-6, name)


def test_ext_backend_on_cuda_explains_what_it_needs():
    reason = ExtBackend().unavailable_reason(torch.device("cuda"), torch.bfloat16)
    if ext_backend.has_cuda_kernels():
        pytest.skip("this build has CUDA kernels (covered by the GPU test)")
    assert "no CUDA kernels" in reason and "TORCH_CUDA_ARCH_LIST" in reason
    assert ExtBackend.for_device(torch.device("cuda"), torch.bfloat16).strategy == "grouped_mm"
    assert ExtBackend.for_device(torch.device("cpu"), torch.bfloat16).strategy == "segments"


@pytest.mark.gpu
def test_ext_backend_on_cuda_matches_torch_backend():
    """Needs the CUDA build of the extension (ahead of time, with TORCH_CUDA_ARCH_LIST) and a Hopper-class GPU."""
    if not ext_backend.has_cuda_kernels():
        pytest.skip("the loaded extension has no CUDA kernels: build it with DEEPSEEK_MOE_BUILD_EXT=1")
    device = torch.device("cuda")
    backend = ExtBackend.for_device(device, torch.bfloat16)
    if backend.unavailable_reason(device, torch.bfloat16):
        pytest.skip(backend.unavailable_reason(device, torch.bfloat16))
    for T, E, K, kind, empty, cap in CASES:
        problem = [t if not isinstance(t, torch.Tensor) else
                   t.detach().to(device).requires_grad_(t.requires_grad) if t.is_floating_point() else t.to(device)
                   for t in _problem(T, E, K, 64, 32, torch.bfloat16, kind, empty, cap)]
        ours, ref = _run_own_plan(backend, *problem), _run_own_plan(TorchBackend("grouped_mm"), *problem)
        for name, a, b in zip(("y", "grad_x", "grad_gate_up", "grad_down", "grad_weight"), ours, ref):
            assert_close(a, b, 1e-2, f"{(T, E, K, kind, empty, cap)} {name}")
        plan = ExtBackend().plan(problem[0], problem[1], E)
        ref_plan = build_plan(problem[0], problem[1], E)
        for name, value in _plan_fields(ref_plan).items():
            assert torch.equal(_plan_fields(plan)[name], value), name


def test_ext_backend_gradcheck_float64():
    topk, weight, cap, x, gate_up, down, _ = _problem(9, 4, 2, 5, 3, torch.float64, "random", empty_experts=1)
    weight = weight.detach().double().requires_grad_()

    def f(x, gate_up, down, weight):
        backend = ExtBackend()
        return backend.run(x, backend.plan(topk, weight, 4), gate_up, down)

    assert torch.autograd.gradcheck(f, (x, gate_up, down, weight))


def test_layer_ext_matches_eager_and_compiles():
    cfg = dm.MoEConfig(hidden_size=32, expert_hidden_size=16, num_routed_experts=16, num_shared_experts=1,
                       top_k=3, num_groups=4, topk_groups=2, score_func="sigmoid", aux_loss_alpha=0.01)
    fast, ref = dm.DeepSeekMoELayer(cfg.replace(backend="ext")), dm.DeepSeekMoELayer(cfg.replace(backend="eager"))
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 21, 32)
    torch._dynamo.reset()
    results = []
    for layer in (fast, torch.compile(fast, backend="aot_eager"), ref):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y.square().sum() + fast.aux_loss if layer is not ref else y.square().sum() + ref.aux_loss).backward()
        results.append((y, xi.grad, {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in layer.named_parameters()}))
        for p in fast.parameters():
            p.grad = None
    for y, gx, gp in results[:2]:
        assert_close(y, results[2][0], 1e-5, "y")
        assert_close(gx, results[2][1], 1e-5, "grad x")
        for name, g in gp.items():
            assert_close(g, results[2][2][name], 1e-5, f"grad {name}")


def test_compiled_segment_loop_matches_python_loop():
    problem = _problem(77, 16, 3, 24, 16, torch.float32, "skewed", empty_experts=4)
    python, compiled = _run(TorchBackend("segments"), *problem), _run(ExtBackend(), *problem)
    for name, a, b in zip(("y", "grad_x", "grad_gate_up", "grad_down", "grad_weight"), compiled, python):
        assert_close(a, b, 1e-6, f"compiled vs python loop/{name}")


def test_errors_are_clear(monkeypatch):
    with pytest.raises(RuntimeError, match=r"expert ids must lie in \[0, 4\)"):
        torch.ops.deepseek_moe.route_plan(torch.tensor([[0, 4]]), 4)
    with pytest.raises(RuntimeError, match=r"slots must lie in \[0, 2\]"):
        torch.ops.deepseek_moe.combine(torch.zeros(2, 3), torch.tensor([[0], [3]]), None)
    assert select("ext").name == "ext"
    monkeypatch.setattr(ext, "_loaded", False)
    monkeypatch.setattr(ext, "_prebuilt", lambda: None)
    monkeypatch.setattr(ext, "sources", lambda cuda=False: [])
    with pytest.raises(ext.ExtensionUnavailable, match="DEEPSEEK_MOE_BUILD_EXT=1"):
        ext.load()
    assert "DEEPSEEK_MOE_BUILD_EXT=1" in ExtBackend().unavailable_reason(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(ext, "_error", None)
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(ext, "sources", lambda cuda=False: ["csrc/ops.cpp"])
    with pytest.raises(ext.ExtensionUnavailable, match="no C\\+\\+ compiler"):
        ext.load()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile_with_nvcc(tmp_path, arch):
    """The CUDA kernels compile wherever nvcc exists (they use no PyTorch headers; the binding file needs a CUDA
    build of torch and is compiled only by the CUDA build of the extension)."""
    root = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda")
    for name in sorted(f for f in os.listdir(root) if f.endswith(".cu")):
        done = subprocess.run(["nvcc", "-std=c++17", "-O3", f"-arch={arch}", "-c", os.path.join(root, name),
                               "-o", str(tmp_path / (name + ".o"))], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]


def test_auto_uses_the_extension_for_fp32_on_cpu_only_when_built_ahead_of_time(monkeypatch):
    """auto depends on the installation, never on what this process happened to load."""
    monkeypatch.delenv("DEEPSEEK_MOE_BACKEND", raising=False)
    ext.load()
    monkeypatch.setattr(ext, "_prebuilt", lambda: None)
    assert select("auto", torch.device("cpu"), torch.float32).name == "torch"  # loaded just in time: not chosen
    monkeypatch.setattr(ext, "_prebuilt", lambda: "deepseek_moe/_C.so")
    assert select("auto", torch.device("cpu"), torch.float32).name == "ext"
    assert select("auto", torch.device("cpu"), torch.bfloat16).name == "torch"  # training: measured for fp32 only
    # inference: the weight-streaming op for decode steps (<= 16 tokens), the blocks op for more, fp32 and bf16
    # (docs/benchmarks.md); bf16 blocks only for even sizes (VNNI pairs)
    for dtype in (torch.float32, torch.bfloat16):
        impl = select("auto", torch.device("cpu"), dtype, inference=True, decode=True)
        assert (impl.name, impl.strategy) == ("ext", "decode")
        if blocks_supported(dtype):
            impl = select("auto", torch.device("cpu"), dtype, inference=True, sizes=(64, 32))
            assert (impl.name, impl.strategy) == ("ext", "blocks")
    assert select("auto", torch.device("cpu"), torch.bfloat16, inference=True, sizes=(64, 33)).name == "torch"
    # The deterministic mode: inference through the batch-invariant decode op at every token count and size;
    # training through torch's tiles (ext's segment loop is not batch-invariant)
    for dtype, sizes in ((torch.float32, (64, 32)), (torch.bfloat16, (64, 33))):
        impl = select("auto", torch.device("cpu"), dtype, inference=True, sizes=sizes, batch_invariant=True)
        assert (impl.name, impl.strategy, impl.batch_invariant) == ("ext", "decode", True)
    impl = select("auto", torch.device("cpu"), torch.float32, batch_invariant=True)
    assert (impl.name, impl.batch_invariant) == ("torch", True)


def test_ext_layer_compiles_fullgraph():
    layer = dm.DeepSeekMoELayer(hidden_size=32, expert_hidden_size=16, num_routed_experts=8, top_k=2,
                                backend="ext").eval()
    assert layer.backend_name == "ext"
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(torch.compile(layer, fullgraph=True)(x), layer(x), atol=1e-6)


def test_first_forward_compiled_loads_the_extension(monkeypatch):
    """A layer whose first forward is compiled selects its backend at trace time: selecting "ext" there must load
    the extension, not report it missing."""
    loads = []
    monkeypatch.setattr(ext, "_loaded", False)
    monkeypatch.setattr(ext, "load", lambda verbose=False: (loads.append(1), monkeypatch.setattr(ext, "_loaded", True)))
    layer = dm.DeepSeekMoELayer(hidden_size=32, expert_hidden_size=16, num_routed_experts=8, top_k=2,
                                backend="ext").eval()
    x = torch.randn(5, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True)(x)
    assert loads
    with torch.no_grad():
        assert torch.allclose(got, layer(x), atol=1e-6)


def test_backend_named_by_the_environment_is_loaded(monkeypatch):
    prepared = []
    monkeypatch.setattr(ExtBackend, "prepare", lambda: prepared.append(1))
    monkeypatch.setenv("DEEPSEEK_MOE_BACKEND", "ext")
    assert select("auto", torch.device("cpu"), torch.float32).name == "ext"
    assert prepared
