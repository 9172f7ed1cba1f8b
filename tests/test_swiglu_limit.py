"""The clamped SwiGLU of DeepSeek-V4 and gpt-oss (``swiglu_limit`` L): silu(min(gate, L)) · clamp(up, −L, L) in the
routed and the shared experts (transformers 5.25's DeepseekV4Experts._apply_gate and DeepseekV4MLP), with its
gradient zero where a clamp is active. Against float64 formulas written here, every backend that computes it, with
padding and experts that receive no tokens; the fused backends refuse it by name."""
import pytest
import torch

import deepseek_moe as dm
from deepseek_moe.backends import BackendUnavailable
from deepseek_moe.testing import assert_close
from float64_reference import moe_rows

H, E, K, I, L = 16, 8, 2, 8, 0.05


def make_layer(backend, **fields):
    base = dict(hidden_size=H, expert_hidden_size=I, num_routed_experts=E, num_shared_experts=1, top_k=K,
                score_func="sqrtsoftplus", norm_topk_prob=True, swiglu_limit=L, backend=backend,
                initializer_range=0.2, aux_loss_alpha=0.0)
    return dm.DeepSeekMoELayer(**{**base, **fields})


def by_formula(layer, x_TH):
    params = {n: t.detach().double().clone().requires_grad_() for n, t in layer.named_parameters()}
    x = x_TH.double()
    s = torch.sqrt(torch.log1p(torch.exp(x @ params["gate.weight"].T)))
    idx = (s.detach() + layer.gate.e_score_correction_bias.double()).topk(K, dim=-1).indices
    w = s.gather(1, idx)
    w = w / w.sum(-1, keepdim=True)
    return moe_rows(params, x, idx, w, limit=L), params, idx


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_clamped_swiglu_outputs_and_every_gradient_against_float64(backend):
    torch.manual_seed(0)
    layer = make_layer(backend)
    with torch.no_grad():
        layer.gate.e_score_correction_bias[-1] = -100.0  # the last expert receives no tokens
    x = torch.randn(3, 6, H) * 3
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[2, 4:] = True
    y = layer(x, padding_mask=mask)
    y_ref, params, idx = by_formula(layer, x[~mask])
    assert (idx != E - 1).all()
    assert_close(y[~mask], y_ref, 1e-5, "y")
    r = torch.randn_like(y)
    (y * r).sum().backward()
    (y_ref * r[~mask].double()).sum().backward()
    for name, p in layer.named_parameters():
        assert_close(p.grad, params[name].grad, 1e-5, f"grad {name}")
    assert (layer.experts.gate_up_proj.grad[E - 1] == 0).all() and (layer.experts.down_proj.grad[E - 1] == 0).all()
    h = x[~mask] @ layer.shared_experts.gate_proj.weight.T
    assert (h > L).float().mean() > 0.2, "the clamp is active on a good share of the units"
    unclamped = make_layer(backend, swiglu_limit=None)
    unclamped.load_state_dict(layer.state_dict())
    assert not torch.allclose(unclamped(x, padding_mask=mask), y)


def test_fused_backends_refuse_the_clamp_and_auto_picks_torch():
    for backend in ("triton", "ext"):
        with pytest.raises(BackendUnavailable, match="unclamped GLU only, not swiglu_limit=0.05"):
            make_layer(backend)(torch.randn(2, H))
    assert make_layer("auto").backend.name == "torch"
    with pytest.raises(dm.ConfigError, match="swiglu_limit"):
        make_layer("torch", swiglu_limit=0)
