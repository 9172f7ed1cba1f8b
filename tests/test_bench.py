"""The benchmark CLI end to end at tiny sizes, its matching rule, and its one-line errors."""
import json
import math
import subprocess
import sys

import pytest

from deepseek_moe.bench.cli import main
from deepseek_moe.bench.contenders import configs_for
from deepseek_moe.bench.report import COLUMNS

TINY = ["--hidden-size", "32", "--ffn-size", "64", "--repeats", "2", "--warmup", "1", "--no-progress"]


def _expert_flops(cfg):
    return 2 * 3 * cfg.expert_hidden_size * cfg.hidden_size * (cfg.top_k + cfg.num_shared_experts)


@pytest.mark.parametrize("H,F", [(1024, 2816), (512, 1408), (4096, 14336), (64, 128)])
@pytest.mark.parametrize("match", ["flops", "params"])
def test_matching_rule(match, H, F):
    (name_a, a), (name_b, b) = configs_for(match, H, F)
    assert (a.num_routed_experts, a.top_k, a.num_shared_experts, a.expert_hidden_size) == (8, 2, 0, F)
    assert (b.top_k, b.num_shared_experts, b.expert_hidden_size) == (14, 2, F // 8)
    assert _expert_flops(a) == _expert_flops(b)
    assert abs(b.total_params - a.total_params) / a.total_params <= 0.05
    if match == "params":
        assert b.routed_params + b.shared_params == a.routed_params


def test_cli_end_to_end(tmp_path, capsys):
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    rc = main(TINY + ["--tokens", "16,48", "--mode", "fwd,fwdbwd,decode", "--decode-tokens", "2",
                      "--backend", "all", "--dtype", "float32,bfloat16", "--json", str(out_json),
                      "--csv", str(out_csv), "--plot", str(out_png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "deepseek-64x+2" in printed and "mixtral-8x2" in printed
    data = json.loads(out_json.read_text())
    assert {"torch", "device", "match", "hidden_size", "ffn_size", "command", "peers"} <= set(data["meta"])
    assert data["columns"] == [k for k, _, _ in COLUMNS]
    rows = data["rows"]
    # 2 dtypes x (2 fwd + 2 fwdbwd + 1 decode) groups x (2 configs x 2 backends + dense [+ peers]).
    assert len(rows) >= 2 * 5 * 5
    for row in rows:
        for key, _, _ in COLUMNS:
            assert key in row, key
            if not isinstance(row[key], str):
                assert math.isfinite(row[key]), (key, row)
        assert row["median_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_memory_bytes"] >= 0
    names = {(r["config"], r["implementation"]) for r in rows}
    assert {("mixtral-8x2", "torch"), ("deepseek-64x+2", "eager"), ("dense-128", "dense")} <= names
    ref = [r for r in rows if r["config"] == "mixtral-8x2" and r["implementation"] == "torch"]
    assert all(r["ratio_to_mixtral"] == pytest.approx(1.0) for r in ref)
    assert all(r["expert_combinations"] == math.comb(64, 14) for r in rows if r["config"] == "deepseek-64x+2")
    if data["meta"]["peers"]["transformers"] == "available":
        assert any(r["config"].startswith("hf-") for r in rows)
    assert out_csv.read_text().splitlines()[0].startswith("config,implementation")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_compared_as_they_are(capsys, tmp_path):
    out_json = tmp_path / "p.json"
    rc = main(["--a", "qwen2-moe", "--b", "mixtral-8x7b", "--hidden-size", "32", "--tokens", "8", "--mode", "fwd",
               "--repeats", "1", "--warmup", "0", "--no-progress", "--peers", "none", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "qwen2-moe" in out and "mixtral-8x7b" in out and "match=none" in out
    data = json.loads(out_json.read_text())
    assert data["meta"]["match"] == "none" and data["meta"]["command"].startswith("deepseek-moe-bench --a qwen2-moe")
    assert main(["--a", "qwen2-moe", "--match", "params"]) == 2


@pytest.mark.parametrize("argv,needle", [
    (["--a", "gpt-5"], "--a 'gpt-5': unknown preset; expected one of"),
    (["--backend", "cuda"], "--backend 'cuda': expected a comma list of eager, torch"),
    (["--backend", "megablocks"], "--backend megablocks: the megablocks adapter is not part of this release"),
    (["--dtype", "float8"], "--dtype 'float8': expected a comma list of float32, bfloat16, float16"),
    (["--mode", "train"], "--mode 'train': expected a comma list of fwd, fwdbwd, decode"),
    (["--match", "area"], "--match 'area': expected a comma list of flops, params, none"),
    (["--tokens", "0"], "--tokens '0': expected a comma list of integers >= 1"),
    (["--repeats", "0"], "--repeats 0: expected an integer >= 1"),
    (["--device", "tpu"], "--device 'tpu': expected cpu, cuda, cuda:N or auto"),
    (["--hf-impls", "fast"], "--hf-impls 'fast': expected a comma list of eager, grouped_mm, batched_mm"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_flags_one_line_error(argv, needle, capsys):
    assert main(TINY + argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_module_entry_point_and_error_without_traceback():
    ok = subprocess.run([sys.executable, "-m", "deepseek_moe.bench", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "deepseek-moe-bench" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "deepseek_moe.bench", "--dtype", "int8"], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("deepseek-moe-bench: error: --dtype 'int8'")
    assert "Traceback" not in bad.stderr


def test_missing_peer_is_listed_not_an_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert main(TINY + ["--tokens", "8", "--mode", "fwd", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "peer transformers: not run (not installed" in out and "hf-" not in out
