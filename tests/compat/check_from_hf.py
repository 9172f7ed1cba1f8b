"""Manual compatibility check of deepseek_moe.hf.from_hf against an installed transformers version.

CI runs tests/test_hf.py with the transformers that `pip install -e .[hf]` gives (5.x, fused experts). This
script checks the other supported layout, transformers 4.57 (per-expert ModuleList), in a side environment:

    python -m venv /tmp/v457 --system-site-packages
    /tmp/v457/bin/pip install "transformers>=4.57,<4.58"
    /tmp/v457/bin/python tests/compat/check_from_hf.py      # prints the relative RMS error per block type

Exits non-zero if any block type fails or differs by more than 1e-5.
"""
import sys

import torch, os
os.environ["HF_HUB_OFFLINE"]="1"
import transformers  # run with the transformers version to check, e.g. 4.57
from deepseek_moe import hf
from deepseek_moe.testing import rel_rms
torch.manual_seed(0)
H=32
def rnd(m):
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn_like(p)*0.3)
    return m
from transformers import MixtralConfig, Qwen2MoeConfig, DeepseekV3Config
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
blocks={
 'mixtral': rnd(MixtralSparseMoeBlock(MixtralConfig(hidden_size=H, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2))),
 'qwen2_moe': rnd(Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3, shared_expert_intermediate_size=40))),
 'deepseek_v3': rnd(DeepseekV3MoE(DeepseekV3Config(hidden_size=H, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5))),
}
try:
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MoE as V2
    blocks['deepseek_v2']=rnd(V2(DeepseekV2Config(hidden_size=H, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=1.5)))
except Exception as e: print('v2:', type(e).__name__, e)
from transformers import Qwen3MoeConfig, OlmoeConfig, DbrxConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.dbrx.modeling_dbrx import DbrxFFN
blocks['qwen3_moe'] = rnd(Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=16, num_experts=8,
                                                                num_experts_per_tok=2, norm_topk_prob=True)))
blocks['olmoe'] = rnd(OlmoeSparseMoeBlock(OlmoeConfig(hidden_size=H, intermediate_size=16, num_experts=8,
                                                      num_experts_per_tok=2)))
blocks['dbrx'] = rnd(DbrxFFN(DbrxConfig(d_model=H, n_heads=4, ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4,
                                                                          "moe_top_k": 2})))
failed = False
for k,b in blocks.items():
    print(k, type(b).__name__, type(b.experts).__name__)
    x=torch.randn(2,7,H)
    try:
        layer=hf.from_hf(b)
        with torch.no_grad():
            ref=b(x); ref = ref[0] if isinstance(ref, tuple) else ref
            print('  rel rms', rel_rms(layer(x), ref))
    except Exception as e:
        print('  FAIL', type(e).__name__, e)
        failed = True
        continue
    failed = failed or rel_rms(layer(x), ref) > 1e-5

sys.exit(1 if failed else 0)
