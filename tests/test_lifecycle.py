"""A layer through the lifecycle of a real model: built on the meta device and materialised (to_empty +
reset_parameters, load_state_dict(assign=True)), moved, emptied, deep-copied and wrapped in DDP. Each must give a
layer that behaves exactly like one built on the CPU: same outputs, counters and bias after training steps."""
import copy

import torch
import torch.distributed as dist

import deepseek_moe as dm
from deepseek_moe.testing import assert_close, spawn_gloo

CFG = dm.MoEConfig(hidden_size=16, expert_hidden_size=8, num_routed_experts=8, num_shared_experts=1, top_k=2,
                   score_func="sigmoid", bias_update_speed=0.01, aux_loss_alpha=0.01, backend="torch")


def _train(layer, steps=3, seed=0):
    """``steps`` training steps with a bias update after each; returns the last output."""
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 5, CFG.hidden_size, generator=g)
        y = layer(x)
        (y.square().mean() + layer.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        layer.update_bias()
    layer(torch.randn(2, 5, CFG.hidden_size, generator=g))
    return y


def _cpu_and_meta_builds():
    """A layer built on the CPU with seed 0, and one of the same config built on the meta device."""
    torch.manual_seed(0)
    cpu = dm.DeepSeekMoELayer(CFG)
    with torch.device("meta"):
        meta = dm.DeepSeekMoELayer(CFG)
    return cpu, meta


def _same_state(a, b):
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    for name in ("tokens_per_expert", "load_since_update", "balance_window"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.last_stats == b.last_stats


def test_meta_build_then_to_empty_and_reset_parameters_equals_a_cpu_build():
    cpu, meta = _cpu_and_meta_builds()
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.reset_parameters()
    _same_state(cpu, meta)
    assert meta.aux_loss.device.type == "cpu"  # was left on meta
    _train(cpu), _train(meta)
    _same_state(cpu, meta)


def test_to_empty_on_a_trained_layer_keeps_its_counters():
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(CFG)
    _train(layer)
    layer.train()
    layer(torch.randn(3, CFG.hidden_size))  # a pending load for the next bias step
    pending = layer.load_since_update.clone()
    assert pending.sum() == (10 + 3) * CFG.top_k  # _train's last forward and this one
    reference = copy.deepcopy(layer)
    state = copy.deepcopy(layer.state_dict())
    layer.to_empty(device="cpu")
    assert torch.equal(layer.load_since_update, pending)  # was uninitialised memory
    layer.load_state_dict(state)
    reference.update_bias(), layer.update_bias()
    _same_state(reference, layer)


def test_load_state_dict_assign_into_a_meta_build():
    cpu, meta = _cpu_and_meta_builds()
    meta.load_state_dict(copy.deepcopy(cpu.state_dict()), assign=True)
    assert meta.last_stats["num_dropped"] == 0  # raised on meta counters
    _train(cpu), _train(meta)
    _same_state(cpu, meta)


def test_moves_and_copies_keep_counters_and_aux_loss_usable():
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(CFG)
    _train(layer)
    counts = layer.tokens_per_expert.clone()
    layer.to("meta")
    assert layer.last_stats["num_dropped"] == 0
    layer.to_empty(device="cpu")  # back from meta: fresh zeros, never garbage
    assert not layer.tokens_per_expert.any() and not layer.load_since_update.any()
    torch.manual_seed(0)
    layer.reset_parameters()
    _train(layer)
    assert torch.equal(layer.tokens_per_expert, counts)
    double = copy.deepcopy(layer).double()
    assert double.aux_loss.dtype == torch.float32 and double.tokens_per_expert.dtype == torch.int64
    assert torch.equal(double.tokens_per_expert, counts)


def _ddp_worker(rank, world):
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(dm.DeepSeekMoELayer(CFG))  # broadcast_buffers=True
    layer = model.module
    torch.manual_seed(1 + rank)
    for _ in range(2):
        x = torch.randn(4 + 3 * rank, CFG.hidden_size)  # the ranks' loads differ
        model(x).sum().backward()
        own = torch.bincount(layer.route(x)[0].topk_idx_TK.flatten(), minlength=CFG.num_routed_experts)
        assert torch.equal(layer.tokens_per_expert, own), "DDP replaced this rank's counts"
    assert int(layer.load_since_update.sum()) == 2 * (4 + 3 * rank) * CFG.top_k
    # The bias step sums the ranks' loads: every rank ends with the same bias.
    bias = layer.update_bias()
    biases = [torch.empty_like(bias) for _ in range(world)]
    dist.all_gather(biases, bias)
    assert all(torch.equal(b, bias) for b in biases)


def test_ddp_leaves_each_rank_its_own_load_counters():
    spawn_gloo(_ddp_worker, 2)


def _fsdp_worker(rank, world):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    cpu = dm.DeepSeekMoELayer(CFG)
    with torch.device("meta"):
        meta = dm.DeepSeekMoELayer(CFG)
    fully_shard(meta)
    meta.to_empty(device="cpu")  # FSDP2 materialisation
    meta.reset_parameters()
    set_model_state_dict(meta, cpu.state_dict(), options=StateDictOptions(full_state_dict=True))
    x = torch.randn(2, 5, CFG.hidden_size, generator=torch.Generator().manual_seed(rank))
    assert_close(meta(x), cpu(x), 1e-6, f"rank {rank}: output")
    assert torch.equal(meta.tokens_per_expert, cpu.tokens_per_expert)
    assert torch.equal(meta.load_since_update, cpu.load_since_update)
    assert meta.aux_loss.device.type == "cpu" and meta.last_stats == cpu.last_stats


def test_fsdp2_materialisation_of_a_meta_build():
    spawn_gloo(_fsdp_worker, 2)
