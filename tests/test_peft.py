"""PEFT LoRA on the layer: ``target_parameters`` on the fused experts and the router, ``target_modules`` on the shared
experts, on every backend, on a bare layer and on converted transformers models.

The oracle is PEFT's documented update applied by hand in float64: W' = W + (α/r)·B·A per adapted weight (for a
3-D expert stack (E, out, in), PEFT's factors are A (r·E, in) read as (E, r, in) and B (out, r·E) read as
(out, r, E)), put into a float64 eager layer with torch.func.functional_call; for converted models the stock
transformers model with the same adapter."""
import os

import pytest
import torch
from torch.func import functional_call

import deepseek_moe as dm
from deepseek_moe.invariant import deterministic_algorithms
from deepseek_moe.testing import assert_close, require_extension

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

H, E, R, ALPHA = 32, 8, 4, 8
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
SHARED = ["shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]


def lora_config(router=True, shared=True):
    return LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False,  # B random too: the update is not zero
                      target_parameters=EXPERTS + (["gate.weight"] if router else []),
                      target_modules=SHARED if shared else None)


def make_layer(backend="torch", **fields):
    base = dict(hidden_size=H, expert_hidden_size=16, num_routed_experts=E, num_shared_experts=1, top_k=2,
                score_func="sigmoid", norm_topk_prob=True, num_groups=4, topk_groups=2, backend=backend)
    return dm.DeepSeekMoELayer(**{**base, **fields})


def _factors(peft_model):
    """{adapted parameter's name in the bare layer: (A, B) as float64 leaves}, read from PEFT's modules."""
    out = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        target = name.split("base_model.model.", 1)[1].replace(".base_layer", "")
        param = getattr(module, "parameter_name", "weight")
        A = module.lora_A["default"].weight.detach().double().requires_grad_()
        B = module.lora_B["default"].weight.detach().double().requires_grad_()
        out[f"{target}.{param}"] = (A, B, module.lora_A["default"].weight, module.lora_B["default"].weight)
    return out


def merged_by_hand(base_state, factors):
    """{name: W + (α/r)·B·A} in float64 for every adapted weight (differentiable w.r.t. the factors)."""
    params = {}
    for name, (A, B, _, _) in factors.items():
        W = base_state[name].double()
        if W.dim() == 3:  # PEFT's expert factors: A (E·r, in) -> (E, r, in); B (out, r·E) -> (out, r, E)
            Ee, out_f, in_f = W.shape
            A_e = A.reshape(Ee, R, in_f)
            B_e = B.reshape(out_f, R, Ee).permute(2, 0, 1)
            params[name] = W + (ALPHA / R) * torch.bmm(B_e, A_e)
        else:
            params[name] = W + (ALPHA / R) * B @ A
    return params


BACKENDS = ["eager", "torch", "triton", "ext"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_gradients_equal_a_float64_merged_weight_reference(backend):
    if backend == "ext":
        require_extension()
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton extra is not installed")
    torch.manual_seed(0)
    layer = make_layer(backend)
    base_state = {k: v.clone() for k, v in layer.state_dict().items()}
    model = get_peft_model(layer, lora_config())
    assert model.base_model.model is layer and layer.backend.name == backend
    x = torch.randn(3, 6, H)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[2, 4:] = True
    r = torch.randn(3, 6, H)
    y = model(x, padding_mask=mask)
    (y * r).sum().backward()

    factors = _factors(model)
    assert sorted(factors) == sorted(["gate.weight"] + EXPERTS + [s + ".weight" for s in SHARED])
    ref = make_layer("eager").double()
    ref.load_state_dict(base_state)
    params = {**{k: v.double() for k, v in base_state.items()}, **merged_by_hand(base_state, factors)}
    y_ref = functional_call(ref, params, (x.double(),), {"padding_mask": mask})
    assert_close(y, y_ref, 1e-6, "LoRA output")
    (y_ref * r.double()).sum().backward()
    for name, (A, B, A32, B32) in factors.items():
        assert_close(A32.grad, A.grad, 1e-6, f"{name} lora_A grad")
        assert_close(B32.grad, B.grad, 1e-6, f"{name} lora_B grad")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


def test_merge_and_unload_and_the_layer_api_under_the_wrappers():
    torch.manual_seed(0)
    layer = make_layer(bias_update_speed=0.01)
    model = get_peft_model(layer, lora_config())
    x = torch.randn(2, 5, H)
    model(x)  # the load the bias update reads
    assert layer.router is not layer.gate and layer.routed_experts is not layer.experts
    layer.update_bias()  # the bias lives in the wrapped Router
    assert layer.router.e_score_correction_bias.abs().sum() > 0
    wrapped = model(x).detach()  # after the update: a bias step can change a choice (it did under PEFT 0.22's draws)
    with dm.record_routing(model) as routes:
        model(x)
    assert list(routes) == ["base_model.model"]
    merged = model.merge_and_unload()
    assert merged is layer and type(layer.gate) is dm.Router and type(layer.experts).__name__ == "RoutedExperts"
    with torch.no_grad():
        assert_close(merged(x), wrapped, 1e-6, "merged vs adapter")
    wrapped_layer = make_layer()
    get_peft_model(wrapped_layer, lora_config())
    with pytest.raises(ValueError, match="shard first, then add the adapters"):
        dm.parallel.shard_experts(wrapped_layer)


def test_lora_by_target_parameters_keeps_deterministic_mode_batch_invariant():
    torch.manual_seed(0)
    shared = [name + ".weight" for name in SHARED]
    config = LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False,
                        target_parameters=EXPERTS + ["gate.weight"] + shared)
    model = get_peft_model(make_layer(shared_expert_gate=True), config).eval()
    x = torch.randn(20, H)
    with deterministic_algorithms(), torch.no_grad():
        alone = torch.cat([model(x[t:t + 1]) for t in range(20)])
        batch = model(x)
    assert torch.equal(alone, batch)
    # target_modules wraps the shared projections in PEFT's lora.Linear, outside the mode's arithmetic: refused in
    # eval (a warning with warn_only=True), allowed in training, where the mode promises repeatability only.
    wrapped = get_peft_model(make_layer(), lora_config()).eval()
    with deterministic_algorithms(), pytest.raises(RuntimeError, match="target_parameters=\\['shared_experts"):
        wrapped(x)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="batch-invariant"):
            wrapped(x)
    finally:
        torch.use_deterministic_algorithms(False)
    with deterministic_algorithms():
        wrapped.train()(x)


# ------------------------------------------------------------------------------------ converted transformers models
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from deepseek_moe import hf  # noqa: E402
from test_hf_fidelity import _batch, _model  # noqa: E402

Auto = transformers.AutoModelForCausalLM


def _hf_lora_config(family="mixtral"):
    """Attention, routed experts, router, and the shared experts under the stock block's name: by module for Qwen2-MoE,
    by parameter for DeepSeek-V3 (PEFT maps a DeepSeek-V3 target module ending in gate/up/down_proj to the fused
    routed experts)."""
    shared = {"deepseek_v3": "shared_experts", "qwen2_moe": "shared_expert"}.get(family)
    projections = [f"mlp.{shared}.{p}" for p in ("gate_proj", "up_proj", "down_proj")] if shared else []
    by_module = family == "qwen2_moe"
    return LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False,
                      target_modules=["q_proj", "v_proj"] + (projections if by_module else []),
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]
                      + ([] if by_module else [f"{p}.weight" for p in projections]))


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_converted_models_train_with_lora_and_adapters_move_to_the_stock_class(family, tmp_path):
    """Qwen2-MoE names its shared expert ``shared_expert`` (DeepSeek ``shared_experts``): the converted layer keeps
    the family's name, so adapters on it move both ways."""
    ids = _batch(1)
    _model(family).save_pretrained(tmp_path / "base")
    with hf.converted_at_construction():
        converted = Auto.from_pretrained(tmp_path / "base")
    stock = Auto.from_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    ours = get_peft_model(converted, _hf_lora_config(family))
    theirs = get_peft_model(stock, _hf_lora_config(family))
    loaded = set_peft_model_state_dict(theirs, get_peft_model_state_dict(ours))
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    n_experts = sum(1 for n, _ in ours.named_parameters() if "mlp.experts." in n and "lora_A" in n)
    assert n_experts == 4, "two MoE layers x (gate_up_proj, down_proj)"
    shared = [n for n, _ in ours.named_parameters() if ".shared_expert" in n and "lora_A" in n]
    assert sorted(shared) == sorted(n for n, _ in theirs.named_parameters() if ".shared_expert" in n and "lora_A" in n)
    assert len(shared) == (0 if family == "mixtral" else 6), shared

    for m in (ours, theirs):  # the stock model is the oracle: same logits, same LoRA gradients
        m.train()
        m(ids, labels=ids).loss.backward()
    assert_close(ours(ids).logits, theirs(ids).logits, 1e-5, f"{family} logits")
    grads_ours, grads_theirs = _lora_grads(ours), _lora_grads(theirs)
    assert sorted(grads_ours) == sorted(grads_theirs) and grads_ours
    for name in grads_ours:
        assert_close(grads_ours[name], grads_theirs[name], 1e-5, f"{family} {name}")

    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = ours(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    ours.eval()
    with torch.no_grad():
        trained = ours(ids).logits

    ours.save_pretrained(tmp_path / "adapter")
    with hf.converted_at_construction():
        fresh = Auto.from_pretrained(tmp_path / "base")
    again = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    stock_again = PeftModel.from_pretrained(Auto.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, trained)
        assert_close(stock_again(ids).logits, trained, 1e-5, f"{family} adapter in the stock class")

    merged = ours.merge_and_unload()
    with torch.no_grad():
        assert_close(merged(ids).logits, trained, 1e-6, f"{family} merged")
    merged.save_pretrained(tmp_path / "merged")
    back = Auto.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_close(back(ids).logits, trained, 1e-5, f"{family} merged, saved, stock class")


def test_disabled_or_merged_target_modules_adapters_are_not_refused_in_the_mode():
    torch.manual_seed(0)
    model = get_peft_model(make_layer(), lora_config()).eval()
    x = torch.randn(20, H)
    with deterministic_algorithms(), torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(torch.cat([model(x[t:t + 1]) for t in range(20)]), model(x))
        model.merge_adapter()
        assert torch.equal(torch.cat([model(x[t:t + 1]) for t in range(20)]), model(x))
