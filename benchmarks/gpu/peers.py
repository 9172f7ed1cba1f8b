"""Other projects' MoE layers for the device program, each (module on (T, H) tokens, None) or (None, why not)."""
from __future__ import annotations

import torch

import deepseek_moe as dm


def megablocks_dmoe(cfg: dm.MoEConfig, dtype: torch.dtype, device: torch.device):
    """megablocks' dMoE (GLU, grouped GEMMs) at ``cfg``'s shape. megablocks 0.10.0, the newest release, pins
    torch 2.7.0: it runs only where a user installed it next to a torch it was built for."""
    if device.type != "cuda":
        return None, "CUDA only"
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as err:  # an ImportError, or its compiled ops failing to load
        return None, f"does not import ({type(err).__name__}: {str(err)[:160]})"
    args = Arguments(hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.expert_hidden_size,
                     moe_num_experts=cfg.num_routed_experts, moe_top_k=cfg.top_k, mlp_type="glu",
                     mlp_impl="grouped", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, device=device)
    layer = dMoE(args)

    class Tokens(torch.nn.Module):  # dMoE takes (S, B, H) and returns (y, bias)
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x.unsqueeze(1))[0].squeeze(1)

    return Tokens(), None


def sonic_moe(cfg: dm.MoEConfig, dtype: torch.dtype, device: torch.device):
    """SonicMoE (arXiv 2512.14080) when its package imports; it is not on PyPI (install from its repository)."""
    if device.type != "cuda":
        return None, "CUDA only"
    try:
        import sonicmoe  # noqa: F401
    except Exception as err:
        return None, f"does not import ({type(err).__name__}: {str(err)[:160]}); not on PyPI"
    return None, (f"sonicmoe {getattr(sonicmoe, '__version__', '?')} imports, but this program has no adapter for "
                  f"its API yet")
