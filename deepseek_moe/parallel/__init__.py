"""Expert parallelism over ``torch.distributed``: routed experts sharded over the ranks of a process group,
tokens exchanged with all-to-all. See :func:`shard_experts` and docs/parallel.md."""
from .checkpoint import checkpoint_optimizer_state_dict, checkpoint_state_dict, load_optimizer_state_dict
from .expert_parallel import AllToAllDispatcher, fully_shard_moe, gather_expert_state_dict, shard_experts

__all__ = ["AllToAllDispatcher", "checkpoint_optimizer_state_dict", "checkpoint_state_dict", "fully_shard_moe",
           "gather_expert_state_dict", "load_optimizer_state_dict", "shard_experts"]
