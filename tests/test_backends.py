"""Every fast path against the eager reference: outputs and all gradients, ragged loads and empty experts."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import deepseek_moe as dm
from deepseek_moe.backends import EagerBackend, TorchBackend, backend_status, select
from deepseek_moe.backends.grouped import _grouped_mm
from deepseek_moe.dispatch import build_plan, expert_capacity
from deepseek_moe.testing import assert_close, make_topk

STRATEGIES = ["segments"] + (["grouped_mm"] if _grouped_mm is not None else [])


def torch_backend(strategy: str, activation: str = "silu") -> TorchBackend:
    return TorchBackend(strategy, activation=activation)
NAMES = ("y", "grad_x", "grad_gate_up", "grad_down", "grad_weight")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _problem(T, E, K, H, I, dtype, kind, empty_experts=0, capacity_factor=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    topk = make_topk(T, E, K, kind, generator=g, empty_experts=empty_experts)
    weight = torch.rand(T, K, generator=g).requires_grad_()
    cap = None if capacity_factor is None else expert_capacity(T, K, E, capacity_factor)
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype).requires_grad_()
    down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype).requires_grad_()
    grad_y = torch.randn(T, H, generator=g).to(dtype)
    return topk, weight, cap, x, gate_up, down, grad_y


def _run(backend, topk, weight, cap, x, gate_up, down, grad_y):
    plan = build_plan(topk, weight, gate_up.shape[0], cap, weight.detach())
    y = backend.run(x, plan, gate_up, down)
    grads = torch.autograd.grad(y, (x, gate_up, down, weight), grad_y)
    return (y,) + grads


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,kind,empty,cap", [
    (64, 8, 2, "balanced", 0, None),
    (97, 16, 4, "skewed", 5, None),      # ragged segments, 5 experts with zero tokens
    (33, 64, 6, "random", 0, None),      # more experts than tokens per expert: many empty
    (50, 8, 2, "skewed", 2, 0.5),        # capacity drops
    (1, 4, 4, "random", 0, None),
])
def test_torch_matches_eager(strategy, dtype, T, E, K, kind, empty, cap):
    if strategy != "segments" and dtype == torch.float32 and not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no public fp32 grouped_mm")
    problem = _problem(T, E, K, 24, 16, dtype, kind, empty, cap)
    ref = _run(EagerBackend(), *problem)
    out = _run(torch_backend(strategy), *problem)
    for name, a, b in zip(("y", "grad_x", "grad_gate_up", "grad_down", "grad_weight"), out, ref):
        assert a.dtype == b.dtype, name
        assert_close(a, b, TOL[dtype], f"{strategy}/{dtype}/{name}")
    inference = TorchBackend(strategy, inference=True)  # selected for forwards without autograd
    assert_close(_run_no_grad(inference, *problem), ref[0], TOL[dtype], f"{strategy}/{dtype}/no grad")


def _run_no_grad(backend, topk, weight, cap, x, gate_up, down, grad_y):
    with torch.no_grad():
        return backend.run(x, build_plan(topk, weight, gate_up.shape[0], cap, weight), gate_up, down)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("multiple", [1, 8, 32])
def test_padded_segments_match_eager(dtype, multiple):
    problem = _problem(77, 16, 3, 24, 16, dtype, "skewed", empty_experts=4, capacity_factor=0.8)
    ref = _run(EagerBackend(), *problem)
    out = _run(TorchBackend("segments", pad_multiple=multiple), *problem)
    for name, a, b in zip(("y", "grad_x", "grad_gate_up", "grad_down", "grad_weight"), out, ref):
        assert_close(a, b, TOL[dtype], f"pad {multiple}/{dtype}/{name}")


def test_align_segments_layout():
    from deepseek_moe.backends.grouped import align_segments
    token = torch.tensor([5, 6, 7, 8, 9])
    weight = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9])
    tok_M, w_M, counts = align_segments(token, weight, torch.tensor([3, 0, 2]), 4)
    assert counts.tolist() == [4, 0, 4]
    assert tok_M.tolist() == [5, 6, 7, 0, 8, 9, 0, 0]
    assert w_M.tolist() == pytest.approx([0.5, 0.6, 0.7, 0.0, 0.8, 0.9, 0.0, 0.0])
    assert TorchBackend.for_device(torch.device("cpu"), torch.bfloat16).pad_multiple == 32
    assert TorchBackend.for_device(torch.device("cpu"), torch.float32).pad_multiple == 1
    with pytest.raises(ValueError, match="pad_multiple"):
        TorchBackend(pad_multiple=0)


def test_segment_blocks_layout():
    from deepseek_moe.backends import grouped
    # Consecutive non-empty experts share a block up to BLOCK_ROWS rows; a larger expert is a block of its own.
    assert grouped._blocks([0, 3, 0, 2, 300, 1, 1]) == [
        (0, 5, [(1, 0, 3), (3, 3, 2)]), (5, 305, [(4, 0, 300)]), (305, 307, [(5, 0, 1), (6, 1, 1)])]
    assert grouped._blocks([0, 0]) == []


@pytest.mark.parametrize("block_rows", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_blocks_of_any_size_match_eager(monkeypatch, block_rows, dtype):
    """Blocks that split between experts at every size, with ragged and empty experts, padding and capacity: the
    output and every gradient equal the reference's, with and without a backward."""
    from deepseek_moe.backends import grouped
    monkeypatch.setattr(grouped, "BLOCK_ROWS", block_rows)
    problem = _problem(61, 16, 3, 24, 16, dtype, "skewed", empty_experts=4, capacity_factor=0.9)
    ref = _run(EagerBackend(), *problem)
    for backend in (TorchBackend("segments"), TorchBackend.for_device(torch.device("cpu"), dtype)):
        for name, a, b in zip(NAMES, _run(backend, *problem), ref):
            assert_close(a, b, TOL[dtype], f"blocks of {block_rows}/{dtype}/{name}")
    assert_close(_run_no_grad(TorchBackend("segments", inference=True), *problem), ref[0], TOL[dtype], "no grad")


def test_empty_expert_gets_exactly_zero_gradient():
    problem = _problem(40, 8, 2, 16, 8, torch.float32, "skewed", empty_experts=3)
    _, g_gu, g_dn, _ = _run(TorchBackend("segments"), *problem)[1:]
    assert bool((g_gu[-3:] == 0).all()) and bool((g_dn[-3:] == 0).all())
    assert bool((g_gu[:5].abs().sum((1, 2)) > 0).all())


def test_segments_gradcheck_float64():
    problem = _problem(7, 4, 2, 5, 3, torch.float64, "random", empty_experts=1)
    topk, weight, cap, x, gate_up, down, _ = problem
    weight = weight.detach().double().requires_grad_()

    def f(x, gate_up, down, weight):
        plan = build_plan(topk, weight, 4)
        return TorchBackend("segments").run(x, plan, gate_up, down)

    assert torch.autograd.gradcheck(f, (x, gate_up, down, weight))


def test_layer_torch_matches_eager_all_parameters():
    cfg = dm.MoEConfig(hidden_size=32, expert_hidden_size=16, num_routed_experts=16, num_shared_experts=1,
                       top_k=3, num_groups=4, topk_groups=2, score_func="sigmoid", norm_topk_prob=True,
                       routed_scaling_factor=2.5, z_loss_coef=1e-3, shared_expert_gate=True)
    fast, ref = dm.DeepSeekMoELayer(cfg.replace(backend="torch")), dm.DeepSeekMoELayer(cfg.replace(backend="eager"))
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 21, 32)
    outs = []
    for layer in (fast, ref):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y.square().sum() + layer.aux_loss).backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    assert_close(outs[0][0], outs[1][0], 1e-5, "y")
    assert_close(outs[0][1], outs[1][1], 1e-5, "grad_x")
    for name, g in outs[0][2].items():
        assert g is not None, name
        assert_close(g, outs[1][2][name], 1e-5, f"grad {name}")


def test_one_expert_top1_equals_dense_swiglu():
    layer = dm.DeepSeekMoELayer(hidden_size=16, expert_hidden_size=24, num_routed_experts=1, num_shared_experts=0,
                                top_k=1)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    gu, dn = layer.experts.gate_up_proj[0], layer.experts.down_proj[0]
    g, u = F.linear(x, gu).chunk(2, dim=-1)
    ref = F.linear(F.silu(g) * u, dn)
    assert_close(y, ref, 1e-6, "y")
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(ref.sum(), x)
    assert_close(gx, gx_ref, 1e-6, "grad_x")


def test_registry_reasons_and_env(monkeypatch):
    status = backend_status()
    assert status["eager"] is None and status["torch"] is None
    assert "pins torch>=2.7.0,<2.7.1" in status["megablocks"]
    with pytest.raises(dm.BackendUnavailable, match="megablocks"):
        select("megablocks")
    with pytest.raises(ValueError, match="backend='nope'"):
        select("nope")
    monkeypatch.setenv("DEEPSEEK_MOE_BACKEND", "eager")
    assert select("auto").name == "eager"
    assert select("torch").name == "torch"  # an explicit choice wins over the env var
    monkeypatch.setenv("DEEPSEEK_MOE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="DEEPSEEK_MOE_BACKEND"):
        select("auto")


def test_torch_strategy_resolved_at_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert select("torch", cpu, torch.float32).strategy == "segments"
    assert not select("torch", cpu, torch.float32).inference
    assert select("torch", cpu, torch.float32, inference=True).inference  # chosen for forwards without autograd
    if _grouped_mm is not None:
        monkeypatch.setenv("DEEPSEEK_MOE_TORCH_STRATEGY", "grouped_mm")
        chosen = select("torch", cpu, torch.float32)
        assert chosen.strategy == "grouped_mm"
        with pytest.raises(dm.BackendUnavailable, match="multiple of 4"):  # grouped_mm's 16-byte rows
            select("torch", cpu, torch.float32, sizes=(30, 16))
        # Read at selection only: a backend already selected keeps its strategy.
        monkeypatch.setenv("DEEPSEEK_MOE_TORCH_STRATEGY", "segments")
        assert chosen.strategy == "grouped_mm"
    monkeypatch.setenv("DEEPSEEK_MOE_TORCH_STRATEGY", "fast")
    with pytest.raises(ValueError, match="DEEPSEEK_MOE_TORCH_STRATEGY"):
        select("torch", cpu, torch.float32)
    with pytest.raises(ValueError, match="strategy"):
        TorchBackend("fast")


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_layer_gradcheck_float64(backend):
    cfg = dm.MoEConfig(hidden_size=6, expert_hidden_size=3, num_routed_experts=4, num_shared_experts=1, top_k=2,
                       backend=backend, z_loss_coef=0.1)
    layer = dm.DeepSeekMoELayer(cfg).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    # Routing is piecewise constant in x; with random inputs no top-k choice sits within eps of a tie.
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    assert torch.autograd.gradcheck(lambda t: (layer(t), layer.aux_loss)[1], (x,))


def _reads_of_package(monkeypatch):
    """A list that records every environment read (os.environ / os.getenv) and filesystem access (open, stat,
    listdir, glob) made directly by deepseek_moe's own code from now on."""
    import builtins
    import glob
    import os
    import sys

    reads = []
    package = os.path.dirname(dm.__file__)

    def ours() -> bool:
        return sys._getframe(2).f_code.co_filename.startswith(package)

    class Recording(dict):
        def get(self, key, default=None):
            if ours():
                reads.append(("environ", key))
            return super().get(key, default)

        def __getitem__(self, key):
            if ours():
                reads.append(("environ", key))
            return super().__getitem__(key)

    monkeypatch.setattr(os, "environ", Recording(os.environ))

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                reads.append((name, args[:1]))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for module, name in ((builtins, "open"), (os, "stat"), (os, "listdir"), (os, "scandir"), (os, "getenv"),
                         (os.path, "exists"), (os.path, "isdir"), (os.path, "isfile"), (os.path, "getmtime"),
                         (glob, "glob")):
        spy(module, name)
    return reads


@pytest.mark.parametrize("backend", ["eager", "torch", "ext", "triton", "auto"])
def test_layer_reads_no_environment_or_filesystem_per_forward(monkeypatch, backend):
    """The implementation is resolved once per (device, dtype, grad mode): after the first forward+backward (and the
    first inference forward), forwards and backwards read neither os.environ nor the filesystem, on every backend
    (triton in its interpreter on CPU)."""
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if backend == "ext":
        from deepseek_moe.testing import require_extension
        require_extension()
    cfg = dm.MoEConfig(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2, num_shared_experts=1,
                       aux_loss_alpha=0.01, backend=backend)
    layer = dm.DeepSeekMoELayer(cfg)
    x = torch.randn(12, 16, requires_grad=True)
    layer(x).sum().backward()
    with torch.no_grad():
        layer(x)
    reads = _reads_of_package(monkeypatch)
    for _ in range(2):
        (layer(x).sum() + layer.aux_loss).backward()
        with torch.no_grad():
            layer(x)
    assert reads == []
    assert backend == "auto" or layer.backend_name == backend  # the resolved backend is visible


def _glu_reference(topk, weight, cap, x, gate_up, down, activation):
    """Σ_k w · down(act(gate x) · up x) over the kept pairs, in float64 through autograd (independent of backends)."""
    plan = build_plan(topk, weight, gate_up.shape[0], cap, weight.detach())
    xd, gud, dnd, wd = (t.detach().double().requires_grad_() for t in (x, gate_up, down, weight))
    I = down.shape[-1]
    acts = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda g: F.gelu(g, approximate="tanh"),
            "relu": F.relu}
    name, _, limit = activation.partition("@")  # "silu@L": DeepSeek-V4's clamped GLU
    L = float(limit) if limit else float("inf")
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t, k in plan.keep_TK.nonzero().tolist():
        e = int(topk[t, k])
        h = gud[e] @ xd[t]
        a = acts[name](h[:I].clamp(max=L)) * h[I:].clamp(-L, L)
        y = y.index_add(0, torch.tensor([t]), (wd[t, k] * (dnd[e] @ a))[None])
    return y, (xd, gud, dnd, wd)


@pytest.mark.parametrize("activation", dm.config.ACTIVATIONS + ("silu@0.65", "gelu@0.65"))  # clamps half the units
@pytest.mark.parametrize("backend", ["eager"] + [f"torch:{s}" for s in STRATEGIES])
def test_glu_activations_match_float64(activation, backend):
    problem = _problem(45, 8, 2, 16, 8, torch.float32, "skewed", empty_experts=3)
    topk, weight, cap, x, gate_up, down, grad_y = problem
    if backend not in ("eager", "torch:segments") and not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no public fp32 grouped_mm")
    impl = EagerBackend(activation) if backend == "eager" else torch_backend(backend.split(":", 1)[1], activation)
    plan = build_plan(topk, weight, gate_up.shape[0], cap, weight.detach())
    y = impl.run(x, plan, gate_up, down)
    grads = torch.autograd.grad(y, (x, gate_up, down, weight), grad_y)
    ref, leaves = _glu_reference(*problem[:6], activation)
    ref_grads = torch.autograd.grad(ref, leaves, grad_y.double())
    for name, a, b in zip(("y", "grad_x", "grad_gate_up", "grad_down", "grad_weight"), (y,) + grads,
                          (ref,) + ref_grads):
        assert_close(a.double(), b, 1e-5, f"{backend}/{activation}/{name}")


@pytest.mark.parametrize("activation", dm.config.ACTIVATIONS)
def test_shared_experts_glu_and_layer_with_each_activation(activation):
    from deepseek_moe.glu import glu, glu_backward
    from deepseek_moe.experts import SharedExperts
    acts = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda g: F.gelu(g, approximate="tanh"),
            "relu": F.relu}
    h = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    ref = acts[activation](h[:, :5]) * h[:, 5:] * w[:, None]
    g = torch.randn(6, 5, dtype=torch.float64)
    assert_close(glu(h.detach(), activation, w.detach()), ref, 1e-12, "glu forward")
    grad_h, grad_w, a = glu_backward(h.detach(), w.detach(), g.clone(), activation)
    ref_h, ref_w = torch.autograd.grad(ref, (h, w), g)
    assert_close(grad_h, ref_h, 1e-12, "glu backward h")
    assert_close(grad_w, ref_w, 1e-12, "glu backward w")
    assert_close(a, ref.detach(), 1e-12, "glu backward's weighted activation")
    mlp = SharedExperts.dense(8, 12, activation).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = mlp.down_proj.weight @ (acts[activation](mlp.gate_proj.weight @ x.T) * (mlp.up_proj.weight @ x.T))
    assert_close(mlp(x), expected.T, 1e-12, "shared experts")
    cfg = dm.MoEConfig(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2, hidden_act=activation)
    layer = dm.DeepSeekMoELayer(cfg)
    eager = dm.DeepSeekMoELayer(cfg.replace(backend="eager"))
    eager.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 16)
    y, y_ref = layer(x), eager(x)
    assert_close(y, y_ref, 1e-5, f"layer {activation}")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, 1e-5, f"grad {name}")


def test_fused_backends_decline_other_activations():
    from deepseek_moe.backends import TritonBackend, ExtBackend
    for backend in (TritonBackend, ExtBackend):
        assert backend.activation_reason("silu") is None
        with pytest.raises(ValueError, match="hidden_act='gelu'"):
            backend(activation="gelu")
    status = backend_status(torch.device("cpu"), torch.float32, activation="relu")
    assert status["torch"] is None and status["eager"] is None
    assert "GLU only" in status["ext"] and "GLU only" in status["triton"]
    with pytest.raises(dm.BackendUnavailable, match="GLU only"):
        select("triton", torch.device("cpu"), torch.float32, activation="gelu")
    assert select("auto", torch.device("cpu"), torch.float32, activation="gelu").name == "torch"


def test_activation_is_checked_before_any_build_or_run(monkeypatch):
    from deepseek_moe.backends import ExtBackend
    def no_build():
        raise AssertionError("prepare() ran: a build would start before the activation check")
    monkeypatch.setattr(ExtBackend, "prepare", no_build)
    with pytest.raises(dm.BackendUnavailable, match="GLU only"):
        select("ext", torch.device("cpu"), torch.float32, activation="gelu")
    monkeypatch.setenv("DEEPSEEK_MOE_BACKEND", "ext")
    with pytest.raises(dm.BackendUnavailable, match="DEEPSEEK_MOE_BACKEND"):
        select("auto", torch.device("cpu"), torch.float32, activation="gelu")
    # An invalid name fails when the implementation is built, before any token reaches an expert.
    for backend in (TorchBackend, EagerBackend):
        with pytest.raises(ValueError, match="hidden_act='tanh' is invalid"):
            backend(activation="tanh")


def test_ext_status_is_true_for_each_kind_of_installation(monkeypatch):
    """backend_status() tells an editable checkout, a wheel and an ahead-of-time build apart, and advises only what
    works there (a wheel has no csrc/ for deepseek_moe.ext.load() to build)."""
    from deepseek_moe import ext

    cpu, fp32 = torch.device("cpu"), torch.float32
    monkeypatch.delenv("DEEPSEEK_MOE_BACKEND", raising=False)
    monkeypatch.setattr(ext, "_loaded", False)
    monkeypatch.setattr(ext, "_error", None)
    monkeypatch.setattr(ext, "_prebuilt", lambda: None)
    monkeypatch.setattr(ext, "sources", lambda cuda=False: [])  # a wheel
    wheel = backend_status(cpu, fp32)["ext"]
    assert "not in this installation" in wheel and "ext.load()" not in wheel
    monkeypatch.setattr(ext, "sources", lambda cuda=False: ["csrc/ops.cpp"])  # an editable checkout, not built
    monkeypatch.setattr(ext, "has_cached_build", lambda: False)
    assert "not built yet" in backend_status(cpu, fp32)["ext"]
    monkeypatch.setattr(ext, "has_cached_build", lambda: True)
    assert "loads it without compiling" in backend_status(cpu, fp32)["ext"]
    assert select("auto", cpu, fp32).name == "torch"  # auto never compiles

    # An ahead-of-time build: status and auto agree that ext runs (loading it compiles nothing).
    monkeypatch.setattr(ext, "_prebuilt", lambda: "deepseek_moe/_C.so")
    loads = []
    monkeypatch.setattr(ext, "load", lambda verbose=False: (loads.append(1), monkeypatch.setattr(ext, "_loaded", True)))
    import deepseek_moe.backends.ext as ext_backend
    monkeypatch.setattr(ext_backend, "_registered", True)
    assert backend_status(cpu, fp32)["ext"] is None and loads
    assert select("auto", cpu, fp32).name == "ext"


def test_just_in_time_build_rebuilds_when_a_header_changes(monkeypatch, tmp_path):
    """torch's builder compares the sources and the build arguments only: the headers' digest is a define among
    the arguments, so editing a header (an AMX micro-kernel lives in one) rebuilds."""
    from deepseek_moe import ext
    import torch.utils.cpp_extension as cpp

    header = tmp_path / "kernel.h"
    header.write_text("inline int f() { return 1; }\n")
    flags = []
    monkeypatch.setattr(ext, "headers", lambda: [str(header)])
    monkeypatch.setattr(ext, "sources", lambda cuda=False: ["csrc/ops.cpp"])
    monkeypatch.setattr(ext, "_missing_tool", lambda: None)
    monkeypatch.setattr(ext, "has_cached_build", lambda: True)
    monkeypatch.setattr(cpp, "load", lambda **kwargs: flags.append(kwargs["extra_cflags"]))
    ext._jit_build(verbose=False)
    ext._jit_build(verbose=False)
    header.write_text("inline int f() { return 2; }\n")
    ext._jit_build(verbose=False)
    defines = [[f for f in each if f.startswith("-DDEEPSEEK_MOE_HEADERS=")] for each in flags]
    assert all(len(d) == 1 for d in defines)
    assert defines[0] == defines[1] != defines[2]


def test_just_in_time_build_says_so_on_one_line(monkeypatch, capsys):
    from deepseek_moe import ext
    import torch.utils.cpp_extension as cpp

    built = []
    monkeypatch.setattr(ext, "sources", lambda cuda=False: ["csrc/ops.cpp"])
    monkeypatch.setattr(ext, "_missing_tool", lambda: None)
    monkeypatch.setattr(cpp, "load", lambda **kwargs: built.append(kwargs["name"]))
    monkeypatch.setattr(ext, "has_cached_build", lambda: False)
    ext._jit_build(verbose=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert built == ["deepseek_moe_ext"]
    assert len(err) == 1 and err[0].startswith("deepseek_moe: building the compiled extension just in time")
    monkeypatch.setattr(ext, "has_cached_build", lambda: True)  # a cached build only loads: nothing to say
    ext._jit_build(verbose=False)
    assert built == ["deepseek_moe_ext"] * 2 and capsys.readouterr().err == ""
