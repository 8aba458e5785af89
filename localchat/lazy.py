"""Package attributes imported from their modules on first use (PEP 562).

Why: the app's page process imports the engine's client types and the model registry without torch,
transformers or the model code, which only the engine process needs; the engine process then starts at once
and imports them beside the page's own imports (localchat/cli/app.py)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(package: str, where: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package`: name -> getattr(package.where[name], name)."""

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__
