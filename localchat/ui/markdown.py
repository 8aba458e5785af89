"""Markdown to HTML for the page, with nothing active in it.

Raw HTML in a message is shown as text (markdown-it with html off escapes it), and links, autolinks
and images stay text: a model's output must neither run code nor make the page fetch anything (the
app works offline). Code blocks keep their language class for styling only.

A reply that is still streaming is rendered often; `StreamingMarkdown` keeps the HTML of the blocks
that can no longer change (everything before the last blank line outside a code fence) and renders
only the tail again, so an update costs the same at token 2,000 as at token 20.
"""

from __future__ import annotations

import functools
import re

from markdown_it import MarkdownIt

_MD = (
    MarkdownIt("commonmark", {"html": False, "breaks": True})
    .enable(["table", "strikethrough"])
    .disable(["image", "link", "autolink"])
)
_FENCE = re.compile(r"^ {0,3}(```|~~~)", re.M)


@functools.lru_cache(maxsize=1024)
def render_markdown(text: str) -> str:
    """Safe HTML for a finished message (cached: a chat is rendered again after every reply)."""
    return _MD.render(text) if text else ""


def stable_split(text: str) -> int:
    """Where the finished blocks of a growing text end: after its last blank line that is not
    inside a code fence (0 when there is none)."""
    cut = text.rfind("\n\n")
    while cut > 0:
        if len(_FENCE.findall(text, 0, cut)) % 2 == 0:
            return cut + 2
        cut = text.rfind("\n\n", 0, cut)
    return 0


class StreamingMarkdown:
    """Render a growing text again and again, re-rendering only what can still change."""

    def __init__(self) -> None:
        self._head_text = ""
        self._head_html = ""

    def parts(self, text: str) -> tuple[str, str]:
        """(HTML of the finished blocks, HTML of the rest): the page replaces the first only when a
        paragraph completes, and the second, small, at every update."""
        cut = stable_split(text)
        head = text[:cut]
        if head != self._head_text:
            if head.startswith(self._head_text) and self._head_text:
                self._head_html += _MD.render(head[len(self._head_text):])
            else:
                self._head_html = _MD.render(head) if head else ""
            self._head_text = head
        return self._head_html, (_MD.render(text[cut:]) if cut < len(text) else "")

    def render(self, text: str) -> str:
        head, tail = self.parts(text)
        return head + tail
