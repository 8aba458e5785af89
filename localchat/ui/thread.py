"""A conversation as the page shows it: every message of every branch, the current one visible.

All of a conversation's messages are rendered once, in depth order, each with its own `‹ i/N ›`
control; the messages off the current branch are `hidden`. Switching a branch is then done in the
page (assets/ui.js shows the path to the newest leaf under the chosen message, as
Store.switch_branch does) without asking the server for anything, and the server is told afterwards
so the next message continues there.

Every piece of text is escaped here or rendered by localchat/ui/markdown.py: nothing a user or a
model wrote can become an element or an attribute.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from localchat.ui.markdown import render_markdown

ROLE_NAMES = {"user": "You", "assistant": "Assistant", "system": "System", "tool": "Tool"}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class Tree:
    """The messages of a conversation by id, each message's children (oldest first), and depths."""

    by_id: dict
    children: dict  # parent id (None for roots) -> [child ids]
    depth: dict

    @classmethod
    def of(cls, messages: Iterable) -> "Tree":
        by_id = {m.id: m for m in messages}
        children: dict = {}
        for m in sorted(by_id.values(), key=lambda m: m.id):
            children.setdefault(m.parent_id, []).append(m.id)
        depth: dict = {}
        stack = [(r, 0) for r in children.get(None, [])]
        while stack:
            mid, d = stack.pop()
            depth[mid] = d
            stack.extend((c, d + 1) for c in children.get(mid, []))
        return cls(by_id, children, depth)

    def siblings(self, message_id: int) -> list[int]:
        return self.children.get(self.by_id[message_id].parent_id, [])

    def path(self, leaf_id: int | None) -> list[int]:
        out = []
        while leaf_id is not None and leaf_id in self.by_id:
            out.append(leaf_id)
            leaf_id = self.by_id[leaf_id].parent_id
        return out[::-1]

    def newest_leaf(self, message_id: int) -> int:
        """The newest message under `message_id` (itself included): where a branch resumes."""
        best, stack = message_id, [message_id]
        while stack:
            mid = stack.pop()
            best = max(best, mid)
            stack.extend(self.children.get(mid, []))
        return best

    def ordered(self) -> list:
        """Messages in depth order (parents first), so any root-to-leaf path reads top to bottom."""
        return sorted((m for m in self.by_id.values() if m.id in self.depth), key=lambda m: (self.depth[m.id], m.id))


def reply_stats(m, *, length_penalty: float | None = None) -> str:
    """The line under a reply: tokens, time to first token, tok/s, prefix-cache tokens, model."""
    parts = []
    if m.generated_tokens is not None:
        parts.append(f"{m.generated_tokens} tokens")
    if m.ttft_s is not None:
        parts.append(f"first token {m.ttft_s:.2f} s")
    if m.tokens_per_s:
        parts.append(f"{m.tokens_per_s:.1f} tok/s")
    if m.prompt_tokens:
        hit = m.prefix_hit_tokens or 0
        parts.append(f"{hit} of {m.prompt_tokens} prompt tokens from the prefix cache")
    if length_penalty is not None and m.cumulative_logprob is not None and m.generated_tokens:
        parts.append(f"beam score {beam_score(m, length_penalty):.3f}")
    elif m.cumulative_logprob is not None:
        parts.append(f"log-prob {m.cumulative_logprob:.2f}")
    if m.model:
        parts.append(m.model)
    if m.finish_reason == "streaming":
        parts.append("interrupted")
    elif m.finish_reason not in (None, "stop"):
        parts.append({"length": "stopped at the token limit", "abort": "stopped"}.get(m.finish_reason, m.finish_reason))
    return " · ".join(parts)


def beam_score(m, length_penalty: float) -> float:
    """transformers' beam score: log-probability over length ** length_penalty (beam_search.py)."""
    return m.cumulative_logprob / (max(1, m.generated_tokens or 1) ** length_penalty)


def beam_penalty(m) -> float | None:
    """The length penalty of a beam-search reply, None for any other."""
    s = m.sampling or {}
    return float(s.get("length_penalty", 1.0)) if (s.get("beam_width") or 0) > 1 else None


def group_label(m, tree: Tree) -> str:
    """'sample 2 of 3' / 'beam 1 of 4' for replies generated together; '' for a lone reply."""
    if not m.sample_group:
        return ""
    group = [i for i in tree.siblings(m.id) if tree.by_id[i].sample_group == m.sample_group]
    kind = "beam" if beam_penalty(m) is not None else "sample"
    return f"{kind} {group.index(m.id) + 1} of {len(group)}"


def _nav(tree: Tree, m) -> str:
    sibs = tree.siblings(m.id)
    if len(sibs) < 2:
        return ""
    i = sibs.index(m.id)
    prev_attr = f' data-go="{sibs[i - 1]}"' if i > 0 else " disabled"
    next_attr = f' data-go="{sibs[i + 1]}"' if i < len(sibs) - 1 else " disabled"
    return (
        '<span class="lc-nav" role="group" aria-label="branches of this message">'
        f'<button class="lc-go lc-prev" title="previous branch"{prev_attr}>‹</button>'
        f'<span class="lc-pos">{i + 1}/{len(sibs)}</span>'
        f'<button class="lc-go lc-next" title="next branch"{next_attr}>›</button></span>'
    )


def _actions(tree: Tree, m) -> str:
    if m.role == "user":
        return '<button class="lc-act" data-act="edit" title="edit: a new branch from here">Edit</button>'
    if m.role != "assistant":
        return ""
    out = ['<button class="lc-act" data-act="regen" title="a new reply here (another branch)">↻ Regenerate</button>']
    if len(tree.siblings(m.id)) > 1:
        out.append('<button class="lc-act" data-act="compare" title="this reply beside its siblings">Compare</button>')
    out.append('<button class="lc-act" data-act="copy" title="copy the text">Copy</button>')
    return "".join(out)


def message_html(tree: Tree, m, *, visible: bool, tokens: int) -> str:
    role = m.role if m.role in ROLE_NAMES else "tool"
    label = group_label(m, tree)
    head = (f'<span class="lc-role">{esc(ROLE_NAMES[role])}</span>'
            + (f'<span class="lc-group">{esc(label)}</span>' if label else "")
            + _nav(tree, m) + f'<span class="lc-acts">{_actions(tree, m)}</span>')
    stats = ""
    if m.role == "assistant":
        stats = f'<footer class="lc-stats">{esc(reply_stats(m, length_penalty=beam_penalty(m)))}</footer>'
    return (
        f'<article class="lc-msg lc-{role}" data-id="{m.id}" data-parent="{"" if m.parent_id is None else m.parent_id}"'
        f' data-tokens="{tokens}" data-src="{esc(m.content)}"{"" if visible else " hidden"}>'
        f'<header class="lc-head">{head}</header>'
        f'<div class="lc-body">{render_markdown(m.content)}</div>{stats}</article>'
    )


def message_tokens(m, count: Callable[[str], int] | None) -> int:
    """Tokens a message adds to the context: its exact ids, else an estimate from its text."""
    if m.token_ids is not None and (m.token_ids or m.role == "assistant"):
        return len(m.token_ids)
    return (count(m.content) if count else len(m.content) // 4) + 5  # + the template's tokens


def conversation_html(conversation_id: int | None, messages: list, leaf_id: int | None, *, context: int,
                      count_tokens: Callable[[str], int] | None = None) -> str:
    """The whole conversation tree, showing the branch that ends at `leaf_id`."""
    if conversation_id is None or not messages:
        return ('<div class="lc-conv lc-empty" data-conv="" data-leaf="" data-ctx="{}">'
                '<p class="lc-placeholder">Start a conversation: type below and press Enter.</p></div>').format(context)
    tree = Tree.of(messages)
    on_path = set(tree.path(leaf_id))
    body = "".join(message_html(tree, m, visible=m.id in on_path, tokens=message_tokens(m, count_tokens))
                   for m in tree.ordered())
    return (f'<div class="lc-conv" data-conv="{conversation_id}" data-leaf="{"" if leaf_id is None else leaf_id}"'
            f' data-ctx="{context}">{body}</div>')
