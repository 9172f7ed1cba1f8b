"""Smoke test of the quality study (benchmarks/quality/run.py --quick): it trains, evaluates, records and plots;
a finished run is not trained again; the ladder configs have equal expert parameters and active FLOPs.

It lives beside the study, not in tests/ (the package's suite, which also runs against an installed wheel):
run it from a source checkout's root with ``python -m pytest benchmarks``."""
import argparse
import json
import os

import pytest
import torch

from benchmarks.quality import run  # a source checkout: run from its root (python -m pytest benchmarks)


def _random_bytes_data():
    """The data dict train_one/train_all take: 18 kB of random bytes to train on, 2 validation batches."""
    text_N = torch.randint(0, 256, (20_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return {"train": text_N[:18_000], "val": run.val_batches(text_N[18_000:], 2), "corpus": None}


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
    records = {f: json.loads((tmp_path / f).read_text()) for f in os.listdir(tmp_path)
               if f.endswith(".json") and f != "summary.json"}
    assert set(records) == {"dense-seed0.json", "deepseekmoe-seed0.json"}
    for record in records.values():
        assert record["git_revision"] and record["steps"] == 20
        assert record["history"]["step"] == [10, 20] and len(record["history"]["val_bpb"]) == 2
        assert 0 < record["final_val_bpb"] < 8.5  # below uniform bytes (8 bits) plus slack for 20 steps
        assert record["corpus"]["bytes"] > 0 and len(record["corpus"]["sha256"]) == 64
    moe = records["deepseekmoe-seed0.json"]
    assert moe["history"]["batch_max_vio"][-1] > 0 and moe["history"]["global_max_vio"][-1] > 0
    curve = moe["redundancy"]["top_experts"]
    assert [p["fraction"] for p in curve] == run.REDUNDANCY_FRACTIONS and curve[0]["loss"] > 0
    assert records["dense-seed0.json"]["redundancy"] is None
    assert (tmp_path / "val_loss.png").exists() and (tmp_path / "expert_load.png").exists()
    assert (tmp_path / "redundancy.png").exists() and (tmp_path / "max_vio.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["a"] + "-" + c["b"] for c in summary["comparisons"]] == ["deepseekmoe-dense"]
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


@pytest.mark.parametrize("argv, message", [
    ([], "say what to train"),
    (["--configs", ""], "unknown config ''"),
    (["--all", "--configs", "dense"], "not both"),
    (["--quick", "--seeds", "1"], "drop --seeds"),
    (["--configs", "dense", "--seeds", "1.5"], "comma list of integers"),
    (["--configs", "dense", "--seeds", ""], "comma list of integers"),
    (["--report", "--steps", "9"], "drop --steps"),
    (["--configs", "dense", "--data", "/no/such/file"], "--data: [Errno 2]"),
    (["--configs", "dense", "--seeds", "-1"], "non-negative"),
    (["--configs", "dense", "--steps", "0"], "at least 1"),
    (["--configs", "dense", "--jobs", "0"], "--jobs must be at least 1"),
])
def test_command_line_mistakes_are_named_before_anything_runs(argv, message, capsys, tmp_path):
    assert run.main(argv + ["--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_aliases_and_repeats_name_each_run_once(tmp_path):
    args = argparse.Namespace(jobs=2, quick=False, all=False, report=False, configs="deepseekmoe,deepseekmoe-aux",
                              seeds="0,0,1", steps=5)
    assert run._plan(args)[:3] == (["deepseekmoe"], [0, 1], 5)


def test_unreadable_records_and_too_little_text_are_named(tmp_path, capsys):
    (tmp_path / "dense-seed0.json").write_text("{")
    assert run.main(["--report", "--out", str(tmp_path)]) == 2
    assert "dense-seed0.json is not a finished run's JSON" in capsys.readouterr().err
    (tmp_path / "dense-seed0.json").write_text("{}")
    assert run.main(["--report", "--out", str(tmp_path)]) == 2
    assert "no 'config'" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 100)
    assert run.main(["--configs", "dense", "--data", str(small), "--out", str(tmp_path / "o")]) == 2
    assert f"needs at least {run.MIN_TEXT_BYTES}" in capsys.readouterr().err


def test_ten_steps_train(tmp_path):
    data = _random_bytes_data()
    record = run.train_one("dense", 0, 10, data, str(tmp_path), eval_every=5, progress=False)
    assert record["steps"] == 10 and record["history"]["step"] == [5, 10]


def test_t_quantiles_equal_the_published_table():
    # Two-sided 95% Student t quantiles as printed in statistics tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 11: 2.201, 20: 2.086, 30: 2.042, 60: 2.000, 100: 1.984}
    for df, value in table.items():
        assert run.t95(df) == pytest.approx(value, abs=6e-4), df
    records = [{"config": c, "seed": seed, "steps": 9, "final_val_bpb": 3.0 + 0.01 * seed * (c == "shared"),
                "git_revision": "r", "corpus": None, "history": {"batch_max_vio": [0], "global_max_vio": [0]}}
               for c in ("gshard", "shared") for seed in range(12)]
    (comparison,) = run.summary(records)["comparisons"]  # 12 seeds: beyond the old 11-seed table
    assert comparison["ci95"] == pytest.approx(run.t95(11) * comparison["std"] / 12 ** 0.5)


def test_paired_seeds_share_everything_but_the_mlps():
    dense, moe = run.build("dense", 3), run.build("deepseekmoe", 3)
    moe_state = moe.state_dict()
    for key, value in dense.state_dict().items():
        if ".mlp." not in key:
            assert torch.equal(value, moe_state[key]), key
    assert not torch.equal(run.build("dense", 4).embed.weight, dense.embed.weight)


def test_confidence_interval_of_paired_differences():
    mean, std, half = run._mean_ci([0.1, 0.3, 0.2])
    assert (mean, std) == pytest.approx((0.2, 0.1)) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=2e-4)
    records = [{"config": c, "seed": s, "steps": 9, "final_val_bpb": v, "git_revision": "r", "corpus": None,
                "history": {"batch_max_vio": [0], "global_max_vio": [0]}}
               for c, s, v in [("gshard", 0, 3.0), ("gshard", 1, 3.1), ("shared", 0, 2.9), ("shared", 1, 3.0)]]
    (comparison,) = run.summary(records)["comparisons"]
    assert comparison["diff"] == pytest.approx(-0.1) and comparison["std"] == pytest.approx(0.0, abs=1e-12)
    assert comparison["decided"]


def test_runs_of_another_step_count_are_refused_and_kept_out_of_the_summary(tmp_path, capsys):
    record = {"config": "dense", "seed": 0, "steps": 20, "final_val_bpb": 3.0, "git_revision": "r", "corpus": None,
              "history": {"batch_max_vio": [0], "global_max_vio": [0]}}
    (tmp_path / "dense-seed0.json").write_text(json.dumps(record))
    (tmp_path / "notes.json").write_text("{}")  # not a run: ignored
    assert run.main(["--configs", "dense", "--seeds", "0", "--steps", "30", "--out", str(tmp_path)]) == 2
    assert "holds 20-step runs" in capsys.readouterr().err
    other = {**record, "seed": 1, "steps": 30}
    summary = run.summary([record, other, {**record, "seed": 2}])
    assert summary["steps"] == 20 and summary["ignored"] == ["dense-seed1 (30 steps)"]
    assert run.main(["--report", "--out", str(tmp_path / "empty")]) == 2


def test_runs_in_parallel_workers_equal_runs_in_this_process(tmp_path):
    """--jobs 2 trains each run in its own process with half the threads; at one thread either way the records
    are the same number for number, so a parallel study is the sequential one, whatever this process ran before
    (the study pins the experts backend: auto would pick the compiled extension here once test_ext loaded it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers get max(1, 1 // 2) = 1 thread: the same arithmetic as this process
    try:
        assert run.main(["--quick", "--out", str(tmp_path / "one")]) == 0
        assert run.main(["--quick", "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    finally:
        torch.set_num_threads(threads)
    for name in ("dense-seed0.json", "deepseekmoe-seed0.json"):
        one, two = (json.loads((tmp_path / d / name).read_text()) for d in ("one", "two"))
        assert one["torch_threads"] == two["torch_threads"] == 1
        assert one["backend"] == two["backend"] == (None if name.startswith("dense") else "torch")
        assert one["history"]["val_bpb"] == two["history"]["val_bpb"]
        assert one["final_val_bpb"] == two["final_val_bpb"] and one["redundancy"] == two["redundancy"]
    assert run.main(["--quick", "--jobs", "0", "--out", str(tmp_path / "zero")]) == 2


def test_parallel_study_skips_finished_runs_and_stops_at_the_first_failure(tmp_path):
    data = _random_bytes_data()
    finished = {"config": "dense", "seed": 5, "steps": 4}
    (tmp_path / "dense-seed5.json").write_text(json.dumps(finished))
    # "no-such-config" fails in its worker at once; dense seed 0, handed out beside it, runs to its end; dense
    # seed 1 is never handed out; dense seed 5 is finished already and is not trained again.
    tasks = [("no-such-config", 0), ("dense", 0), ("dense", 1), ("dense", 5)]
    with pytest.raises(KeyError, match="no-such-config"):
        run.train_all(tasks, steps=4, data=data, out_dir=str(tmp_path), eval_every=4, jobs=2)
    assert json.loads((tmp_path / "dense-seed0.json").read_text())["steps"] == 4
    assert not (tmp_path / "dense-seed1.json").exists()
    assert json.loads((tmp_path / "dense-seed5.json").read_text()) == finished


def test_a_run_named_twice_trains_once_in_parallel(tmp_path):
    data = _random_bytes_data()
    tasks = [("dense", 0), ("deepseekmoe", 0), ("deepseekmoe-aux", 0), ("dense", 0)]
    run.train_all(tasks, steps=2, data=data, out_dir=str(tmp_path), eval_every=2, jobs=2)
    assert sorted(os.listdir(tmp_path)) == ["deepseekmoe-seed0.json", "dense-seed0.json"]


def test_redundancy_comparison_pairs_the_loss_rise_seed_by_seed():
    def record(config, seed, losses):
        curve = [{"fraction": f, "loss": v} for f, v in zip(run.REDUNDANCY_FRACTIONS, losses)]
        return {"config": config, "seed": seed, "steps": 9, "final_val_bpb": 2.0, "git_revision": "r",
                "corpus": None, "history": {"batch_max_vio": [0.5], "global_max_vio": [0.2]},
                "redundancy": {"top_experts": curve}}
    records = [record("gshard", 0, [1.0, 2.0, 2.1, 2.2, 2.3]), record("gshard", 1, [1.2, 2.0, 2.1, 2.2, 2.3]),
               record("deepseekmoe", 0, [1.1, 2.3, 2.3, 2.3, 2.3]), record("deepseekmoe", 1, [1.0, 2.0, 2.2, 2.2, 2.2])]
    points = run.summary(records)["redundancy_comparison"]
    assert [p["fraction"] for p in points] == run.REDUNDANCY_FRACTIONS[1:]
    # seed 0: rise 1.2 against 1.0; seed 1: rise 1.0 against 0.8
    assert points[0]["per_seed"] == pytest.approx([0.2, 0.2]) and points[0]["decided"]
    assert points[3]["per_seed"] == pytest.approx([1.2 - 1.3, 1.2 - 1.1])
    assert "less redundant" in run.markdown(run.summary(records))
