"""transformers interop: converted blocks compute the same function; moefy upcycling preserves logits."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")  # CI installs the hf extra; this guards local minimal installs

import deepseek_moe as dm  # noqa: E402
from deepseek_moe import hf  # noqa: E402
from deepseek_moe.testing import assert_close  # noqa: E402

H = 32


def _randomize(module, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _block(kind):
    if kind == "deepseek_v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                               n_shared_experts=2, n_group=4, topk_group=2, norm_topk_prob=True,
                               routed_scaling_factor=2.5)
        block = _randomize(DeepseekV3MoE(cfg))
        block.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.2)  # a non-zero bias steers selection
        return block
    if kind == "deepseek_v2":
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
        cfg = DeepseekV2Config(hidden_size=H, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=3,
                               n_shared_experts=1, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                               routed_scaling_factor=1.5)
        return _randomize(DeepseekV2Moe(cfg))
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        return _randomize(MixtralSparseMoeBlock(MixtralConfig(hidden_size=H, intermediate_size=24,
                                                              num_local_experts=8, num_experts_per_tok=2)))
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    return _randomize(Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=16, num_experts=8,
                                                            num_experts_per_tok=3, shared_expert_intermediate_size=40,
                                                            norm_topk_prob=False)))


KINDS = ["deepseek_v3", "deepseek_v2", "mixtral", "qwen2_moe"]


@pytest.mark.parametrize("kind", KINDS)
def test_from_hf_same_function_and_gradients(kind):
    block = _block(kind)
    layer = hf.from_hf(block)
    x = torch.randn(2, 7, H)
    x_ref = x.clone().requires_grad_()
    ref = block(x_ref)
    y = layer(x.requires_grad_())
    assert_close(y, ref, 1e-5, f"{kind} output")
    g = torch.randn_like(y)
    ref.backward(g)
    y.backward(g)
    assert_close(x.grad, x_ref.grad, 1e-5, f"{kind} input gradient")
    grads = {name: p.grad for name, p in layer.named_parameters()}
    hf.to_stock(grads, "", layer.hf_family, layer.config.num_routed_experts)  # under the block's names and layout
    ref_grads = dict(block.named_parameters())
    assert set(grads) == set(ref_grads)
    for name, p in ref_grads.items():
        assert_close(grads[name], p.grad, 1e-5, f"{kind} grad {name}")


def test_from_hf_carries_routing_details():
    v3 = hf.config_from_hf(_block("deepseek_v3"))
    assert (v3.score_func, v3.group_score, v3.num_groups, v3.topk_groups, v3.norm_topk_prob,
            v3.routed_scaling_factor, v3.num_shared_experts, v3.shared_width) == \
        ("sigmoid", "top2_sum", 4, 2, True, 2.5, 1, 32)
    layer = hf.from_hf(_block("deepseek_v3"))
    assert layer.gate.e_score_correction_bias.abs().sum() > 0
    qwen = hf.config_from_hf(_block("qwen2_moe"))
    assert qwen.shared_expert_gate and qwen.shared_width == 40 and not qwen.norm_topk_prob
    mix = hf.config_from_hf(_block("mixtral"))
    assert (mix.num_shared_experts, mix.norm_topk_prob, mix.top_k) == (0, True, 2)
    with pytest.raises(TypeError, match="not a supported block"):
        hf.from_hf(torch.nn.Linear(4, 4))


def test_from_hf_per_expert_modulelist_layout():
    """transformers < 5 stored experts as a ModuleList of MLPs; rebuild that layout from a v5 Mixtral block."""
    block = _block("mixtral")
    E, I = 8, 24

    class Expert(torch.nn.Module):
        def __init__(self, e):
            super().__init__()
            self.w1 = torch.nn.Linear(H, I, bias=False)
            self.w3 = torch.nn.Linear(H, I, bias=False)
            self.w2 = torch.nn.Linear(I, H, bias=False)
            self.act_fn = torch.nn.SiLU()
            with torch.no_grad():
                self.w1.weight.copy_(block.experts.gate_up_proj[e, :I])
                self.w3.weight.copy_(block.experts.gate_up_proj[e, I:])
                self.w2.weight.copy_(block.experts.down_proj[e])

    old = type("MixtralSparseMoeBlock", (torch.nn.Module,), {})()
    old.gate = torch.nn.Linear(H, E, bias=False)
    old.gate.weight.data.copy_(block.gate.weight)
    old.experts = torch.nn.ModuleList(Expert(e) for e in range(E))
    old.top_k, old.jitter_noise = 2, 0.0
    layer = hf.from_hf(old)
    x = torch.randn(9, H)
    with torch.no_grad():
        assert_close(layer(x), block(x.unsqueeze(0)).squeeze(0), 1e-5, "per-expert layout")


def _tiny_causal_lm(kind):
    if kind == "deepseek_v3":
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
        cfg = DeepseekV3Config(vocab_size=97, hidden_size=H, intermediate_size=48, moe_intermediate_size=16,
                               num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
                               num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                               n_group=2, topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                               qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64)
        return DeepseekV3ForCausalLM(cfg)
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=97, hidden_size=H, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["deepseek_v3", "mixtral"])
def test_replace_moe_blocks_keeps_logits(kind):
    torch.manual_seed(0)
    model = _tiny_causal_lm(kind).eval()
    if kind == "deepseek_v3":
        for layer in model.model.layers[1:]:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.3)
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    n = hf.replace_moe_blocks(model)
    assert n == (2 if kind == "deepseek_v3" else 2)
    assert len(hf.moe_layers(model)) == n
    with torch.no_grad():
        got = model(ids).logits
    assert_close(got, ref, 1e-5, f"{kind} logits")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=H, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


MOE = dm.MoEConfig(hidden_size=H, expert_hidden_size=8, num_routed_experts=8, num_shared_experts=1, top_k=2,
                   aux_loss_alpha=0.01, bias_update_speed=1e-3)


def test_moefy_upcycle_preserves_logits_then_trains_and_round_trips(tmp_path):
    model = _tiny_llama()
    ids = torch.randint(0, 101, (4, 16))
    with torch.no_grad():
        dense = model(ids).logits
    assert hf.moefy(model, MOE, init="upcycle") == 2
    layers = hf.moe_layers(model)
    assert all(l.config.shared_width == 56 for l in layers.values())
    with torch.no_grad():
        assert_close(model(ids).logits, dense, 1e-6, "upcycled logits")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids)
        loss = out.loss + dm.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hf.update_biases(model)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert set(hf.expert_load(model)) == {f"{n}/{k}" for n in layers for k in ("num_dropped", "max_vio", "cv")}
    # save -> load: a fresh dense model moefied the same way takes the saved weights as they are.
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    fresh = _tiny_llama()
    hf.moefy(fresh, MOE, init="upcycle")
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    # The correction bias learned by update_biases() is part of the checkpoint.
    name = next(iter(layers))
    assert torch.equal(fresh.get_submodule(name).gate.e_score_correction_bias,
                       layers[name].gate.e_score_correction_bias)


def test_moefy_layers_predicate_and_errors():
    model = _tiny_llama()
    assert hf.moefy(model, MOE, layers=[1]) == 1
    assert isinstance(model.model.layers[1].mlp, dm.DeepSeekMoELayer)
    assert not isinstance(model.model.layers[0].mlp, dm.DeepSeekMoELayer)
    with pytest.raises(ValueError, match="init"):
        hf.moefy(model, MOE, init="copy")
    with pytest.raises(ValueError, match=r"layers=\[5\] has indices \[5\] outside the 1 matched MLPs"):
        hf.moefy(model, MOE, layers=[5])
    assert hf.moefy(model, MOE) == 1  # only layer 0 is left: MoE layers (and their shared experts) are skipped
    assert isinstance(model.model.layers[1].mlp.shared_experts, dm.experts.SharedExperts)
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=H, n_layer=2, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match="init='random'"):
        hf.moefy(gpt2, MOE, init="upcycle", predicate=lambda n, m: hf.is_plain_mlp(m))
    # The default predicate finds no gated MLP in GPT-2: the same documented error, not a silent 0.
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp \(GPT2MLP\) and 1 more is not a gated .*"
                                         r"init='random'"):
        hf.moefy(gpt2, MOE, init="upcycle")
    assert hf.moefy(gpt2, MOE, init="random") == 2
    with pytest.raises(ValueError, match="found no MLP to replace in GPT2LMHeadModel .already MoE: 2 layers."):
        hf.moefy(gpt2, MOE, init="random")
    out = gpt2(torch.randint(0, 50, (2, 8)))
    assert out.logits.shape == (2, 8, 50)


def test_trainer_helpers_add_aux_loss_update_biases_and_log(tmp_path):
    from transformers import TrainingArguments

    model = _tiny_llama()
    hf.moefy(model, MOE, init="upcycle")
    ids = torch.randint(0, 101, (8, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    seen_aux = []

    class Recording(hf.aux_loss_trainer()):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            seen_aux.append(dm.aux_loss(model).item())
            return loss

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Recording(model=model, args=args, train_dataset=data, callbacks=[hf.trainer_callback()])
    trainer.train()
    assert len(seen_aux) == 3 and all(a > 0 for a in seen_aux)
    logged = [entry for entry in trainer.state.log_history if any(k.startswith("moe/") for k in entry)]
    assert logged and all(k.endswith("max_vio") for k in logged[0] if k.startswith("moe/"))
    biases = [layer.gate.e_score_correction_bias for layer in hf.moe_layers(model).values()]
    assert all(b.abs().sum() > 0 for b in biases)  # bias_update_speed > 0: the callback ran update_bias


def test_calibrate_routing_balances_each_layer_on_the_inputs_it_will_see():
    """Layers are calibrated in the order they run: a plain forward afterwards reproduces every reported MaxVio,
    which holds only if each layer was calibrated on inputs routed by the already-calibrated layers before it."""
    torch.manual_seed(0)
    model = _tiny_llama()
    with pytest.raises(ValueError, match="no DeepSeekMoELayer"):
        hf.calibrate_routing(model, torch.zeros(1, 4, dtype=torch.long))
    hf.moefy(model, MOE.replace(num_routed_experts=16), init="random")
    _randomize(model, std=0.2)
    model.train()
    ids = torch.randint(0, 101, (8, 32))
    stats = hf.calibrate_routing(model, ids)
    layers = hf.moe_layers(model)
    assert set(stats) == set(layers) and model.training
    assert all(s["max_vio_after"] < s["max_vio_before"] for s in stats.values()), stats
    model.eval()
    with torch.no_grad():
        model(ids)
    for name, layer in layers.items():
        assert layer.last_stats["max_vio"] == pytest.approx(stats[name]["max_vio_after"]), name


def test_calibrate_routing_ignores_padding_and_leaves_modes_and_pending_losses_alone():
    torch.manual_seed(0)
    model = _tiny_llama()
    hf.moefy(model, MOE.replace(num_routed_experts=16), init="random")
    _randomize(model, std=0.2)
    ids = torch.randint(0, 101, (4, 32))
    attention_mask = torch.ones(4, 32, dtype=torch.long)
    attention_mask[:2, 12:] = 0
    layers = hf.moe_layers(model)
    # A pending training step: its aux loss (with grad_fn) and load must survive a calibration.
    model.train()
    model.model.layers[0].self_attn.eval()  # a submodule the user froze in eval stays in eval
    model(ids)
    pending = {n: (l.aux_loss, l.tokens_per_expert) for n, l in layers.items()}
    masked = hf.calibrate_routing(model, ids, attention_mask=attention_mask)
    assert model.training and not model.model.layers[0].self_attn.training
    assert all(l.aux_loss is pending[n][0] and l.tokens_per_expert is pending[n][1] for n, l in layers.items())
    biases = {n: l.gate.e_score_correction_bias.clone() for n, l in layers.items()}
    for l in layers.values():
        l.gate.e_score_correction_bias.zero_()
    with dm.padding_mask(attention_mask == 0):
        explicit = hf.calibrate_routing(model, ids, attention_mask=attention_mask)
    assert explicit == masked
    assert all(torch.equal(l.gate.e_score_correction_bias, biases[n]) for n, l in layers.items())
    for l in layers.values():
        l.gate.e_score_correction_bias.zero_()
    assert hf.calibrate_routing(model, ids) != masked  # the padding, counted, changes the answer


def test_calibrate_routing_takes_a_mask_passed_positionally_and_calibrates_a_reused_layer_once():
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, top_k=2)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = layer

        def forward(self, x, pad):
            return self.moe(self.moe(x, pad), pad)

    x = torch.randn(2, 10, 16) + 3 * torch.randn(16)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 4:] = True
    x[pad] = 50.0
    stats = hf.calibrate_routing(Twice(), x, pad)
    layer.gate.e_score_correction_bias.zero_()
    assert stats == {"moe": layer.calibrate_bias(x, pad)}
