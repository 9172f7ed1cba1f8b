"""Deterministic, batch-invariant mode: under torch.use_deterministic_algorithms(True) every backend gives the same
bits run after run, and in eval a token's output is bitwise the same alone, in any batch and at any position;
its values stay those of the float64 reference (within fp32 rounding). Without the mode the CPU GEMMs already
differ between a token alone and in a batch (the first test), so these tests can fail."""

import pytest
import torch

import deepseek_moe as dm
from deepseek_moe import invariant
from deepseek_moe.invariant import deterministic_algorithms
from deepseek_moe.backends import BackendUnavailable
from deepseek_moe.testing import assert_close, ran_ops, require_extension

H = 64


def make_layer(backend, dtype=torch.float32, **fields):
    base = dict(hidden_size=H, expert_hidden_size=48, num_routed_experts=16, num_shared_experts=1, top_k=4,
                backend=backend)
    return dm.DeepSeekMoELayer(**{**base, **fields}).to(dtype)


CASES = [
    ("eager", torch.float32, dict()),
    ("eager", torch.bfloat16, dict(score_func="sigmoid", num_groups=4, topk_groups=2, norm_topk_prob=True)),
    ("torch", torch.float32, dict(score_func="sigmoid", num_groups=4, topk_groups=2, norm_topk_prob=True,
                                  hidden_act="gelu")),
    ("torch", torch.bfloat16, dict()),
    ("torch", torch.float32, dict(expert_hidden_size=40, num_shared_experts=2, shared_expert_gate=True)),
    # Triton's CPU interpreter computes bf16 tl.dot wrongly (docs/kernels.md): fp32 only here.
    ("triton", torch.float32, dict(score_func="sigmoid", norm_topk_prob=True)),
]


def _batches(x_TH, layer):
    """(a token alone, the batch, a permuted batch, the batch behind 150 other tokens, a sub-batch) outputs."""
    T = x_TH.shape[0]
    perm = torch.randperm(T)
    others = torch.randn(150, H, dtype=x_TH.dtype)
    with torch.no_grad():
        return (torch.cat([layer(x_TH[t:t + 1]) for t in range(T)]), layer(x_TH),
                layer(x_TH[perm])[perm.argsort()], layer(torch.cat([others, x_TH]))[150:],
                layer(x_TH[3:20]))


def _assert_invariant_and_true(layer, x_TH, outputs, fields):
    """:func:`_batches`' outputs bit for bit the same, and the batch's within rounding of the float64 reference."""
    alone, batch, permuted, behind, sub = outputs
    assert torch.equal(alone, batch), f"{int((alone != batch).any(1).sum())} of {len(x_TH)} tokens differ alone"
    assert torch.equal(permuted, batch)
    assert torch.equal(behind, batch)
    assert torch.equal(sub, batch[3:20])
    ref = make_layer("eager", torch.float64, **fields)
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        expected = ref.eval()(x_TH.double())
    tol = 1e-5 if x_TH.dtype == torch.float32 else 3e-2
    assert_close(batch, expected, tol, "batch-invariant vs float64")


def test_without_the_mode_a_token_alone_and_in_a_batch_differ():
    """Why the mode exists: CPU BLAS sums a row's products in another order in a batch than alone."""
    layer = make_layer("torch", num_shared_experts=4).eval()
    x = torch.randn(64, H)
    alone, batch, *_ = _batches(x, layer)
    assert not torch.equal(alone, batch)


def _numpy_matmul_is_row_invariant() -> bool:
    """Whether numpy's matmul gives a row the same bits at every position of an operand of one shape (OpenBLAS's
    Haswell kernel, on AVX2 CPUs such as AMD Zen 3, does not: rows at some positions are summed in another order)."""
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((32, 64)).astype(np.float32)
    b = rng.standard_normal((64, 32)).astype(np.float32)
    first = np.matmul(a, b)[0]
    for p in range(1, 32):
        moved = np.zeros_like(a)
        moved[p] = a[0]
        if not np.array_equal(np.matmul(moved, b)[p], first):
            return False
    return True


@pytest.fixture
def row_invariant_interpreter_dot(monkeypatch):
    """Triton's CPU interpreter computes tl.dot with numpy's matmul, which decides its row invariance by the host's
    BLAS kernel, not by the Triton kernel (a GPU's tensor cores compute every row of a tile alike). Where numpy's
    matmul is not row-invariant, the interpreter's dot runs a row at a time (the same numpy call for every row), so
    that what the test checks is the kernels' own order of work."""
    if _numpy_matmul_is_row_invariant():
        return
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    create_dot = InterpreterBuilder.create_dot

    def rowwise(self, a, b, d, *args):
        rows = [create_dot(self, TensorHandle(a.data[..., i:i + 1, :], a.dtype.scalar), b,
                           TensorHandle(d.data[..., i:i + 1, :], d.dtype.scalar), *args).data
                for i in range(a.data.shape[-2])]
        return TensorHandle(np.concatenate(rows, axis=-2), d.dtype.scalar)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", rowwise)


@pytest.mark.parametrize("backend,dtype,fields", CASES, ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "defaults")
def test_eval_outputs_are_bitwise_batch_invariant(backend, dtype, fields, request):
    if backend == "triton":
        request.getfixturevalue("row_invariant_interpreter_dot")
    torch.manual_seed(0)
    layer = make_layer(backend, dtype, **fields).eval()
    x = torch.randn(70, H, dtype=dtype)
    with deterministic_algorithms():
        assert layer.backend.batch_invariant
        outputs = _batches(x, layer)
    _assert_invariant_and_true(layer, x, outputs, fields)


@pytest.mark.parametrize("backend,dtype,fields", CASES[:4] + CASES[5:], ids=lambda v: str(v) if not isinstance(
    v, dict) else ",".join(f"{k}={w}" for k, w in v.items()) or "defaults")
def test_training_steps_are_bitwise_repeatable(backend, dtype, fields):
    torch.manual_seed(0)
    layer = make_layer(backend, dtype, aux_loss_alpha=0.01, capacity_factor=1.25, **fields)
    x = torch.randn(4, 12, H, dtype=dtype)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[2, 7:] = True

    def step():
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        y = layer(xr, padding_mask=mask)
        (y.float().square().mean() + layer.aux_loss).backward()
        return [y.detach(), layer.aux_loss.detach(), xr.grad] + [p.grad.clone() for p in layer.parameters()]

    with deterministic_algorithms():
        first, second = step(), step()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = make_layer("eager", torch.float64, aux_loss_alpha=0.01, capacity_factor=1.25, **fields)
    ref.load_state_dict(layer.state_dict())
    xd = x.double().requires_grad_()
    y = ref(xd, padding_mask=mask)
    (y.square().mean() + ref.aux_loss).backward()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert_close(first[0], y, tol, "y")
    for (name, p), g in zip(ref.named_parameters(), first[3:]):
        assert_close(g, p.grad, tol if dtype == torch.float32 else 1e-1, f"grad {name}")


EXT_CASES = [
    (torch.float32, dict(score_func="sigmoid", num_groups=4, topk_groups=2, norm_topk_prob=True)),
    (torch.bfloat16, dict()),
    # 11 experts: where ATen's sigmoid/softplus kernels would give a token alone other bits; the shared experts
    # behind a gate run outside the op (invariant.linear)
    (torch.float32, dict(score_func="sqrtsoftplus", num_routed_experts=11, top_k=3, expert_hidden_size=40,
                         num_shared_experts=2, shared_expert_gate=True, swiglu_limit=7.0)),
]


@pytest.mark.parametrize("dtype,fields", EXT_CASES, ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "defaults")
def test_ext_inference_is_bitwise_batch_invariant_through_its_decode_op_at_every_token_count(dtype, fields):
    """In the mode the ext backend runs every CPU inference call through its decode op (csrc/cpu/expert_gemv.cpp:
    each output a fixed-order sum over the token's own pairs) and its gate GEMM (router_logits): a token alone, in
    a batch of 70, permuted, behind 150 others (220 tokens, past where the op decodes outside the mode) and in a
    sub-batch, bit for bit, and within rounding of the float64 reference."""
    require_extension()
    torch.manual_seed(0)
    layer = make_layer("ext", dtype, **fields).eval()
    x = torch.randn(70, H, dtype=dtype)
    with deterministic_algorithms():
        outputs, ran = ran_ops(lambda: _batches(x, layer))
        with torch.no_grad():
            impl = layer._implementation(x.device, dtype, 220)
    assert impl.name == "ext" and impl.strategy == "decode" and impl.batch_invariant
    assert {"deepseek_moe::expert_gemv", "deepseek_moe::router_logits"} <= ran
    assert "deepseek_moe::expert_blocks" not in ran
    _assert_invariant_and_true(layer, x, outputs, fields)


def test_backends_that_cannot_be_batch_invariant_refuse_in_the_mode():
    layer = make_layer("ext")  # training: the segment loop, which has a backward
    refusal = "must compute batch-invariantly, but its GEMMs with a backward"
    with deterministic_algorithms(), pytest.raises(BackendUnavailable, match=refusal):
        layer(torch.randn(3, H))
    with deterministic_algorithms():
        auto = make_layer("auto")
        assert auto.backend.name in ("torch", "triton") and auto.backend.batch_invariant
    assert not auto.backend.batch_invariant  # selected again once the mode is off


def test_tiled_mm_and_invariant_activations_against_float64():
    a = torch.randn(77, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    out = invariant.tiled_mm(a, b)
    assert out.shape == (77, 24) and torch.allclose(out, a @ b, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert torch.allclose(a.grad, torch.ones(77, 24, dtype=torch.float64) @ b.T)
    assert invariant.tiled_mm(a[:0], b).shape == (0, 24)
    g = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    expected = {"silu": torch.nn.functional.silu(g), "gelu": torch.nn.functional.gelu(g),
                "gelu_pytorch_tanh": torch.nn.functional.gelu(g, approximate="tanh"), "relu": g.relu()}
    for name, value in expected.items():
        # 1 + erf cancels for negative g in fp32 (in ATen's kernel as well): absolute 1e-6
        assert torch.allclose(invariant.activate(g.float(), name).double(), value, rtol=1e-6, atol=1e-6), name
    assert torch.allclose(invariant.sigmoid(g.float()).double(), g.sigmoid(), rtol=1e-6, atol=1e-7)


def test_compiled_layer_is_batch_invariant_in_the_mode():
    """Inductor generates its own kernels (outputs differ from eager in the last bits); they are batch-invariant."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = make_layer("torch", score_func="sigmoid").eval()
    compiled = torch.compile(layer)
    x = torch.randn(40, H)
    with deterministic_algorithms(), torch.no_grad():
        batch = compiled(x)
        alone = torch.cat([compiled(x[t:t + 1]) for t in range(0, 40, 7)])
        assert_close(batch, layer(x), 1e-6, "compiled vs eager")
    assert torch.equal(alone, batch[0:40:7])
