"""Replies side by side: the n samples (or beams) of a reply as they stream, and later the comparison
of any message's siblings, each with its statistics and a "continue with this one" action.

Cards wrap into rows when they don't fit (assets/ui.css: a grid of auto-filled columns), so 2 to 8
replies stay readable. Everything is escaped or rendered by localchat/ui/markdown.py.
"""

from __future__ import annotations

from localchat.ui.markdown import StreamingMarkdown, render_markdown
from localchat.ui.thread import ROLE_NAMES, Tree, beam_penalty, esc, group_label, reply_stats


def _excerpt(text: str, limit: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def compare_html(messages: list, message_id: int | None, current_path: list[int]) -> str:
    """The siblings of `message_id` as cards; '' when there is nothing to compare."""
    tree = Tree.of(messages)
    if message_id is None or message_id not in tree.by_id:
        return ""
    sibs = tree.siblings(message_id)
    if len(sibs) < 2:
        return ""
    m0 = tree.by_id[message_id]
    parent = tree.by_id.get(m0.parent_id)
    what = "replies" if m0.role == "assistant" else "versions of this message"
    about = f" to “{_excerpt(parent.content)}”" if parent is not None else ""
    on_path = set(current_path)
    cards = []
    for n, sid in enumerate(sibs, 1):
        m = tree.by_id[sid]
        label = group_label(m, tree) or f"{ROLE_NAMES.get(m.role, m.role).lower()} {n}"
        current = " lc-current" if sid in on_path else ""
        stats = reply_stats(m, length_penalty=beam_penalty(m)) if m.role == "assistant" else ""
        cards.append(
            f'<article class="lc-card{current}" data-id="{sid}">'
            f'<header class="lc-card-head"><b>{esc(n)}/{len(sibs)}</b> <span class="lc-group">{esc(label)}</span>'
            f'<span class="lc-here">current branch</span></header>'
            f'<div class="lc-body">{render_markdown(m.content)}</div>'
            + (f'<footer class="lc-stats">{esc(stats)}</footer>' if stats else "")
            + f'<button class="lc-continue" data-continue="{sid}">Continue with this one</button></article>'
        )
    return (
        f'<section class="lc-compare" data-of="{message_id}">'
        f'<header class="lc-compare-head"><span>Compare {len(sibs)} {esc(what)}{esc(about)}</span>'
        '<button class="lc-act" data-act="close-compare">Close</button></header>'
        f'<div class="lc-cards" data-count="{len(sibs)}">{"".join(cards)}</div></section>'
    )


class LiveView:
    """The page's view of a reply being generated: the user's message (for a send or an edit) and
    one bubble, or one card per sample or beam. `html` is the skeleton, sent once; `samples` is what
    the page asks for while the reply grows (localchat/ui/streaming.py), each sample's body rendered
    with the markdown of finished paragraphs kept between updates (StreamingMarkdown)."""

    def __init__(self, user_text: str | None, n: int, beam: bool) -> None:
        self.user_text = user_text
        self.n = n
        self.beam = beam
        self._md: dict[int, StreamingMarkdown] = {}
        self._user_html = ""
        if user_text is not None:
            self._user_html = (
                '<article class="lc-msg lc-user lc-pending"><header class="lc-head"><span class="lc-role">You</span></header>'
                f'<div class="lc-body">{render_markdown(user_text)}</div></article>'
            )

    def _body(self, index: int, text: str) -> str:
        return self._md.setdefault(index, StreamingMarkdown()).render(text)

    def samples(self, events: list) -> list[dict]:
        """Each sample's body as (finished blocks, the rest) of safe HTML, and its token count."""
        out = []
        for e in events:
            head, tail = self._md.setdefault(e.index, StreamingMarkdown()).parts(e.text)
            out.append({"index": e.index, "head": head, "tail": tail, "tokens": e.generated_tokens})
        return out

    def html(self, events: list, key: str = "") -> str:
        """The reply as it stands; `key` names the stream the page then follows (data-stream)."""
        stream = f' data-stream="{esc(key)}"' if key else ""
        if self.n == 1 and not self.beam:
            text = events[0].text if events else ""
            tokens = events[0].generated_tokens if events else 0
            return (
                f'<div class="lc-live"{stream}>{self._user_html}'
                '<article class="lc-msg lc-assistant lc-streaming" data-index="0"><header class="lc-head">'
                '<span class="lc-role">Assistant</span><span class="lc-note">generating…</span></header>'
                f'<div class="lc-body">{self._body(0, text)}</div>'
                f'<footer class="lc-stats">{tokens} tokens</footer></article></div>'
            )
        kind = "beam" if self.beam else "sample"
        count = max(self.n, len(events))
        by_index = {e.index: e for e in events}
        cards = []
        for i in range(count):
            e = by_index.get(i)
            text = e.text if e is not None else ""
            tokens = e.generated_tokens if e is not None else 0
            cards.append(
                f'<article class="lc-card lc-streaming" data-index="{i}"><header class="lc-card-head">'
                f'<b>{kind} {i + 1} of {count}</b></header><div class="lc-body">{self._body(i, text)}</div>'
                f'<footer class="lc-stats">{tokens} tokens</footer></article>'
            )
        return (f'<div class="lc-live"{stream}>{self._user_html}'
                f'<div class="lc-cards" data-count="{count}">{"".join(cards)}</div></div>')
