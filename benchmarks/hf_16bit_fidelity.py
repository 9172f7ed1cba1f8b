"""How far a converted transformers model's 16-bit logits are from the stock 16-bit model's and from fp32.

For each family of tests/test_hf_fidelity.py (tiny random configs): save the fp32 stock model, load it with
``from_pretrained(dtype=bf16 / fp16)`` twice, convert one with ``deepseek_moe.hf.replace_moe_blocks``, and print
the relative RMS difference of the logits (4 sequences of 16 tokens) between ours, the stock 16-bit model and the
fp32 model. Usage: ``python benchmarks/hf_16bit_fidelity.py``.
"""
import os
import sys
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import transformers  # noqa: E402
import test_hf_fidelity as fixtures  # noqa: E402

from deepseek_moe import hf  # noqa: E402
from deepseek_moe.testing import rel_rms  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
print(f"{'family':<12} {'dtype':<9} {'ours vs stock 16-bit':>21} {'ours vs fp32':>13} {'stock 16-bit vs fp32':>21}")
for family in ["deepseek_v3", "deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx"]:
    for dtype in (torch.bfloat16, torch.float16):
        with tempfile.TemporaryDirectory() as path:
            fixtures._model(family).save_pretrained(path)
            stock = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            ours = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            fp32 = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        hf.replace_moe_blocks(ours)
        ids = fixtures._batch(2, B=4, S=16)
        with torch.no_grad():
            a, b, c = ours(ids).logits.float(), stock(ids).logits.float(), fp32(ids).logits
        print(f"{family:<12} {str(dtype)[6:]:<9} {rel_rms(a, b):>21.2e} {rel_rms(a, c):>13.2e} {rel_rms(b, c):>21.2e}")
