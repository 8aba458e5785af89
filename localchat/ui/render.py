"""Pure helpers for the UI: settings widgets to SamplingParams, titles and sidebar labels, safe text.

The conversation itself is rendered by localchat/ui/thread.py (messages), compare.py (replies side by
side), overview.py (the branch tree) and memory_panel.py (the KV pool).
"""

from __future__ import annotations

import math
import re

from localchat import settings
from localchat.engine.sampling_params import SamplingParams

# The settings widgets, in the order every event passes them (localchat/ui/layout.py).
SETTING_NAMES = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed", "stop", "n", "beam_width")

# Fenced code blocks (``` or ~~~) and inline code spans: markdown shows their content as text.
_CODE = re.compile(r"(^|\n)(```|~~~)[^\n]*\n.*?(\n\2[^\n]*(?=\n|$)|$)|(`+)(?!`).+?(?<!`)\4(?!`)", re.S)


def escape_html_text(text: str) -> str:
    """Escape &, < and > so no tag in the text can become an element (quotes are harmless in text)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def safe_markdown(text: str) -> str:
    """Markdown source for model or user text in which raw HTML shows as text, never as elements.

    Outside code, ``<``, ``>`` and ``&`` are escaped (markdown shows the entities as the
    characters). Code spans and fenced blocks are left alone: markdown renders them as text.
    (The page renders with localchat/ui/markdown.py, which escapes HTML itself; this is for
    markdown consumers that might not.)
    """
    if not text:
        return ""
    out: list[str] = []
    pos = 0
    for m in _CODE.finditer(text):
        out.append(escape_html_text(text[pos : m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(escape_html_text(text[pos:]))
    return "".join(out)


def conversation_choices(conversations) -> list[tuple[str, str]]:
    """(label, value) pairs for the sidebar; the label is shown as plain text by the widget."""
    out = []
    for c in conversations:
        title = (c.title or "").strip() or f"Chat {c.id}"
        if len(title) > 60:
            title = title[:57] + "..."
        out.append((title, str(c.id)))
    return out


def title_from_message(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 48 else line[:45] + "..."


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value, name: str):
    if _blank(value):
        raise ValueError(f"invalid sampling parameter: {name} is empty")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"invalid sampling parameter: {name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"invalid sampling parameter: {name} must be finite, got {value!r}")
    return x


def _integer(value, name: str) -> int:
    x = _number(value, name)
    if x != int(x):
        raise ValueError(f"invalid sampling parameter: {name} must be a whole number, got {value!r}")
    return int(x)


def stop_strings(value) -> tuple[str, ...]:
    """Stop strings from the settings box: one per line; `\\n` in a line stands for a newline."""
    if _blank(value):
        return ()
    if not isinstance(value, str):
        raise ValueError("invalid sampling parameter: stop strings must be text, one per line")
    lines = [line.replace("\\n", "\n") for line in value.split("\n") if line.strip()]
    if len(lines) > 8:
        raise ValueError("invalid sampling parameter: at most 8 stop strings")
    return tuple(lines)


def params_from_ui(temperature, top_p, max_tokens, seed, n, *, top_k=0, min_p=0.0, repetition_penalty=1.0,
                   stop="", beam_width=0) -> SamplingParams:
    """SamplingParams from the settings widgets; raises ValueError with a readable message."""
    beams = 0 if _blank(beam_width) else _integer(beam_width, "beam_width")
    samples = _integer(n, "n")
    if beams > 1 and samples > 1:
        raise ValueError("invalid sampling parameter: use either n (samples) or beam width (beam search), not both")
    if samples > settings.UI_MAX_SAMPLES or beams > settings.UI_MAX_SAMPLES:
        raise ValueError(f"invalid sampling parameter: the page compares at most {settings.UI_MAX_SAMPLES} "
                         "samples or beams side by side")
    return SamplingParams(
        temperature=_number(temperature, "temperature"),
        top_p=_number(top_p, "top_p"),
        top_k=0 if _blank(top_k) else _integer(top_k, "top_k"),
        min_p=0.0 if _blank(min_p) else _number(min_p, "min_p"),
        repetition_penalty=1.0 if _blank(repetition_penalty) else _number(repetition_penalty, "repetition_penalty"),
        max_tokens=_integer(max_tokens, "max_tokens"),
        seed=None if _blank(seed) else _integer(seed, "seed"),
        stop=stop_strings(stop),
        n=samples,
        beam_width=beams if beams > 1 else 0,
    )


def params_from_settings(values) -> SamplingParams:
    """SamplingParams from the settings widgets' values in SETTING_NAMES order."""
    v = dict(zip(SETTING_NAMES, values))
    return params_from_ui(v["temperature"], v["top_p"], v["max_tokens"], v["seed"], v["n"], top_k=v["top_k"],
                          min_p=v["min_p"], repetition_penalty=v["repetition_penalty"], stop=v["stop"],
                          beam_width=v["beam_width"])
