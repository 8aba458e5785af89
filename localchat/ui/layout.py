"""The page's widgets. `build_layout` runs inside a gr.Blocks and returns them by name for wiring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from localchat import settings
from localchat.ui.memory_panel import render_memory_html

MAX_SAMPLES = settings.UI_MAX_SAMPLES


@dataclass
class Widgets:
    conv_state: Any
    nav_state: Any
    edit_state: Any
    pending_state: Any
    params_state: Any
    timer: Any
    new_btn: Any
    conv_list: Any
    title_box: Any
    rename_btn: Any
    delete_btn: Any
    chatbot: Any
    prev_btn: Any
    nav_label: Any
    next_btn: Any
    samples_row: Any
    sample_cols: Any
    msg: Any
    send_btn: Any
    regen_btn: Any
    stop_btn: Any
    status: Any
    edit_acc: Any
    edit_box: Any
    edit_btn: Any
    system_box: Any
    temperature: Any
    top_p: Any
    max_tokens: Any
    seed: Any
    n_box: Any
    mem_acc: Any
    mem_html: Any
    mem_refresh: Any


def build_layout() -> Widgets:
    """Create every widget (call inside `with gr.Blocks()`)."""
    conv_state = gr.State(None)
    nav_state = gr.State(None)
    edit_state = gr.State(None)
    pending_state = gr.State("")
    params_state = gr.State({})
    timer = gr.Timer(0.5, active=False)

    with gr.Sidebar(open=True, width=270, elem_id="lc-sidebar"):
        gr.Markdown("## localchat", elem_id="lc-brand")
        new_btn = gr.Button("+ New chat", variant="primary", elem_id="lc-new")
        conv_list = gr.Radio(choices=[], label="Conversations (newest first)", elem_id="lc-conversations")
        title_box = gr.Textbox(label="Title", elem_id="lc-title", max_lines=1)
        with gr.Row():
            rename_btn = gr.Button("Rename", size="sm", elem_id="lc-rename")
            delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="lc-delete")

    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=420):
            chatbot = gr.Chatbot(
                label="Chat",
                elem_id="lc-chat",
                height=470,
                sanitize_html=True,
                allow_tags=False,
                render_markdown=True,
                buttons=["copy"],
                feedback_options=None,
                placeholder="Start a conversation: type below and press Send.",
                latex_delimiters=[],
            )
            with gr.Row(elem_id="lc-branch", equal_height=True):
                prev_btn = gr.Button("‹", size="sm", min_width=40, scale=0, interactive=False, elem_id="lc-prev")
                nav_label = gr.Markdown("", elem_id="lc-branch-label")
                next_btn = gr.Button("›", size="sm", min_width=40, scale=0, interactive=False, elem_id="lc-next")
            with gr.Row(visible=False, elem_id="lc-samples") as samples_row:
                sample_cols = [gr.Markdown("", visible=False, elem_classes=["lc-sample"], elem_id=f"lc-sample-{i}") for i in range(MAX_SAMPLES)]
            with gr.Row(equal_height=True):
                msg = gr.Textbox(placeholder="Message localchat (Enter sends, Shift+Enter for a new line)", show_label=False,
                                 lines=1, max_lines=8, scale=5, elem_id="lc-input")
                send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="lc-send")
            with gr.Row():
                regen_btn = gr.Button("↻ Regenerate", size="sm", elem_id="lc-regenerate")
                stop_btn = gr.Button("■ Stop", size="sm", variant="stop", elem_id="lc-stop")
            status = gr.Markdown("", elem_id="lc-status")
            with gr.Accordion("Edit a message (click one of your messages in the chat)", open=False, elem_id="lc-edit-acc") as edit_acc:
                edit_box = gr.Textbox(label="Edited text", lines=2, elem_id="lc-edit")
                edit_btn = gr.Button("Save as a new branch and reply", size="sm", elem_id="lc-edit-send")

        with gr.Column(scale=2, min_width=300):
            with gr.Accordion("Settings", open=False, elem_id="lc-settings"):
                system_box = gr.Textbox(label="System prompt (used when a new chat starts)", lines=2, elem_id="lc-system")
                with gr.Row():
                    temperature = gr.Number(settings.DEFAULT_TEMPERATURE, label="Temperature", elem_id="lc-temperature")
                    top_p = gr.Number(settings.DEFAULT_TOP_P, label="Top-p", elem_id="lc-top-p")
                with gr.Row():
                    max_tokens = gr.Number(settings.DEFAULT_MAX_TOKENS, label="Max tokens", precision=0, elem_id="lc-max-tokens")
                    seed = gr.Textbox("", label="Seed (blank: random)", max_lines=1, elem_id="lc-seed")
                n_box = gr.Number(1, label=f"Samples side by side (n, 1-{MAX_SAMPLES})", precision=0, elem_id="lc-n")
            with gr.Accordion("Memory (KV cache blocks)", open=False, elem_id="lc-memory-acc") as mem_acc:
                mem_html = gr.HTML(render_memory_html(None), elem_id="lc-memory")
                mem_refresh = gr.Button("Refresh", size="sm", elem_id="lc-memory-refresh")

    return Widgets(conv_state=conv_state, nav_state=nav_state, edit_state=edit_state, pending_state=pending_state, params_state=params_state, timer=timer, new_btn=new_btn, conv_list=conv_list, title_box=title_box, rename_btn=rename_btn, delete_btn=delete_btn, chatbot=chatbot, prev_btn=prev_btn, nav_label=nav_label, next_btn=next_btn, samples_row=samples_row, sample_cols=sample_cols, msg=msg, send_btn=send_btn, regen_btn=regen_btn, stop_btn=stop_btn, status=status, edit_acc=edit_acc, edit_box=edit_box, edit_btn=edit_btn, system_box=system_box, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, n_box=n_box, mem_acc=mem_acc, mem_html=mem_html, mem_refresh=mem_refresh)
