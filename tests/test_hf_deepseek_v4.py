"""DeepSeek-V4's MoE block (transformers 5.25's DeepseekV4SparseMoeBlock), the eighth family, block by block: both
router kinds (top-k with the correction bias; hash, with its tid2eid table and no bias) convert with their routing
(sqrt-softplus, always normalised, scaled; the clamped SwiGLU in routed and shared experts), compute the stock
block's function and gradients, and convert back; the errors name the field. Whole models (logits, loss, every
gradient, save/load both ways, generate, padding, meta init) are in tests/test_hf_fidelity.py and
tests/test_hf_checkpoints.py."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4",
                         reason="this transformers has no DeepSeek-V4 (added in 5.25)")

import deepseek_moe as dm  # noqa: E402
from deepseek_moe import hf  # noqa: E402
from deepseek_moe.forced_routing import default_hash_table  # noqa: E402
from deepseek_moe.testing import assert_close  # noqa: E402

H, E, K, I, V = 32, 8, 2, 16, 50


def _config(**extra):
    fields = dict(vocab_size=V, hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                  num_hidden_layers=2, mlp_layer_types=["hash_moe", "moe"], swiglu_limit=0.5, initializer_range=0.2)
    return v4.DeepseekV4Config(**{**fields, **extra})


def _block(layer_idx, seed=0, **extra):
    torch.manual_seed(seed)
    block = v4.DeepseekV4SparseMoeBlock(_config(**extra), layer_idx)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2, generator=g)
        if block.is_hash:
            block.gate.tid2eid.copy_(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)]))
        else:
            block.gate.e_score_correction_bias.normal_(0, 0.1, generator=g)
    return block


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["hash", "top-k"])
def test_both_router_kinds_compute_the_stock_function_and_gradients(layer_idx):
    block = _block(layer_idx)
    layer = hf.from_hf(block)
    cfg = layer.config
    assert (cfg.score_func, cfg.norm_topk_prob, cfg.routed_scaling_factor, cfg.swiglu_limit) == \
        ("sqrtsoftplus", True, 1.5, 0.5)
    assert cfg.hash_vocab_size == (V if layer_idx == 0 else None)
    assert cfg.shared_expert_hidden_size == I and cfg.num_shared_experts == 1
    x = torch.randn(3, 7, H) * 2
    ids = torch.randint(0, V, (3, 7))
    y_ref = block(x, input_ids=ids)
    y = layer(x, input_ids=ids)
    assert_close(y, y_ref, 1e-5, "output")
    h = torch.einsum("bth,ejh->btej", x, block.experts.gate_up_proj.detach())
    assert (h[..., :I] > 0.5).float().mean() > 0.1, "the gate clamp is active"
    r = torch.randn_like(y)
    (y * r).sum().backward()
    (y_ref * r).sum().backward()
    ref = dict(block.named_parameters())
    for name, p in layer.named_parameters():
        assert_close(p.grad, ref[name].grad, 1e-5, f"grad {name}")
    stock_keys = set(block.state_dict())
    assert set(layer.state_dict()) == stock_keys  # gate.tid2eid xor gate.e_score_correction_bias, as stock
    back = hf.to_hf(layer)
    assert type(back) is type(block) and back.is_hash == block.is_hash
    for name, t in block.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert torch.equal(back(x, input_ids=ids), y_ref)


def test_hash_layer_ids_reach_it_through_the_context_and_errors_name_the_layer():
    block = _block(0)
    layer = hf.from_hf(block)
    x, ids = torch.randn(2, 5, H), torch.randint(0, V, (2, 5))
    with dm.input_ids(ids):
        assert torch.equal(layer(x), layer(x, input_ids=ids))
    with pytest.raises(ValueError, match="hash-routed layer .* needs the token ids"):
        layer(x)
    with pytest.raises(ValueError, match=r"outside the table's vocabulary \[0, hash_vocab_size=50\)"):
        layer(x, input_ids=ids + V)
    # transformers' placeholder table (zeros until a checkpoint fills it) becomes the layer's default table, as in
    # a layer built by __init__ or init_weights; zeros loaded later are refused, with the reason
    fresh = hf.from_hf(v4.DeepseekV4SparseMoeBlock(_config(), 0))
    assert torch.equal(fresh.router.tid2eid, default_hash_table(V, E, K))
    with torch.no_grad():
        fresh.router.tid2eid.zero_()
    with pytest.raises(ValueError, match=r"gate.tid2eid\[\d+\] = \[0, 0\].*all-zero table is the placeholder"):
        fresh(x, input_ids=ids)


def test_output_router_logits_records_the_top_k_layers_only():
    """transformers records DeepseekV4TopKRouter's logits (its _can_record_outputs) and not the hash router's."""
    hash_layer, top_k_layer = hf.from_hf(_block(0)), hf.from_hf(_block(1))
    assert not hash_layer.logits_probe._forward_hooks and top_k_layer.logits_probe._forward_hooks


def test_unsupported_configurations_raise_naming_the_field():
    block = _block(1)
    block.shared_experts.limit = 7.0
    with pytest.raises(ValueError, match="swiglu_limit differs"):
        hf.from_hf(block)
    block = _block(1)
    block.gate.score_fn = torch.nn.Tanh()
    with pytest.raises(ValueError, match="scoring_func=Tanh is not supported"):
        hf.from_hf(block)
    sigmoid = _block(1, scoring_func="sigmoid")
    assert hf.from_hf(sigmoid).config.score_func == "sigmoid"
    layer = hf.from_hf(_block(0))
    with pytest.raises(ValueError, match=r"mlp_layer_types=\['moe', 'moe'\] has no 'hash_moe' layer"):
        hf.to_hf(layer, _config(mlp_layer_types=["moe", "moe"]))


def test_hash_layers_have_no_bias_to_balance_calibrate_or_save():
    """update_bias, calibrate_bias / calibrate_routing leave a hash layer's (unused) bias alone, and it stays out of
    the saved state even with bias balancing on, as in the stock hash block."""
    hash_layer = hf.from_hf(_block(0), bias_update_speed=1e-3)
    top_k_layer = hf.from_hf(_block(1), bias_update_speed=1e-3)
    assert "gate.e_score_correction_bias" not in hash_layer.state_dict()
    assert "gate.e_score_correction_bias" in top_k_layer.state_dict()
    x, ids = torch.randn(2, 6, H), torch.randint(0, V, (2, 6))
    with pytest.raises(ValueError, match="hash-routed .* no bias changes its load"):
        hash_layer.calibrate_bias(x)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = hash_layer, top_k_layer

        def forward(self, x, input_ids):
            return self.second(self.first(x, input_ids=input_ids))

    results = hf.calibrate_routing(Two(), x, ids)
    assert list(results) == ["second"]
    assert not hash_layer.router.e_score_correction_bias.any()
    assert hf.to_hf(hash_layer).is_hash  # a zero bias: the stock block routes the same


def test_an_infinite_limit_is_no_clamp():
    """transformers' config takes no None for swiglu_limit: inf (which clamps nothing) turns the clamp off."""
    block = _block(1, swiglu_limit=float("inf"))
    layer = hf.from_hf(block)
    assert layer.config.swiglu_limit is None
    x = torch.randn(2, 5, H) * 3
    assert_close(layer(x), block(x), 1e-5, "output")
    with pytest.raises(dm.ConfigError, match="from_hf: DeepseekV4SparseMoeBlock: MoEConfig.swiglu_limit=0.0"):
        hf.from_hf(_block(1, swiglu_limit=0.0))
