"""The triton backend against the eager reference (outputs and every gradient), its tile map, tile overrides,
and torch.compile. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), so the
sizes are small; tests marked ``gpu`` repeat the comparison at realistic sizes on CUDA."""
import importlib.util
import os

import pytest
import torch

import deepseek_moe as dm
from deepseek_moe.backends import EagerBackend, TorchBackend, TritonBackend, backend_status, select
from deepseek_moe.testing import assert_close, rel_rms

from test_backends import TOL, _problem, _run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
ON_GPU = torch.cuda.is_available()


@pytest.fixture
def kernels():
    from deepseek_moe.kernels import launch

    launch.POISON_OUTPUTS = True  # every output starts as NaN: an unwritten row fails the comparison
    yield launch
    launch.POISON_OUTPUTS = False


@pytest.fixture
def small_tiles():
    from deepseek_moe.kernels import TileConfig, force_tiles

    with force_tiles(TileConfig(16, 16, 16)):  # many tiles even at test sizes: tile edges inside segments
        yield


def _on(device, problem):
    return tuple(t.detach().to(device).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                 for t in problem)


NAMES = ("y", "grad_x", "grad_gate_up", "grad_down", "grad_weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,kind,empty,cap", [
    (37, 8, 2, "skewed", 3, None),       # ragged segments, 3 experts with zero tokens
    (1, 6, 3, "random", 0, None),        # a single token
    (29, 5, 1, "random", 0, None),       # K = 1
    (11, 4, 4, "random", 0, None),       # K = E: every token visits every expert
    (40, 8, 2, "skewed", 2, 0.5),        # capacity drops: dropped pairs must add exactly zero
])
def test_triton_matches_eager(kernels, small_tiles, dtype, T, E, K, kind, empty, cap):
    problem = _problem(T, E, K, 40, 24, dtype, kind, empty, cap)  # H=40, I=24: not multiples of the 16 tile
    ref = _run(EagerBackend(), *problem)
    out = _run(TritonBackend(), *problem)
    for name, a, b in zip(NAMES, out, ref):
        assert a.dtype == b.dtype, name
        assert_close(a, b, TOL[dtype], f"triton/{dtype}/{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_error_no_worse_than_eager(kernels, small_tiles, dtype):
    """Against fp32 arithmetic on the same 16-bit inputs, triton's rounding error stays at the eager reference's
    level (an fp32 -> bf16 conversion that truncates instead of rounding doubles it)."""
    problem = _problem(37, 8, 2, 40, 24, dtype, "skewed", 3)
    as_fp32 = tuple(t.detach().float().requires_grad_(t.requires_grad)
                    if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in problem)
    truth = _run(EagerBackend(), *as_fp32)
    for name, a, b, t in zip(NAMES, _run(TritonBackend(), *problem), _run(EagerBackend(), *problem), truth):
        assert a.dtype == dtype or name == "grad_weight"
        err, ref_err = rel_rms(a.float(), t), rel_rms(b.float(), t)
        assert err <= 1.5 * ref_err + 1e-4, f"{dtype}/{name}: triton error {err:.2e} vs eager {ref_err:.2e}"


def test_triton_default_tiles_match_eager(kernels):
    problem = _problem(70, 16, 4, 72, 40, torch.float32, "skewed", 4)
    for name, a, b in zip(NAMES, _run(TritonBackend(), *problem), _run(EagerBackend(), *problem)):
        assert_close(a, b, 1e-5, f"default tiles/{name}")


def test_expert_tiles_layout(kernels):
    offsets = torch.tensor([0, 5, 5, 21, 22])  # counts 5, 0, 16, 1
    tile_expert, tile_start = kernels.expert_tiles(offsets, 22, 8)
    # cdiv(22, 8) + 4 = 7 tiles: expert 0 one tile, expert 2 two, expert 3 one, then unused tiles
    assert tile_expert.tolist() == [0, 2, 2, 3, -1, -1, -1]
    assert tile_start[:4].tolist() == [0, 5, 13, 21]


def test_tile_overrides(monkeypatch):
    from deepseek_moe.kernels import TileConfig, force_tiles, gpu_tile_config, tile_config

    assert gpu_tile_config("gate_up", torch.bfloat16, 9) == TileConfig(128, 64, 64, 8, 4)
    assert gpu_tile_config("gate_up", torch.bfloat16, 8).block_r == 32  # Ampere: less shared memory
    cpu = torch.device("cpu")
    assert tile_config("gate_up", torch.float32, cpu) == TileConfig(32, 32, 32)
    with force_tiles(TileConfig(16, 64, 32)):
        assert tile_config("down", torch.bfloat16, cpu).block_c == 64
        forced = TritonBackend.for_device(cpu, torch.bfloat16)
    monkeypatch.setenv("DEEPSEEK_MOE_TRITON_TILES", "64,32,16,8,2")
    assert tile_config("wgrad", torch.float16, cpu) == TileConfig(64, 32, 16, 8, 2)
    # Resolved at selection: an implementation already selected keeps its tiles.
    assert forced.settings(cpu, torch.bfloat16)[1:4] == [16, 64, 32]
    assert TritonBackend.for_device(cpu, torch.float16).settings(cpu, torch.float16)[1:4] == [64, 32, 16]
    monkeypatch.setenv("DEEPSEEK_MOE_TRITON_TILES", "64,24,16")
    with pytest.raises(ValueError, match="DEEPSEEK_MOE_TRITON_TILES"):
        tile_config("wgrad", torch.float16, cpu)
    with pytest.raises(ValueError, match="kind"):
        tile_config("nope", torch.float16, cpu)


def test_availability_reasons(monkeypatch):
    assert "float64" in TritonBackend().unavailable_reason(torch.device("cpu"), torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backend_status(torch.device("cpu"))["triton"]
    with pytest.raises(dm.BackendUnavailable, match="TRITON_INTERPRET"):
        select("triton", torch.device("cpu"))
    assert select("auto", torch.device("cpu")).name != "triton"  # auto never picks the interpreter


def test_kernels_compile_for_gpu_targets():
    """Every kernel, with the tiles the heuristics pick on Ampere and Hopper, compiles to a CUDA binary (Triton and
    its bundled ptxas, no GPU needed): GPU-only compile errors show up in CPU CI. A subprocess, because Triton
    fixes interpreted-or-compiled at import and this process interprets."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "deepseek_moe.kernels.compile_check", "--capability", "80,90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 * 3 * 7, done.stdout  # 2 architectures x 3 dtypes x 7 kernel variants (CLAMP, GATHER)
    assert all("shared=" in line for line in lines)


def test_tuning_candidates_compile_for_hopper():
    """Every tile the autotune sweep tries on a GPU compiles for sm_90 in bf16 and fits its shared memory, so the
    device run spends no time on a candidate that cannot launch."""
    import subprocess
    import sys

    from deepseek_moe.kernels.tuning import candidates

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "deepseek_moe.kernels.compile_check", "--capability", "90",
                           "--dtype", "bfloat16", "--candidates"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = {tuple(line.split()[2:3] + line.split()[-5:-2]) for line in done.stdout.splitlines()}
    for kind, kernel in (("gate_up", "_gate_up_swiglu_kernel"), ("down_bwd", "_down_swiglu_bwd_kernel"),
                         ("wgrad", "_expert_weight_grad_kernel"), ("down", "_grouped_gemm_scatter_kernel"),
                         ("dgrad", "_grouped_gemm_scatter_kernel")):
        for t in candidates(kind, torch.bfloat16, 9, False):
            assert (kernel, f"{t.block_m}x{t.block_c}x{t.block_r}", f"warps={t.num_warps}",
                    f"stages={t.num_stages}") in compiled, (kind, t)


def _layer_pair(**fields):
    cfg = dm.MoEConfig(hidden_size=32, expert_hidden_size=16, num_routed_experts=8, num_shared_experts=1,
                       top_k=2, num_groups=4, topk_groups=2, score_func="sigmoid", **fields)
    fast, ref = dm.DeepSeekMoELayer(cfg.replace(backend="triton")), dm.DeepSeekMoELayer(cfg.replace(backend="eager"))
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _layer_grads(layer, x):
    xi = x.clone().requires_grad_()
    y = layer(xi)
    (y.square().sum() + layer.aux_loss).backward()
    return y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}


def test_layer_triton_matches_eager_all_parameters(kernels):
    fast, ref = _layer_pair(aux_loss_alpha=0.01)
    x = torch.randn(2, 9, 32)
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = _layer_grads(fast, x), _layer_grads(ref, x)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(gx, gx_ref, 1e-5, "grad x")
    for name, g in gp.items():
        assert_close(g, gp_ref[name], 1e-5, f"grad {name}")


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_layer_compiles_fullgraph_with_triton(kernels, capacity_factor):
    fast, ref = _layer_pair(capacity_factor=capacity_factor)
    x = torch.randn(2, 9, 32)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = _layer_grads(compiled, x), _layer_grads(ref, x)
    assert_close(y, y_ref, 1e-5, "compiled y")
    assert_close(gx, gx_ref, 1e-5, "compiled grad x")
    for name, g in gp.items():
        assert_close(g, gp_ref[name.replace("_orig_mod.", "")], 1e-5, f"compiled grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 333, 4096])
def test_triton_matches_torch_on_gpu(dtype, T):
    problem = _on("cuda", _problem(T, 64, 6, 2048, 1408 if T < 4096 else 352, dtype, "skewed", 3))
    ref = _run(TorchBackend("segments"), *problem)
    out = _run(TritonBackend(), *problem)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name, a, b in zip(NAMES, out, ref):
        assert_close(a, b, tol, f"gpu/{dtype}/T={T}/{name}")


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda():
    assert select("auto", torch.device("cuda"), torch.bfloat16).name == "triton"
