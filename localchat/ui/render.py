"""Pure helpers for the UI: turning store messages and settings into widget values, safely."""

from __future__ import annotations

import math
import re

from localchat.engine.sampling_params import SamplingParams

# Fenced code blocks (``` or ~~~) and inline code spans: markdown shows their content as text.
_CODE = re.compile(r"(^|\n)(```|~~~)[^\n]*\n.*?(\n\2[^\n]*(?=\n|$)|$)|(`+)(?!`).+?(?<!`)\4(?!`)", re.S)


def escape_html_text(text: str) -> str:
    """Escape &, < and > so no tag in the text can become an element (quotes are harmless in text)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def safe_markdown(text: str) -> str:
    """Markdown source for model or user text in which raw HTML shows as text, never as elements.

    Outside code, ``<``, ``>`` and ``&`` are escaped (markdown shows the entities as the
    characters). Code spans and fenced blocks are left alone: markdown renders them as text. The
    chatbot's sanitizer is a second layer on top of this.
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


def chat_messages(path) -> list[dict]:
    """The chatbot's value for a branch (a list of store Messages): role/content dicts."""
    return [{"role": m.role, "content": safe_markdown(m.content)} for m in path if m.role in ("user", "assistant")]


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


def branch_label(role: str, position: int, index: int, count: int) -> str:
    """Text for the branch navigator, e.g. 'Reply #4: branch 2/3' (index is 0-based)."""
    what = "Reply" if role == "assistant" else "Message"
    return f"{what} #{position + 1}: branch {index + 1}/{count}"


def _number(value, name: str):
    if value is None or (isinstance(value, str) and not value.strip()):
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


def params_from_ui(temperature, top_p, max_tokens, seed, n) -> SamplingParams:
    """SamplingParams from the settings widgets; raises ValueError with a readable message."""
    seed_value = None if seed is None or (isinstance(seed, str) and not seed.strip()) else _integer(seed, "seed")
    return SamplingParams(
        temperature=_number(temperature, "temperature"),
        top_p=_number(top_p, "top_p"),
        max_tokens=_integer(max_tokens, "max_tokens"),
        seed=seed_value,
        n=_integer(n, "n"),
    )


def stats_line(event) -> str:
    """One line under the chat about the last reply (markdown-safe: numbers only)."""
    if event is None:
        return ""
    hit = f"{event.prefix_hit_tokens}/{event.prompt_tokens}" if event.prompt_tokens else "0/0"
    parts = [f"prompt {event.prompt_tokens} tokens, {hit} from the prefix cache", f"{event.generated_tokens} generated"]
    if event.ttft_s is not None:
        parts.append(f"first token {event.ttft_s:.2f} s")
    if event.tokens_per_s:
        parts.append(f"{event.tokens_per_s:.1f} tok/s")
    if event.finish_reason:
        parts.append(f"finished: {escape_html_text(event.finish_reason)}")
    return " · ".join(parts)
