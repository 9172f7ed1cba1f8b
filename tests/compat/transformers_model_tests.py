"""transformers' own model tests (``ModelTesterMixin`` of its ``tests/test_modeling_common.py``) for the eight
families (DeepSeek-V4 twice: with top-k layers only, as its own tester, and with a hash-routed layer), run twice: on the stock models and with every MoE block converted at construction
(``deepseek_moe.hf.converted_at_construction()`` active for the whole run). Prints the tests that pass stock and
fail converted (the regressions) and the reverse. Run by hand (several minutes on 2 cores)::

    pip download transformers==$(python -c "import transformers; print(transformers.__version__)") \
        --no-binary :all: --no-deps -d /tmp/tfsrc && tar xzf /tmp/tfsrc/transformers-*.tar.gz -C /tmp/tfsrc
    pip install --target /tmp/tfdeps parameterized          # the test files' one extra dependency
    PYTHONPATH=/tmp/tfdeps python tests/compat/transformers_model_tests.py /tmp/tfsrc/transformers-*/tests [FAMILY ...]

transformers' sdist ships its common test files but not ``tests/models/`` nor ``tests/generation/``: the
per-family testers here are written in the style of transformers' ``CausalLMModelTester`` (tiny configs, the
same fields its testers use), and ``GenerationTesterMixin`` / ``ExportTesterMixin`` are empty stand-ins, so the
generate and export tests are not part of this run. Everything ``ModelTesterMixin`` checks is: save/load round
trips, meta-device init, ``init_weights`` of every parameter and buffer, every tensor a parameter or buffer,
gradient checkpointing, attention implementations, batched vs. grouped experts implementations, dtype loading,
``from_pretrained`` with device maps and offload, resizing embeddings, ...
"""
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

# Widths are multiples of 8 elements: transformers' own grouped_mm (the stock default) needs 16-byte strides on the
# CPU, which odd widths (its testers' 37 and 12) violate in 16-bit and 32-bit dtypes.
_V4 = dict(num_key_value_heads=1, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16,
           partial_rotary_factor=0.5, q_lora_rank=16, o_groups=2, o_lora_rank=8, n_routed_experts=4,
           n_shared_experts=1, mlp_layer_types=["moe", "moe"],
           layer_types=["heavily_compressed_attention", "compressed_sparse_attention"], sliding_window=8, hc_mult=2,
           hc_sinkhorn_iters=3, index_n_heads=2, index_head_dim=16, index_topk=2, num_nextn_predict_layers=0,
           scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0)
FAMILIES = {  # family: (config class, model classes, config fields) -- tiny, as transformers' testers
    "deepseek_v3": ("DeepseekV3Config", ("DeepseekV3Model", "DeepseekV3ForCausalLM"), dict(
        intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=8,
        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)),
    "deepseek_v2": ("DeepseekV2Config", ("DeepseekV2Model", "DeepseekV2ForCausalLM"), dict(
        intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=4, topk_group=2, topk_method="group_limited_greedy", first_k_dense_replace=0,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        num_key_value_heads=4)),
    "mixtral": ("MixtralConfig", ("MixtralModel", "MixtralForCausalLM"), dict(
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2, hidden_act="gelu")),
    "qwen2_moe": ("Qwen2MoeConfig", ("Qwen2MoeModel", "Qwen2MoeForCausalLM"), dict(
        intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, num_key_value_heads=2, hidden_act="gelu")),
    "qwen3_moe": ("Qwen3MoeConfig", ("Qwen3MoeModel", "Qwen3MoeForCausalLM"), dict(
        intermediate_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=8,
        num_key_value_heads=2)),
    "olmoe": ("OlmoeConfig", ("OlmoeModel", "OlmoeForCausalLM"), dict(
        intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_key_value_heads=2)),
    "dbrx": ("DbrxConfig", ("DbrxModel", "DbrxForCausalLM"), None),
    # transformers' DeepseekV4ModelTester's fields (tests/models/deepseek_v4), with its all-top-k layers ...
    "deepseek_v4": ("DeepseekV4Config", ("DeepseekV4Model", "DeepseekV4ForCausalLM"), _V4),
    # ... and with a hash-routed first layer (its tester avoids one: inputs_embeds-only tests have no token ids)
    "deepseek_v4_hash": ("DeepseekV4Config", ("DeepseekV4Model", "DeepseekV4ForCausalLM"),
                         dict(_V4, mlp_layer_types=["hash_moe", "moe"])),
}

TEST_MODULE = '''
import unittest

import torch
import transformers
from transformers.testing_utils import torch_device

from tftests.test_modeling_common import ModelTesterMixin, ids_tensor
from tftests.generation.test_utils import GenerationTesterMixin

FAMILIES = {families!r}


class Tester:
    batch_size, seq_length, vocab_size, hidden_size = 2, 7, 99, 32
    num_hidden_layers, num_attention_heads, is_training = 2, 4, True

    def __init__(self, parent, family):
        self.parent, self.family = parent, family

    def get_config(self):
        name, _, fields = FAMILIES[self.family]
        if fields is None:  # DBRX nests its sizes
            return transformers.DbrxConfig(
                d_model=self.hidden_size, n_heads=self.num_attention_heads, n_layers=self.num_hidden_layers,
                vocab_size=self.vocab_size, max_seq_len=64, pad_token_id=0,
                ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2),
                attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0))
        return getattr(transformers, name)(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, max_position_embeddings=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, **fields)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        mask = torch.tril(torch.ones_like(input_ids)).to(torch_device)
        return self.get_config(), dict(input_ids=input_ids, attention_mask=mask)


def _case(family):
    classes = tuple(getattr(transformers, c) for c in FAMILIES[family][1])

    class Case(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
        all_model_classes = classes

        def setUp(self):
            self.model_tester = Tester(self, family)

    Case.__name__ = Case.__qualname__ = "Test_" + family
    return Case


for _family in FAMILIES:
    globals()["Test_" + _family] = _case(_family)
'''

CONFTEST = '''
import os

if os.environ.get("DEEPSEEK_MOE_CONVERT") == "1":
    from deepseek_moe import hf

    _context = hf.converted_at_construction()
    _context.__enter__()  # for the whole run, as a remote-code model converts at construction
'''


def _run(workdir: str, convert: bool) -> dict:
    report = os.path.join(workdir, f"report_{int(convert)}.xml")
    env = dict(os.environ, DEEPSEEK_MOE_CONVERT=str(int(convert)), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [workdir, os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                    f"--junitxml={report}", "test_families.py"], cwd=workdir, env=env, check=False)
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed: " + (child.get("message") or "")[:200].replace("\\n", " ")
            elif child.tag == "skipped":
                outcome = "skipped"
        results[f"{case.get('classname').split('.')[-1]}::{case.get('name')}"] = outcome
    return results


def main(tests_dir: str, families=None) -> None:
    workdir = tempfile.mkdtemp(prefix="tf_model_tests_")
    shutil.copytree(tests_dir, os.path.join(workdir, "tftests"))
    for sub, text in (("exporters", "class ExportTesterMixin:\n    pass\n"),
                      ("generation", "class GenerationTesterMixin:\n    pass\n")):
        os.makedirs(os.path.join(workdir, "tftests", sub), exist_ok=True)
        open(os.path.join(workdir, "tftests", sub, "__init__.py"), "w").close()
        name = "test_export.py" if sub == "exporters" else "test_utils.py"
        with open(os.path.join(workdir, "tftests", sub, name), "w") as f:
            f.write(text)
    open(os.path.join(workdir, "tftests", "__init__.py"), "a").close()
    with open(os.path.join(workdir, "test_families.py"), "w") as f:
        f.write(TEST_MODULE.format(families={k: v for k, v in FAMILIES.items() if not families or k in families}))
    with open(os.path.join(workdir, "conftest.py"), "w") as f:
        f.write(CONFTEST)
    stock, converted = _run(workdir, False), _run(workdir, True)
    regressions = {k: v for k, v in converted.items() if v.startswith("failed") and stock.get(k) == "passed"}
    fixed = {k: stock[k] for k, v in converted.items() if v == "passed" and stock.get(k, "").startswith("failed")}
    for family in families or FAMILIES:
        names = [k for k in stock if k.startswith(f"Test_{family}::")]
        count = lambda res, what: sum(res.get(k, "").startswith(what) for k in names)  # noqa: E731
        print(f"{family:12s} stock: {count(stock, 'passed')} passed, {count(stock, 'failed')} failed, "
              f"{count(stock, 'skipped')} skipped | converted: {count(converted, 'passed')} passed, "
              f"{count(converted, 'failed')} failed | regressions: "
              f"{sum(k.startswith(f'Test_{family}::') for k in regressions)}")
    print(f"\nregressions ({len(regressions)}):")
    for k, v in sorted(regressions.items()):
        print(f"  {k}: {v}")
    print(f"\npass converted, fail stock ({len(fixed)}):")
    for k, v in sorted(fixed.items()):
        print(f"  {k}: {v}")
    print(f"\n(work directory: {workdir})")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
