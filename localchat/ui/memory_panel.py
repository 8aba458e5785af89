"""The memory panel's data: the KV pool, who owns each used block, and its recent history.

The engine answers with arrays (localchat.engine.panel.PanelSnapshot); this module turns them into
one JSON-ready dict that assets/memory_panel.js draws: figures under design.md's names (and in MiB), the pool
as one character per block on a canvas (so tens of thousands of blocks stay fast to draw), each live
sequence with a label saying which conversation and sample it serves, and the timeline of blocks
used, cached and shared with forks, copy-on-write copies and preemptions marked.

`render_memory_html` wraps that dict into the panel's HTML (the dict travels escaped in an
attribute; the script only ever sets text, never markup).
"""

from __future__ import annotations

import html
import json

from localchat.engine.block_manager import CACHED, USED, CompactSnapshot, MemorySnapshot

STATE_CHARS = {0: "f", CACHED: "c", USED: "u"}  # free, cached, used
TIMELINE_S = 300.0  # the timeline shows the last five minutes


def memory_figures(snapshot) -> dict:
    """The figures the panel shows, under design.md's names."""
    f = _memory(snapshot).figures
    return {
        "blocks_total": f.blocks_total,
        "blocks_used": f.blocks_used,
        "blocks_cached": f.blocks_cached,
        "blocks_free": f.blocks_free,
        "block_size": f.block_size,
        "kv_utilization": f.kv_utilization,
        "sharing_savings": f.sharing_savings,
        "blocks_unshared": f.blocks_unshared,
        "cow_copies": f.cow_copies,
        "preemptions": f.preemptions,
        "prefix_hit_tokens": f.prefix_hit_tokens,
        "prompt_tokens": f.prompt_tokens,
        "prefix_hit_rate": f.prefix_hit_rate,
        "evictions": f.evictions,
        "num_sequences": f.num_sequences,
    }


def _memory(snapshot):
    """The pool part of any snapshot: a PanelSnapshot's, or a block manager's own."""
    return getattr(snapshot, "memory", snapshot)


def _states(memory) -> str:
    if isinstance(memory, CompactSnapshot):
        return memory.states.decode("latin-1").translate({0: "f", CACHED: "c", USED: "u"})
    if isinstance(memory, MemorySnapshot):  # the per-block snapshot: tests and older callers
        return "".join({"free": "f", "cached": "c", "used": "u"}.get(b.state, "f") for b in memory.blocks)
    return ""


def _timeline(memory, since: float | None) -> dict:
    view = getattr(memory, "timeline", None)
    if view is None:
        return {"now": None, "samples": [], "events": []}
    horizon = view.now - TIMELINE_S
    return {
        "now": view.now,
        "samples": [list(s) for s in view.samples if s[0] >= horizon],
        "events": [[t, kind, seq] for t, kind, seq in view.events if t >= horizon],
    }


def panel_data(snapshot, *, title: str = "KV cache", labels: dict | None = None, block_bytes: int = 0,
               since: float | None = None) -> dict:
    """The JSON the panel draws. `labels` maps request id -> (owner key, label) for live sequences."""
    memory = _memory(snapshot)
    figures = memory_figures(snapshot)
    labels = labels or {}
    live = {s.seq_id: s for s in getattr(snapshot, "sequences", ())}
    per_request: dict = {}
    for s in live.values():
        per_request[s.request_id] = per_request.get(s.request_id, 0) + 1
    seqs = []
    for seq_id, table in sorted(memory.tables.items()):
        s = live.get(seq_id)
        if s is None:
            owner, label = str(seq_id), f"sequence {seq_id}"
        else:
            owner, label = labels.get(s.request_id, (s.request_id, f"request {s.request_id}"))
            if s.beam or per_request[s.request_id] > 1 or s.index:
                label += f" · {'beam' if s.beam else 'sample'} {s.index + 1}"
        seqs.append({"seq": seq_id, "owner": owner, "label": label, "tokens": memory.seq_tokens.get(seq_id, 0),
                     "blocks": list(table), "status": s.status if s else "running"})
    mib = block_bytes / 2**20
    return {
        "title": title,
        "figures": figures,
        "peaks": dict(getattr(memory, "peaks", {}) or {}),
        "mib": {
            "block": mib,
            "pool": figures["blocks_total"] * mib,
            "used": figures["blocks_used"] * mib,
            "cached": figures["blocks_cached"] * mib,
            "unshared": figures["blocks_unshared"] * mib,
        },
        "states": _states(memory),
        "seqs": seqs,
        "timeline": _timeline(memory, since),
    }


def render_memory_html(snapshot, *, title: str = "KV cache", labels: dict | None = None, block_bytes: int = 0) -> str:
    """The panel: its data in an escaped attribute, drawn by assets/memory_panel.js (and a summary as text)."""
    if snapshot is None:
        return '<div class="lc-mem lc-mem-empty"><p>No memory snapshot yet.</p></div>'
    data = panel_data(snapshot, title=title, labels=labels, block_bytes=block_bytes)
    f = data["figures"]
    summary = (f"{f['blocks_used']} of {f['blocks_total']} blocks used, {f['blocks_cached']} cached, "
               f"{f['num_sequences']} sequences")
    payload = html.escape(json.dumps(data, separators=(",", ":")), quote=True)
    return (f'<div class="lc-mem" data-panel="{payload}"><div class="lc-mem-title">{html.escape(title)}</div>'
            f'<p class="lc-mem-summary">{html.escape(summary)}</p></div>')
