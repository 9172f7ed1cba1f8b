"""Expert parallelism with gloo on CPU, ranks spawned by the test: a sharded layer equals the single-process
layer on the concatenated batch (outputs, input gradients, and every parameter's gradient under the data-parallel
convention: replicated gradients averaged over ranks, expert shards already averaged by the layer), device-limited routing, a rank that receives no tokens, load statistics, and
state_dict shard/gather round trips."""
import copy

import pytest
import torch
import torch.distributed as dist

import deepseek_moe as dm
from deepseek_moe.parallel import gather_expert_state_dict, shard_experts
from deepseek_moe.testing import assert_close, spawn_gloo

T_LOCAL, H = 13, 16



def _config(world: int, M):
    return dm.MoEConfig(hidden_size=H, expert_hidden_size=8, num_routed_experts=4 * world, num_shared_experts=1,
                        top_k=3, score_func="sigmoid", norm_topk_prob=True, num_devices=world,
                        max_devices_per_token=M, backend="torch")


def _check_against_single_process(rank, world, M, bias=None):
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(_config(world, M))
    if bias is not None:
        layer.gate.e_score_correction_bias.copy_(bias)
    ref = copy.deepcopy(layer)
    x_all = torch.randn(world * T_LOCAL, H)
    shard_experts(layer)
    L = layer.config.num_routed_experts // world
    assert layer.experts.gate_up_proj.shape[0] == L

    x = x_all[rank * T_LOCAL:(rank + 1) * T_LOCAL].clone().requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    x_ref = x_all.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ref.square().sum().backward()

    rows = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
    assert_close(y, y_ref[rows], 1e-5, f"rank {rank}: y")
    assert_close(x.grad, x_ref.grad[rows], 1e-5, f"rank {rank}: grad x")
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        if name.startswith("experts."):
            expected = ref_params[name].grad[rank * L:(rank + 1) * L] / world
            assert_close(p.grad, expected, 1e-5, f"rank {rank}: grad {name}")
        else:  # replicated: each rank holds its tokens' share, averaged as DDP does
            g = p.grad.clone()
            dist.all_reduce(g)
            assert_close(g / world, ref_params[name].grad / world, 1e-5, f"rank {rank}: averaged grad {name}")

    # Device-limited routing: no token's experts span more than M ranks.
    routing, _ = layer.route(x.detach())
    spans = [len(set((row // L).tolist())) for row in routing.topk_idx_TK]
    assert max(spans) <= (M or world), spans
    # Each token row travels once per destination rank: at most M rows per token, fewer than its K pairs.
    sent = layer.expert_parallel.last_exchange["rows_sent"]
    assert sent == sum(spans) and sent <= T_LOCAL * min(M or world, layer.config.top_k)
    # Load statistics: the ranks' loads sum to the single-process load.
    load = layer.tokens_per_expert.clone()
    dist.all_reduce(load)
    assert torch.equal(load, ref.tokens_per_expert)
    return layer, ref


def _check_device_capacity(rank, world):
    """Per-device capacity (training only): every rank processes at most ceil(c · all pairs / W) pairs, the
    drops are counted, a capacity that never binds changes nothing, and eval never drops."""
    torch.manual_seed(0)
    layer = dm.DeepSeekMoELayer(_config(world, None).replace(device_capacity_factor=0.6))
    layer.gate.e_score_correction_bias[:4] = 10.0  # every token picks rank 0's experts: rank 0 overflows
    ref = copy.deepcopy(layer)
    x_all = torch.randn(world * T_LOCAL, H)
    x = x_all[rank * T_LOCAL:(rank + 1) * T_LOCAL]
    shard_experts(layer)
    layer(x.clone().requires_grad_()).sum().backward()
    ex = layer.expert_parallel.last_exchange
    capacity = -(-6 * world * T_LOCAL * 3 // (10 * world))  # ceil(0.6 · W·T·K / W)
    assert ex["pairs_processed"] == min(ex["pairs_received"], capacity), ex
    dropped = torch.tensor([layer.last_stats["num_dropped"], ex["pairs_received"] - ex["pairs_processed"]])
    dist.all_reduce(dropped)
    assert dropped[0] == dropped[1] > 0
    layer.eval()
    ref.eval()
    assert_close(layer(x), ref(x_all)[rank * T_LOCAL:(rank + 1) * T_LOCAL], 1e-5, f"rank {rank}: eval y")
    assert layer.last_stats["num_dropped"] == 0
    layer.train()
    ref.train()
    layer.dispatcher.device_capacity_factor = float(world)  # never binds
    assert_close(layer(x), ref(x_all)[rank * T_LOCAL:(rank + 1) * T_LOCAL], 1e-5, f"rank {rank}: loose capacity")


def _worker(rank, world, M):
    layer, ref = _check_against_single_process(rank, world, M)

    # state_dict: gathering the shards gives the full checkpoint; a full checkpoint loads into a shard.
    full = gather_expert_state_dict(layer)
    for key, value in ref.state_dict().items():
        assert torch.equal(full[key], value), key
    torch.manual_seed(1)
    fresh = shard_experts(dm.DeepSeekMoELayer(_config(world, M)))
    fresh.load_state_dict(ref.state_dict())
    assert torch.equal(fresh.experts.down_proj, layer.experts.down_proj)
    with pytest.raises(ValueError, match="already sharded"):
        shard_experts(layer)

    # A rank that receives no tokens: a large bias sends every token to rank 0's experts.
    bias = torch.zeros(4 * world)
    bias[:4] = 10.0
    _check_against_single_process(rank, world, None, bias)
    _check_device_capacity(rank, world)


@pytest.mark.parametrize("world,M", [(2, 1), (4, 2), (4, None)])
def test_expert_parallel_equals_single_process(world, M):
    spawn_gloo(_worker, world, M)


def test_shard_needs_initialised_distributed():
    layer = dm.DeepSeekMoELayer(_config(2, None))
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_experts(layer)


def _calibrate_worker(rank, world):
    torch.manual_seed(0)
    layer = shard_experts(dm.DeepSeekMoELayer(_config(world, None)))
    torch.manual_seed(10 + rank)  # each rank its own tokens, sharing one dominant direction
    x = torch.randn(64, H) + 3 * torch.ones(H)
    stats = layer.calibrate_bias(x)
    bias = layer.gate.e_score_correction_bias
    biases = [torch.empty_like(bias) for _ in range(world)]
    dist.all_gather(biases, bias)
    assert all(torch.equal(b, bias) for b in biases), "ranks calibrated different biases"
    # The reported MaxVio is the world's: the loads of all ranks' tokens summed.
    load = torch.bincount(layer.route(x)[0].topk_idx_TK.flatten(), minlength=bias.numel()).double()
    dist.all_reduce(load)
    assert (load.max() / load.mean() - 1).item() == pytest.approx(stats["max_vio_after"])
    assert stats["max_vio_after"] < stats["max_vio_before"]


def test_calibrate_bias_sums_the_load_over_ranks_and_every_rank_gets_the_same_bias():
    spawn_gloo(_calibrate_worker, 2)


def _deepcopy_worker(rank, world):
    import copy
    torch.manual_seed(0)
    layer = shard_experts(dm.DeepSeekMoELayer(_config(world, None)))
    layer.balance_group = layer.dispatcher.group
    x = torch.randn(12, H, generator=torch.Generator().manual_seed(rank))
    y = layer(x)
    snapshot = copy.deepcopy(layer)  # an EMA / best-model copy mid-training
    assert snapshot.dispatcher.group is layer.dispatcher.group and snapshot.balance_group is layer.balance_group
    assert snapshot.routed_experts.gate_up_proj.data_ptr() != layer.routed_experts.gate_up_proj.data_ptr()
    assert torch.equal(snapshot(x), y)


def test_a_deep_copy_of_an_expert_parallel_layer_shares_its_process_groups():
    """copy.deepcopy raised TypeError (a ProcessGroup cannot be pickled): the copy now shares the groups and
    holds its own weights, computing the same outputs."""
    spawn_gloo(_deepcopy_worker, 2)


def _meta_worker(rank, world):
    cfg = _config(world, None)
    torch.manual_seed(0)
    built = shard_experts(dm.DeepSeekMoELayer(cfg))
    with torch.device("meta"):
        layer = dm.DeepSeekMoELayer(cfg)
    shard_experts(layer).to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    for key, value in built.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), f"rank {rank}: {key}"
    shards = [torch.empty_like(layer.routed_experts.gate_up_proj) for _ in range(world)]
    dist.all_gather(shards, layer.routed_experts.gate_up_proj.detach())
    assert not torch.equal(shards[0], shards[1]), "ranks initialised the same experts"


def test_a_layer_built_on_meta_sharded_then_initialised_equals_one_built_whole_then_sharded():
    """Each rank drew only its own shard from the same generator state, so every rank held the same experts; now
    the shard holds what the whole layer's initialisation puts at its experts (on the CPU, for experts of a
    multiple of 16 elements)."""
    spawn_gloo(_meta_worker, 2)


def _device_capacity_worker(rank, world):
    torch.manual_seed(0)
    layer = shard_experts(dm.DeepSeekMoELayer(_config(world, None).replace(device_capacity_factor=0.6)))
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(rank)) + (2.0 if rank else 0.0)
    layer(x)
    load = layer.tokens_per_expert.clone()
    dist.all_reduce(load)
    processed = torch.tensor([layer.expert_parallel.last_exchange["pairs_processed"]])
    processed_W = [torch.empty_like(processed) for _ in range(world)]
    dist.all_gather(processed_W, processed)
    L = layer.expert_parallel.local_experts
    dropped = layer.load_state.num_dropped.clone()
    dist.all_reduce(dropped)
    assert dropped > 0, "the test's capacity drops nothing"
    for r in range(world):
        assert load[r * L:(r + 1) * L].sum() == processed_W[r], f"rank {r}'s experts"
    assert load.sum() + dropped == world * 16 * 3


def test_tokens_per_expert_counts_only_the_pairs_kept_under_device_capacity():
    """device_capacity_factor drops pairs at the receiving rank; tokens_per_expert (the pairs the experts
    processed) counted them as processed. Over the ranks it now equals what each rank's experts processed, and
    with the dropped pairs every pair routed."""
    spawn_gloo(_device_capacity_worker, 2)


def _differing_worker(rank, world):
    base = _config(world, None)
    for fields, dtype, named in ((dict(top_k=3 - rank), torch.float32, "top_k: rank 0 3, rank 1 2"),
                                 (dict(num_routed_experts=8 // (rank + 1)), torch.float32, "num_routed_experts"),
                                 ({}, (torch.float32, torch.bfloat16)[rank], "gate_up_proj dtype")):
        layer = dm.DeepSeekMoELayer(base.replace(**fields)).to(dtype)
        with pytest.raises(ValueError, match=f"differ across the ranks.*{named}"):
            shard_experts(layer)
        assert layer.expert_parallel is None
    # The same layer but for the backend and num_devices (1 or W: both become W): sharded.
    layer = dm.DeepSeekMoELayer(base.replace(backend=("torch", "eager")[rank], num_devices=(1, world)[rank]))
    layer.experts.down_proj.requires_grad_(False)
    optimizer = torch.optim.AdamW(layer.parameters())
    shard_experts(layer)
    assert layer.config.num_devices == world and layer.experts.down_proj.shape[0] == base.num_routed_experts // world
    assert not layer.experts.down_proj.requires_grad and layer.experts.gate_up_proj.requires_grad  # frozen stays
    with pytest.raises(ValueError, match="optimizer holds 2 parameter.*built before shard_experts"):
        dm.parallel.checkpoint_optimizer_state_dict(layer, optimizer)


def test_layers_that_differ_across_the_ranks_are_refused_on_every_rank_at_sharding():
    """Without the check: a different E raised an index error on one rank while the other waited in the all-to-all
    for ever; a different dtype or H aborted the processes in gloo; a different top_k ran. Also: sharding keeps a
    frozen expert weight frozen (it made a trainable one), and the optimizer helper names an optimizer built before
    sharding (torch's function raised a bare KeyError)."""
    spawn_gloo(_differing_worker, 2)


def _generate_worker(rank, world):
    import os
    import sys
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, os.path.dirname(__file__))
    from test_hf_fidelity import _model

    from deepseek_moe import hf
    model = _model("qwen2_moe").eval()
    hf.replace_moe_blocks(model, backend="torch")
    whole = copy.deepcopy(model)
    for layer in hf.moe_layers(model).values():
        shard_experts(layer)
    prompt = torch.randint(1, 60, (1, 5), generator=torch.Generator().manual_seed(rank))
    args = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = whole.generate(prompt, **args)
        # rank 0 stops at its first token: it keeps running forwards until rank 1 is done (synced_gpus)
        eos = dict(eos_token_id=int(want[0, 5])) if rank == 0 else {}
        got = model.generate(prompt, **args, **eos, synced_gpus=True)
    assert torch.equal(got, want[:, :6] if rank == 0 else want), (rank, got, want)


def test_generate_on_a_sharded_model_with_ranks_stopping_at_different_steps_needs_synced_gpus():
    """Each decode step exchanges tokens with every rank: a rank that stops early (EOS) would leave the others
    waiting in the all-to-all; transformers' ``synced_gpus=True`` keeps it stepping (docs/parallel.md)."""
    pytest.importorskip("transformers")
    spawn_gloo(_generate_worker, 2)
