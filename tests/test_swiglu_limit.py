"""The clamped SwiGLU of DeepSeek-V4 and gpt-oss (``swiglu_limit`` L): silu(min(gate, L)) · clamp(up, −L, L) in the
routed and the shared experts (transformers 5.25's DeepseekV4Experts._apply_gate and DeepseekV4MLP), with its
gradient zero where a clamp is active. Every backend (the Triton and C++ kernels clamp in their epilogues) against
float64 formulas written here, with padding and experts that receive no tokens; and, under hypothesis, every backend
against the eager oracle with sqrt-softplus routing, outputs and every gradient."""
import importlib.util

import pytest
import torch
from hypothesis import given, settings, strategies as st

import deepseek_moe as dm
from deepseek_moe.testing import assert_close
from conftest import interpreted_examples
from float64_reference import moe_rows

BACKENDS = ["eager", "torch", "triton", "ext"]

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


def needs(backend):
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("the triton extra is not installed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamped_swiglu_outputs_and_every_gradient_against_float64(backend):
    needs(backend)
    torch.manual_seed(0)
    layer = make_layer(backend)
    with torch.no_grad():
        layer.gate.e_score_correction_bias[-1] = -100.0  # the last expert receives no tokens
    x = torch.randn(3, 6, H) * 3
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[2, 4:] = True
    y = layer(x, padding_mask=mask)
    assert layer.backend.name == backend
    y_ref, params, idx = by_formula(layer, x[~mask])
    assert (idx != E - 1).all()
    assert_close(y[~mask], y_ref, 1e-5, "y")
    r = torch.randn_like(y)
    (y * r).sum().backward()
    (y_ref * r[~mask].double()).sum().backward()
    for name, p in layer.named_parameters():
        assert_close(p.grad, params[name].grad, 1e-5, f"grad {name}")
    assert (layer.experts.gate_up_proj.grad[E - 1] == 0).all() and (layer.experts.down_proj.grad[E - 1] == 0).all()
    h_NJ = torch.einsum("th,ejh->tej", x[~mask], layer.experts.gate_up_proj.detach())
    assert (h_NJ[..., :I] > L).float().mean() > 0.2 and (h_NJ[..., I:].abs() > L).float().mean() > 0.2, \
        "both clamps are active on a good share of the routed units"
    unclamped = make_layer(backend, swiglu_limit=None)
    unclamped.load_state_dict(layer.state_dict())
    assert not torch.allclose(unclamped(x, padding_mask=mask), y)


@st.composite
def cases(draw):
    E = draw(st.integers(2, 10))
    # T, H >= 8: the gate's gradient sums several tokens' dot products of H terms (see agree_with_eager).
    return dict(T=draw(st.integers(8, 24)), E=E, K=draw(st.integers(1, min(E, 4))), H=draw(st.integers(8, 20)),
                I=draw(st.integers(4, 12)), limit=draw(st.sampled_from([0.05, 0.25, 1.0, 7.0])),
                empty=draw(st.integers(0, E - 1)), dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                padded=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def agree_with_eager(backend, c):
    """The layer on ``backend`` against the eager oracle with the same weights: output and every gradient."""
    torch.manual_seed(c["seed"])
    fields = dict(hidden_size=c["H"], expert_hidden_size=c["I"], num_routed_experts=c["E"], num_shared_experts=1,
                  top_k=c["K"], score_func="sqrtsoftplus",
                  norm_topk_prob=c["K"] > 1,  # with one expert the normalised weight is 1: the gate gets no gradient routed_scaling_factor=1.5,
                  swiglu_limit=c["limit"], initializer_range=0.3, aux_loss_alpha=0.0)
    oracle = dm.DeepSeekMoELayer(**fields, backend="eager").to(c["dtype"])
    with torch.no_grad():
        oracle.gate.e_score_correction_bias[:c["empty"]] = -100.0  # experts that receive no tokens
    layer = dm.DeepSeekMoELayer(**fields, backend=backend).to(c["dtype"])
    layer.load_state_dict(oracle.state_dict())
    x = (torch.randn(1, c["T"], c["H"]) * 2).to(c["dtype"])
    mask = torch.zeros(1, c["T"], dtype=torch.bool)
    if c["padded"]:
        mask[0, c["T"] // 2:] = True
    r = torch.randn(1, c["T"], c["H"])
    outs = []
    for model in (layer, oracle):
        x_in = x.clone().requires_grad_()
        y = model(x_in, padding_mask=mask)
        (y.float() * r).sum().backward()
        outs.append([("y", y), ("grad x", x_in.grad)] + [(f"grad {n}", p.grad) for n, p in model.named_parameters()])
    assert layer.backend.name == backend
    fp32 = c["dtype"] == torch.float32
    tol, gate_tol = (1e-5, 1e-3) if fp32 else (3e-2, 1e-1)
    for (name, a), (_, b) in zip(*outs):
        # The gate's gradient goes through <expert output, grad y> per pair, a dot product over H terms that can
        # cancel to a small value, where the implementations' different summation orders show as a large relative
        # error (tests/test_equivalence.py measures it against the terms' scale); a missing clamp is O(1).
        assert_close(a, b, gate_tol if name == "grad gate.weight" else tol, f"{backend} {name}")


@settings(deadline=None)
@given(c=cases())
@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_every_backend_equals_the_eager_oracle_with_clamp_and_sqrt_softplus(backend, c):
    agree_with_eager(backend, c)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the triton extra is not installed")
@settings(max_examples=interpreted_examples(), deadline=None)
@given(c=cases())
def test_triton_equals_the_eager_oracle_with_clamp_and_sqrt_softplus(c):
    """Few examples: on CPU the kernels run in Triton's interpreter."""
    agree_with_eager("triton", c)


def test_the_limit_is_validated():
    with pytest.raises(dm.ConfigError, match="swiglu_limit"):
        make_layer("torch", swiglu_limit=0)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_a_nan_stays_nan_through_the_clamp(backend):
    """torch.clamp keeps a NaN: the fused clamps must give the NaNs the eager oracle gives in the output and the
    input's gradient, not a finite number (Triton's min/max drop NaN unless told otherwise)."""
    needs(backend)

    def nans(name, column):
        torch.manual_seed(0)
        layer = make_layer(name, num_shared_experts=0)
        with torch.no_grad():
            layer.experts.gate_up_proj[:, column, 5] = float("nan")
        x = torch.randn(1, 6, H, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        return [t.isnan() for t in (y, x.grad)]

    for column in (3, I + 3):  # a gate unit, an up unit
        expected = nans("eager", column)
        assert expected[0].any()
        for got, want in zip(nans(backend, column), expected):
            assert torch.equal(got, want)
