"""The examples, run as a user runs them with output going to a log (not a terminal): they show progress as they go
and explain the MaxVio they print. How well the upcycling example balances (its worst early MaxVio) is a training
outcome, measured by running the example itself and recorded in docs/integration.md, not asserted here."""
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.mark.parametrize("script,args,progress", [
    ("hf_moefy_train.py", ["--dense-steps", "20", "--steps", "10"],
     ["dense step 20 loss", "moe step 1 loss", "moe step 10 loss", "worst batch MaxVio over MoE steps 1-10"]),
    ("swap_into_block.py", ["--steps", "5"], ["step   1", "step   5"]),
])
def test_example_reports_progress_and_explains_maxvio_in_a_log(script, args, progress):
    path = os.path.join(EXAMPLES, script)
    if not os.path.exists(path):
        pytest.skip("the examples are not in this installation (a wheel)")
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "MaxVio = max expert load / mean expert load - 1" in out
    for line in progress:
        assert line in out, out[-2000:]
