"""The page: widgets (layout.py), their events (handlers.py, streaming.py) and the scripting endpoints
(api.py), wired together here, and `launch` to serve it.

Nothing here touches tensors or block ids: replies come from ChatService, conversations from the
Store, and the memory panel from the engine's panel snapshot (localchat/engine/panel.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: no usage pings

import gradio as gr  # noqa: E402

from localchat import settings  # noqa: E402
from localchat.chat.service import ChatService  # noqa: E402
from localchat.ui import csp  # noqa: E402
from localchat.ui.api import register_api  # noqa: E402
from localchat.ui.layout import Widgets, build_layout  # noqa: E402
from localchat.ui.model_picker import ModelPicker, wire_model_picker  # noqa: E402
from localchat.ui.presets import Presets  # noqa: E402
from localchat.ui.quiet_queue import quiet_queue  # noqa: E402
from localchat.ui.streaming import ReplyHandlers  # noqa: E402
from localchat.ui.unchanged_outputs import skip_unchanged  # noqa: E402

PRIVATE = {"api_visibility": "private"}  # scripts use api.py's endpoints
# Every event hides Gradio's loading spinner: its spring animation keeps running at 60 frames a second
# for seconds after the spinner is removed (measured: ~120 frames in the 2 s after a click on "New
# chat"), CPU taken from the engine on a two-core machine. The page's own events are quick, and a reply
# shows its frame at once (tests/test_ui_browser.py::test_a_click_leaves_no_animation_running).
QUIET = {"show_progress": "hidden", **PRIVATE}


def quiet_events(w: Widgets) -> dict:
    """The options of every event of the page. Each time an event's status changes (queued, started, done),
    Gradio's page hands a loading status to every component that has been an event's output (or input) so far,
    and takes a snapshot of each one's properties, one structuredClone per value: 6,270 calls for one message
    sent, several ms of the page's main thread each time, on the engine's cores while its prompt runs. The
    events' progress is hidden anyway, so it all goes to the status line: 3,618 calls (benchmarks/NOTES.md
    session 16)."""
    return {**QUIET, "show_progress_on": [w.status]}


def _asset(name: str) -> str | None:
    path = settings.resource("assets") / name
    return path.read_text(encoding="utf-8") if path.exists() else None


# The page keeps the settings' values (and the system prompt's) for the replies it starts itself (assets/ui.js
# startReply): Gradio's change events run this in the page alone, whether or not the Settings panel was ever
# opened, on every change a person or an event makes.
MIRROR_SETTINGS_JS = "(...v) => { window.lcSettings = v.slice(0, -1); window.lcSystem = v[v.length - 1]; }"
# The page's own id for its tab, made once and sent with the page's first event (ReplyHandlers.on_load); its
# starts carry it. getRandomValues works on plain http too (a LAN address), where randomUUID does not.
TAB_ID_JS = ("() => [window.lcTab = window.lcTab || Array.from(crypto.getRandomValues(new Uint8Array(16)), "
             "(b) => b.toString(16).padStart(2, '0')).join('')]")


def _start_js(action: str, data: str = "{}") -> str:
    return f"(...a) => {{ if (window.lcStart) window.lcStart('{action}', {data}); }}"


def build_ui(service: ChatService, *, title: str = "localchat", presets: Presets | None = None,
             switcher=None) -> gr.Blocks:
    """`switcher`: a localchat.chat.engine_switch.ModelSwitcher, for the model picker (None: no switching)."""
    h = ReplyHandlers(service, presets)

    # The page script's direct calls (assets/ui.js: server.NAME(arg)); their names are the API.
    def switch_branch(arg):
        return h.server_switch_branch(arg)

    def memory(arg):
        return h.server_memory(arg)

    def block_text(arg):
        return h.server_block_text(arg)

    def start_reply(arg):
        return h.server_start_reply(arg)

    with gr.Blocks(title=title, fill_height=True, elem_id="lc-app") as demo:
        widgets = build_layout({"chat": [switch_branch], "mem": [memory, block_text], "live": [start_reply]})
        h.w = widgets
        wire(demo, widgets, h)
        wire_model_picker(widgets.model_picker, ModelPicker(switcher, service), demo,
                          after_switch=(h.memory_html, [widgets.mem_html]), quiet=quiet_events(widgets))
        register_api(service)
    demo.localchat_routes = [h.live_slots.route()]  # served by launch() beside the page
    skip_unchanged(demo)  # most events change a few of their outputs (localchat/ui/unchanged_outputs.py)
    return demo


def wire(demo: gr.Blocks, w: Widgets, h: ReplyHandlers) -> None:
    """Connect each widget event to its handler (events are private: scripts use the api.py endpoints)."""
    select_out = [w.conv_state, w.conv_list, w.title_box, w.system_box, w.chat, w.overview, w.live, w.compare,
                  w.status, w.export_file]
    quiet = quiet_events(w)
    mirrored = [*w.settings, w.system_box]

    demo.load(h.on_load, [w.tab_box], [*select_out, w.mem_html, w.preset], js=TAB_ID_JS, **quiet)
    demo.load(None, mirrored, None, js=MIRROR_SETTINGS_JS, **quiet)
    gr.on([c.change for c in mirrored], None, mirrored, None, js=MIRROR_SETTINGS_JS, **quiet)

    # Replies start from the page script (localchat/ui/streaming.py server_start_reply); these events run only
    # in the page. A reply on a message (↻, edit) starts from its own button in the chat (assets/ui.js).
    for trigger in (w.send_btn.click, w.msg.submit):
        trigger(None, [w.msg], None, js=_start_js("send", "{text: a[0]}"), **quiet)
    w.regen_btn.click(None, None, None, js=_start_js("regenerate"), **quiet)
    w.chat.lc_compare(h.on_compare, [w.conv_state], [w.compare], **quiet)
    w.live.lc_finish(h.finish_reply, [w.conv_state], select_out, **quiet)
    w.live.lc_started(h.on_started, None, [w.conv_state, w.conv_list, w.title_box], **quiet)
    w.live.lc_refused(h.on_refused, [w.conv_state], [w.chat, w.overview], **quiet)
    w.stop_btn.click(h.on_stop, None, None, queue=False, **quiet)
    demo.unload(h.on_unload)  # a closed or reloaded tab ends its replies

    w.new_btn.click(h.on_new, [w.search_box], select_out, **quiet)
    w.conv_list.input(h.on_pick, [w.conv_list, w.search_box], select_out, **quiet)
    # change (not input): a pasted or dropped query searches too
    w.search_box.change(h.on_search, [w.search_box, w.conv_state], [w.conv_list], trigger_mode="always_last",
                        **quiet)
    w.rename_btn.click(h.on_rename, [w.conv_state, w.title_box, w.search_box], [w.conv_list], **quiet)
    w.delete_btn.click(h.on_delete, [w.conv_state, w.search_box], select_out, **quiet)
    w.system_box.blur(h.on_system, [w.conv_state, w.system_box], None, **quiet)
    w.export_json_btn.click(lambda c: h.on_export(c, "json"), [w.conv_state], [w.export_file], **quiet)
    w.export_md_btn.click(lambda c: h.on_export(c, "md"), [w.conv_state], [w.export_file], **quiet)
    w.import_btn.upload(h.on_import, [w.import_btn, w.search_box], select_out, **quiet)

    w.preset.input(h.on_preset, [w.preset], [*w.settings, w.system_box, w.preset_name], **quiet)
    w.preset_save.click(h.on_preset_save, [w.preset_name, w.system_box, *w.settings], [w.preset], **quiet)
    w.preset_delete.click(h.on_preset_delete, [w.preset], [w.preset], **quiet)

    w.mem_acc.expand(h.memory_html, None, w.mem_html, **quiet)
    w.mem_refresh.click(h.memory_html, None, w.mem_html, **quiet)


def _early_scripts() -> list:
    """assets/quiet_timers.js at the very top of the page's HTML (localchat/ui/early_script.py says why
    it cannot go in Gradio's `head`)."""
    from starlette.middleware import Middleware

    from localchat.ui.early_script import EarlyScript

    quiet = _asset("quiet_timers.js")
    return [Middleware(EarlyScript, script=quiet)] if quiet else []


def launch(demo: gr.Blocks, *, host: str = settings.DEFAULT_HOST, port: int | None = settings.DEFAULT_PORT, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False, routes: list | None = None, auth=None):
    """Start the server; theme, CSS and JS go to launch() in Gradio 6. `routes` (Starlette routes, e.g.
    the OpenAI API's) are served on the same port, ahead of the page's own; `auth` guards the page."""
    demo.queue(default_concurrency_limit=settings.UI_CONCURRENCY)
    quiet_queue(demo)
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
        head=f"<script>{_asset('memory_panel.js') or ''}</script>",  # started by ui.js
        footer_links=["api"],
        # The Content-Security-Policy and its sibling headers on every response (localchat/ui/csp.py).
        app_kwargs={"routes": [*getattr(demo, "localchat_routes", []), *(routes or [])],
                    "middleware": [*csp.middleware(), *_early_scripts()]},
        auth=auth,
    )
