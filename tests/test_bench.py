"""The benchmark CLI end to end at tiny sizes, its matching rule, its one-line errors, and what it tells a newcomer:
a table that fits the terminal, a legend, progress, a memory estimate that refuses what cannot fit, the backends it
leaves out, and titles that name the configs compared."""
import csv
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from deepseek_moe.bench import cli, contenders, memory
from deepseek_moe.bench.cli import main
from deepseek_moe.bench.contenders import configs_for
from deepseek_moe.bench.report import COLUMNS

TINY = ["--hidden-size", "32", "--ffn-size", "64", "--repeats", "2", "--warmup", "1", "--no-progress"]
SMALL = ["--hidden-size", "64", "--ffn-size", "128", "--tokens", "16", "--repeats", "1", "--warmup", "0"]


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
    pytest.importorskip("matplotlib", reason="--plot needs the bench extra's matplotlib")
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    rc = main(TINY + ["--tokens", "16,48", "--mode", "fwd,fwdbwd,decode", "--decode-tokens", "2",
                      "--backend", "all", "--dtype", "float32,bfloat16", "--json", str(out_json),
                      "--csv", str(out_csv), "--plot", str(out_png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "deepseek-64x+2" in printed and "mixtral-8x2" in printed
    data = json.loads(out_json.read_text())
    assert {"torch", "device", "match", "hidden_size", "ffn_size", "command", "peers"} <= set(data["meta"])
    rows = data["rows"]
    assert data["columns"][:len(COLUMNS)] == [k for k, _, _ in COLUMNS]  # the table's, then every other row key
    assert all(set(data["columns"]) == set(row) for row in rows)
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
    assert all(r["ratio_to_ref"] == pytest.approx(1.0) and r["ref_config"] == "mixtral-8x2" for r in ref)
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
    (["--backend", "cuda"], "--backend 'cuda': expected a comma list of eager, torch, triton, ext, or one of auto, all"),
    (["--tokens", ""], "--tokens '': expected a comma list of integers >= 1"),
    (["--mode", ""], "--mode '': expected a comma list of fwd"),
    (["--peers", "none", "--hf-impls", "eager"], "--hf-impls names transformers' implementations to time as peers"),
    (["--json", "/nonexistent/dir/x.json"], "--json '/nonexistent/dir/x.json': cannot write there"),
    (["--csv", "/nonexistent/x.csv"], "--csv '/nonexistent/x.csv': cannot write there"),
    (["--backend", "megablocks"], "--backend megablocks: no megablocks backend in this release"),
    (["--dtype", "float8"], "--dtype 'float8': expected a comma list of float32, bfloat16, float16"),
    (["--mode", "train"], "--mode 'train': expected a comma list of fwd, fwdbwd, decode"),
    (["--match", "area"], "--match 'area': expected one of flops, params, none"),
    (["--match", "flops,params"], "--match 'flops,params': expected one of flops, params, none"),
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


# ------------------------------------------------------------------------------------------ what a newcomer sees
def _timing_rows(out):
    """The timing table's rows, split in cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "median s" in line) + 2  # header, rule
    end = lines.index("", start)
    return [line.split() for line in lines[start:end]]


@pytest.fixture
def no_rich(monkeypatch):
    """rich uninstalled: every ``import rich...`` raises ImportError."""
    for name in [n for n in sys.modules if n == "rich" or n.startswith("rich.")] + ["rich"]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("with_rich", [True, False], ids=["rich", "plain"])
def test_report_fits_the_terminal_width(with_rich, monkeypatch, capsys, request):
    pytest.importorskip("transformers", reason="the report includes the transformers peers (the hf extra)")
    if not with_rich:
        request.getfixturevalue("no_rich")
    monkeypatch.setenv("COLUMNS", "80")
    assert main(SMALL + ["--no-progress", "--dtype", "float32,bfloat16", "--mode", "fwd"]) == 0
    out = capsys.readouterr().out
    too_long = [line for line in out.splitlines() if len(line) > 80]
    assert not too_long, too_long
    # The timing columns that matter are all there, headers unbroken, and what did not fit is named.
    header = next(line for line in out.splitlines() if line.lstrip().startswith("config") and "median s" in line)
    for name in ("impl", "dtype", "mode", "T", "× ref", "× dense"):
        assert name in header, header
    assert "deepseek-64x+2" in out and "mixtral-8x2" in out and "hf-deepseek-v3" in out
    assert "Left out at this width" in out
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal gets every column
    assert main(SMALL + ["--no-progress", "--mode", "fwd", "--peers", "none"]) == 0
    wide = capsys.readouterr().out
    assert "Left out" not in wide and "MaxVio" in wide and "FLOP/s" in wide and "combos" in wide


def test_legend_under_the_table(capsys):
    assert main(SMALL + ["--no-progress", "--mode", "fwd", "--peers", "none"]) == 0
    out = capsys.readouterr().out.splitlines()
    starts = {name: next((i for i, line in enumerate(out) if line.startswith(name + ":")), None)
              for name in ("× ref", "× dense", "spread", "peak MiB", "MaxVio", "combos")}
    assert None not in starts.values(), starts
    table_end = out.index("", next(i for i, line in enumerate(out) if "median s" in line))
    assert min(starts.values()) > table_end
    ref_line = " ".join(out[starts["× ref"]:starts["× dense"]])
    assert "a = mixtral-8x2" in ref_line and "1.00" in ref_line


class _Stream:
    """A stderr that records what was flushed, line by line, and says whether it is a terminal."""

    def __init__(self, tty):
        self.tty, self.buffer, self.flushed = tty, "", []

    def write(self, text):
        self.buffer += text
        return len(text)

    def flush(self):
        self.flushed.append(self.buffer)

    def isatty(self):
        return self.tty

    def fileno(self):
        raise OSError("not a real file")


def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    stream = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", stream)
    assert main(SMALL + ["--mode", "fwd,fwdbwd", "--repeats", "2", "--peers", "none", "--backend", "torch"]) == 0
    lines = [line for line in stream.buffer.splitlines() if line.startswith("[")]
    # 2 modes x (2 configs + 1 dense) x 2 repeats, each line flushed as its sample finished.
    assert len(lines) == 12
    for k, line in enumerate(lines, 1):
        assert re.fullmatch(rf"\[{k}/12\] (fwd|fwdbwd) T=16 float32 \S+ \[\w+\]: [0-9.e-]+ s", line), line
        assert any(f.endswith(line + "\n") for f in stream.flushed), line
    assert "fwd T=16 float32 deepseek-64x+2 [torch]" in stream.buffer


@pytest.mark.parametrize("tty,flag", [(True, []), (False, ["--no-progress"]), (True, ["--no-progress"])])
def test_progress_bar_on_a_terminal_and_silence_on_request(tty, flag, monkeypatch, capsys):
    pytest.importorskip("transformers", reason="the report includes the transformers peers (the hf extra)")
    stream = _Stream(tty=tty)
    monkeypatch.setattr(sys, "stderr", stream)
    assert main(SMALL + ["--mode", "fwd", "--peers", "none"] + flag) == 0
    assert "[1/" not in stream.buffer
    if flag:
        assert stream.buffer == ""


def test_memory_estimate_refuses_a_run_that_cannot_fit(monkeypatch, capsys):
    """The run that swapped for 10 minutes to 22.6 GB on a 24 GiB machine is refused at once, nothing built."""
    pytest.importorskip("transformers", reason="the report includes the transformers peers (the hf extra)")
    monkeypatch.setattr(cli, "available_bytes", lambda device: 24 * 2**30)

    def never(*args, **kwargs):
        raise AssertionError("a module was built before the memory check")

    monkeypatch.setattr(contenders, "DeepSeekMoELayer", never)
    monkeypatch.setattr(contenders.SharedExperts, "dense", never)
    begin = time.perf_counter()
    rc = main(["--a", "deepseek-v3", "--b", "mixtral-8x7b", "--hidden-size", "512", "--match", "none"])
    elapsed = time.perf_counter() - begin
    captured = capsys.readouterr()
    assert rc == 2 and elapsed < 5, (rc, elapsed)
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("deepseek-moe-bench: error: not enough memory: about ")
    needed = float(re.search(r"about ([0-9.]+) GiB needed", err).group(1))
    assert needed > 0.9 * 24 and "24.0 GiB available, 90% of it usable (21.6 GiB) on cpu" in err
    assert "--peers none" in err and "--tokens" in err and "--hidden-size" in err and "--hf-impls grouped_mm" in err
    assert captured.out == ""
    # A batched_mm peer as the heaviest call: the advice names that flag.
    assert main(["--quick", "--hf-impls", "batched_mm", "--tokens", "4096", "--mode", "fwdbwd"]) == 2
    assert "--hf-impls without batched_mm" in capsys.readouterr().err


def test_memory_estimate_is_printed_and_counts_what_is_built(capsys):
    pytest.importorskip("transformers", reason="the report includes the transformers peers (the hf extra)")
    assert main(SMALL + ["--no-progress", "--mode", "fwd", "--backend", "eager,torch"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"memory: about [0-9.]+ (MiB|GiB) needed at the peak \(float32: weights [0-9.]+ (MiB|GiB) in "
                    r"9 modules", " ".join(out.split())), out
    assert out.index("memory: about") < out.index("median s")
    # The weights it counts are exactly the parameters and buffers of the modules the CLI builds.
    args = cli.parse(SMALL + ["--backend", "eager,torch", "--dtype", "float32,bfloat16"])
    groups, _ = cli.plan(args)
    for dtype_name, dtype, group in groups:
        built = {}
        for c in group:
            module = c.build(built.get(c.family)).to(dtype=dtype)
            built.setdefault(c.family, module)
            held = sum(t.numel() for t in list(module.parameters()) + list(module.buffers()))
            assert held == c.state_numel, (c.name, c.implementation)
    est = memory.estimate(groups, args.modes, args.tokens, args.decode_tokens, args.hidden_size, args.repeats,
                          args.device)
    # The run's estimate is the largest of its dtypes', and its weights are what that dtype's modules hold.
    per_dtype = [memory.estimate([g], args.modes, args.tokens, args.decode_tokens, args.hidden_size, args.repeats,
                                 args.device) for g in groups]
    assert est == max(per_dtype, key=lambda e: e.total_bytes)
    assert est.weights_bytes in {sum(c.state_numel for c in g[2]) * g[1].itemsize for g in groups}
    assert est.total_bytes >= est.weights_bytes + est.call_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_call_estimate_bounds_the_measured_peak(dtype):
    """Every contender kind's measured peak (timing.peak_memory) stays under call_bytes: our layer (eager and torch
    backends), the dense FFN, transformers' Mixtral and DeepseekV3 blocks with each experts implementation."""
    pytest.importorskip("transformers", reason="the peers are transformers' blocks (the hf extra)")
    from deepseek_moe import MoEConfig
    from deepseek_moe.bench.timing import peak_memory, run_once

    H, T = 64, 64
    mixtral = MoEConfig(hidden_size=H, expert_hidden_size=128, num_routed_experts=4, top_k=2, num_shared_experts=0,
                        score_func="softmax", norm_topk_prob=True)
    deepseek = MoEConfig(hidden_size=H, expert_hidden_size=32, num_routed_experts=8, top_k=3, num_shared_experts=2)
    group = [contenders.dense_contender(H, 256)]
    for side, cfg in (("a", mixtral), ("b", deepseek)):
        group += [contenders.moe_contender(side, side, cfg, backend) for backend in ("eager", "torch")]
        group += [contenders.hf_contender(side, side, cfg, impl) for impl in ("eager", "grouped_mm", "batched_mm")]
    assert None not in group and {c.name for c in group if c.kind == "peer"} == {"hf-mixtral", "hf-deepseek-v3"}
    built = {}
    for c in group:
        module = c.build(built.get(c.family)).to(dtype=dtype)
        built.setdefault(c.family, module)
        for mode in ("fwd", "fwdbwd"):
            module.train(mode == "fwdbwd")
            x = torch.randn(1, T, H, dtype=dtype, requires_grad=mode == "fwdbwd")
            run_once(module, x, mode)
            measured = peak_memory(lambda: run_once(module, x, mode), torch.device("cpu"))
            bound = memory.call_bytes(c, mode, T, H, x.element_size())
            assert measured <= bound, (c.name, c.implementation, mode, measured, bound)


def test_available_memory(tmp_path):
    cpu = torch.device("cpu")
    assert memory.available_bytes(cpu) > 0
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25165824 kB\nMemAvailable:   1048576 kB\n")
    assert memory.available_bytes(cpu, str(meminfo)) == 2**30
    assert memory.available_bytes(cpu, str(tmp_path / "missing")) > 0  # os.sysconf's free pages


@pytest.fixture
def ext_not_built(monkeypatch):
    """The compiled extension neither loaded, nor built ahead of time, nor in torch's cache."""
    monkeypatch.setattr(contenders.ext, "is_loaded", lambda: False)
    monkeypatch.setattr(contenders.ext, "has_prebuilt", lambda: False)
    monkeypatch.setattr(contenders.ext, "build_error", lambda: None)
    monkeypatch.setattr(contenders.ext, "has_cached_build", lambda: False)


def test_backend_all_names_what_it_skips(ext_not_built, capsys):
    assert main(SMALL + ["--no-progress", "--mode", "fwd", "--peers", "none", "--backend", "all"]) == 0
    out = capsys.readouterr().out
    skipped = dict(re.findall(r"^backend (\w+): skipped \((.*)", out, re.M))
    assert set(skipped) == {"triton", "ext", "megablocks"}, out
    assert skipped["ext"].startswith("not built (pass --backend ext to build it")
    impls = {row[1] for row in _timing_rows(out) if row[0] in ("mixtral-8x2", "deepseek-64x+2")}
    assert impls == {"eager", "torch"}


def test_backend_all_in_a_wheel_says_how_to_get_ext(monkeypatch, ext_not_built):
    """A wheel has no csrc/ to build from: --backend all gives backend_status's advice, not '--backend ext'."""
    monkeypatch.setattr(contenders.ext, "sources", lambda cuda=False: [])
    usable, skipped = contenders.backend_choices(torch.device("cpu"), torch.float32)
    assert "ext" not in usable and "not in this installation" in skipped["ext"]
    assert "--backend ext" not in skipped["ext"]


def test_backend_all_loads_a_cached_ext_build_and_never_compiles(monkeypatch, ext_not_built):
    from deepseek_moe.backends import ext as ext_backend

    monkeypatch.setattr(contenders.ext, "has_cached_build", lambda: True)
    tried = []

    def ensure_loaded():
        tried.append(True)
        raise contenders.ext.ExtensionUnavailable("the cached build failed to load")

    monkeypatch.setattr(ext_backend, "ensure_loaded", ensure_loaded)
    usable, skipped = contenders.backend_choices(torch.device("cpu"), torch.float32)
    assert tried and "ext" not in usable and skipped["ext"] == "the cached build failed to load"


def test_jit_build_cache_is_recognised(monkeypatch, tmp_path):
    srcs = contenders.ext.sources()
    if not srcs:
        pytest.skip("no csrc/ sources in this installation")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "deepseek_moe_ext"
    folder.mkdir()
    (folder / "build.ninja").write_text("".join(f"build x.o: compile {src}\n" for src in srcs))
    so = folder / "deepseek_moe_ext.so"
    so.write_bytes(b"")
    newest = max(os.path.getmtime(p) for p in srcs + contenders.ext.headers() + [str(folder / "build.ninja")])
    os.utime(so, (newest + 10, newest + 10))
    assert contenders.ext.has_cached_build()
    os.utime(so, (newest - 10, newest - 10))  # older than a source: ninja would compile
    assert not contenders.ext.has_cached_build()
    os.utime(so, (newest + 10, newest + 10))
    (folder / "build.ninja").write_text("build x.o: compile /elsewhere/csrc/ops.cpp\n")  # another checkout's
    assert not contenders.ext.has_cached_build()


def test_titles_and_columns_name_the_configs_compared(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs the bench extra's matplotlib")
    import matplotlib.figure

    texts = []
    save = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    out_json, out_csv, out_png = tmp_path / "q.json", tmp_path / "q.csv", tmp_path / "q.png"
    # fwdbwd: deepseek-moe-16b's balance loss is per sequence, so the CLI must hand it (1, T, H).
    assert main(["--a", "qwen2-moe", "--b", "deepseek-moe-16b", "--hidden-size", "32", "--tokens", "8", "--mode",
                 "fwdbwd", "--hf-impls", "grouped_mm", "--repeats", "1", "--warmup", "0", "--no-progress", "--json",
                 str(out_json),
                 "--csv", str(out_csv), "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    title = out[out.index("deepseek-moe-bench: a ="):out.index("median s")]
    assert "a = qwen2-moe (60×1408 top-4 + 4 shared, the reference)" in " ".join(title.split())
    assert "b = deepseek-moe-16b (64×1408 top-6 + 2 shared)" in " ".join(title.split())
    assert "F=" not in title and "2816" not in out and "mixtral" not in out.lower()
    data = json.loads(out_json.read_text())
    meta = data["meta"]
    assert meta["reference"] == "qwen2-moe" and meta["compared"] == "deepseek-moe-16b" and meta["ffn_size"] is None
    assert meta["configs"]["qwen2-moe"]["layout"] == "60×1408 top-4 + 4 shared"
    assert "F=" not in meta["title"] and "qwen2-moe" in meta["title"]
    assert "ratio_to_ref" in data["columns"] and not any("mixtral" in c for c in data["columns"])
    for row in data["rows"]:
        assert row["ref_config"] == "qwen2-moe" and "ratio_to_mixtral" not in row
    header = next(csv.reader(out_csv.open()))
    assert "ratio_to_ref" in header and "ref_config" in header and not any("mixtral" in h for h in header)
    assert texts and not any("mixtral" in t.lower() or "F=" in t for t in texts), texts
    assert any("qwen2-moe" in t for t in texts)


def test_hf_grouped_mm_peer_is_skipped_with_the_reason_where_torch_cannot_run_it(capsys):
    """torch._grouped_mm on the CPU needs rows of multiples of 16 bytes: H = 66 in fp32 crashed the run at warm-up."""
    rc = main(["--hidden-size", "66", "--ffn-size", "128", "--tokens", "8", "--mode", "fwd", "--repeats", "1",
               "--warmup", "0", "--hf-impls", "eager,grouped_mm", "--no-progress"])
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert rc == 0, out
    assert "mixtral-8x2 hf grouped_mm: skipped (torch._grouped_mm on the CPU needs rows of multiples of 16 bytes" in out
    assert "hf-mixtral" in out and "eager" in out  # the eager peer still runs
