"""The post-import hook that registers ``"deepseek_moe"`` in transformers' experts interface.

``import deepseek_moe`` installs it and imports neither transformers nor :mod:`deepseek_moe.hf`: when
transformers' ``integrations.moe`` module is first executed (or at once, if it already was), the hook calls
:func:`deepseek_moe.hf.experts_interface.register`. A transformers below the floor of :mod:`deepseek_moe.versions`
gets no registration (``deepseek_moe.hf`` refuses to import with it).
"""
from __future__ import annotations

import importlib.abc
import sys

MODULE = "transformers.integrations.moe"


def _register() -> None:
    try:
        from .hf.experts_interface import register
    except ImportError:  # transformers below the floor
        return
    register()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` right after transformers' ``integrations.moe`` module is first executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()


def install() -> None:
    """Register now if transformers' integrations.moe is loaded, else when it is (idempotent)."""
    if MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
