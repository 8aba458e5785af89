"""The conversation overview: a small tree of every branch, and for each message whether the history
up to it is still in the KV cache (so continuing there computes no prompt).

A chain of single replies stays one list; a message with several children opens one nested list per
child. Clicking a node shows the newest branch through it (assets/ui.js). The cache marks come from
the engine's prefix cache (`localchat.engine.panel.cached_prefix_tokens`), asked once per leaf.
"""

from __future__ import annotations

from collections.abc import Callable

from localchat.ui.thread import Tree, esc

MARKS = {
    "full": ("●", "history in the KV cache: continuing here computes no prompt"),
    "partial": ("◐", "history partly in the KV cache"),
    "none": ("○", "history not in the KV cache: continuing here computes the prompt again"),
    "unknown": ("·", "no exact token ids (imported): cache state unknown"),
}


def path_ids(tree: Tree, leaf: int) -> list[int] | None:
    """The exact token ids of the branch ending at `leaf`, or None if a message lacks them."""
    ids: list[int] = []
    for mid in tree.path(leaf):
        m = tree.by_id[mid]
        if m.token_ids is None:
            return None
        ids.extend(m.token_ids)
    return ids


def cache_states(tree: Tree, cached: Callable[[list[list[int]]], list[int]] | None, block_size: int) -> dict[int, str]:
    """Each message's cache mark, from how many leading tokens of each leaf's branch are cached."""
    leaves = [mid for mid in tree.by_id if not tree.children.get(mid)]
    known = {leaf: path_ids(tree, leaf) for leaf in leaves}
    asked = [leaf for leaf in leaves if known[leaf] is not None]
    hits = dict(zip(asked, cached([known[leaf] for leaf in asked]))) if cached and asked else {}
    states: dict[int, str] = {}
    for leaf in leaves:
        end = 0
        for mid in tree.path(leaf):
            m = tree.by_id[mid]
            if leaf not in hits:
                states.setdefault(mid, "unknown")
                continue
            end += len(m.token_ids or [])
            # The last token's K/V is computed when the branch continues (a reply's last token never
            # was), so its block cannot be cached: every block before it can.
            whole = max(0, end - 1) // block_size * block_size
            state = "full" if hits[leaf] >= whole else ("partial" if hits[leaf] > 0 else "none")
            if _RANK[state] > _RANK[states.get(mid, "unknown")]:  # another branch through it may know better
                states[mid] = state
    return states


_RANK = {"unknown": 0, "none": 1, "partial": 2, "full": 3}


def _node(tree: Tree, mid: int, on_path: set[int], states: dict[int, str]) -> str:
    m = tree.by_id[mid]
    mark, why = MARKS[states.get(mid, "unknown")]
    who = "You" if m.role == "user" else ("AI" if m.role == "assistant" else m.role)
    text = " ".join(m.content.split())[:48] or "(empty)"
    cls = "lc-ov-node" + (" lc-on-path" if mid in on_path else "")
    return (f'<button class="{cls}" data-node="{mid}" title="{esc(why)}">'
            f'<i class="lc-cache lc-cache-{states.get(mid, "unknown")}">{mark}</i>'
            f'<b>{esc(who)}</b> {esc(text)}</button>')


def _chain(tree: Tree, start: int, on_path: set[int], states: dict[int, str]) -> str:
    items, mid = [], start
    while True:
        items.append(f"<li>{_node(tree, mid, on_path, states)}</li>")
        kids = tree.children.get(mid, [])
        if len(kids) == 1:
            mid = kids[0]
            continue
        if kids:
            branches = "".join(f'<ul class="lc-ov-branch">{_chain(tree, k, on_path, states)}</ul>' for k in kids)
            items.append(f'<li class="lc-ov-fork">{branches}</li>')
        return "".join(items)


def overview_html(conversation_id: int | None, messages: list, leaf_id: int | None, *,
                  cached: Callable[[list[list[int]]], list[int]] | None = None, block_size: int = 16) -> str:
    if conversation_id is None or not messages:
        return '<nav class="lc-ov lc-empty"><p class="lc-note">The branches of a conversation show here.</p></nav>'
    tree = Tree.of(messages)
    states = cache_states(tree, cached, block_size)
    on_path = set(tree.path(leaf_id))
    roots = tree.children.get(None, [])
    body = (_chain(tree, roots[0], on_path, states) if len(roots) == 1
            else "".join(f'<li class="lc-ov-fork"><ul class="lc-ov-branch">{_chain(tree, r, on_path, states)}</ul></li>' for r in roots))
    legend = " ".join(f'<span title="{esc(why)}"><i class="lc-cache lc-cache-{k}">{mark}</i> {esc(k if k != "full" else "cached")}</span>'
                      for k, (mark, why) in MARKS.items() if k != "unknown")
    return (f'<nav class="lc-ov" data-conv="{conversation_id}"><ul class="lc-ov-list">{body}</ul>'
            f'<div class="lc-ov-legend">{legend}</div></nav>')
