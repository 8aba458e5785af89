"""Setting presets (sampling values and a system prompt) kept across restarts.

They live in one JSON file in the user's config dir (localchat.settings.config_dir()), written
atomically (a temporary file renamed over the old one), so a crash never leaves half a file. A file
that cannot be read is reported and left alone; the built-in presets are always there.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from localchat import settings

FIELDS = ("system_prompt", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens",
          "seed", "stop", "n", "beam_width")

_BASE = {"system_prompt": "", "temperature": settings.DEFAULT_TEMPERATURE, "top_p": settings.DEFAULT_TOP_P,
         "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "max_tokens": settings.DEFAULT_MAX_TOKENS,
         "seed": "", "stop": "", "n": 1, "beam_width": 0}
BUILTIN = {
    "Balanced": dict(_BASE),
    "Precise (greedy)": {**_BASE, "temperature": 0.0, "top_p": 1.0},
    "Creative": {**_BASE, "temperature": 1.0, "top_p": 0.98, "min_p": 0.05, "repetition_penalty": 1.05},
    "Compare 4 samples": {**_BASE, "temperature": 0.9, "n": 4, "max_tokens": 256},
    "Beam search (4 beams)": {**_BASE, "temperature": 0.0, "top_p": 1.0, "beam_width": 4, "max_tokens": 128},
}


class PresetError(ValueError):
    """A preset name or file the user must fix (the message says how)."""


def presets_path() -> Path:
    return settings.config_dir() / "presets.json"


class Presets:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else presets_path()
        self.problem: str | None = None  # why the file could not be read, if it could not

    def user_presets(self) -> dict[str, dict]:
        self.problem = None
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            presets = doc["presets"]
            if not isinstance(presets, dict):
                raise TypeError("presets is not an object")
            return {str(k): {f: v[f] for f in FIELDS if f in v} for k, v in presets.items() if isinstance(v, dict)}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.problem = f"{self.path} could not be read ({exc}); it was left as it is"
            return {}

    def all(self) -> dict[str, dict]:
        return {**BUILTIN, **{k: {**_BASE, **v} for k, v in self.user_presets().items()}}

    def names(self) -> list[str]:
        return list(self.all())

    def get(self, name: str) -> dict:
        found = self.all().get(name)
        if found is None:
            raise PresetError(f"there is no preset called {name!r}")
        return found

    def save(self, name: str, values: dict) -> None:
        name = (name or "").strip()
        if not name:
            raise PresetError("give the preset a name first")
        if len(name) > 60:
            raise PresetError("a preset name has at most 60 characters")
        if name in BUILTIN:
            raise PresetError(f"{name!r} is a built-in preset: choose another name")
        presets = self.user_presets()
        if self.problem:
            raise PresetError(self.problem)
        presets[name] = {f: values[f] for f in FIELDS if f in values}
        self._write(presets)

    def delete(self, name: str) -> None:
        if name in BUILTIN:
            raise PresetError(f"{name!r} is a built-in preset and cannot be deleted")
        presets = self.user_presets()
        if name not in presets:
            raise PresetError(f"there is no saved preset called {name!r}")
        del presets[name]
        self._write(presets)

    def _write(self, presets: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": 1, "presets": presets}, indent=2, ensure_ascii=False, allow_nan=False)
        fd, tmp = tempfile.mkstemp(prefix=".presets-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
