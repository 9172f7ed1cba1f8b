"""Smoke test of benchmarks/decode_cpu.py, the decode and prefill benchmark docs/benchmarks.md quotes: each mode
runs at its smallest setting (two weight copies, one round; the layer's own sizes, H = 1024 and 64 experts of 352,
so a few seconds each) and prints a row for every contender. Not a timing: the numbers are not checked.

Beside the script, not in tests/ (the package's suite, which also runs against an installed wheel): run it from a
source checkout's root with ``python -m pytest benchmarks``."""
import pytest

from benchmarks import decode_cpu  # a source checkout: run from its root (python -m pytest benchmarks)
from deepseek_moe import ext


@pytest.fixture(autouse=True)
def extension():
    try:
        ext.load()
    except ext.ExtensionUnavailable as err:
        pytest.skip(f"the benchmark times backend 'ext': {err}")


def rows(out: str, prefix: str):
    return [line.split() for line in out.splitlines() if line.startswith(prefix)]


def test_decode_prints_every_contender_against_the_dense_ffn(capsys):
    assert decode_cpu.main(["--tokens", "1", "--layers", "2", "--rounds", "1", "--dtype", "bfloat16",
                            "--no-hf"]) == 0
    out = capsys.readouterr().out
    assert "read bandwidth" in out
    names = {row[1] for row in rows(out, "  1 ")}
    assert names == {"ext", "torch", "dense"}
    dense = next(row for row in rows(out, "  1 ") if row[1] == "dense")
    assert dense[-1] == "1.00x"


def test_split_prints_each_piece_and_the_layer(capsys):
    assert decode_cpu.main(["--split", "--tokens", "1", "--layers", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for piece in ("op alone", "+ gate GEMM", "+ choice", "+ plan", "fused op", "layer", "dense"):
        assert any(line.strip().startswith(piece) and "x dense" in line for line in out.splitlines()), piece


def test_prefill_prints_ratios_and_rates(capsys):
    assert decode_cpu.main(["--prefill", "--tokens", "16", "--rounds", "1", "--dtype", "bfloat16", "--no-hf"]) == 0
    out = capsys.readouterr().out
    found = [row for row in rows(out, "T=") if row[2] != "hot"]
    assert {row[2] for row in found} == {"ext", "torch", "dense"}
    assert all(row[-4] == "TFLOP/s" and float(row[-5]) > 0 and float(row[-3]) > 0 and row[-1] == "hot" for row in found)
    assert float(out.split("GEMM in the same rounds:")[1].split()[0]) > 0
