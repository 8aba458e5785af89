"""The page's widgets. `build_layout` runs inside a gr.Blocks and returns them by name for wiring.

The conversation, the reply being generated, the comparison, the overview and the memory panel are
gr.HTML blocks rendered by localchat/ui (thread.py, compare.py, overview.py, memory_panel.py) and
brought to life by assets/ui.js; each registers itself with that script through its `js_on_load`.
The custom events a block can trigger are named (quoted) in its js_on_load, as Gradio requires.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import gradio as gr

from localchat import settings
from localchat.ui.memory_panel import render_memory_html
from localchat.ui.model_picker import build_model_picker
from localchat.ui.overview import overview_html
from localchat.ui.presets import BUILTIN
from localchat.ui.thread import conversation_html

MAX_SAMPLES = settings.UI_MAX_SAMPLES


def _mount(part: str, events: tuple[str, ...] = ()) -> str:
    """js_on_load for a block: hand it to assets/ui.js (whichever of the two loads first)."""
    names = ", ".join(f"'{e}'" for e in events)  # the custom events this block triggers: {names}
    return (
        f"/* events: [{names}] */\n"
        f"const lc = (window.lcParts = window.lcParts || {{}}); lc['{part}'] = {{element, trigger, server, props}};\n"
        f"if (window.lcMount) window.lcMount('{part}');\n"
        f"watch('value', () => window.lcChanged && window.lcChanged('{part}'));"
    )


@dataclass
class Widgets:
    conv_state: Any
    tab_box: Any
    new_btn: Any
    search_box: Any
    conv_list: Any
    title_box: Any
    rename_btn: Any
    delete_btn: Any
    export_json_btn: Any
    export_md_btn: Any
    export_file: Any
    import_btn: Any
    chat: Any
    live: Any
    compare: Any
    status: Any
    gauge: Any
    msg: Any
    send_btn: Any
    stop_btn: Any
    regen_btn: Any
    overview: Any
    preset: Any
    preset_name: Any
    preset_save: Any
    preset_delete: Any
    system_box: Any
    temperature: Any
    top_p: Any
    top_k: Any
    min_p: Any
    repetition_penalty: Any
    max_tokens: Any
    seed: Any
    stop: Any
    n_box: Any
    beam_box: Any
    mem_acc: Any
    mem_html: Any
    mem_refresh: Any
    model_picker: Any  # localchat/ui/model_picker.py PickerWidgets

    @property
    def settings(self) -> list:
        """The sampling widgets in localchat.ui.render.SETTING_NAMES order."""
        return [self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty, self.max_tokens,
                self.seed, self.stop, self.n_box, self.beam_box]


def build_layout(server_fns: dict[str, list[Callable]] | None = None) -> Widgets:
    """Create every widget (call inside `with gr.Blocks()`); `server_fns` are the page script's calls."""
    fns = server_fns or {}
    made: dict[str, Any] = {"conv_state": gr.State(None)}
    made["tab_box"] = gr.Textbox("", visible=False, elem_id="lc-tab")  # carries the page's tab id (app.TAB_ID_JS)
    with gr.Sidebar(open=True, width=280, elem_id="lc-sidebar"):
        _sidebar(made)
    with gr.Row(equal_height=False, elem_id="lc-main"):
        with gr.Column(scale=3, min_width=420):
            _thread(made, fns)
        with gr.Column(scale=2, min_width=320, elem_id="lc-side"):
            _side(made, fns)
    return Widgets(**{f.name: made[f.name] for f in fields(Widgets)})


def _sidebar(made: dict) -> None:
    gr.Markdown("## localchat", elem_id="lc-brand")
    made["new_btn"] = gr.Button("+ New chat", variant="primary", elem_id="lc-new")
    made["search_box"] = gr.Textbox(placeholder="Search titles and messages", show_label=False, max_lines=1,
                                    elem_id="lc-search")
    made["conv_list"] = gr.Radio(choices=[], label="Conversations (newest first)", elem_id="lc-conversations")
    made["title_box"] = gr.Textbox(label="Title", elem_id="lc-title", max_lines=1)
    with gr.Row():
        made["rename_btn"] = gr.Button("Rename", size="sm", elem_id="lc-rename")
        made["delete_btn"] = gr.Button("Delete", size="sm", variant="stop", elem_id="lc-delete")
    with gr.Row():
        made["export_json_btn"] = gr.Button("Export JSON", size="sm", elem_id="lc-export-json")
        made["export_md_btn"] = gr.Button("Export Markdown", size="sm", elem_id="lc-export-md")
    made["export_file"] = gr.File(label="Exported file", visible=False, interactive=False, elem_id="lc-export-file")
    made["import_btn"] = gr.UploadButton("Import a conversation (JSON)", file_types=[".json"], file_count="single",
                                         size="sm", elem_id="lc-import")


def _thread(made: dict, fns: dict) -> None:
    with gr.Column(elem_id="lc-thread"):
        made["chat"] = gr.HTML(conversation_html(None, [], None, context=0), elem_id="lc-chat",
                               js_on_load=_mount("chat", ("lc_compare",)),
                               server_functions=fns.get("chat"))
        made["live"] = gr.HTML("", elem_id="lc-live", js_on_load=_mount("live", ("lc_finish", "lc_started", "lc_refused")),
                               server_functions=fns.get("live"))
    made["compare"] = gr.HTML("", elem_id="lc-compare", js_on_load=_mount("compare"))
    made["status"] = gr.HTML("", elem_id="lc-status", apply_default_css=False, js_on_load=_mount("status"))
    made["gauge"] = gr.HTML('<div class="lc-gauge"></div>', elem_id="lc-gauge", apply_default_css=False, js_on_load=None)
    with gr.Row(equal_height=True, elem_id="lc-compose"):
        made["msg"] = gr.Textbox(placeholder="Message localchat (Enter sends, Shift+Enter for a new line, Esc stops)",
                                 show_label=False, lines=1, max_lines=8, scale=5, elem_id="lc-input")
        made["send_btn"] = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="lc-send")
        made["stop_btn"] = gr.Button("■ Stop", variant="stop", scale=1, min_width=70, elem_id="lc-stop")
    with gr.Row(elem_id="lc-under"):
        made["regen_btn"] = gr.Button("↻ Regenerate the last reply", size="sm", elem_id="lc-regenerate")


def _side(made: dict, fns: dict) -> None:
    with gr.Accordion("Branches", open=True, elem_id="lc-overview-acc"):
        made["overview"] = gr.HTML(overview_html(None, [], None), elem_id="lc-overview", apply_default_css=False,
                                   js_on_load=_mount("overview"))
    with gr.Accordion("Settings", open=False, elem_id="lc-settings"):
        made["model_picker"] = build_model_picker()
        made["preset"] = gr.Dropdown(choices=list(BUILTIN), value=None, label="Preset", elem_id="lc-preset")
        with gr.Row():
            made["preset_name"] = gr.Textbox(placeholder="name", show_label=False, max_lines=1, scale=2, elem_id="lc-preset-name")
            made["preset_save"] = gr.Button("Save preset", size="sm", scale=1, elem_id="lc-preset-save")
            made["preset_delete"] = gr.Button("Delete preset", size="sm", scale=1, elem_id="lc-preset-delete")
        made["system_box"] = gr.Textbox(label="System prompt (this conversation)", lines=2, elem_id="lc-system")
        with gr.Row():
            made["temperature"] = gr.Number(settings.DEFAULT_TEMPERATURE, label="Temperature", elem_id="lc-temperature")
            made["top_p"] = gr.Number(settings.DEFAULT_TOP_P, label="Top-p", elem_id="lc-top-p")
            made["top_k"] = gr.Number(0, label="Top-k (0: off)", precision=0, elem_id="lc-top-k")
        with gr.Row():
            made["min_p"] = gr.Number(0.0, label="Min-p", elem_id="lc-min-p")
            made["repetition_penalty"] = gr.Number(1.0, label="Repetition penalty", elem_id="lc-repetition-penalty")
            made["max_tokens"] = gr.Number(settings.DEFAULT_MAX_TOKENS, label="Max tokens", precision=0, elem_id="lc-max-tokens")
        with gr.Row():
            made["seed"] = gr.Textbox("", label="Seed (blank: random)", max_lines=1, elem_id="lc-seed")
            made["n_box"] = gr.Number(1, label=f"Samples (n, 1-{MAX_SAMPLES})", precision=0, elem_id="lc-n")
            made["beam_box"] = gr.Number(0, label=f"Beam width (0: off, 2-{MAX_SAMPLES})", precision=0, elem_id="lc-beam")
        made["stop"] = gr.Textbox("", label="Stop strings (one per line)", lines=1, max_lines=4, elem_id="lc-stop-strings")
    with gr.Accordion("Memory (KV cache blocks)", open=False, elem_id="lc-memory-acc") as mem_acc:
        made["mem_acc"] = mem_acc
        made["mem_html"] = gr.HTML(render_memory_html(None), elem_id="lc-memory", apply_default_css=False,
                                   js_on_load=_mount("mem"), server_functions=fns.get("mem"))
        made["mem_refresh"] = gr.Button("Refresh", size="sm", elem_id="lc-memory-refresh")
