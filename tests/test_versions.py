"""Declared floors: below each, one clear message naming the floor and the upgrade command, where the part that
needs it is imported or selected (versions faked through the installed metadata); at or above, nothing."""
import subprocess
import sys
import textwrap

import pytest
import torch

from deepseek_moe import versions


def _with_version(distribution, version, code):
    """Run ``code`` in a fresh interpreter in which ``distribution``'s installed version reads ``version``."""
    program = textwrap.dedent(f"""
        import importlib.metadata as metadata
        real = metadata.version
        metadata.version = lambda name: {version!r} if name == {distribution!r} else real(name)
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)


def test_parse_and_messages():
    assert versions.parse("2.13.0+cpu") == (2, 13, 0) and versions.parse("2.10.0rc1") == (2, 10, 0)
    for name, floor in versions.FLOORS.items():
        assert versions.below_floor(name, floor) is None
        message = versions.below_floor(name, "1.0.0")
        assert f"{name}>={floor}" in message and "pip install -U" in message and "found 1.0.0" in message


def test_torch_below_the_floor_fails_at_import_with_the_floor():
    result = _with_version("torch", "2.9.1", "import deepseek_moe")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: deepseek_moe needs torch>=2.10 (found 2.9.1)"), result.stderr[-800:]
    assert "pip install -U 'torch>=2.10'" in last


def test_transformers_below_the_floor_fails_at_import_of_hf_only():
    result = _with_version("transformers", "4.57.6", """
        import deepseek_moe
        try:
            import deepseek_moe.hf
        except ImportError as err:
            print("refused:", err)
    """)
    assert result.returncode == 0, result.stderr[-800:]
    assert "refused: deepseek_moe needs transformers>=5.19 (found 4.57.6)" in result.stdout


def test_triton_below_the_floor_makes_the_backend_unavailable(monkeypatch):
    pytest.importorskip("triton")
    from deepseek_moe.backends.triton import TritonBackend

    monkeypatch.setattr(versions, "installed", lambda name: "3.0.0" if name == "triton" else None)
    reason = TritonBackend("silu").unavailable_reason(torch.device("cuda"), torch.float32)
    assert reason.startswith("deepseek_moe needs triton>=3.6 (found 3.0.0)")


def test_the_triton_interpreter_is_refused_where_numpy_breaks_it(monkeypatch):
    from deepseek_moe.backends import triton as triton_backend

    fake = {"triton": "3.6.0", "numpy": "2.4.6"}
    monkeypatch.setattr(versions, "installed", fake.get)
    monkeypatch.setattr(triton_backend, "installed", fake.get)
    assert "pip install 'numpy<2.4'" in triton_backend.interpreter_reason()
    fake["numpy"] = "2.3.5"
    assert triton_backend.interpreter_reason() is None
    fake.update(triton="3.7.1", numpy="2.4.6")
    assert triton_backend.interpreter_reason() is None
