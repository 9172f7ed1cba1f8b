"""deepseek-moe: a DeepSeekMoE layer (shared + fine-grained routed experts) for PyTorch.

    import deepseek_moe as dm
    layer = dm.DeepSeekMoELayer(dm.MoEConfig(hidden_size=1024, expert_hidden_size=352))
    y = layer(x); loss = task_loss + dm.aux_loss(model)
"""
from .versions import require as _require

_require("torch")  # before anything defines custom ops: older torch fails inside torch.library otherwise

from .config import ConfigError, MoEConfig, PRESETS, matched_pair
from .plan import DispatchPlan, build_plan
from .layer import DeepSeekMoELayer
from .model import aux_loss, expert_load, moe_layers, record_routing, replay_routing, update_biases
from .override import RoutingOverride
from .padding import input_ids, padding_mask
from .router import Router, Routing
from .backends import BackendUnavailable, backend_status
from . import analysis  # expert masking, load/co-activation statistics, the redundancy experiment
from . import parallel  # expert parallelism; torch.distributed is used only once a layer is sharded

from . import transformers_hook

transformers_hook.install()  # "deepseek_moe" in transformers' experts interface, once transformers loads it

__version__ = "0.1.0"


__all__ = [
    "MoEConfig", "ConfigError", "PRESETS", "matched_pair", "DeepSeekMoELayer", "aux_loss", "moe_layers",
    "update_biases", "expert_load", "record_routing", "replay_routing", "padding_mask", "input_ids", "Router",
    "Routing", "RoutingOverride",
    "DispatchPlan", "build_plan", "BackendUnavailable", "backend_status", "analysis", "parallel", "__version__",
]


def __getattr__(name: str):
    # deepseek_moe.hf (transformers interop) is imported on first use: an installed transformers below the floor
    # then fails there, with the floor in the message, and never here.
    if name == "hf":
        import importlib
        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

