"""Smoke test of the quality study (benchmarks/quality/run.py --quick): it trains, evaluates, records and plots;
a finished run is not trained again; the ladder configs have equal expert parameters and active FLOPs.

It lives beside the study, not in tests/ (the package's suite, which also runs against an installed wheel):
run it from a source checkout's root with ``python -m pytest benchmarks``."""
import json
import os

import pytest

from benchmarks.quality import run  # a source checkout: run from its root (python -m pytest benchmarks)


def test_ladder_is_matched():
    sizes = {}
    for name in ("gshard", "shared", "fine", "deepseekmoe"):
        cfg = run.layer_config(name)
        width = cfg.expert_hidden_size
        sizes[name] = ((cfg.num_routed_experts + cfg.num_shared_experts) * width,
                       (cfg.top_k + cfg.num_shared_experts) * width)
    assert len(set(sizes.values())) == 1, sizes  # total expert width 16F, active width 2F
    assert sizes["gshard"] == (16 * run.WIDTH, 2 * run.WIDTH)


def test_quick_mode_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    records = {f: json.loads((tmp_path / f).read_text()) for f in os.listdir(tmp_path) if f.endswith(".json")}
    assert set(records) == {"dense-seed0.json", "deepseekmoe-seed0.json"}
    for record in records.values():
        assert record["git_revision"] and record["steps"] == 20
        assert record["history"]["step"] == [10, 20] and len(record["history"]["val_bpb"]) == 2
        assert 0 < record["final_val_bpb"] < 8.5  # below uniform bytes (8 bits) plus slack for 20 steps
    assert records["deepseekmoe-seed0.json"]["history"]["max_vio"][-1] > 0
    assert (tmp_path / "val_loss.png").exists() and (tmp_path / "expert_load.png").exists()
    assert not any(f.endswith(".pt") for f in os.listdir(tmp_path))  # checkpoints removed when a run ends
    out = capsys.readouterr().out
    assert "deepseekmoe" in out and "±" in out
    # A finished run is skipped: its record stays byte for byte.
    before = (tmp_path / "dense-seed0.json").read_text()
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "dense-seed0.json").read_text() == before


def test_unknown_config_is_rejected(capsys):
    assert run.main(["--configs", "gpt5", "--steps", "1"]) == 2
    assert "unknown config 'gpt5'" in capsys.readouterr().err
