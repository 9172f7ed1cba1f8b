"""The README's Python blocks run as written, in order, in one namespace (as a reader pasting them would)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_python_blocks_run():
    if not os.path.exists(README):
        pytest.skip("README.md is not in this installation (a wheel)")
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 2
    namespace = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    layer = namespace["model"][0].mlp
    assert layer.config.bias_update_speed > 0 and layer.gate.e_score_correction_bias.abs().sum() > 0
    # The optimizer, built after the swap, holds the MoE's parameters.
    assert any(p is layer.experts.gate_up_proj for p in namespace["optimizer"].param_groups[0]["params"])
    assert namespace["v3"].num_routed_experts == 256
