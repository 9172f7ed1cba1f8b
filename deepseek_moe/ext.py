"""The optional compiled extension (``csrc/``): the routing sort, the weighted combine and the fused segment MLP.

Never required. Two ways to get it:

* ahead of time: ``DEEPSEEK_MOE_BUILD_EXT=1 pip install -e . --no-build-isolation`` builds ``deepseek_moe/_C``;
* just in time: ``deepseek_moe.ext.load()`` compiles the sources with ``torch.utils.cpp_extension`` (ninja, a
  C++17 compiler; ~30 s once, then cached under ``$TORCH_EXTENSIONS_DIR``).

After loading, the ops live under ``torch.ops.deepseek_moe`` (``route_plan``, ``combine``, ``combine_backward``,
``segment_mlp_fused``, ``segment_mlp_fused_backward``) and ``backend="ext"`` can run. Their outputs come from
ATen's allocator.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import threading
from typing import List, Optional

import torch

__all__ = ["ExtensionUnavailable", "load", "is_loaded", "has_prebuilt", "has_cached_build", "sources", "build_error",
           "unavailable_reason", "shared_cpu_watch"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_JIT_NAME = "deepseek_moe_ext"
_lock = threading.Lock()
_loaded = False
_error: Optional[str] = None


class ExtensionUnavailable(RuntimeError):
    """The extension could not be loaded or built; the message says what is missing and how to fix it."""


def sources(cuda: bool = False) -> List[str]:
    """The extension's C++ sources (and .cu sources with ``cuda``) from a source checkout; [] if absent."""
    root = os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")
    if not os.path.isdir(root):
        return []
    files = [os.path.join(root, "ops.cpp")] + sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))
    if cuda:
        files += sorted(glob.glob(os.path.join(root, "cuda", "*.cu")) + glob.glob(os.path.join(root, "cuda", "*.cpp")))
    return files


def headers() -> List[str]:
    """The extension's headers (csrc/**/*.h) from a source checkout; [] if absent."""
    root = os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")
    return sorted(glob.glob(os.path.join(root, "**", "*.h"), recursive=True))


def _headers_digest() -> str:
    """A digest of the headers' contents. torch's just-in-time builder rebuilds when the sources or the build
    arguments change, not the headers they include: the digest goes into the arguments as a define."""
    digest = hashlib.sha1()
    for path in headers():
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def is_loaded() -> bool:
    """Whether the extension's ops are registered in this process."""
    return _loaded


def build_error() -> Optional[str]:
    """Why the last :func:`load` failed, or None."""
    return _error


def has_prebuilt() -> bool:
    """Whether an ahead-of-time build (``deepseek_moe/_C``) is installed."""
    return _prebuilt() is not None


def has_cached_build() -> bool:
    """Whether torch's extension cache holds a just-in-time build of these very sources, newer than they are (then
    :func:`load` finds nothing to compile). A build from another checkout names other source paths."""
    srcs = sources(cuda=False)
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: guarded below
        folder = _get_build_directory(_JIT_NAME, verbose=False)
        with open(os.path.join(folder, "build.ninja")) as f:
            ninja = f.read()
        built = os.path.getmtime(os.path.join(folder, _JIT_NAME + ".so"))
        newest = max(os.path.getmtime(p) for p in srcs + headers() + [os.path.join(folder, "build.ninja")])
    except (ImportError, OSError, ValueError):  # no cache, no sources (max of nothing), or a torch without it
        return False
    return all(src in ninja for src in srcs) and built >= newest


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded or an ahead-of-time build loads now (~0.1 s, compiling nothing), else why
    it is not usable and how to get it."""
    if is_loaded():
        return None
    if build_error():
        return build_error()
    if has_prebuilt():
        try:
            load()
            return None
        except ExtensionUnavailable as err:
            return str(err)
    if not sources():
        return ("the compiled extension is not in this installation (a wheel ships neither a build nor the csrc/ "
                "sources): install from a source checkout with DEEPSEEK_MOE_BUILD_EXT=1 pip install . "
                "--no-build-isolation")
    if has_cached_build():
        return ("the compiled extension is built (in torch's extension cache) but not loaded: backend='ext' (or "
                "deepseek_moe.ext.load()) loads it without compiling")
    return ("the compiled extension is not built yet: backend='ext' (or deepseek_moe.ext.load()) builds it just in "
            "time from csrc/ (~30 s once, then cached), or build it ahead of time with DEEPSEEK_MOE_BUILD_EXT=1 pip "
            "install -e . --no-build-isolation")


def _prebuilt() -> Optional[str]:
    found = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd")))
    return found[0] if found else None


def _missing_tool() -> Optional[str]:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return f"no C++ compiler found ({compiler!r} / g++): install one (e.g. apt install g++) or set CXX"
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            return "ninja is not installed: pip install ninja"
    return None


def load(verbose: bool = False) -> None:
    """Register the extension's ops: the ahead-of-time build if installed, else a just-in-time build (cached).

    Raises :class:`ExtensionUnavailable` with one actionable sentence when neither works. Thread-safe and
    idempotent.
    """
    global _loaded, _error
    with _lock:
        if _loaded:
            return
        path = _prebuilt()
        try:
            if path is not None:
                torch.ops.load_library(path)
            else:
                _jit_build(verbose)
        except ExtensionUnavailable as err:
            _error = str(err)
            raise
        except Exception as err:  # a compiler error: keep its last lines, they name the problem
            lines = [line for line in str(err).splitlines() if line.strip()]
            _error = (f"building the deepseek_moe extension failed: {' | '.join(lines[-4:])} "
                      f"(rerun deepseek_moe.ext.load(verbose=True) for the full log)")
            raise ExtensionUnavailable(_error) from err
        _loaded = True
        _error = None


def shared_cpu_watch(enabled: Optional[bool] = None) -> bool:
    """Whether the CPU decode op (``expert_gemv``) watches for a CPU shared with other busy processes; switches it
    when ``enabled`` is given. Returns the setting before the call (on at load, unless ``OMP_WAIT_POLICY=PASSIVE``).

    A parallel region ends when its last thread does, so on a CPU with more runnable threads than cores a decode
    step waits for threads the scheduler set aside (beside another 2-thread process on 2 cores, a 7 ms step took
    40 ms). While the watch is on, the op measures each call's time lost that way and, where two calls in a row
    lose over a quarter of their time and took longer for their work than the calls alone did, runs the next calls
    on the calling thread alone for a while (20 ms to 1.28 s, then it tries its threads again;
    ``csrc/cpu/shared_cpu.h``). What makes the waits long is OpenMP's threads spinning after each
    parallel region; where they sleep instead (``OMP_WAIT_POLICY=PASSIVE``, the better cure on a shared CPU: it
    helps every op) the op's threads beat the calling thread alone, and the watch starts off. No result bit depends
    on the setting.

    Loads the extension; raises :class:`ExtensionUnavailable` where it cannot be loaded, and TypeError for an
    ``enabled`` that is neither a bool nor None.
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"shared_cpu_watch: enabled must be True, False or None, got {enabled!r}")
    load()
    if enabled is None:
        return bool(torch.ops.deepseek_moe.shared_cpu_watch())
    return bool(torch.ops.deepseek_moe.shared_cpu_watch(enabled))


def _jit_build(verbose: bool) -> None:
    srcs = sources(cuda=False)
    if not srcs:
        raise ExtensionUnavailable(
            "the csrc/ sources are not in this installation (a wheel ships none): build the extension ahead of "
            "time from a source checkout with DEEPSEEK_MOE_BUILD_EXT=1 pip install -e . --no-build-isolation")
    missing = _missing_tool()
    if missing:
        raise ExtensionUnavailable(f"cannot build the deepseek_moe extension: {missing}")
    from torch.utils.cpp_extension import load as cpp_load

    if not has_cached_build():  # a build takes ~30 s: say so on one line rather than hang silently
        cache = os.environ.get("TORCH_EXTENSIONS_DIR") or "~/.cache/torch_extensions"
        print(f"deepseek_moe: building the compiled extension just in time from csrc/ (~30 s, once; cached under "
              f"{cache})", file=sys.stderr, flush=True)
    flags = ["-O3", "-fopenmp", f"-DDEEPSEEK_MOE_HEADERS={_headers_digest()}"]
    cpp_load(name=_JIT_NAME, sources=srcs, extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False,
             verbose=verbose)
