"""The memory panel: a MemorySnapshot drawn as HTML (pure, every piece of text escaped)."""

from __future__ import annotations

import html

MAX_GRID_BLOCKS = 4096  # a bigger pool shows its first blocks and says how many are left out
MAX_TABLES = 16
MAX_TABLE_BLOCKS = 256


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float) -> str:
    return f"{100 * float(x):.1f}%"


def memory_figures(snapshot) -> dict:
    """The figures the panel shows, under design.md's names."""
    f = snapshot.figures
    return {
        "blocks_total": f.blocks_total,
        "blocks_used": f.blocks_used,
        "blocks_cached": f.blocks_cached,
        "blocks_free": f.blocks_free,
        "block_size": f.block_size,
        "kv_utilization": f.kv_utilization,
        "sharing_savings": f.sharing_savings,
        "cow_copies": f.cow_copies,
        "preemptions": f.preemptions,
        "prefix_hit_tokens": f.prefix_hit_tokens,
        "prompt_tokens": f.prompt_tokens,
        "prefix_hit_rate": f.prefix_hit_rate,
        "num_sequences": f.num_sequences,
    }


def _block_class(b) -> str:
    cls = f"lc-blk lc-{b.state}" if b.state in ("free", "cached", "used") else "lc-blk lc-unknown"
    if b.state == "used" and b.ref_count > 1:
        cls += " lc-shared"
    return cls


def _block_title(b) -> str:
    text = f"block {b.block_id}: {b.state}, {b.num_tokens} tokens"
    if b.ref_count:
        text += f", ref count {b.ref_count}"
    if b.owners:
        text += ", sequences " + ", ".join(str(o) for o in b.owners)
    return text


def render_memory_html(snapshot, *, title: str = "KV cache") -> str:
    """HTML for the memory panel: the figures, a grid of blocks coloured by state, and the tables."""
    if snapshot is None:
        return '<div class="lc-mem"><p>No memory snapshot yet.</p></div>'
    f = memory_figures(snapshot)
    peaks = getattr(snapshot, "peaks", {}) or {}
    out: list[str] = ['<div class="lc-mem">', f'<div class="lc-mem-title">{_e(title)}</div>']

    rows = [
        ("blocks_used", f"{f['blocks_used']} / {f['blocks_total']}"),
        ("blocks_cached", f["blocks_cached"]),
        ("blocks_free", f["blocks_free"]),
        ("kv_utilization", _pct(f["kv_utilization"])),
        ("sharing_savings", _pct(f["sharing_savings"])),
        ("cow_copies", f["cow_copies"]),
        ("preemptions", f["preemptions"]),
        ("prefix hit rate", f"{_pct(f['prefix_hit_rate'])} ({f['prefix_hit_tokens']}/{f['prompt_tokens']} tokens)"),
        ("sequences", f["num_sequences"]),
    ]
    if "blocks_used_peak" in peaks:
        rows.append(("blocks_used_peak", peaks["blocks_used_peak"]))
    if "sharing_savings_peak" in peaks:
        rows.append(("sharing_savings_peak", _pct(peaks["sharing_savings_peak"])))
    out.append('<dl class="lc-figures">')
    for name, value in rows:
        key = name.replace(" ", "_")
        out.append(f'<div class="lc-fig" data-figure="{_e(key)}"><dt>{_e(name)}</dt><dd>{_e(value)}</dd></div>')
    out.append("</dl>")

    out.append(
        '<div class="lc-legend">'
        '<span><i class="lc-blk lc-free"></i>free</span>'
        '<span><i class="lc-blk lc-cached"></i>cached (prefix cache)</span>'
        '<span><i class="lc-blk lc-used"></i>used</span>'
        '<span><i class="lc-blk lc-used lc-shared"></i>shared (ref &gt; 1)</span>'
        f"<span>block size {_e(f['block_size'])} tokens</span>"
        "</div>"
    )

    blocks = list(snapshot.blocks)
    shown = blocks[:MAX_GRID_BLOCKS]
    out.append(f'<div class="lc-grid" data-blocks="{len(blocks)}">')
    for b in shown:
        label = _e(b.ref_count) if b.ref_count > 1 else ""
        out.append(
            f'<i class="{_block_class(b)}" data-block="{_e(b.block_id)}" data-ref="{_e(b.ref_count)}" '
            f'title="{_e(_block_title(b))}">{label}</i>'
        )
    out.append("</div>")
    if len(blocks) > len(shown):
        out.append(f'<p class="lc-note">showing the first {len(shown)} of {len(blocks)} blocks</p>')

    by_id = {b.block_id: b for b in blocks}
    tables = sorted(snapshot.tables.items())
    out.append('<div class="lc-tables">')
    if not tables:
        out.append('<p class="lc-note">No live sequences: every block is free or cached.</p>')
    for seq_id, table in tables[:MAX_TABLES]:
        tokens = snapshot.seq_tokens.get(seq_id, 0)
        out.append(f'<div class="lc-table" data-seq="{_e(seq_id)}">')
        out.append(f'<span class="lc-seq">seq {_e(seq_id)} · {_e(tokens)} tokens · {len(table)} blocks</span>')
        for logical, block_id in enumerate(table[:MAX_TABLE_BLOCKS]):
            b = by_id.get(block_id)
            cls = _block_class(b) if b is not None else "lc-blk lc-unknown"
            ref = b.ref_count if b is not None else 0
            out.append(f'<b class="{cls} lc-entry" title="{_e(f"logical {logical} -> physical {block_id}, ref count {ref}")}">{_e(block_id)}</b>')
        if len(table) > MAX_TABLE_BLOCKS:
            out.append(f'<span class="lc-note">+{len(table) - MAX_TABLE_BLOCKS} more</span>')
        out.append("</div>")
    if len(tables) > MAX_TABLES:
        out.append(f'<p class="lc-note">+{len(tables) - MAX_TABLES} more sequences</p>')
    out.append("</div></div>")
    return "".join(out)
