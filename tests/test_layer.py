"""DeepSeekMoELayer as a user meets it: shapes, dtypes, bad input, autocast, compile, checkpointing, state_dict."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import deepseek_moe as dm
from deepseek_moe.testing import assert_close

CFG = dm.MoEConfig(hidden_size=32, expert_hidden_size=16, num_routed_experts=8, num_shared_experts=2, top_k=2)


def test_forward_shapes_dtypes_and_stats():
    layer = dm.DeepSeekMoELayer(CFG)
    for shape in [(32,), (5, 32), (2, 7, 32), (2, 3, 4, 32)]:
        x = torch.randn(shape)
        y = layer(x)
        assert y.shape == x.shape and y.dtype == x.dtype
    assert layer.tokens_per_expert.dtype == torch.int64
    assert int(layer.tokens_per_expert.sum()) == 24 * CFG.top_k
    assert set(layer.last_stats) == {"num_dropped", "max_vio", "cv"}
    bf = dm.DeepSeekMoELayer(CFG).to(torch.bfloat16)
    assert bf(torch.randn(4, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_constructor_forms():
    assert dm.DeepSeekMoELayer(hidden_size=32, expert_hidden_size=16, top_k=2).config.top_k == 2
    assert dm.DeepSeekMoELayer(CFG, top_k=3).config.top_k == 3
    with pytest.raises(TypeError, match="MoEConfig"):
        dm.DeepSeekMoELayer({"hidden_size": 32})


@pytest.mark.parametrize("bad,exc,match", [
    (torch.randn(4, 31), ValueError, "hidden_size=32"),
    (torch.randn(()), ValueError, "last dimension"),
    (torch.ones(4, 32, dtype=torch.int64), ValueError, "floating dtype"),
    ([[0.0] * 32], TypeError, "torch.Tensor"),
])
def test_bad_input_is_rejected_clearly(bad, exc, match):
    with pytest.raises(exc, match=match):
        dm.DeepSeekMoELayer(CFG)(bad)


@pytest.mark.parametrize("shared", [2, 0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_one_dtype_rule_for_routed_and_shared_experts(shared, dtype):
    """nn.Linear's rule on both paths: a TypeError naming both dtypes (it used to be a raw matmul error with shared
    experts and a silent bf16 run without), and autocast chooses the compute dtype for both."""
    layer = dm.DeepSeekMoELayer(CFG.replace(num_shared_experts=shared))
    x = torch.randn(2, 5, 32, dtype=dtype)
    with pytest.raises(TypeError, match=rf"x has dtype {dtype} and the layer's parameters torch.float32; cast one"):
        layer(x)
    with pytest.raises(TypeError, match=rf"x has dtype {dtype}"):
        layer.eval()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.float())
    assert y.dtype == torch.float32  # the input's dtype, computed in bf16


def test_meta_device_is_a_clear_error():
    with pytest.raises(ValueError, match=r"x is on device meta .*to_empty"):
        dm.DeepSeekMoELayer(CFG)(torch.randn(4, 32, device="meta"))
    with torch.device("meta"):
        layer = dm.DeepSeekMoELayer(CFG)
    with pytest.raises(ValueError, match="parameters on meta"):
        layer(torch.randn(4, 32))
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.isfinite(layer(torch.randn(4, 32))).all()


@pytest.mark.parametrize("loss", [dict(seq_aux=True, aux_loss_alpha=0.01), dict(seq_balance_alpha=0.01),
                                  dict(balance_scope="sequence", aux_loss_alpha=0.01)])
def test_per_sequence_losses_need_sequences(loss):
    layer = dm.DeepSeekMoELayer(CFG.replace(**loss))
    with pytest.raises(ValueError, match=r"x has shape \(6, 32\).*per sequence.*\(1, T, 32\)"):
        layer(torch.randn(6, 32))
    layer(torch.randn(1, 6, 32))
    layer.eval()(torch.randn(6, 32))  # no loss in eval: any shape


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_zero_tokens_empty_in_empty_out(backend):
    per_sequence = CFG.replace(backend=backend, capacity_factor=1.0, seq_balance_alpha=0.01, z_loss_coef=0.01)
    for cfg, shape in [(per_sequence.replace(seq_balance_alpha=0.0), (0, 32)), (per_sequence, (2, 0, 32))]:
        layer = dm.DeepSeekMoELayer(cfg)
        x = torch.randn(shape, requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape
        (y.sum() + layer.aux_loss).backward()
        assert x.grad.shape == x.shape
        assert int(layer.tokens_per_expert.sum()) == 0 and layer.aux_loss.item() == 0.0


def test_nan_propagates_only_to_its_own_token():
    layer = dm.DeepSeekMoELayer(CFG).eval()
    x = torch.randn(10, 32)
    clean = layer(x)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    y = layer(x)
    assert not torch.isfinite(y[3]).any() and not torch.isfinite(y[7]).all()
    rows = [i for i in range(10) if i not in (3, 7)]
    assert torch.isfinite(y[rows]).all()
    # Other tokens keep their experts and outputs (up to the order of fp32 sums).
    torch.testing.assert_close(y[rows], clean[rows], rtol=1e-5, atol=1e-6)


def test_autocast_bf16_on_cpu():
    layer = dm.DeepSeekMoELayer(CFG)
    x = torch.randn(4, 9, 32, requires_grad=True)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    assert_close(y, ref, 2e-2, "autocast y")
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and layer.experts.gate_up_proj.grad.dtype == torch.float32


def test_torch_compile_matches_eager_mode():
    layer = dm.DeepSeekMoELayer(CFG.replace(z_loss_coef=1e-3))
    x = torch.randn(3, 8, 32)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(layer.parameters()), allow_unused=True)
    compiled = torch.compile(layer)
    y = compiled(x)
    assert_close(y, ref, 1e-5, "compiled y")
    grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()), allow_unused=True)
    for (name, _), g, r in zip(layer.named_parameters(), grads, ref_grads):
        assert_close(g, r, 1e-5, f"compiled grad {name}")


def test_activation_checkpointing_same_grads_and_single_load_count():
    layer = dm.DeepSeekMoELayer(CFG.replace(bias_update_speed=0.01))
    x = torch.randn(2, 6, 32, requires_grad=True)
    y = layer(x)
    (y.square().sum() + layer.aux_loss).backward()
    ref = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    layer.update_bias()
    layer.gate.e_score_correction_bias.zero_()
    y = checkpoint(layer, x, use_reentrant=False)
    (y.square().sum() + layer.aux_loss).backward()
    got = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, ref):
        assert_close(a, b, 1e-6, "checkpointed grad")
    assert int(layer.load_since_update.sum()) == 12 * CFG.top_k


def test_capacity_drops_in_training_only_and_counts_them():
    layer = dm.DeepSeekMoELayer(CFG.replace(capacity_factor=0.5))
    x = torch.randn(64, 32)
    layer(x)
    dropped = layer.last_stats["num_dropped"]
    assert dropped > 0
    assert int(layer.tokens_per_expert.sum()) == 64 * CFG.top_k - dropped
    assert int(layer.tokens_per_expert.max()) <= 16  # ceil(0.5 * 64 * 2 / 8)
    layer.eval()
    layer(x)
    assert layer.last_stats["num_dropped"] == 0


CONTRACT_KEYS = {"gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj",
                 "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight"}


def test_state_dict_names_shapes_and_round_trip():
    layer = dm.DeepSeekMoELayer(CFG)
    sd = layer.state_dict()
    assert set(sd) == CONTRACT_KEYS
    E, I, H = 8, 16, 32
    assert sd["experts.gate_up_proj"].shape == (E, 2 * I, H) and sd["experts.down_proj"].shape == (E, H, I)
    assert sd["gate.e_score_correction_bias"].dtype == torch.float32
    assert sd["shared_experts.gate_proj.weight"].shape == (2 * I, H)
    gated = dm.DeepSeekMoELayer(CFG.replace(shared_expert_gate=True)).state_dict()
    assert set(gated) == CONTRACT_KEYS | {"shared_expert_gate.weight"}
    other = dm.DeepSeekMoELayer(CFG)
    other.load_state_dict(sd)
    x = torch.randn(5, 32)
    assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
def test_per_expert_checkpoint_layouts_load(names):
    layer = dm.DeepSeekMoELayer(CFG)
    sd = {k: v for k, v in layer.state_dict().items() if not k.startswith("experts.")}
    I = 16
    for i in range(8):
        sd[f"experts.{i}.{names[0]}.weight"] = layer.experts.gate_up_proj[i, :I].detach().clone()
        sd[f"experts.{i}.{names[1]}.weight"] = layer.experts.gate_up_proj[i, I:].detach().clone()
        sd[f"experts.{i}.{names[2]}.weight"] = layer.experts.down_proj[i].detach().clone()
    other = dm.DeepSeekMoELayer(CFG)
    other.load_state_dict(sd)
    assert torch.equal(other.experts.gate_up_proj, layer.experts.gate_up_proj)
    assert torch.equal(other.experts.down_proj, layer.experts.down_proj)
    extra = dict(sd, **{f"experts.8.{names[2]}.weight": sd[f"experts.0.{names[2]}.weight"]})
    with pytest.raises(RuntimeError, match=re.escape(f"beyond E=8: experts.8.{names[2]}.weight")):
        dm.DeepSeekMoELayer(CFG).load_state_dict(extra)
    misshaped = dict(sd, **{f"experts.2.{names[2]}.weight": torch.zeros(32, 17)})
    with pytest.raises(RuntimeError, match=re.escape(f"experts.2.{names[2]}.weight (32, 17) do not have the config's "
                                                     "shapes (gate/up (16, 32), down (32, 16)")):
        dm.DeepSeekMoELayer(CFG).load_state_dict(misshaped)
    del sd[f"experts.3.{names[2]}.weight"]
    # Named as the checkpoint names it, as PyTorch names any missing key.
    with pytest.raises(RuntimeError, match=re.escape(f'Missing key(s) in state_dict: "experts.3.{names[2]}.weight"')):
        dm.DeepSeekMoELayer(CFG).load_state_dict(sd)
    result = dm.DeepSeekMoELayer(CFG).load_state_dict(sd, strict=False)  # reported, as PyTorch reports missing keys
    assert f"experts.3.{names[2]}.weight" in result.missing_keys


def test_mixtral_style_runs_through_the_same_layer():
    cfg = dm.MoEConfig.preset("mixtral-8x2", hidden_size=32, ffn_size=64)
    layer, ref = dm.DeepSeekMoELayer(cfg), dm.DeepSeekMoELayer(cfg.replace(backend="eager"))
    ref.load_state_dict(layer.state_dict())
    assert layer.shared_experts is None
    x = torch.randn(3, 11, 32)
    assert_close(layer(x), ref(x), 1e-5, "mixtral y")
    torch.testing.assert_close(layer.gate(x.reshape(-1, 32)).topk_weight_TK.sum(-1), torch.ones(33))


def test_shared_expert_gate_scales_shared_output():
    layer = dm.DeepSeekMoELayer(CFG.replace(shared_expert_gate=True))
    x = torch.randn(6, 32)
    with torch.no_grad():
        y = layer(x)
        routing, plan = layer.route(x)
        routed = layer.experts(x, plan, dm.backends.select("torch"))
        gate = torch.sigmoid(x @ layer.shared_expert_gate.weight.T)
    assert_close(y, routed + gate * layer.shared_experts(x), 1e-6, "gated shared")


def test_update_bias_is_noop_without_speed():
    layer = dm.DeepSeekMoELayer(CFG)
    layer(torch.randn(16, 32))
    assert int(layer.load_since_update.sum()) == 32
    layer.update_bias()
    assert torch.equal(layer.gate.e_score_correction_bias, torch.zeros(8))
    assert int(layer.load_since_update.sum()) == 0


def test_import_needs_only_torch():
    """`import deepseek_moe` (hf and bench included) works, silently, with the optional packages blocked."""
    import subprocess
    import sys

    code = ("import sys, warnings\n"
            "for name in ('transformers', 'triton', 'rich', 'matplotlib', 'megablocks'):\n"
            "    sys.modules[name] = None\n"
            "warnings.simplefilter('error')\n"
            "import deepseek_moe, deepseek_moe.hf, deepseek_moe.bench\n"
            "layer = deepseek_moe.DeepSeekMoELayer(hidden_size=8, expert_hidden_size=4, num_routed_experts=4, top_k=2)\n"
            "print(layer(__import__('torch').randn(3, 8)).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([3, 8])" and out.stderr == ""


def test_router_jitter_scales_the_routed_path_in_training_only():
    """u ~ U(1-ε, 1+ε) multiplies the router's and routed experts' input in training; shared experts see x."""
    cfg = dm.MoEConfig(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2, num_shared_experts=1,
                       router_jitter_noise=0.2, backend="eager")
    layer = dm.DeepSeekMoELayer(cfg)
    plain = dm.DeepSeekMoELayer(cfg.replace(router_jitter_noise=0.0))
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 16)
    torch.manual_seed(3)
    u = torch.empty_like(x).uniform_(0.8, 1.2)
    torch.manual_seed(3)
    y = layer(x)
    shared = plain.shared_experts(x)
    routed = plain(x * u) - plain.shared_experts(x * u)
    assert torch.allclose(y, routed + shared, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), plain.eval()(x))


def test_backend_is_selected_once_and_fullgraph_compiles_on_cpu(monkeypatch):
    """Selection reads the environment and the filesystem: once per (device, dtype), again after a move; a
    compiled layer takes it as a trace-time constant, so fullgraph compiles with backend "auto" on CPU."""
    from deepseek_moe import backends
    calls = []
    real = backends.select
    monkeypatch.setattr(backends, "select", lambda *a, **k: calls.append(a) or real(*a, **k))
    layer = dm.DeepSeekMoELayer(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2)
    x = torch.randn(2, 3, 16)
    for _ in range(5):
        layer(x).sum().backward()
    assert len(calls) == 1
    assert layer.backend_name == real("auto", torch.device("cpu"), torch.float32).name
    layer.double()
    layer(x.double())
    assert len(calls) == 2 and calls[-1][2] == torch.float64
    layer.float().eval()
    with torch.no_grad():
        ref = layer(x)
        got = torch.compile(layer, fullgraph=True)(x)
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_compiles_fullgraph_and_matches_eager(dtype):
    """torch.compile(fullgraph=True) of a training forward+backward with the torch backend: one graph, the same
    output, aux loss and gradients as the uncompiled layer (the segment op is one node each way)."""
    cfg = dm.MoEConfig(hidden_size=32, expert_hidden_size=16, num_routed_experts=8, num_shared_experts=1, top_k=2,
                       aux_loss_alpha=0.01, z_loss_coef=1e-3, backend="torch")
    eager = dm.DeepSeekMoELayer(cfg).to(dtype)
    compiled_layer = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x = torch.randn(2, 24, 32, dtype=dtype)
    results = []
    for layer, module in ((eager, eager), (compiled_layer, compiled)):
        xi = x.clone().requires_grad_()
        y = module(xi)
        (y.float().square().sum() + layer.aux_loss).backward()
        results.append((y, layer.aux_loss, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(results[1][0], results[0][0], tol, "y")
    assert_close(results[1][1], results[0][1], 1e-5, "aux_loss")
    assert_close(results[1][2], results[0][2], tol, "grad x")
    for name, g in results[0][3].items():
        assert_close(results[1][3][name], g, tol, f"grad {name}")


def test_training_with_capacity_compiles_fullgraph_at_many_rows_per_expert():
    """T·K above the few-rows threshold (64 rows per expert) with capacity: the row count is data-dependent, and
    the compiled graph must not branch on it."""
    layer = dm.DeepSeekMoELayer(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2,
                                capacity_factor=1.0)
    ref = copy.deepcopy(layer)
    torch._dynamo.reset()
    x = torch.randn(320, 16)
    y = torch.compile(layer, fullgraph=True)(x)
    y.square().sum().backward()
    y_ref = ref(x)
    y_ref.square().sum().backward()
    assert_close(y, y_ref, 1e-5, "y")
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, 1e-5, f"grad {name}")


def test_reset_counters_after_an_inference_mode_forward():
    layer = dm.DeepSeekMoELayer(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2)
    with torch.inference_mode():
        layer(torch.randn(5, 16))
    assert int(layer.tokens_per_expert.sum()) == 10
    layer.reset_counters()
    assert not layer.tokens_per_expert.any() and int(layer.last_stats["num_dropped"]) == 0
    layer.train()(torch.randn(5, 16)).sum().backward()
    assert int(layer.load_since_update.sum()) == 10


def test_counters_made_inside_inference_mode_still_count_a_training_step():
    """Counters created under inference_mode (a reset there, or a first forward after a load that left them on the
    meta device) are ordinary tensors: the next training forward and update_bias update them in place."""
    layer = dm.DeepSeekMoELayer(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2,
                                bias_update_speed=0.01)
    with torch.inference_mode():
        layer.reset_counters()
    layer(torch.randn(5, 16)).sum().backward()
    layer.update_bias()
    with torch.device("meta"):
        built = dm.DeepSeekMoELayer(layer.config)
    built.load_state_dict(layer.state_dict(), assign=True)
    with torch.inference_mode():
        built.eval()(torch.randn(3, 16))
    built.train()(torch.randn(5, 16)).sum().backward()
    assert int(built.load_since_update.sum()) == 10
    assert built.update_bias().shape == (8,) and int(built.load_since_update.sum()) == 0


def test_import_loads_neither_dynamo_nor_optional_packages():
    """`import deepseek_moe` stays light: no torch._dynamo (1.6 s; it would import triton), triton or transformers."""
    import subprocess
    import sys

    code = ("import sys, deepseek_moe, deepseek_moe.hf, deepseek_moe.analysis, deepseek_moe.parallel\n"
            "print([m for m in ('torch._dynamo', 'triton', 'transformers') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class _Delegate(torch.nn.Module):
    """A user's wrapper around the shared experts: counts its calls, computes what it wraps."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_shared_experts_under_another_name_and_replaced_by_assignment(backend):
    """name_shared_experts (a converted Qwen2-MoE layer's ``shared_expert``): same function, the child renamed in
    place; ``layer.shared_experts = m`` replaces that child (nn.Module would register a second one, never called)."""
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(hidden_size=16, expert_hidden_size=8, num_routed_experts=4, top_k=2,
                                num_shared_experts=1, backend=backend).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = layer(x)
        layer.name_shared_experts("shared_expert")
        assert list(layer._modules) == ["gate", "experts", "shared_expert", "logits_probe"]
        assert sorted(k for k in layer.state_dict() if k.startswith("shared")) == [
            f"shared_expert.{p}_proj.weight" for p in ("down", "gate", "up")]
        assert torch.equal(layer(x), before)
        wrapper = _Delegate(layer.shared_experts)
        layer.shared_experts = wrapper  # a module that is not SharedExperts: not fused into the experts' pass
        assert layer.shared_experts is wrapper and list(layer._modules)[2] == "shared_expert"
        assert torch.equal(layer(x), before) and wrapper.calls == 1
        layer.shared_experts = None
        assert layer.shared_experts is None and "shared_experts" not in layer._modules
        assert not torch.equal(layer(x), before)
        layer.shared_experts = wrapper.inner
        layer.name_shared_experts("shared_experts")  # back to the bare layer's name
        assert list(layer._modules)[2] == "shared_experts" and torch.equal(layer(x), before)
    for bad, error in (("", ValueError), ("a.b", ValueError), (3, TypeError), ("gate", ValueError),
                       ("forward", ValueError)):
        with pytest.raises(error, match="name_shared_experts"):
            layer.name_shared_experts(bad)
