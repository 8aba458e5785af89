"""The memory panel for an engine on another server: what its /metrics exposes (pure HTML, escaped).

A remote server's block tables never leave it, so the panel shows its figures (KV cache usage,
prefix-cache hit rate, queues, and localchat's block figures when the server is a localchat) and
says that the block grid is not available. The snapshot comes from localchat/api/remote_metrics.py.
"""

from __future__ import annotations

import html

LABELS = (  # canonical key, label, how to show it
    ("kv_cache_usage", "KV cache usage", "pct"),
    ("prefix_cache_hit_rate", "prefix-cache hit rate", "pct"),
    ("requests_running", "running requests", "int"),
    ("requests_waiting", "waiting requests", "int"),
    ("ttft_mean_s", "mean time to first token", "s"),
    ("preemptions", "preemptions", "int"),
    ("blocks_used", "blocks_used", "int"),
    ("blocks_cached", "blocks_cached", "int"),
    ("blocks_free", "blocks_free", "int"),
    ("blocks_total", "blocks_total", "int"),
    ("kv_utilization", "kv_utilization", "pct"),
    ("sharing_savings", "sharing_savings", "pct"),
    ("cow_copies", "cow_copies", "int"),
)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _format(value: float, how: str) -> str:
    if how == "pct":
        return f"{100 * value:.1f}%"
    if how == "s":
        return f"{value * 1000:.0f} ms"
    return f"{value:.0f}"


def render_remote_html(snapshot, *, title: str = "KV cache") -> str:
    server = snapshot.server or "an OpenAI-compatible server"
    out = ['<div class="lc-mem lc-remote">', f'<div class="lc-mem-title">{_e(title)}</div>',
           f'<p class="lc-note" data-remote-url="{_e(snapshot.url)}">Remote engine: {_e(server)} at {_e(snapshot.url)}, '
           f'model {_e(snapshot.model)}.</p>']
    if snapshot.error:
        out.append(f'<p class="lc-note lc-remote-error">{_e(snapshot.error)}</p>')
    rows = [(key, label, _format(snapshot.values[key], how)) for key, label, how in LABELS if key in snapshot.values]
    if rows:
        out.append('<dl class="lc-figures">')
        for key, label, value in rows:
            out.append(f'<div class="lc-fig" data-figure="{_e(key)}"><dt>{_e(label)}</dt><dd>{_e(value)}</dd></div>')
        out.append("</dl>")
    elif not snapshot.error:
        out.append(f'<p class="lc-note">Its /metrics has {_e(snapshot.families)} metric families, none of the KV cache figures this panel knows.</p>')
    out.append('<p class="lc-note lc-remote-tables">Block tables and the block grid are not available remotely: '
               "the server keeps its KV cache to itself.</p>")
    out.append("</div>")
    return "".join(out)
