"""Smoke test of benchmarks/shared_cpu.py (decode steps beside another busy process, each configuration in a
process of its own): its smallest run prints a row per configuration and wait policy. Not a timing: the numbers are
not checked. Run from a source checkout's root with ``python -m pytest benchmarks``."""
import pytest

from benchmarks import shared_cpu  # a source checkout: run from its root (python -m pytest benchmarks)
from deepseek_moe import ext


@pytest.mark.parametrize("idle", [True, False])
def test_prints_a_row_per_configuration_and_wait_policy(capsys, idle):
    try:
        ext.load()
    except ext.ExtensionUnavailable as err:
        pytest.skip(f"the benchmark times backend 'ext': {err}")
    assert shared_cpu.main(["--tokens", "1", "--layers", "1", "--seconds", "0.05", "--repeats", "1",
                            "--configs", "watch off,dense"] + ["--idle"] * idle) == 0
    out = capsys.readouterr().out
    assert ("idle" if idle else "beside another 2-thread PyTorch process") in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  1 ")]
    assert [(row[1], row[-4]) for row in rows] == [
        ("watch", "default"), ("watch", "PASSIVE"), ("dense", "default"), ("dense", "PASSIVE")]
    assert rows[1][3] == "*" and rows[0][3] == "default"  # what the package does by itself: under PASSIVE the watch off
    assert all(float(row[-3]) > 0 for row in rows)
