"""The browser UI (Gradio). Engine logic stays in ChatService/Store; this package renders and wires.

- `thread`, `compare`, `overview`: a conversation tree, replies side by side, the branch overview, as
  escaped HTML (`markdown` renders message text with nothing active in it).
- `memory_panel`: the KV pool's data for the panel (drawn by assets/memory_panel.js).
- `render`: settings widgets to SamplingParams, titles; `presets`: saved settings.
- `layout` (widgets), `handlers` and `streaming` (their events), `api` (named endpoints), `app`
  (`build_ui` and `launch`); assets/ui.js is the page's script.
- `live`: a reply streams to the page on a route of its own; `quiet_queue` and `unchanged_outputs` cut what
  Gradio's queue and its postprocessing take from the engine's cores.
`gradio_stubs` keeps Gradio from rewriting its type stubs at every start; it is installed here, before any
module of this package imports gradio.
"""

from localchat.ui.gradio_stubs import skip_stub_pass

skip_stub_pass()

from localchat.ui.memory_panel import render_memory_html  # noqa: E402
from localchat.ui.render import safe_markdown  # noqa: E402

__all__ = ["render_memory_html", "safe_markdown"]
