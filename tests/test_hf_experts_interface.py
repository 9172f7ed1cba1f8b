"""transformers' experts interface, both ways: stock models run their experts through "deepseek_moe" with outputs and
every parameter's gradient equal to transformers' "eager" (fp32, train and eval), variants the kernels cannot run
are refused at the first forward, transformers' expert-parallel sentinel slots count nothing; converted models
honour set_experts_implementation or refuse it."""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import deepseek_moe  # noqa: E402,F401  (registers "deepseek_moe" with transformers)
from deepseek_moe import hf  # noqa: E402
from deepseek_moe.testing import assert_close  # noqa: E402
from test_hf_fidelity import _batch, _model  # noqa: E402


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2"])
@pytest.mark.parametrize("training", [True, False])
def test_stock_model_runs_its_experts_through_deepseek_moe(family, training):
    eager = _model(family)
    ours = copy.deepcopy(eager)
    eager.set_experts_implementation("eager")
    ours.set_experts_implementation("deepseek_moe")
    ids = _batch(5)
    eager.train(training), ours.train(training)
    out_e, out_o = eager(ids, labels=ids), ours(ids, labels=ids)
    assert_close(out_o.logits, out_e.logits, 1e-5, f"{family} logits")
    out_e.loss.backward(), out_o.loss.backward()
    grads = dict(ours.named_parameters())
    for name, p in eager.named_parameters():
        assert_close(grads[name].grad, p.grad, 1e-5, f"{family} grad {name}")
    # It really ran here: our implementation is selected on the experts modules.
    assert any("_deepseek_moe" in m.__dict__ for m in ours.modules())


def test_from_pretrained_takes_experts_implementation_deepseek_moe(tmp_path):
    _model("qwen3_moe").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="deepseek_moe")
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    ids = _batch(6)
    with torch.no_grad():
        assert_close(model(ids).logits, stock(ids).logits, 1e-5, "from_pretrained deepseek_moe")


def _experts_module(bias=False):
    """gpt-oss's experts: transposed-free fused weights with biases and its own clamped SwiGLU (_apply_gate)."""
    config = transformers.GptOssConfig(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2)
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    return GptOssExperts(config)


def test_variants_it_cannot_run_are_refused_at_the_first_forward():
    experts = _experts_module()
    experts.config._experts_implementation = "deepseek_moe"
    x = torch.randn(5, 32)
    idx = torch.randint(0, 4, (5, 2))
    with pytest.raises(ValueError, match="cannot run through deepseek_moe's kernels"):
        experts(x, idx, torch.rand(5, 2))


def test_expert_parallel_sentinel_slots_contribute_nothing_and_get_no_gradient():
    model = _model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    E = experts.num_experts
    H = experts.gate_up_proj.shape[-1]
    x = torch.randn(6, H)
    idx = torch.randint(0, E, (6, 2))
    idx[::2, 1] = E  # not this rank's expert
    w = torch.rand(6, 2, requires_grad=True)
    experts._is_expert_parallel = True
    experts.config._experts_implementation = "deepseek_moe"
    y = experts(x, idx, w)
    y.square().sum().backward()
    assert not w.grad[::2, 1].any()
    # The reference: transformers' eager loop over the real slots only (sentinel weights zeroed).
    experts._is_expert_parallel = False
    experts.config._experts_implementation = "eager"
    keep = idx < E
    ref_w = (w.detach() * keep).requires_grad_()
    ref = experts(x, idx.clamp(max=E - 1), ref_w)
    ref.square().sum().backward()
    assert_close(y, ref, 1e-6, "sentinel output")
    assert_close(w.grad, ref_w.grad * keep, 1e-6, "sentinel weight gradients")


def test_converted_models_honour_set_experts_implementation():
    model = _model("mixtral")
    hf.replace_moe_blocks(model)
    layer = next(iter(hf.moe_layers(model).values()))
    ids = _batch(7)
    model.set_experts_implementation("eager")
    model(ids)
    assert layer.backend_name == "eager"
    model.set_experts_implementation("deepseek_moe")
    model(ids)
    assert layer.backend_name == dm_auto_name(layer)
    # generate() switches "grouped_mm" to "batched_mm" for decoding on GPUs: the layer's backend runs it.
    model.set_experts_implementation("batched_mm")
    model(ids)
    assert layer.backend_name == dm_auto_name(layer)
    model.config._experts_implementation = "sonicmoe"  # was silently run on the same backend
    with pytest.raises(ValueError, match="sonicmoe.*supported: 'eager'"):
        model(ids)


def dm_auto_name(layer):
    from deepseek_moe import backends
    weight = layer.experts.gate_up_proj
    return backends.select("auto", weight.device, weight.dtype, layer.config.hidden_act,
                           sizes=(layer.config.hidden_size, layer.config.expert_hidden_size)).name


def test_dbrx_and_explicit_backends_are_not_overridden_by_transformers_eager():
    """DBRX's experts do not take experts_implementation (transformers reports "eager" for it whatever is asked):
    its layers keep their own backend; an explicit backend= wins over the model's setting."""
    model = _model("dbrx")
    hf.replace_moe_blocks(model)
    layer = next(iter(hf.moe_layers(model).values()))
    assert model.config._experts_implementation == "eager"
    assert layer.backend_name == dm_auto_name(layer)
    mixtral = _model("mixtral")
    hf.replace_moe_blocks(mixtral, backend="torch")
    mixtral.set_experts_implementation("eager")
    assert next(iter(hf.moe_layers(mixtral).values())).backend_name == "torch"


def test_deepseek_moe_experts_compile_fullgraph_from_a_cold_start():
    model = _model("qwen3_moe")
    model.set_experts_implementation("deepseek_moe")
    experts = model.model.layers[0].mlp.experts
    x, idx, w = torch.randn(5, 32), torch.randint(0, 8, (5, 2)), torch.rand(5, 2)
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    got = compiled(x, idx, w)
    experts.config._experts_implementation = "eager"
    assert_close(got, experts(x, idx, w), 1e-6, "compiled deepseek_moe experts")


def test_autocast_runs_the_experts_in_the_autocast_dtype_as_eager():
    from deepseek_moe.testing import rel_rms

    experts = _model("qwen3_moe").model.layers[0].mlp.experts  # fp32 weights
    g = torch.Generator().manual_seed(0)
    x, idx, w = torch.randn(64, 32, generator=g), torch.randint(0, 8, (64, 2), generator=g), torch.rand(64, 2)
    experts.config._experts_implementation = "eager"
    fp32 = experts(x, idx, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = experts(x, idx, w)
        experts.config._experts_implementation = "deepseek_moe"
        ours = experts(x, idx, w)
    assert ours.dtype == eager.dtype
    assert rel_rms(ours.float(), eager.float()) < 1e-2  # both bf16 GEMMs
    assert rel_rms(ours.float(), fp32) > 1e-4  # it did not run in fp32 (it did before)
    with pytest.raises(TypeError, match="dtype"):  # bf16 input, fp32 weights, no autocast: eager raises too
        experts(x.bfloat16(), idx, w)


def test_unsupported_activation_names_the_experts_implementation():
    model = _model("qwen3_moe", hidden_act="tanh")
    model.set_experts_implementation("deepseek_moe")
    with pytest.raises(ValueError, match="experts_implementation='deepseek_moe'.*activation"):
        model(_batch(1))


def test_nested_converted_at_construction_applies_the_inner_overrides():
    from test_hf_fidelity import _config

    with hf.converted_at_construction(backend="eager"):
        with hf.converted_at_construction(backend="torch"):
            inner = transformers.AutoModelForCausalLM.from_config(_config("mixtral"))
        outer = transformers.AutoModelForCausalLM.from_config(_config("mixtral"))
    plain = transformers.AutoModelForCausalLM.from_config(_config("mixtral"))
    assert {layer.config.backend for layer in hf.moe_layers(inner).values()} == {"torch"}
    assert {layer.config.backend for layer in hf.moe_layers(outer).values()} == {"eager"}
    assert not hf.moe_layers(plain)


def test_deepseek_v4_experts_with_their_clamped_swiglu_run_exactly():
    """DeepseekV4Experts defines its own _apply_gate (silu(min(g, L)) · clamp(u, −L, L)): recognised on values and
    run with the clamped GLU; outputs and gradients equal transformers' eager loop."""
    v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4",
                             reason="this transformers has no DeepSeek-V4 (added after the 5.19 floor)")
    DeepseekV4Experts = v4.DeepseekV4Experts
    config = v4.DeepseekV4Config(vocab_size=97, hidden_size=32, moe_intermediate_size=16,
                                           num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2,
                                           swiglu_limit=0.3)
    torch.manual_seed(0)
    eager = DeepseekV4Experts(config)
    torch.nn.init.normal_(eager.gate_up_proj, std=0.3)
    torch.nn.init.normal_(eager.down_proj, std=0.3)
    ours = copy.deepcopy(eager)
    ours.config = copy.deepcopy(config)
    eager.config._experts_implementation, ours.config._experts_implementation = "eager", "deepseek_moe"
    x = torch.randn(9, 32)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(9)])
    w = torch.rand(9, 2)
    ys = []
    for m in (eager, ours):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = m(xr, idx, wr)
        y.square().sum().backward()
        ys.append((y, xr.grad, wr.grad, m.gate_up_proj.grad, m.down_proj.grad))
    assert ours.__dict__["_deepseek_moe"][0] == "silu@0.3"
    assert ((x @ eager.gate_up_proj[0, :16].T).abs() > 0.3).float().mean() > 0.2  # the clamp is active
    for name, a, b in zip(("y", "grad x", "grad w", "grad gate_up", "grad down"), ys[1], ys[0]):
        assert_close(a, b, 1e-5, f"DeepseekV4Experts {name}")
