"""Gradio without its type-stub pass at import.

As each of Gradio's ~40 component classes is defined, its metaclass reads the class's source file, parses it
with `ast`, and rewrites the `.pyi` stub beside it in site-packages if the stub differs
(`create_or_modify_pyi` in gradio/component_meta.py): stubs for the editors of custom components. The app
never uses them, and on a 2-core machine that pass was ~3.5 of the page process's ~11 CPU-seconds of
start-up, spent while the engine's process loads the model beside it (benchmarks/NOTES.md, session 11).

`skip_stub_pass()` turns the pass into a no-op as `gradio.component_meta` is first imported (before any
component class exists). If Gradio has no such function (another version), nothing changes.
"""

from __future__ import annotations

import importlib.abc
import sys

_MODULE = "gradio.component_meta"
_FUNCTION = "create_or_modify_pyi"


def _no_stub(*_args, **_kwargs) -> None:
    return None


def _patch(module) -> None:
    if hasattr(module, _FUNCTION):
        setattr(module, _FUNCTION, _no_stub)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for gradio.component_meta it asks the other finders, and wraps the loader so
    that the module is patched right after it runs."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):  # get_source, get_data, ... as the real loader has them
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _patch(module)


_FINDER = _PatchOnImport()


def skip_stub_pass() -> None:
    """Install the patch (idempotent); patches at once if Gradio is already imported."""
    if _MODULE in sys.modules:
        _patch(sys.modules[_MODULE])
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
