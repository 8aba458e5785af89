"""The browser UI (Gradio). Engine logic stays in ChatService/Store; this package only wires widgets.

- `render`: pure functions from store objects to what the widgets show (safe markdown, labels).
- `memory_panel`: pure function from a MemorySnapshot to escaped HTML.
- `app`: the Gradio Blocks (`build_ui`) and `launch`.
"""

from localchat.ui.memory_panel import render_memory_html
from localchat.ui.render import safe_markdown

__all__ = ["render_memory_html", "safe_markdown"]
