"""The browser UI (Gradio). Engine logic stays in ChatService/Store; this package renders and wires.

- `thread`, `compare`, `overview`: a conversation tree, replies side by side, the branch overview, as
  escaped HTML (`markdown` renders message text with nothing active in it).
- `memory_panel`: the KV pool's data for the panel (drawn by assets/memory_panel.js).
- `render`: settings widgets to SamplingParams, titles; `presets`: saved settings.
- `layout` (widgets), `handlers` and `streaming` (their events), `api` (named endpoints), `app`
  (`build_ui` and `launch`); assets/ui.js is the page's script.
"""

from localchat.ui.memory_panel import render_memory_html
from localchat.ui.render import safe_markdown

__all__ = ["render_memory_html", "safe_markdown"]
