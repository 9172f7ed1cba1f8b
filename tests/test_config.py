"""MoEConfig validation, presets and size accounting."""
import pytest

import deepseek_moe as dm
from deepseek_moe.config import MoEConfig, matched_pair

BASE = dict(hidden_size=64, expert_hidden_size=32, num_routed_experts=16, top_k=4)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 0), ("hidden_size", 2.5), ("hidden_size", True), ("expert_hidden_size", -1),
    ("num_routed_experts", 0), ("num_shared_experts", -1), ("top_k", 0), ("top_k", 17),
    ("score_func", "relu"), ("norm_topk_prob", 1), ("routed_scaling_factor", 0.0),
    ("routed_scaling_factor", float("nan")), ("num_groups", 3), ("topk_groups", 5), ("group_score", "mean"),
    ("aux_loss_alpha", -0.1), ("aux_loss_alpha", float("inf")), ("seq_aux", "yes"), ("device_loss_alpha", -1),
    ("num_devices", 3), ("comm_loss_alpha", -1.0), ("max_devices_per_token", 2), ("seq_balance_alpha", -1),
    ("z_loss_coef", -1), ("bias_update_speed", -0.5), ("capacity_factor", 0.0), ("capacity_factor", -1.0),
    ("shared_expert_gate", None), ("backend", "cuda"), ("initializer_range", 0),
    ("shared_expert_hidden_size", 0), ("shared_expert_hidden_size", 2.0), ("hidden_act", "tanh"),
    ("hidden_act", "swish"), ("router_jitter_noise", -0.1), ("router_jitter_noise", 1.0),
    ("router_jitter_noise", True),
])
def test_invalid_field_names_field_and_value(field, value):
    with pytest.raises(dm.ConfigError) as info:
        MoEConfig(**{**BASE, field: value})
    msg = str(info.value)
    assert f"MoEConfig.{field}=" in msg and "expected" in msg


def test_cross_field_rules():
    with pytest.raises(ValueError, match="top_k"):  # 2 groups of 8 kept out of 8 -> at most 16, fine; 1 group of 2
        MoEConfig(**{**BASE, "num_groups": 8, "topk_groups": 1, "top_k": 3})
    with pytest.raises(ValueError, match="top2_sum"):
        MoEConfig(**{**BASE, "num_groups": 16, "topk_groups": 4, "group_score": "top2_sum"})
    MoEConfig(**{**BASE, "num_groups": 4, "topk_groups": 2, "group_score": "top2_sum", "num_devices": 4,
                 "max_devices_per_token": 2})
    # Both limits: groups and devices must nest, and with devices inside groups the kept groups may hold one kept
    # device each (E=4, 2 groups, 4 devices, keep 1 group and 2 devices: 1 expert may be left for top_k=2).
    with pytest.raises(ValueError, match="nest"):
        MoEConfig(**{**BASE, "num_routed_experts": 12, "num_groups": 3, "num_devices": 2, "max_devices_per_token": 1,
                     "top_k": 2})
    with pytest.raises(ValueError, match="one kept device each"):
        MoEConfig(**{**BASE, "num_routed_experts": 4, "num_groups": 2, "topk_groups": 1, "num_devices": 4,
                     "max_devices_per_token": 2, "top_k": 2})
    MoEConfig(**{**BASE, "num_routed_experts": 4, "num_groups": 2, "topk_groups": 1, "num_devices": 4,
                 "max_devices_per_token": 2, "top_k": 1})
    MoEConfig.preset("deepseek-v2")  # 8 groups on 8 devices, keep 3 of each: nested, allowed


def test_config_is_frozen_and_replace_validates():
    cfg = MoEConfig(**BASE)
    with pytest.raises(Exception):
        cfg.top_k = 2
    assert cfg.replace(top_k=2).top_k == 2
    with pytest.raises(dm.ConfigError):
        cfg.replace(top_k=99)


@pytest.mark.parametrize("name", sorted(dm.PRESETS))
def test_presets_build_with_overrides(name):
    cfg = MoEConfig.preset(name, hidden_size=256)
    assert cfg.hidden_size == 256
    layer = dm.DeepSeekMoELayer(MoEConfig.preset(name, hidden_size=16, expert_hidden_size=8))
    assert layer.config.num_routed_experts == dm.PRESETS[name]["num_routed_experts"]


def test_preset_errors():
    with pytest.raises(dm.ConfigError, match="unknown preset 'gpt-5'"):
        MoEConfig.preset("gpt-5")
    with pytest.raises(dm.ConfigError, match="hidden_sise"):
        MoEConfig.preset("deepseek-v3", hidden_sise=4)
    with pytest.raises(dm.ConfigError, match="ffn_size"):
        MoEConfig.preset("deepseek-v3", ffn_size=64)
    with pytest.raises(dm.ConfigError, match="divisible by 8"):
        MoEConfig.preset("deepseek-64x", ffn_size=100)


def test_mixtral_style_preset_is_8x2_softmax_renormalised_no_shared():
    cfg = MoEConfig.preset("mixtral-8x2", hidden_size=64, ffn_size=128)
    assert (cfg.num_routed_experts, cfg.top_k, cfg.num_shared_experts) == (8, 2, 0)
    assert cfg.score_func == "softmax" and cfg.norm_topk_prob and cfg.expert_hidden_size == 128


@pytest.mark.parametrize("name,extra", [("deepseek-v3", {}), ("qwen2-moe", {}), ("mixtral-8x2", {}),
                                        ("deepseek-64x", {}), ("qwen2-moe", {"shared_expert_hidden_size": 20})])
def test_size_accounting_matches_the_module(name, extra):
    cfg = MoEConfig.preset(name, hidden_size=32, expert_hidden_size=8, **extra)
    layer = dm.DeepSeekMoELayer(cfg)
    assert cfg.total_params == sum(p.numel() for p in layer.parameters())
    per_expert = 3 * 8 * 32
    expected_active = cfg.total_params - (cfg.num_routed_experts - cfg.top_k) * per_expert
    assert cfg.active_params == expected_active
    assert cfg.flops_per_token == 2 * expected_active


@pytest.mark.parametrize("H,F", [(1024, 2816), (512, 1408), (4096, 14336), (256, 1024)])
def test_matched_pair_equal_active_flops_params_within_5_percent(H, F):
    a, b = matched_pair(H, F)
    expert_flops = lambda c: 2 * 3 * c.expert_hidden_size * c.hidden_size * (c.top_k + c.num_shared_experts)
    assert expert_flops(a) == expert_flops(b)
    assert abs(b.total_params - a.total_params) / a.total_params <= 0.05
