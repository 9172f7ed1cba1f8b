"""deepseek_moe.analysis against float64 per-token references and constructed models with known answers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import deepseek_moe as dm
from deepseek_moe.analysis import (LayerRouting, disabled_experts, plot_redundancy, redundancy_curve,
                                   routing_statistics)

H, I, E, K = 16, 8, 12, 3


def _layer(**fields):
    torch.manual_seed(0)
    cfg = dict(hidden_size=H, expert_hidden_size=I, num_routed_experts=E, top_k=K, num_shared_experts=1)
    layer = dm.DeepSeekMoELayer(**{**cfg, **fields}).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def _reference(layer, x_TH, excluded_TE, shared=True):
    """The layer's output in float64, token by token, picking the top-K scores among the experts not excluded."""
    W = layer.gate.weight.double()
    scores_TE = (x_TH @ W.T).softmax(-1)
    gate_up, down = layer.experts.gate_up_proj.double(), layer.experts.down_proj.double()
    out = []
    for t in range(x_TH.shape[0]):
        order = [e for e in scores_TE[t].argsort(descending=True).tolist() if not excluded_TE[t, e]][:K]
        y = torch.zeros(H, dtype=torch.float64)
        for e in order:
            g, u = (gate_up[e] @ x_TH[t]).split(I)
            y += scores_TE[t, e] * (down[e] @ (F.silu(g) * u))
        if shared:
            s = layer.shared_experts
            y += s.down_proj.weight @ (F.silu(s.gate_proj.weight @ x_TH[t]) * (s.up_proj.weight @ x_TH[t]))
        out.append(y)
    return torch.stack(out), scores_TE


def test_top_fraction_masks_each_tokens_best_experts_and_shared_off_removes_the_shared_path():
    layer = _layer()
    x = torch.randn(20, H, dtype=torch.float64)
    _, scores_TE = _reference(layer, x, torch.zeros(20, E, dtype=torch.bool))
    excluded_TE = torch.zeros(20, E, dtype=torch.bool).scatter_(1, scores_TE.topk(2, -1).indices, True)
    with torch.no_grad():
        plain = layer(x)
        with disabled_experts(layer, top_fraction=2 / E):
            masked = layer(x)
        with disabled_experts(layer, top_fraction=2 / E, shared=True):
            masked_no_shared = layer(x)
    expected, _ = _reference(layer, x, excluded_TE)
    torch.testing.assert_close(masked, expected, rtol=1e-10, atol=1e-10)
    expected_no_shared, _ = _reference(layer, x, excluded_TE, shared=False)
    torch.testing.assert_close(masked_no_shared, expected_no_shared, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # restored on exit
        assert torch.equal(layer(x), plain)
    assert layer.routing_override is None and layer.shared_experts is not None


def test_fixed_experts_per_layer_are_never_picked_and_restored_after_an_error():
    model = torch.nn.Sequential(_layer(), _layer())
    x = torch.randn(30, H, dtype=torch.float64)
    with pytest.raises(KeyError):
        with disabled_experts(model, experts={"0": [1, 5]}):
            routing, _ = model[0].route(x)
            assert not torch.isin(routing.topk_idx_TK, torch.tensor([1, 5])).any()
            with torch.no_grad():
                expected, _ = _reference(model[0], x, torch.isin(torch.arange(E), torch.tensor([1, 5])).expand(30, E))
                torch.testing.assert_close(model[0](x), expected, rtol=1e-10, atol=1e-10)
            assert model[1].routing_override.exclude is None  # a layer not named keeps all its experts
            raise KeyError("user code failed inside the block")
    assert model[0].routing_override is None


def test_disabled_experts_errors_name_the_problem():
    layer = _layer()
    x = torch.randn(4, H, dtype=torch.float64)
    with pytest.raises(ValueError, match="outside"):
        with disabled_experts(layer, experts=[E]):
            pass
    with pytest.raises(ValueError, match="not a DeepSeekMoELayer"):
        with disabled_experts(layer, experts={"blocks.0.mlp": [0]}):
            pass
    with pytest.raises(ValueError, match="top_fraction"):
        with disabled_experts(layer, top_fraction=1.0):
            pass
    with pytest.raises(ValueError, match="contains no DeepSeekMoELayer"):
        with disabled_experts(torch.nn.Linear(2, 2), experts=[0]):
            pass
    with pytest.raises(ValueError, match="fewer than top_k"):
        with disabled_experts(layer, experts=list(range(E - K + 1))):
            layer(x)
    with pytest.raises(RuntimeError, match="nested"):
        with disabled_experts(layer, experts=[0]):
            with disabled_experts(layer, experts=[1]):
                pass


def test_routing_statistics_counts_load_and_coactivation_of_a_known_routing():
    """Router weight = 10·identity: a token x = e_i + e_j picks exactly experts i and j (K = 2)."""
    layer = dm.DeepSeekMoELayer(hidden_size=4, expert_hidden_size=2, num_routed_experts=4, top_k=2,
                                num_shared_experts=0)
    with torch.no_grad():
        layer.gate.weight.copy_(10 * torch.eye(4))
    eye = torch.eye(4)
    pairs = [(0, 1), (0, 1), (0, 2), (2, 3)]
    x = torch.stack([eye[i] + eye[j] for i, j in pairs]).unsqueeze(0)  # (1, 4, 4)
    x = torch.cat([x, torch.full((1, 1, 4), 50.0)], dim=1)  # plus one padded position
    pad = torch.tensor([[False] * 4 + [True]])
    layer.train()
    stats = routing_statistics(layer, [x, x], forward=lambda m, b: m(b, padding_mask=pad))
    assert layer.training
    s = stats[""]
    assert s.tokens == 8
    assert s.load_E.tolist() == [6, 4, 4, 2]
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for i, j in pairs:
        expected[i, j] += 2
        expected[j, i] += 2
    expected += torch.diag(torch.tensor([6, 4, 4, 2]))
    assert torch.equal(s.coactivation_EE, expected)
    assert s.max_vio == pytest.approx(6 / 4 - 1)
    share = torch.tensor([6, 4, 4, 2], dtype=torch.float64) / 16
    assert s.load_entropy == pytest.approx(float(-(share * share.log2()).sum()))
    assert s.coactivation_lift_EE[0, 1].item() == pytest.approx((4 / 8) / ((6 / 8) * (4 / 8)))


def test_redundancy_curve_is_flat_for_duplicated_experts_and_not_otherwise():
    """Known answer: when every expert has an identical twin (same router row, same weights) and K = 1, disabling
    each token's best expert hands the token to the twin with the same score, so the loss does not move."""
    torch.manual_seed(0)
    cfg = dict(hidden_size=H, expert_hidden_size=I, num_routed_experts=8, top_k=1, num_shared_experts=1)
    twins = dm.DeepSeekMoELayer(**cfg).double().eval()
    with torch.no_grad():
        for p in twins.parameters():
            p.normal_(0, 0.3)
        for t in (twins.gate.weight, twins.experts.gate_up_proj, twins.experts.down_proj):
            t[4:] = t[:4]
    distinct = copy.deepcopy(twins)
    with torch.no_grad():
        distinct.gate.weight.normal_(0, 0.3)
        distinct.experts.down_proj.normal_(0, 0.3)
    batches = [torch.randn(6, 10, H, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():  # "trained" to its own outputs: the loss of the intact model is exactly 0
        targets = {id(m): [m(b) for b in batches] for m in (twins, distinct)}

    def loss_fn(model, x):
        target = targets[id(model)][next(i for i, b in enumerate(batches) if b is x)]
        return (model(x) - target).square().mean()

    flat = redundancy_curve(twins, loss_fn, batches, [0.0, 1 / 8])
    assert [p["loss"] for p in flat] == [0.0, 0.0] and flat[1]["experts_disabled"] == 1
    steep = redundancy_curve(distinct, loss_fn, batches, [0.0, 1 / 8, 2 / 8])
    assert steep[0]["loss"] == 0.0 and steep[1]["loss"] > 0.0 and steep[2]["loss"] > 0.0
    no_shared = redundancy_curve(twins, loss_fn, batches, [0.0], shared=True)
    assert no_shared[0]["loss"] > 0.0


@pytest.mark.filterwarnings("ignore:DeepSeekMoELayer. a training forward ran without autograd")  # reentrant
@pytest.mark.parametrize("reentrant", [False, True])
def test_masks_must_cover_the_checkpoint_recompute(reentrant):
    """Checkpointing re-runs the forward in backward: inside the block the gradients equal those without
    checkpointing; a backward after the block (the re-run would route around no mask) is a clear error."""
    layer = _layer().train()
    x = torch.randn(10, H, dtype=torch.float64, requires_grad=True)
    with disabled_experts(layer, experts=[0, 1], shared=True):
        layer(x).square().sum().backward()
        expected = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        layer.zero_grad()
        checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(layer.named_parameters())[name].grad, grad, msg=name)
    with disabled_experts(layer, experts=[0, 1], shared=True):
        y = checkpoint(layer, x, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match="other experts disabled"):
        y.square().sum().backward()
    for _ in range(5):  # a backward in another block: its filter may sit where the first block's was freed
        with disabled_experts(layer, top_fraction=1 / E):
            y = checkpoint(layer, x, use_reentrant=reentrant)
        with disabled_experts(layer, top_fraction=2 / E), pytest.raises(RuntimeError, match="other experts"):
            y.square().sum().backward()


def test_statistics_without_tokens_are_zero():
    empty = LayerRouting(0, torch.zeros(4, dtype=torch.int64), torch.zeros(4, 4, dtype=torch.int64))
    assert empty.max_vio == 0.0 and str(empty.load_entropy) == "0.0" and float(empty.share_E.sum()) == 0.0


def test_plot_redundancy_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    curve = [{"fraction": 0.0, "experts_disabled": 0, "loss": 1.0}, {"fraction": 0.25, "experts_disabled": 2,
                                                                     "loss": 1.5}]
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend of the user's (a notebook's, say) that plotting must leave alone
    try:
        for name in ("r.png", "no_suffix"):
            path = plot_redundancy({"a": curve, "b": curve}, tmp_path / name)
            assert path == str(tmp_path / name)
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)


def test_masks_rank_by_score_plus_bias_keep_the_module_tree_and_take_tensors():
    layer = _layer()
    x = torch.randn(40, H, dtype=torch.float64)
    with torch.no_grad():
        layer.gate.e_score_correction_bias[5] = 10.0  # every token's first choice, by score + bias
    with disabled_experts(layer, top_fraction=1 / E, shared=True):
        assert not (layer.route(x)[0].topk_idx_TK == 5).any()
        assert any(k.startswith("shared_experts.") for k in layer.state_dict())  # nothing detached
    with disabled_experts(layer, experts=torch.tensor([1, 2])):
        assert not torch.isin(layer.route(x)[0].topk_idx_TK, torch.tensor([1, 2])).any()
    with disabled_experts(layer, experts=list(torch.tensor([1, 2])) + [torch.tensor(3)]):  # 0-dim tensors
        assert not torch.isin(layer.route(x)[0].topk_idx_TK, torch.tensor([1, 2, 3])).any()
    mask_E = torch.zeros(E, dtype=torch.bool)
    mask_E[0] = True  # a mask, not the indices [1, 0, 0, ...]
    with disabled_experts(layer, experts=mask_E):
        picked = layer.route(x)[0].topk_idx_TK
        assert not (picked == 0).any() and (picked == 1).any()
    for wrong, error, match in [([1.9], TypeError, "integer indices"), ("3", TypeError, "integer indices"),
                                ([True], TypeError, "bool"), (torch.tensor([1.0]), TypeError, "float"),
                                (torch.ones(E + 1, dtype=torch.bool), ValueError, "shape"),
                                (torch.tensor([0, 1], dtype=torch.uint8), TypeError, "uint8"),
                                (torch.tensor([[1, 2]]), ValueError, "1-D")]:
        with pytest.raises(error, match=match):
            with disabled_experts(layer, experts=wrong):
                pass
    with pytest.raises(ValueError, match="no DeepSeekMoELayer of the model has shared experts"):
        with disabled_experts(_layer(num_shared_experts=0), shared=True):
            pass


def test_routing_statistics_of_a_compiled_model_and_of_dict_batches_with_padding():
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(hidden_size=8, expert_hidden_size=4, num_routed_experts=4, top_k=2)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = layer

        def forward(self, x, attention_mask=None):
            return self.moe(x)

    model = Model()
    x = torch.randn(2, 5, 8)
    compiled = torch.compile(model, backend="eager")
    compiled(x)  # compiled before the statistics' hooks exist
    assert routing_statistics(compiled, [x])["_orig_mod.moe"].tokens == 10
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert routing_statistics(model, [{"x": x, "attention_mask": mask}])["moe"].tokens == 8


def test_masked_routing_compiles_with_fullgraph():
    layer = _layer()
    x = torch.randn(16, H, dtype=torch.float64)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad(), disabled_experts(layer, experts=[0, 3], top_fraction=1 / E):
        torch.testing.assert_close(compiled(x), layer(x))
