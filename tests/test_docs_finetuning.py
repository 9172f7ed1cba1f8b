"""docs/finetuning-and-rl.md: its Python blocks run as written, in order, in one namespace."""
import os
import re

import pytest

pytest.importorskip("peft")
PAGE = os.path.join(os.path.dirname(__file__), "..", "docs", "finetuning-and-rl.md")


def test_finetuning_and_rl_page_runs():
    if not os.path.exists(PAGE):
        pytest.skip("docs/ is not in this installation (a wheel)")
    with open(PAGE, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 4
    namespace = {"__name__": "docs"}
    import torch
    try:
        for block in blocks:
            exec(compile(block, PAGE, "exec"), namespace)
    finally:
        torch.use_deterministic_algorithms(False)
    assert namespace["routed_experts"].shape == (32, 2, 2)
    assert torch.equal(namespace["same"], namespace["y"].detach())
