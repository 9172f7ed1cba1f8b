"""The device program (benchmarks/gpu/run_all.py) end to end in its CPU smoke form, the per-stage profile split, and
the tile tuning table that selection reads."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepseek_moe as dm
from deepseek_moe.bench.profile import profile_stages
from deepseek_moe.kernels import heuristics
from deepseek_moe.kernels.heuristics import TileConfig
from deepseek_moe.stages import stage

ROOT = Path(__file__).resolve().parents[1]


def test_device_program_smoke_runs_every_step(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "benchmarks/gpu/run_all.py", "--smoke", "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_run.json").read_text())
    steps = record["steps"]
    assert {"build", "check", "tests", "time"} <= set(steps) and any(s.startswith("tune ") for s in steps)
    for name in ("triton", "torch"):
        assert steps["check"][name]["ok"] is True, steps["check"]
    assert steps["check"]["ext"].get("ok", True), steps["check"]  # ok, or not run with the reason
    assert set(record["shapes"]) == {"deepseek-moe-16b", "qwen3-30b-a3b", "mixtral-8x7b"}
    for shape in record["shapes"].values():
        names = {r["contender"] for r in shape["rows"]}
        assert {"triton", "torch"} <= names and any(n.startswith("dense-") for n in names)
        assert any(n.endswith("grouped_mm") for n in names), shape["not_run"]  # transformers' experts
        assert {"megablocks dMoE", "sonic-moe"} <= set(shape["not_run"])  # CUDA only: listed with the reason
        triton = shape["stages"]["triton"]["fwdbwd"]
        assert {"router/fwd", "plan/fwd", "gemm1_glu/fwd", "gemm2/fwd", "combine/fwd", "gemm1_glu/bwd",
                "gemm2/bwd"} <= set(triton)
        assert "experts/fwd" in shape["stages"]["torch"]["fwd"]  # the CPU segment loop: one fused stage
    table = heuristics.read_table(tmp_path / "tuned_tiles.json")
    assert set(table) == {"interpreter/bfloat16/H64-I32"} and set(table["interpreter/bfloat16/H64-I32"]) == set(
        heuristics.KINDS)


def test_stage_split_of_a_training_step_and_no_cost_without_a_profiler():
    cfg = dm.MoEConfig(hidden_size=32, expert_hidden_size=16, num_routed_experts=8, num_shared_experts=1, top_k=2,
                       backend="torch")
    layer = dm.DeepSeekMoELayer(cfg)
    x = torch.randn(24, 32, requires_grad=True)
    split = profile_stages(layer, x, "fwdbwd", calls=2)
    for key in ("router/fwd", "plan/fwd", "experts/fwd", "shared_experts/fwd", "experts/bwd", "router/bwd",
                "shared_experts/bwd"):
        assert split.get(key, 0) > 0, (key, split)
    assert layer.training  # restored
    with pytest.raises(ValueError, match="mode"):
        profile_stages(layer, x, "bwd")
    assert isinstance(stage("router"), contextlib.nullcontext)  # outside a profiler: nothing entered
    with pytest.raises(ValueError, match="unknown stage"):
        stage("gemm3")


def test_the_device_run_fails_for_what_it_must_not_hide():
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    try:
        from run_all import failed_steps
    finally:
        sys.path.pop(0)
    good = {"check": {"triton": {"ok": True}, "torch": {"ok": True}, "ext": {"not_run": "no nvcc"}},
            "tests": {"exit": 0, "tail": ""}}
    assert failed_steps(good, torch.device("cuda")) == []
    off = {**good, "check": {**good["check"], "torch": {"ok": False, "worst": 0.3}}}
    assert len(failed_steps(off, torch.device("cpu"))) == 1
    missing = {**good, "check": {**good["check"], "triton": {"not_run": "BackendUnavailable: ..."}}}
    assert failed_steps(missing, torch.device("cpu")) == []  # CPU: the interpreter may be off
    assert len(failed_steps(missing, torch.device("cuda"))) == 1
    for exit_code in (1, None):  # failed, or stopped by the budget
        assert len(failed_steps({**good, "tests": {"exit": exit_code, "tail": "x"}}, torch.device("cuda"))) == 1


def test_tuning_table_round_trip_and_lookup(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    best = {"gate_up": TileConfig(64, 64, 32, 4, 4), "down": TileConfig(128, 128, 64, 8, 3)}
    key = heuristics.table_key("sm90", torch.bfloat16, (2048, 1408))
    assert key == "sm90/bfloat16/H2048-I2048"
    heuristics.write_table(path, key, best, {"device": "test"})
    heuristics.write_table(path, "sm80/float16/H64-I32", {"down": TileConfig(16, 16, 16)}, {})
    assert heuristics.read_table(path)[key] == best
    monkeypatch.setattr(heuristics, "TABLE_PATH", path)
    heuristics._package_table.cache_clear()
    try:
        assert heuristics.tuned_tile_config("gate_up", torch.bfloat16, "sm90", (2048, 1536)) == best["gate_up"]
        assert heuristics.tuned_tile_config("dgrad", torch.bfloat16, "sm90", (2048, 1408)) is None  # not tuned
        assert heuristics.tuned_tile_config("gate_up", torch.float16, "sm90", (2048, 1408)) is None
        assert heuristics.tuned_tile_config("gate_up", torch.bfloat16, "sm90", None) is None
    finally:
        heuristics._package_table.cache_clear()
    for bad in ('{"entries": {"k": {"down": {"block_m": 3}}}}', '{"entries": []}', '{"entries": {"k": null}}',
                '{"entries": {"k": {"gate_upp": {"block_m": 16, "block_c": 16, "block_r": 16}}}}',
                '{"entries": {"k": {"down": {"block_m": 16, "block_c": 16, "block_r": 16, "num_warps": 3}}}}',
                "{}", "not json"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="not a tile tuning table"):
            heuristics.read_table(path)
        with pytest.raises(ValueError, match="not a tile tuning table"):  # never overwritten by a sweep
            heuristics.write_table(path, key, best, {})


def test_shipped_tuning_table_reads():
    assert isinstance(heuristics.read_table(heuristics.TABLE_PATH), dict)


@pytest.mark.gpu
def test_selection_reads_the_tuned_table_on_the_gpu(tmp_path, monkeypatch):
    device = torch.device("cuda")
    tiles = TileConfig(64, 64, 32, 4, 3)
    path = tmp_path / "tuned.json"
    heuristics.write_table(path, heuristics.table_key(heuristics.cuda_arch(device), torch.bfloat16, (128, 64)),
                           {kind: tiles for kind in heuristics.KINDS}, {})
    monkeypatch.setattr(heuristics, "TABLE_PATH", path)
    heuristics._package_table.cache_clear()
    try:
        backend = dm.backends.select("triton", device, torch.bfloat16, sizes=(128, 64))
        assert backend.fixed_settings[1:6] == [64, 64, 32, 4, 3]
        other = dm.backends.select("triton", device, torch.bfloat16, sizes=(4096, 14336))
        assert other.fixed_settings[1:6] != [64, 64, 32, 4, 3]  # another shape class: the heuristic
    finally:
        heuristics._package_table.cache_clear()
