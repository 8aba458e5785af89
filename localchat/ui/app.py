"""The page: widgets (layout.py), their events (handlers.py) and the scripting endpoints (api.py),
wired together here, and `launch` to serve it.

Nothing here touches tensors or block ids: replies come from ChatService, conversations from the
Store, and the memory panel from `render_memory_html(driver.snapshot())`.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: no usage pings

import gradio as gr  # noqa: E402

from localchat import settings  # noqa: E402
from localchat.chat.service import ChatService  # noqa: E402
from localchat.ui.api import register_api  # noqa: E402
from localchat.ui.handlers import Handlers  # noqa: E402
from localchat.ui.layout import Widgets, build_layout  # noqa: E402


def _asset(name: str) -> str | None:
    path = settings.resource("assets") / name
    return path.read_text(encoding="utf-8") if path.exists() else None


def build_ui(service: ChatService, *, title: str = "localchat") -> gr.Blocks:
    with gr.Blocks(title=title, fill_height=True, elem_id="lc-app") as demo:
        widgets = build_layout()
        wire(demo, widgets, Handlers(service))
        register_api(service)
    return demo


def wire(demo: gr.Blocks, w: Widgets, h: Handlers) -> None:
    """Connect each widget event to its handler (events are private: scripts use the api.py endpoints)."""
    sampling = [w.temperature, w.top_p, w.max_tokens, w.seed, w.n_box]
    view_outputs = [w.chatbot, w.nav_state, w.nav_label, w.prev_btn, w.next_btn]
    sample_outputs = [w.samples_row, *w.sample_cols]
    stream_outputs = [w.chatbot, w.status, w.mem_html, *sample_outputs]
    finish_outputs = [w.timer, w.mem_html, w.conv_list, w.title_box, *view_outputs]
    private = {"api_visibility": "private"}

    demo.load(h.on_load, None, [w.conv_state, w.conv_list, w.title_box, w.mem_html, *view_outputs], **private)

    # send (button or Enter)
    for trigger in (w.send_btn.click, w.msg.submit):
        ev = trigger(h.start, [w.msg, w.conv_state, *sampling], [w.msg, w.pending_state, w.params_state, w.timer], **private)
        gen = ev.success(h.generate_send, [w.pending_state, w.conv_state, w.params_state, w.system_box],
                         [w.conv_state, w.conv_list, w.title_box, *stream_outputs],
                         concurrency_limit=settings.UI_CONCURRENCY, **private)
        gen.then(h.finish, [w.conv_state, w.nav_state], finish_outputs, **private)

    ev = w.regen_btn.click(h.start_regenerate, [w.conv_state, *sampling], [w.params_state, w.timer], **private)
    regen_event = ev.success(h.generate_regenerate, [w.conv_state, w.params_state], stream_outputs, concurrency_limit=settings.UI_CONCURRENCY, **private)
    regen_event.then(h.finish, [w.conv_state, w.nav_state], finish_outputs, **private)

    ev = w.edit_btn.click(h.start_edit, [w.conv_state, w.edit_state, w.edit_box, *sampling], [w.pending_state, w.params_state, w.timer], **private)
    edit_event = ev.success(h.generate_edit, [w.edit_state, w.pending_state, w.params_state], stream_outputs, concurrency_limit=settings.UI_CONCURRENCY, **private)
    edit_event.then(h.finish, [w.conv_state, w.nav_state], finish_outputs, **private)

    w.stop_btn.click(h.on_stop, None, None, **private)

    w.prev_btn.click(lambda c, m: h.on_navigate(c, m, -1), [w.conv_state, w.nav_state], view_outputs, **private)
    w.next_btn.click(lambda c, m: h.on_navigate(c, m, +1), [w.conv_state, w.nav_state], view_outputs, **private)
    w.chatbot.select(h.on_select, [w.conv_state], [*view_outputs, w.edit_state, w.edit_box], **private)

    w.new_btn.click(h.on_new, None, [w.conv_state, w.conv_list, w.title_box, w.status, *sample_outputs, *view_outputs], **private)
    # The chatbot's own trash button only clears the view: treat it as "new chat" (nothing is deleted).
    w.chatbot.clear(h.on_new, None, [w.conv_state, w.conv_list, w.title_box, w.status, *sample_outputs, *view_outputs], **private)
    w.conv_list.input(h.on_pick, [w.conv_list], [w.conv_state, w.title_box, w.system_box, w.status, *sample_outputs, *view_outputs], **private)
    w.rename_btn.click(h.on_rename, [w.conv_state, w.title_box], [w.conv_list], **private)
    w.delete_btn.click(h.on_delete, [w.conv_state], [w.conv_state, w.conv_list, w.title_box, *sample_outputs, *view_outputs], **private)

    w.timer.tick(h.memory_html, None, w.mem_html, show_progress="hidden", **private)
    w.mem_acc.expand(h.memory_html, None, w.mem_html, show_progress="hidden", **private)
    w.mem_refresh.click(h.memory_html, None, w.mem_html, **private)


def launch(demo: gr.Blocks, *, host: str = settings.DEFAULT_HOST, port: int | None = settings.DEFAULT_PORT, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Start the server; theme, CSS and JS go to launch() in Gradio 6."""
    demo.queue(default_concurrency_limit=settings.UI_CONCURRENCY)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        inbrowser=False,
        # System fonts only: the app works offline and asks no font server for anything.
        theme=gr.themes.Soft(primary_hue="indigo", neutral_hue="slate",
                             font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]),
        css=_asset("ui.css"),
        js=_asset("ui.js"),
        footer_links=["api"],
    )
