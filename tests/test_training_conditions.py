"""The layer in the conditions real training runs in, each checked against an independent float64 reference on the
same global batch: bf16 casts, autocast, padding, gradient accumulation (plain loop and the Trainer helper), data
parallelism, expert parallelism, expert parallelism x FSDP2 on a 2-D mesh, torch.compile, activation checkpointing
and compile inside checkpointing. Compared: outputs, aux_loss, every parameter's gradient, tokens_per_expert and the
balancing bias after 5 update_bias() steps.

The reference (`reference_forward`) is written from the papers' formulas with a per-token loop, in float64, and
shares no code with the package.

Legend: T tokens, B sequences, S tokens per sequence, H hidden size, I expert width, E routed experts, K experts per
token, W ranks.
"""
import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import deepseek_moe as dm
from deepseek_moe.testing import assert_close, spawn_gloo

H, I, E, K = 16, 8, 8, 2
GAMMA = 0.01


def make_config(**fields) -> dm.MoEConfig:
    base = dict(hidden_size=H, expert_hidden_size=I, num_routed_experts=E, num_shared_experts=1, top_k=K,
                aux_loss_alpha=0.1, z_loss_coef=0.01, bias_update_speed=GAMMA, backend="torch")
    base.update(fields)
    return dm.MoEConfig(**base)


def make_layer(seed: int = 0, **fields) -> dm.DeepSeekMoELayer:
    torch.manual_seed(seed)
    layer = dm.DeepSeekMoELayer(make_config(**fields))
    with torch.no_grad():  # larger weights than the default init, so every gradient is well above rounding
        layer.gate.weight.normal_(0, 0.5)
        layer.experts.gate_up_proj.normal_(0, 0.3)
        layer.experts.down_proj.normal_(0, 0.3)
        for p in layer.shared_experts.parameters():
            p.normal_(0, 0.3)
    return layer


# ------------------------------------------------------------------------------------------- the reference
def reference_params(layer: dm.DeepSeekMoELayer):
    """float64 leaf copies of the layer's parameters (full experts), plus the bias (no gradient)."""
    sd = layer.state_dict()
    params = {k: v.detach().double().clone().requires_grad_() for k, v in sd.items()
              if k != "gate.e_score_correction_bias"}
    return params, sd["gate.e_score_correction_bias"].detach().double().clone()


def _swiglu(x_H, w_gate, w_up, w_down):
    return w_down @ (F.silu(w_gate @ x_H) * (w_up @ x_H))


def reference_forward(cfg: dm.MoEConfig, p, bias_E, x_TH, seq_T):
    """(y_TH, aux, counts_E) by the papers' formulas, token by token, on a whole (global) batch. x_TH holds real
    tokens only; seq_T (T,) says which sequence each belongs to."""
    T = x_TH.shape[0]
    logits = x_TH @ p["gate.weight"].T
    s = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    idx = (s.detach() + bias_E).topk(cfg.top_k, dim=-1).indices
    w = s.gather(1, idx)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    w = w * cfg.routed_scaling_factor
    rows = []
    for t in range(T):
        y = _swiglu(x_TH[t], p["shared_experts.gate_proj.weight"], p["shared_experts.up_proj.weight"],
                    p["shared_experts.down_proj.weight"])
        for k in range(cfg.top_k):
            e = int(idx[t, k])
            gate, up = p["experts.gate_up_proj"][e].split(cfg.expert_hidden_size)
            y = y + w[t, k] * _swiglu(x_TH[t], gate, up, p["experts.down_proj"][e])
        rows.append(y)
    y_TH = torch.stack(rows) if rows else x_TH.new_zeros(0, cfg.hidden_size)
    counts_E = torch.bincount(idx.reshape(-1), minlength=cfg.num_routed_experts)
    probs = s / s.sum(-1, keepdim=True)  # DeepSeek-V3 normalises sigmoid scores; softmax rows sum to 1 already
    aux = torch.zeros((), dtype=torch.float64)
    if T and cfg.aux_loss_alpha:
        groups = [seq_T == b for b in seq_T.unique()] if cfg.resolved_balance_scope == "sequence" else \
            [torch.ones(T, dtype=torch.bool)]
        per_group = []
        for g in groups:  # DeepSeekMoE eq. 12-14 over the group's tokens
            f = (cfg.num_routed_experts / (cfg.top_k * int(g.sum()))
                 * torch.bincount(idx[g].reshape(-1), minlength=cfg.num_routed_experts).double())
            per_group.append((f * probs[g].mean(0)).sum() * int(g.sum()) / T)  # sequences weighted by tokens
        aux = aux + cfg.aux_loss_alpha * torch.stack(per_group).sum()
    if T and cfg.seq_balance_alpha:  # DeepSeek-V3 eq. 17-20: raw top-K (no bias), per sequence
        raw = s.detach().topk(cfg.top_k, dim=-1).indices
        for b in seq_T.unique():
            g = seq_T == b
            f = (cfg.num_routed_experts / (cfg.top_k * int(g.sum()))
                 * torch.bincount(raw[g].reshape(-1), minlength=cfg.num_routed_experts).double())
            aux = aux + cfg.seq_balance_alpha * (f * probs[g].mean(0)).sum() * int(g.sum()) / T
    if T and cfg.z_loss_coef:
        aux = aux + cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    return y_TH, aux, counts_E


def reference_bias_steps(cfg, p, bias_E, x_TH, steps=5):
    """The bias after ``steps`` rounds of route-then-update (DeepSeek-V3 §2.1.2) on the same tokens."""
    bias = bias_E.clone()
    for _ in range(steps):
        with torch.no_grad():
            _, _, counts = reference_forward(cfg, p, bias, x_TH, torch.zeros(len(x_TH), dtype=torch.long))
        load = counts.double()
        bias = bias + GAMMA * torch.sign(load.mean() - load)
    return bias


def task_weights(shape, seed=7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def check_grads(layer, p_ref, rtol, where="", expert_rows=None):
    for name, param in layer.named_parameters():
        ref = p_ref[name].grad
        if expert_rows is not None and name.startswith("experts."):
            ref = ref[expert_rows]
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        assert_close(grad, ref, rtol, f"{where}grad {name}")


# ------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("cast", ["to", "bfloat16", "half", "assign_load", "from_hf", "moefy"])
def test_cast_keeps_router_fp32_and_counters_int64(cast):
    layer = make_layer()
    if cast == "to":
        layer = layer.to(torch.bfloat16)
    elif cast == "bfloat16":
        layer = layer.bfloat16()
    elif cast == "half":
        layer = layer.half()
    elif cast == "assign_load":
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in layer.state_dict().items()}
        layer.load_state_dict(state, assign=True)
    elif cast == "from_hf":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                                            num_experts_per_tok=K, n_group=2, topk_group=2, n_shared_experts=1,
                                            intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        layer = dm.hf.from_hf(DeepseekV3MoE(cfg).to(torch.bfloat16))
    else:
        from torch import nn

        class MLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate_proj, self.up_proj = nn.Linear(H, 32, bias=False), nn.Linear(H, 32, bias=False)
                self.down_proj, self.act_fn = nn.Linear(32, H, bias=False), nn.SiLU()

        model = nn.Sequential(MLP()).to(torch.bfloat16)
        dm.hf.moefy(model, make_config(num_shared_experts=1))
        layer = model[0]
    assert layer.gate.weight.dtype == torch.float32
    assert layer.gate.e_score_correction_bias.dtype == torch.float32
    assert layer.load_since_update.dtype == layer.tokens_per_expert.dtype == torch.int64
    if cast in ("to", "bfloat16", "half", "from_hf", "moefy"):
        assert layer.experts.gate_up_proj.dtype in (torch.bfloat16, torch.float16)
    layer.double()  # fp64 stays fp64 (the reference precision)
    assert layer.gate.e_score_correction_bias.dtype == torch.float64


def test_built_under_bf16_default_dtype():
    """transformers' from_pretrained(dtype=torch.bfloat16) builds modules under a bf16 default dtype."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        layer = make_layer()
    finally:
        torch.set_default_dtype(default)
    assert layer.gate.weight.dtype == layer.gate.e_score_correction_bias.dtype == torch.float32
    assert layer.experts.gate_up_proj.dtype == torch.bfloat16


def test_counters_after_meta_materialisation_and_deepcopy():
    """Counters left on the meta device by a loader that bypasses Module._apply restart as zeros; a layer copied
    mid-training (EMA, snapshots) copies."""
    with torch.device("meta"):
        layer = make_layer(bias_update_speed=0.01)
    layer.to_empty(device="cpu")
    assert layer.load_since_update.device.type == "cpu" and int(layer.load_since_update.sum()) == 0
    layer.load_state.load_since_update = layer.load_since_update.to("meta")  # as transformers' loader leaves it
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    layer.gate.e_score_correction_bias.zero_()
    y = layer(torch.randn(5, H))
    assert int(layer.load_since_update.sum()) == 5 * K
    assert not torch.equal(layer.update_bias(), torch.zeros(E))
    layer(torch.randn(5, H))
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(torch.ones(2, H)), layer(torch.ones(2, H))) and y.grad_fn is not None


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_all_padding_gives_zero_gradients_not_none(backend):
    """DDP reduces every parameter's gradient on every rank: a rank whose batch is all padding must still give
    (zero) gradients for the experts."""
    layer = make_layer(backend=backend)
    y = layer(torch.randn(2, 3, H), padding_mask=torch.ones(2, 3, dtype=torch.bool))
    (y.sum() + layer.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


def test_bias_step_and_checkpoint_bias_survive_bf16():
    """Issue 13's numbers: bias [0.5, 0.5], load [2, 0], γ = 0.001 -> [0.499, 0.501]; a checkpoint bias
    [2.0, 2.004] keeps its 0.004 difference and routes x = [0.008, 0] to expert 1."""
    layer = dm.DeepSeekMoELayer(hidden_size=2, expert_hidden_size=4, num_routed_experts=2, num_shared_experts=0,
                                top_k=1, score_func="sigmoid", bias_update_speed=0.001).to(torch.bfloat16)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(2))
    layer.gate.e_score_correction_bias.copy_(torch.tensor([0.5, 0.5]))
    layer.load_since_update.copy_(torch.tensor([2, 0]))
    assert torch.allclose(layer.update_bias(), torch.tensor([0.499, 0.501]), atol=1e-7, rtol=0)
    state = layer.state_dict()
    state["gate.e_score_correction_bias"] = torch.tensor([2.0, 2.004])
    layer.load_state_dict(state)
    routing, _ = layer.eval().route(torch.tensor([[0.008, 0.0]], dtype=torch.bfloat16))
    assert routing.topk_idx_TK.item() == 1


def _run_single(layer, x_BSH, padding=None, loss_scale=1.0):
    """Forward + backward of Σ y·r / T_real + aux on one batch; returns (y, aux)."""
    y = layer(x_BSH, padding_mask=padding)
    real = y.shape[0] * y.shape[1] if padding is None else int((~padding).sum())
    ((y.float() * task_weights(y.shape)).sum() / real * loss_scale + layer.aux_loss).backward()
    return y, layer.aux_loss


def _reference_single(layer, x_BSH, padding=None, with_aux=True):
    cfg = layer.config
    p, bias = reference_params(layer)
    B, S, _ = x_BSH.shape
    real = torch.ones(B, S, dtype=torch.bool) if padding is None else ~padding
    seq_T = torch.arange(B).repeat_interleave(S)[real.reshape(-1)]
    x_TH = x_BSH.double().reshape(-1, H)[real.reshape(-1)]
    y_real, aux, counts = reference_forward(cfg, p, bias, x_TH, seq_T)
    y = torch.zeros(B * S, H, dtype=torch.float64)
    y[real.reshape(-1)] = y_real
    y = y.view(B, S, H)
    ((y * task_weights(y.shape).double()).sum() / int(real.sum()) + (aux if with_aux else 0)).backward()
    return y, aux, counts, p, reference_bias_steps(cfg, p, bias, x_TH)


def _check_bias_steps(layer, x, expected_bias, padding=None, atol=1e-6, model=None):
    for _ in range(5):
        (model or layer)(x, padding_mask=padding)
        layer.update_bias()
    assert torch.allclose(layer.gate.e_score_correction_bias.double(), expected_bias, atol=atol, rtol=0), \
        (layer.gate.e_score_correction_bias, expected_bias)


@pytest.mark.parametrize("mode", ["bf16_cast", "autocast"])
def test_low_precision_against_float64(mode):
    layer = make_layer(seq_aux=True)
    x = torch.randn(2, 12, H)
    if mode == "bf16_cast":
        layer = layer.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
        y, aux = _run_single(layer, x)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = _run_single(layer, x)
    y_ref, aux_ref, counts_ref, p_ref, bias_ref = _reference_single(layer, x.double())
    assert torch.equal(layer.tokens_per_expert, counts_ref)
    assert_close(y, y_ref, 2e-2, "y")
    assert_close(aux, aux_ref, 1e-5, "aux_loss")  # router and losses run in fp32 from the bf16 input
    check_grads(layer, p_ref, 3e-2)
    _check_bias_steps(layer, x, bias_ref)


# ------------------------------------------------------------------------------------------- padding
PADDING = torch.tensor([[False] * 9 + [True] * 3, [False] * 12, [False] * 4 + [True] * 8])


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("scope", ["sequence", "micro_batch"])
def test_padding_against_float64(score_func, scope):
    """Padded tokens count nowhere; real outputs, losses (per-sequence ones over each sequence's real tokens),
    gradients, loads and bias steps equal the float64 reference on the real tokens alone; padded rows are 0.
    With sigmoid scores the balance probabilities are normalised per token (DeepSeek-V3)."""
    layer = make_layer(balance_scope=scope, score_func=score_func, norm_topk_prob=score_func == "sigmoid",
                       seq_balance_alpha=0.0)
    x = torch.randn(3, 12, H)
    x[PADDING] = 1e4  # garbage at padded positions must not leak anywhere
    y, aux = _run_single(layer, x, PADDING)
    y_ref, aux_ref, counts_ref, p_ref, bias_ref = _reference_single(layer, x.double(), PADDING)
    assert torch.equal(y[PADDING], torch.zeros_like(y[PADDING]))
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(aux, aux_ref, 1e-5, "aux_loss")
    assert torch.equal(layer.tokens_per_expert, counts_ref)
    check_grads(layer, p_ref, 1e-5)
    _check_bias_steps(layer, x, bias_ref, PADDING)


def test_padding_issue_example_and_context_manager():
    """2 experts, top-1, α = 1, identity router, rows [[1,0],[0,1],[5,0]], last row padding: loss 1.0, load [1, 1]
    (DeepSeekMoE eq. 12-14 over the real tokens); dm.padding_mask(m) gives the same as padding_mask=m."""
    layer = dm.DeepSeekMoELayer(hidden_size=2, expert_hidden_size=4, num_routed_experts=2, num_shared_experts=0,
                                top_k=1, aux_loss_alpha=1.0)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(2))
    x, m = torch.tensor([[1.0, 0], [0, 1], [5, 0]]), torch.tensor([False, False, True])
    y = layer(x, padding_mask=m)
    assert abs(layer.aux_loss.item() - 1.0) < 1e-6 and layer.tokens_per_expert.tolist() == [1, 1]
    with dm.padding_mask(m):
        y_ctx = layer(x)
    assert layer.tokens_per_expert.tolist() == [1, 1]
    assert torch.equal(y, y_ctx) and torch.equal(y[2], torch.zeros(2))


@pytest.mark.parametrize("reentrant", [False, True])
def test_padding_context_must_cover_the_checkpoint_recompute(reentrant):
    """Checkpointing re-runs the forward in backward: with backward inside the `with` block the gradients equal
    those of an explicit mask; after the block a clear error instead of routing the padding."""
    layer = make_layer(seq_aux=True)
    x = torch.randn(3, 12, H)
    x[PADDING] = float("nan")
    y = layer(x, padding_mask=PADDING)
    ((y * task_weights(y.shape)).sum() + layer.aux_loss).backward()
    expected = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reentrant: the aux_loss-without-gradient warning
        with dm.padding_mask(PADDING):
            y = checkpoint(layer, x.requires_grad_(), use_reentrant=reentrant)  # reentrant: an input needs grad
            ((y * task_weights(y.shape)).sum() + (0 if reentrant else layer.aux_loss)).backward()
        if not reentrant:
            for name, p in layer.named_parameters():
                assert_close(p.grad, expected[name], 1e-6, f"grad {name}")
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        with dm.padding_mask(PADDING):
            y = checkpoint(layer, x, use_reentrant=reentrant)
        with pytest.raises(RuntimeError, match="after the `with dm.padding_mask\\(m\\)` block its forward ran in"):
            y.sum().backward()
        with dm.padding_mask(PADDING):
            y = checkpoint(layer, x, use_reentrant=reentrant)
        with dm.padding_mask(PADDING.clone()):  # another block (the next micro-batch's), an equal mask even
            with pytest.raises(RuntimeError, match="inside another `with dm.padding_mask\\(m\\)` block"):
                y.sum().backward()


def test_padding_excluded_from_capacity_and_maxvio():
    """Capacity C = ceil(c·T_real·K/E) and the drops are those of a run on the real tokens alone."""
    layer = make_layer(capacity_factor=1.0)
    x = torch.randn(3, 12, H)
    y = layer(x, padding_mask=PADDING)
    stats = layer.last_stats
    y_real = layer(x[~PADDING].unsqueeze(0))
    assert stats == layer.last_stats
    assert torch.equal(y[~PADDING], y_real[0])


def test_bad_padding_masks_and_all_padding():
    layer = make_layer(seq_aux=True, seq_balance_alpha=0.1)
    x = torch.randn(2, 5, H, requires_grad=True)
    with pytest.raises(ValueError, match="padding_mask has shape"):
        layer(x, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask must have dtype torch.bool"):
        layer(x, padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="padding_mask has shape"), dm.padding_mask(torch.zeros(3, dtype=torch.bool)):
        layer(x)
    bias = layer.gate.e_score_correction_bias.clone()
    y = layer(x, padding_mask=torch.ones(2, 5, dtype=torch.bool))
    (y.sum() + layer.aux_loss).backward()
    assert torch.equal(y, torch.zeros_like(y)) and layer.aux_loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert torch.isfinite(x.grad).all() and layer.tokens_per_expert.sum() == 0
    assert layer.last_stats == {"num_dropped": 0, "max_vio": 0.0, "cv": 0.0}
    assert torch.equal(layer.update_bias(), bias)  # no real tokens: the bias does not move


# ------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("micro_batches", [1, 2, 4])
def test_gradient_accumulation_plain_loop(micro_batches):
    """4 sequences as 4x1, 2x2 or 1x4 micro-batches, with the documented rule (each micro-batch's losses weighted
    by its share of the accumulated batch's tokens): the gradients of the float64 reference on all 4."""
    layer = make_layer(seq_aux=True, seq_balance_alpha=0.05)
    x = torch.randn(4, 6, H)
    r = task_weights(x.shape)
    total = x.shape[0] * x.shape[1]
    for part_x, part_r in zip(x.chunk(micro_batches), r.chunk(micro_batches)):
        y = layer(part_x)
        share = part_x.shape[0] * part_x.shape[1] / total
        ((y * part_r).sum() / total + layer.aux_loss * share).backward()
    _, _, _, p_ref, _ = _reference_single(layer, x.double())
    check_grads(layer, p_ref, 1e-5, f"{micro_batches} micro-batches: ")


def test_trainer_gradient_accumulation(tmp_path):
    """transformers' Trainer with aux_loss_trainer(), padded batch: 1x4, 2x2 and 4x1 give the same gradient for
    every parameter (before the fix the router gradient came out 2x and 4x), and the attention mask reaches the
    layers as their padding mask."""
    transformers = pytest.importorskip("transformers")
    from transformers import MixtralConfig, MixtralForCausalLM, TrainerCallback, TrainingArguments
    transformers.logging.set_verbosity_error()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0
    attention[3, 5:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    data = [{"input_ids": i, "attention_mask": a, "labels": lab} for i, a, lab in zip(ids, attention, labels)]

    def train(batch_size, steps, checkpointing=False):
        torch.manual_seed(0)
        model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                 num_local_experts=4, num_experts_per_tok=2))
        dm.hf.replace_moe_blocks(model, aux_loss_alpha=0.1, balance_scope="sequence", z_loss_coef=0.01)
        grads, padded = {}, []

        class Grab(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

        layer = dm.hf.moe_layers(model)["model.layers.0.mlp"]
        def count_padding(module, args):
            mask = dm.padding.active_padding_mask()
            padded.append(0 if mask is None else int(mask.sum()))

        layer.register_forward_pre_hook(count_padding)
        args = TrainingArguments(str(tmp_path / f"{batch_size}x{steps}"), per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=steps, max_steps=1, learning_rate=0.0, report_to=[],
                                 save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                                 activation_checkpointing=checkpointing)
        trainer = dm.hf.aux_loss_trainer()(model=model, args=args, train_dataset=data, callbacks=[Grab()])
        trainer.train()
        # Every padded position reached the layer as padding (twice with checkpointing: the recompute too).
        assert sum(padded) == int((attention == 0).sum()) * (2 if checkpointing else 1)
        return grads

    whole = train(4, 1)
    for batch_size, steps, checkpointing in ((2, 2, False), (1, 4, False), (2, 2, True)):
        grads = train(batch_size, steps, checkpointing)
        for name, g in whole.items():
            assert_close(grads[name], g, 1e-5, f"{steps}x{batch_size} (checkpointing {checkpointing}) grad {name}")


# ------------------------------------------------------------------------------------------- compile, checkpoint
class Block(torch.nn.Module):
    """A pre-norm residual block around the layer, as models checkpoint it."""

    def __init__(self, layer):
        super().__init__()
        self.norm, self.mlp = torch.nn.LayerNorm(H, elementwise_affine=False), layer

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def _wrapped(layer, how):
    """A callable x -> the layer's output (for the block: the block's residual branch) under ``how``."""
    if how == "compile":
        return torch.compile(layer)
    if how in ("checkpoint", "checkpoint_reentrant"):
        return lambda x: checkpoint(layer, x, use_reentrant=how.endswith("reentrant"))
    if how == "checkpoint_block":
        block = Block(layer)
        return lambda x: checkpoint(block, x, use_reentrant=False) - x
    if how == "compile_in_checkpoint":
        compiled = torch.compile(layer)
        return lambda x: checkpoint(compiled, x, use_reentrant=False)
    if how == "checkpoint_in_compile":
        block = Block(layer)
        return torch.compile(lambda x: checkpoint(block, x, use_reentrant=False) - x)
    raise ValueError(how)


@pytest.mark.parametrize("how", ["compile", "checkpoint", "checkpoint_reentrant", "checkpoint_block",
                                 "compile_in_checkpoint", "checkpoint_in_compile"])
def test_compile_and_checkpoint_against_float64(how):
    """Outputs, losses and gradients of the float64 reference, and the load counted exactly once per training
    forward (the recompute in backward does not count; eval does not count)."""
    torch._dynamo.reset()
    reentrant = how == "checkpoint_reentrant"
    # Reentrant checkpointing runs the forward without autograd: aux_loss cannot carry a gradient there, the
    # layer says so, and the gradients are those of the task loss alone.
    layer = make_layer(seq_aux=True)
    x = torch.randn(2, 8, H)
    run = _wrapped(layer, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = run(x.clone().requires_grad_())
    assert any("use_reentrant=False" in str(w.message) for w in caught) == reentrant
    ((y * task_weights(y.shape)).sum() / 16 + layer.aux_loss).backward()
    layer_input = F.layer_norm(x, (H,)) if how.endswith("block") or how == "checkpoint_in_compile" else x
    y_ref, aux_ref, counts_ref, p_ref, _ = _reference_single(layer, layer_input.double(), with_aux=not reentrant)
    assert_close(y, y_ref, 1e-5, "y")
    check_grads(layer, p_ref, 1e-5)
    assert_close(layer.aux_loss, aux_ref, 1e-5, "aux_loss")
    assert torch.equal(layer.tokens_per_expert, counts_ref)
    assert torch.equal(layer.load_since_update, counts_ref), "load counted more (or less) than once"
    layer.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reentrant checkpoint: "none of the inputs require grad", as intended here
        run(x)
    assert torch.equal(layer.load_since_update, counts_ref), "eval counted load"


# ------------------------------------------------------------------------------------------- global-batch scope
def test_global_batch_window_sums_micro_batches_until_update_bias():
    """balance_scope="global_batch": f comes from the load summed over the micro-batches since the last
    update_bias() (P stays local); the first micro-batch of a window is the micro-batch loss."""
    layer = make_layer(balance_scope="global_batch", z_loss_coef=0.0)
    micro = make_layer(balance_scope="micro_batch", z_loss_coef=0.0)
    x1, x2 = torch.randn(10, H), torch.randn(6, H)
    layer(x1)
    micro(x1)
    assert_close(layer.aux_loss, micro.aux_loss, 1e-6, "first micro-batch")
    counts1 = layer.tokens_per_expert.clone()
    routing, _ = layer.route(x2)
    layer(x2)
    counts = (counts1 + layer.tokens_per_expert).double()
    f = E * counts / counts.sum()
    P = routing.scores_TE.double().mean(0)
    assert_close(layer.aux_loss, 0.1 * (f * P).sum(), 1e-6, "second micro-batch")
    layer.update_bias()
    layer(x2)
    micro(x2)
    assert_close(layer.aux_loss, micro.aux_loss, 1e-6, "after update_bias: a new window")


def test_global_batch_window_with_micro_batches_in_flight_under_checkpointing():
    """Two micro-batches forwarded before one backward: the recomputed forward of the first must use the f its
    original forward saw, not the window that has grown since."""
    base = make_layer(balance_scope="global_batch")
    xs = [torch.randn(2, 6, H) for _ in range(2)]

    def grads(checkpointed):
        layer = copy.deepcopy(base)
        total = 0
        for x in xs:
            y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
            total = total + (y * task_weights(y.shape)).sum() + layer.aux_loss
        total.backward()
        return {n: p.grad for n, p in layer.named_parameters()}

    eager, checkpointed = grads(False), grads(True)
    for name, g in eager.items():
        assert_close(checkpointed[name], g, 1e-6, f"grad {name}")


# ------------------------------------------------------------------------------------------- several ranks
T_LOCAL_SEQ = 2  # sequences per rank, of 6 tokens


def _distributed_case(rank, world, kind):
    """One rank of: "dp" (DistributedDataParallel, which also broadcasts buffers before each forward), "ep"
    (shard_experts, replicated gradients averaged as DDP would), "ep_fsdp" (2 data-parallel x 2 expert-parallel
    mesh, FSDP2 over both). Checked against the float64 reference on the global batch:
    outputs, the mean of the ranks' aux_loss, every gradient, the summed tokens_per_expert, and the bias after 5
    update_bias() steps (loads summed over the ranks)."""
    layer = make_layer(balance_scope="global_batch")
    x_all = torch.randn(world * T_LOCAL_SEQ, 6, H, generator=torch.Generator().manual_seed(3))
    r_all = task_weights(x_all.shape)
    x, r = x_all[rank * T_LOCAL_SEQ:(rank + 1) * T_LOCAL_SEQ], r_all[rank * T_LOCAL_SEQ:(rank + 1) * T_LOCAL_SEQ]
    p_ref, bias = reference_params(layer)
    seq_T = torch.arange(x_all.shape[0]).repeat_interleave(6)
    y_ref, aux_ref, counts_ref = reference_forward(layer.config, p_ref, bias, x_all.double().reshape(-1, H), seq_T)
    ((y_ref * r_all.double().reshape(-1, H)).sum() / seq_T.numel() + aux_ref).backward()
    bias_ref = reference_bias_steps(layer.config, p_ref, bias, x_all.double().reshape(-1, H))

    L = E // 2
    expert_rows = None
    if kind == "dp":
        model = torch.nn.parallel.DistributedDataParallel(layer)
    elif kind == "ep":
        model = dm.parallel.shard_experts(layer)
        expert_rows = slice(rank * L, (rank + 1) * L)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
        world_mesh = init_device_mesh("cpu", (world,))
        _check_fsdp_mixed_precision(world_mesh, x)
        model = dm.parallel.fully_shard_moe(dm.parallel.shard_experts(layer, mesh["ep"].get_group()), world_mesh,
                                            expert_mesh=mesh["dp"])
        expert_rows = slice(mesh["ep"].get_local_rank() * L, (mesh["ep"].get_local_rank() + 1) * L)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = model(x)
        ((y * r).sum() / y.shape[:-1].numel() + layer.aux_loss).backward()
    assert not [w for w in caught if "view" in str(w.message)], [str(w.message) for w in caught]
    if kind == "ep":  # DDP and FSDP2 average the replicated gradients themselves; here we do what DDP would
        for name, p in layer.named_parameters():
            if expert_rows is None or not name.startswith("experts."):
                dist.all_reduce(p.grad)
                p.grad /= world
    assert_close(y, y_ref.view(x_all.shape)[rank * T_LOCAL_SEQ:(rank + 1) * T_LOCAL_SEQ], 1e-5, f"{kind}: y")
    aux = layer.aux_loss.detach().clone()
    dist.all_reduce(aux)
    assert_close(aux / world, aux_ref, 1e-5, f"{kind}: mean aux_loss over ranks")
    check_grads(layer, p_ref, 1e-5, f"{kind} rank {rank}: ", expert_rows)
    load = layer.tokens_per_expert.clone()
    dist.all_reduce(load)
    assert torch.equal(load, counts_ref), (load, counts_ref)
    _check_bias_steps(layer, x, bias_ref, model=model)  # the first step's load also has the training forward's


def _check_fsdp_mixed_precision(mesh, x):
    """Under FSDP2 with bf16 parameters the router still computes with fp32 weights, the bias and the counters
    keep fp32 / int64, and a bias step of 0.001 is exact."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    layer = dm.parallel.fully_shard_moe(make_layer(bias_update_speed=0.001), mesh,
                                        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    seen = {}
    layer.gate.register_forward_pre_hook(lambda m, args: seen.update(gate=m.weight.dtype))  # after the unshard
    layer.experts.register_forward_pre_hook(lambda m, args: seen.update(experts=m.gate_up_proj.dtype))
    layer.gate.e_score_correction_bias.fill_(3.0)
    layer(x).float().sum().backward()
    assert seen == {"gate": torch.float32, "experts": torch.bfloat16}, seen
    assert layer.gate.e_score_correction_bias.dtype == torch.float32
    assert layer.load_since_update.dtype == layer.tokens_per_expert.dtype == torch.int64
    step = layer.update_bias() - 3.0
    assert torch.allclose(step.abs(), torch.full_like(step, 0.001), atol=1e-6, rtol=0) or (step == 0).any()


@pytest.mark.parametrize("kind", ["dp", "ep"])
def test_two_ranks_against_float64(kind):
    spawn_gloo(_distributed_case, 2, kind)


def test_expert_parallel_with_fsdp2_on_a_2d_mesh():
    pytest.importorskip("torch.distributed.fsdp")
    spawn_gloo(_distributed_case, 4, "ep_fsdp")


def test_compiled_layer_reads_the_padding_context():
    """torch.compile sees dm.padding_mask: the compiled layer with a padded batch equals the float64 reference on
    the real tokens, and a later call without the context routes every token. (Selecting the real tokens has a
    data-dependent size: a graph break, so fullgraph=True needs an unpadded batch.)"""
    torch._dynamo.reset()
    layer = make_layer(seq_aux=True)
    compiled = torch.compile(layer)
    x = torch.randn(3, 12, H)
    with dm.padding_mask(PADDING):
        y = compiled(x)
    ((y * task_weights(y.shape)).sum() / int((~PADDING).sum()) + layer.aux_loss).backward()
    y_ref, aux_ref, counts_ref, p_ref, _ = _reference_single(layer, x.double(), PADDING)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(layer.aux_loss, aux_ref, 1e-5, "aux_loss")
    assert torch.equal(layer.tokens_per_expert, counts_ref)
    check_grads(layer, p_ref, 1e-5)
    compiled(x)
    assert int(layer.tokens_per_expert.sum()) == x.shape[0] * x.shape[1] * K
