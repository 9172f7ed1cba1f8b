"""The named presets of :meth:`deepseek_moe.MoEConfig.preset`: published MoE layers' sizes and routing, as MoEConfig
fields (data only)."""
from typing import Any, Dict

# Published hyper-parameters (DeepSeekMoE 2401.06066, DeepSeek-V2 2405.04434, DeepSeek-V3 2412.19437, Mixtral
# 2401.04088, Qwen1.5-MoE). Balance coefficients are in DeepSeek's normalisation (1.0 at uniform routing):
# transformers' Mixtral/Qwen coefficient c becomes c * top_k here.
PRESETS: Dict[str, Dict[str, Any]] = {
    "deepseek-moe-16b": dict(hidden_size=2048, expert_hidden_size=1408, num_routed_experts=64,
                             num_shared_experts=2, top_k=6, score_func="softmax", norm_topk_prob=False,
                             aux_loss_alpha=0.001, seq_aux=True),
    "deepseek-v2-lite": dict(hidden_size=2048, expert_hidden_size=1408, num_routed_experts=64,
                             num_shared_experts=2, top_k=6, score_func="softmax", norm_topk_prob=False,
                             aux_loss_alpha=0.001, seq_aux=True),
    "deepseek-v2": dict(hidden_size=5120, expert_hidden_size=1536, num_routed_experts=160, num_shared_experts=2,
                        top_k=6, score_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0,
                        num_groups=8, topk_groups=3, group_score="max", aux_loss_alpha=0.003, seq_aux=True,
                        device_loss_alpha=0.05, num_devices=8, comm_loss_alpha=0.02, max_devices_per_token=3),
    "deepseek-v3": dict(hidden_size=7168, expert_hidden_size=2048, num_routed_experts=256, num_shared_experts=1,
                        top_k=8, score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                        num_groups=8, topk_groups=4, group_score="top2_sum", aux_loss_alpha=0.0,
                        seq_balance_alpha=0.0001, bias_update_speed=0.001),
    # DeepSeek-V4 (its top-k MoE layers; the first three are hash-routed: add hash_vocab_size=129280). Flash: the
    # routing of transformers 5.25's DeepseekV4Config defaults (√softplus, norm, scale 1.5, clamp 10, no groups).
    # Pro: sizes of its public config (hidden 7168, 384 experts of 3072, top-6, 1 shared); scale and clamp carried
    # over from Flash, unverified. Balance: aux-loss-free with V3's γ and sequence-wise α (the V4 report's values are
    # not checked here).
    "deepseek-v4-flash": dict(hidden_size=4096, expert_hidden_size=2048, num_routed_experts=256, num_shared_experts=1,
                              top_k=6, score_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
                              swiglu_limit=10.0, aux_loss_alpha=0.0, seq_balance_alpha=0.0001,
                              bias_update_speed=0.001),
    "deepseek-v4-pro": dict(hidden_size=7168, expert_hidden_size=3072, num_routed_experts=384, num_shared_experts=1,
                            top_k=6, score_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
                            swiglu_limit=10.0, aux_loss_alpha=0.0, seq_balance_alpha=0.0001, bias_update_speed=0.001),
    "mixtral-8x7b": dict(hidden_size=4096, expert_hidden_size=14336, num_routed_experts=8, num_shared_experts=0,
                         top_k=2, score_func="softmax", norm_topk_prob=True, aux_loss_alpha=0.04),
    # Qwen3-30B-A3B's MoE layers (its config.json: moe_intermediate_size 768, 128 experts, 8 per token, normalised,
    # router_aux_loss_coef 0.001, i.e. 0.008 here).
    "qwen3-30b-a3b": dict(hidden_size=2048, expert_hidden_size=768, num_routed_experts=128, num_shared_experts=0,
                          top_k=8, score_func="softmax", norm_topk_prob=True, aux_loss_alpha=0.008),
    "qwen2-moe": dict(hidden_size=2048, expert_hidden_size=1408, num_routed_experts=60, num_shared_experts=4,
                      top_k=4, score_func="softmax", norm_topk_prob=False, shared_expert_gate=True,
                      aux_loss_alpha=0.004),
    "mixtral-8x2": dict(hidden_size=1024, expert_hidden_size=2816, num_routed_experts=8, num_shared_experts=0,
                        top_k=2, score_func="softmax", norm_topk_prob=True, aux_loss_alpha=0.01),
    "deepseek-64x": dict(hidden_size=1024, expert_hidden_size=352, num_routed_experts=64, num_shared_experts=2,
                         top_k=14, score_func="softmax", norm_topk_prob=False, aux_loss_alpha=0.01),
}
