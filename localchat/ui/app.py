"""The Gradio wiring: widgets and event handlers over ChatService, Store and driver.snapshot().

Nothing here touches tensors or block ids: replies come from ChatService, conversations from the
Store, and the memory panel from `render_memory_html(driver.snapshot())`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: no usage pings

import gradio as gr  # noqa: E402

from localchat.engine import RequestError  # noqa: E402
from localchat.service import ChatService
from localchat.store import StoreError
from localchat.ui.memory_panel import render_memory_html
from localchat.ui.render import (
    branch_label,
    chat_messages,
    conversation_choices,
    params_from_ui,
    safe_markdown,
    stats_line,
    title_from_message,
)

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets"
MAX_SAMPLES = 4  # columns for n samples side by side
STREAM_INTERVAL_S = 0.05  # at most this often a streamed update goes to the browser
MEMORY_INTERVAL_S = 0.4  # at most this often a streamed update redraws the memory panel
EXPECTED_ERRORS = (ValueError, StoreError, RequestError, RuntimeError)


def _asset(name: str) -> str | None:
    path = ASSETS / name
    return path.read_text(encoding="utf-8") if path.exists() else None


def _user_error(exc: BaseException) -> gr.Error:
    """A clear message for the browser (never a stack trace); the trace goes to the log."""
    log.info("request failed: %s", exc)
    return _err(str(exc) or exc.__class__.__name__)


def _err(message: str) -> gr.Error:
    return gr.Error(message, title="localchat", duration=6, print_exception=False)


def build_ui(service: ChatService, *, title: str = "localchat") -> gr.Blocks:
    store = service.store
    driver = service.driver
    stop_requested: set[str] = set()  # session hashes whose current reply should stop

    def session_of(request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or ""

    # ------------------------------------------------------------ pure-ish views
    def memory_html() -> str:
        try:
            return render_memory_html(driver.snapshot(), title=f"KV cache · {service.engine.model_name}")
        except Exception as exc:  # noqa: BLE001 - the panel must never break the page
            log.exception("memory snapshot failed")
            return render_memory_html(None) + f"<!-- {type(exc).__name__} -->"

    def sidebar(conv_id):
        choices = conversation_choices(store.list_conversations(limit=200))
        value = str(conv_id) if conv_id is not None and any(v == str(conv_id) for _, v in choices) else None
        return gr.Radio(choices=choices, value=value)

    def default_nav(path) -> int | None:
        for m in reversed(path):
            if store.siblings(m.id).count > 1:
                return m.id
        return path[-1].id if path else None

    def current_path(conv_id):
        try:
            return store.current_path(conv_id) if conv_id is not None else []
        except StoreError:  # deleted meanwhile (another tab): show an empty chat
            return []

    def chat_view(conv_id, nav_id=None):
        """(chatbot, nav_state, nav label, prev button, next button) for the conversation's branch."""
        path = current_path(conv_id)
        ids = [m.id for m in path]
        if nav_id not in ids:
            nav_id = default_nav(path)
        if nav_id is None:
            label, has_prev, has_next = "", False, False
        else:
            sib = store.siblings(nav_id)
            pos = ids.index(nav_id)
            label = branch_label(path[pos].role, pos, sib.index, sib.count)
            has_prev, has_next = sib.index > 0, sib.index < sib.count - 1
        return (
            chat_messages(path),
            nav_id,
            label,
            gr.Button(interactive=has_prev),
            gr.Button(interactive=has_next),
        )

    def hidden_samples():
        return [gr.Row(visible=False)] + [gr.Markdown(value="", visible=False) for _ in range(MAX_SAMPLES)]

    def read_params(temperature, top_p, max_tokens, seed, n):
        try:
            params = params_from_ui(temperature, top_p, max_tokens, seed, n)
        except ValueError as exc:
            raise _user_error(exc) from None
        if params.n > MAX_SAMPLES:
            raise _err(f"n must be at most {MAX_SAMPLES} here (the UI shows up to {MAX_SAMPLES} samples side by side)")
        return params

    # ----------------------------------------------------------------- streaming
    def stream_reply(events_iter, base: list[dict], n: int, session: str):
        """ChatService events as widget updates: (chatbot, status, memory panel, samples row, *columns).

        The memory panel is redrawn from the stream too (besides the timer), at most every
        MEMORY_INTERVAL_S, so even a reply faster than the timer shows its live blocks.
        """
        last = last_mem = 0.0
        final = None
        stopped = False
        for item in events_iter:
            if session in stop_requested:
                events_iter.close()  # ChatService aborts the request and keeps what was shown
                stopped = True
                break
            events = item if isinstance(item, list) else [item]
            if not events:
                continue
            final = events[0]
            now = time.monotonic()
            if now - last < STREAM_INTERVAL_S and not events[0].finished:
                continue
            last = now
            mem = gr.skip()
            if now - last_mem >= MEMORY_INTERVAL_S and not events[0].finished:
                mem, last_mem = memory_html(), now
            chat = base + [{"role": "assistant", "content": safe_markdown(events[0].text)}]
            if n > 1:
                columns = []
                for i in range(MAX_SAMPLES):
                    if i < len(events):
                        columns.append(gr.Markdown(value=f"**Sample {i + 1}**\n\n" + safe_markdown(events[i].text), visible=True))
                    else:
                        columns.append(gr.Markdown(value=f"**Sample {i + 1}**" if i < n else "", visible=i < n))
                yield (chat, "generating…", mem, gr.Row(visible=True), *columns)
            else:
                yield (chat, "generating…", mem, *hidden_samples())
        stop_requested.discard(session)
        if stopped:
            yield (gr.skip(), "Stopped: the reply so far is saved.", *([gr.skip()] * (MAX_SAMPLES + 2)))
        elif final is not None:
            yield (gr.skip(), stats_line(final), *([gr.skip()] * (MAX_SAMPLES + 2)))

    def start(text, conv_id, temperature, top_p, max_tokens, seed, n, request: gr.Request = None):
        """Validate before anything is saved; clear the box and start the memory timer."""
        stop_requested.discard(session_of(request))
        if not isinstance(text, str) or not text.strip():
            raise _err("The message is empty: write something first.")
        params = read_params(temperature, top_p, max_tokens, seed, n)
        return "", text, params.to_dict(), gr.Timer(active=True)

    def generate_send(pending, conv_id, params_dict, system_prompt, request: gr.Request = None):
        from localchat.sampling_params import SamplingParams

        params = SamplingParams.from_dict(params_dict)
        try:
            if conv_id is None:
                system = system_prompt.strip() if isinstance(system_prompt, str) and system_prompt.strip() else None
                conv = service.new_conversation(title_from_message(pending), system_prompt=system, settings={"sampling": params_dict})
                conv_id = conv.id
            base = chat_messages(store.current_path(conv_id)) + [{"role": "user", "content": safe_markdown(pending)}]
            events = service.send_samples(conv_id, pending, params) if params.n > 1 else service.send(conv_id, pending, params)
            first = True
            for update in stream_reply(events, base, params.n, session_of(request)):
                if first:  # the new conversation shows in the sidebar while its reply streams
                    yield (conv_id, sidebar(conv_id), store.get_conversation(conv_id).title, *update)
                    first = False
                else:
                    yield (conv_id, gr.skip(), gr.skip(), *update)
        except EXPECTED_ERRORS as exc:
            raise _user_error(exc) from None

    def start_regenerate(conv_id, temperature, top_p, max_tokens, seed, n, request: gr.Request = None):
        stop_requested.discard(session_of(request))
        path = current_path(conv_id)
        if not path or path[-1].role != "assistant":
            raise _err("There is no reply to regenerate yet: send a message first.")
        params = read_params(temperature, top_p, max_tokens, seed, n)
        return params.to_dict(), gr.Timer(active=True)

    def generate_regenerate(conv_id, params_dict, request: gr.Request = None):
        from localchat.sampling_params import SamplingParams

        params = SamplingParams.from_dict(params_dict)
        try:
            path = store.current_path(conv_id)
            reply = path[-1]
            base = chat_messages(path[:-1])
            events = service.regenerate_samples(reply.id, params) if params.n > 1 else service.regenerate(reply.id, params)
            for update in stream_reply(events, base, params.n, session_of(request)):
                yield update
        except EXPECTED_ERRORS as exc:
            raise _user_error(exc) from None

    def start_edit(conv_id, edit_id, text, temperature, top_p, max_tokens, seed, n, request: gr.Request = None):
        stop_requested.discard(session_of(request))
        if edit_id is None or edit_id not in {m.id for m in current_path(conv_id)}:
            raise _err("Select one of your messages in the chat first, then edit it here.")
        if not isinstance(text, str) or not text.strip():
            raise _err("The edited message is empty: write something first.")
        params = read_params(temperature, top_p, max_tokens, seed, n)
        return text, params.to_dict(), gr.Timer(active=True)

    def generate_edit(edit_id, pending, params_dict, request: gr.Request = None):
        from localchat.sampling_params import SamplingParams

        params = SamplingParams.from_dict(params_dict)
        try:
            original = store.get_message(edit_id)
            before = store.path(original.parent_id) if original.parent_id is not None else []
            base = chat_messages(before) + [{"role": "user", "content": safe_markdown(pending)}]
            events = service.edit_samples(edit_id, pending, params) if params.n > 1 else service.edit(edit_id, pending, params)
            for update in stream_reply(events, base, params.n, session_of(request)):
                yield update
        except EXPECTED_ERRORS as exc:
            raise _user_error(exc) from None

    def finish(conv_id, nav_id):
        """After a reply: stop the timer, redraw from the store (the saved branch) and the sidebar."""
        try:
            title_value = store.get_conversation(conv_id).title if conv_id is not None else ""
        except StoreError:
            title_value = ""
        return (gr.Timer(active=False), memory_html(), sidebar(conv_id), title_value, *chat_view(conv_id, None))

    # ------------------------------------------------------------- other events
    def on_load():
        conversations = store.list_conversations(limit=1)
        conv_id = conversations[0].id if conversations else None
        title_value = conversations[0].title if conversations else ""
        return (conv_id, sidebar(conv_id), title_value, memory_html(), *chat_view(conv_id))

    def on_pick(value):
        try:
            conv_id = int(value) if value not in (None, "") else None
            conv = store.get_conversation(conv_id) if conv_id is not None else None
        except EXPECTED_ERRORS as exc:
            raise _user_error(exc) from None
        return (conv_id, conv.title if conv else "", conv.system_prompt or "" if conv else gr.skip(), "", *hidden_samples(), *chat_view(conv_id))

    def on_new():
        return (None, gr.Radio(value=None), "", "", *hidden_samples(), *chat_view(None))

    def on_rename(conv_id, new_title):
        if conv_id is None:
            raise _err("Start or pick a conversation first.")
        if not isinstance(new_title, str) or not new_title.strip():
            raise _err("The title is empty: write a title first.")
        try:
            store.rename_conversation(conv_id, new_title.strip())
        except EXPECTED_ERRORS as exc:
            raise _user_error(exc) from None
        gr.Info("Renamed.")
        return sidebar(conv_id)

    def on_delete(conv_id):
        if conv_id is None:
            raise _err("There is no conversation selected to delete.")
        try:
            store.delete_conversation(conv_id)
        except EXPECTED_ERRORS as exc:
            raise _user_error(exc) from None
        rest = store.list_conversations(limit=1)
        new_id = rest[0].id if rest else None
        return (new_id, sidebar(new_id), rest[0].title if rest else "", *hidden_samples(), *chat_view(new_id))

    def on_navigate(conv_id, nav_id, step):
        if conv_id is None or nav_id is None:
            return chat_view(conv_id, nav_id)
        try:
            sib = store.siblings(nav_id)
            target = sib.index + step
            if not 0 <= target < sib.count:
                return chat_view(conv_id, nav_id)
            store.switch_branch(sib.ids[target])
        except EXPECTED_ERRORS as exc:
            raise _user_error(exc) from None
        return chat_view(conv_id, sib.ids[target])

    def on_select(conv_id, evt: gr.SelectData):
        path = current_path(conv_id)
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not isinstance(index, int) or not 0 <= index < len(path):
            return (*chat_view(conv_id), gr.skip(), gr.skip())
        message = path[index]
        if message.role == "user":
            return (*chat_view(conv_id, message.id), message.id, message.content)
        return (*chat_view(conv_id, message.id), None, "")

    def on_stop(request: gr.Request = None):
        """Ask this browser session's running reply to stop (it aborts and keeps what was shown)."""
        stop_requested.add(session_of(request))

    # --------------------------------------------------------------- API only
    def api_params(temperature, top_p, max_tokens, seed, n):
        try:
            return params_from_ui(temperature, top_p, max_tokens, seed, n)
        except ValueError as exc:
            raise _user_error(exc) from None

    def _collect(events) -> dict:
        last = None
        for item in events:
            last = item
        outs = last if isinstance(last, list) else [last]
        return {"message_ids": [e.message_id for e in outs], "texts": [e.text for e in outs], "finish_reasons": [e.finish_reason for e in outs]}

    def api_send(text: str, conversation_id: int | None = None, temperature: float = 0.7, top_p: float = 0.95,
                 max_tokens: int = 256, seed: int | None = None, n: int = 1) -> dict:
        """Send a message (a new conversation when conversation_id is None) and return the full reply."""
        params = api_params(temperature, top_p, max_tokens, seed, n)
        try:
            if conversation_id is None:
                conversation_id = service.new_conversation(title_from_message(text) if isinstance(text, str) else "").id
            out = _collect(service.send_samples(conversation_id, text, params))
        except EXPECTED_ERRORS as exc:
            raise _user_error(exc) from None
        return {"conversation_id": conversation_id, **out}

    def api_regenerate(message_id: int, temperature: float = 0.7, top_p: float = 0.95, max_tokens: int = 256,
                       seed: int | None = None, n: int = 1) -> dict:
        """A new reply (n replies) as siblings of an assistant message."""
        params = api_params(temperature, top_p, max_tokens, seed, n)
        try:
            return _collect(service.regenerate_samples(int(message_id), params))
        except EXPECTED_ERRORS as exc:
            raise _user_error(exc) from None

    def api_edit(message_id: int, text: str, temperature: float = 0.7, top_p: float = 0.95, max_tokens: int = 256,
                 seed: int | None = None, n: int = 1) -> dict:
        """An edited copy of a user message (a new branch) and its reply."""
        params = api_params(temperature, top_p, max_tokens, seed, n)
        try:
            return _collect(service.edit_samples(int(message_id), text, params))
        except EXPECTED_ERRORS as exc:
            raise _user_error(exc) from None

    # ------------------------------------------------------------------ layout
    with gr.Blocks(title=title, fill_height=True, elem_id="lc-app") as demo:
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
                        temperature = gr.Number(0.7, label="Temperature", elem_id="lc-temperature")
                        top_p = gr.Number(0.95, label="Top-p", elem_id="lc-top-p")
                    with gr.Row():
                        max_tokens = gr.Number(256, label="Max tokens", precision=0, elem_id="lc-max-tokens")
                        seed = gr.Textbox("", label="Seed (blank: random)", max_lines=1, elem_id="lc-seed")
                    n_box = gr.Number(1, label=f"Samples side by side (n, 1-{MAX_SAMPLES})", precision=0, elem_id="lc-n")
                with gr.Accordion("Memory (KV cache blocks)", open=False, elem_id="lc-memory-acc") as mem_acc:
                    mem_html = gr.HTML(render_memory_html(None), elem_id="lc-memory")
                    mem_refresh = gr.Button("Refresh", size="sm", elem_id="lc-memory-refresh")

        settings = [temperature, top_p, max_tokens, seed, n_box]
        view_outputs = [chatbot, nav_state, nav_label, prev_btn, next_btn]
        sample_outputs = [samples_row, *sample_cols]
        stream_outputs = [chatbot, status, mem_html, *sample_outputs]
        finish_outputs = [timer, mem_html, conv_list, title_box, *view_outputs]
        private = {"api_visibility": "private"}

        demo.load(on_load, None, [conv_state, conv_list, title_box, mem_html, *view_outputs], **private)

        # send (button or Enter)
        for trigger in (send_btn.click, msg.submit):
            ev = trigger(start, [msg, conv_state, *settings], [msg, pending_state, params_state, timer], **private)
            gen = ev.success(generate_send, [pending_state, conv_state, params_state, system_box],
                             [conv_state, conv_list, title_box, *stream_outputs],
                             concurrency_limit=8, **private)
            gen.then(finish, [conv_state, nav_state], finish_outputs, **private)

        ev = regen_btn.click(start_regenerate, [conv_state, *settings], [params_state, timer], **private)
        regen_event = ev.success(generate_regenerate, [conv_state, params_state], stream_outputs, concurrency_limit=8, **private)
        regen_event.then(finish, [conv_state, nav_state], finish_outputs, **private)

        ev = edit_btn.click(start_edit, [conv_state, edit_state, edit_box, *settings], [pending_state, params_state, timer], **private)
        edit_event = ev.success(generate_edit, [edit_state, pending_state, params_state], stream_outputs, concurrency_limit=8, **private)
        edit_event.then(finish, [conv_state, nav_state], finish_outputs, **private)

        stop_btn.click(on_stop, None, None, **private)

        prev_btn.click(lambda c, m: on_navigate(c, m, -1), [conv_state, nav_state], view_outputs, **private)
        next_btn.click(lambda c, m: on_navigate(c, m, +1), [conv_state, nav_state], view_outputs, **private)
        chatbot.select(on_select, [conv_state], [*view_outputs, edit_state, edit_box], **private)

        new_btn.click(on_new, None, [conv_state, conv_list, title_box, status, *sample_outputs, *view_outputs], **private)
        # The chatbot's own trash button only clears the view: treat it as "new chat" (nothing is deleted).
        chatbot.clear(on_new, None, [conv_state, conv_list, title_box, status, *sample_outputs, *view_outputs], **private)
        conv_list.input(on_pick, [conv_list], [conv_state, title_box, system_box, status, *sample_outputs, *view_outputs], **private)
        rename_btn.click(on_rename, [conv_state, title_box], [conv_list], **private)
        delete_btn.click(on_delete, [conv_state], [conv_state, conv_list, title_box, *sample_outputs, *view_outputs], **private)

        timer.tick(memory_html, None, mem_html, show_progress="hidden", **private)
        mem_acc.expand(memory_html, None, mem_html, show_progress="hidden", **private)
        mem_refresh.click(memory_html, None, mem_html, **private)

        gr.api(api_send, api_name="send")
        gr.api(api_regenerate, api_name="regenerate")
        gr.api(api_edit, api_name="edit")
    return demo


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Start the server; theme, CSS and JS go to launch() in Gradio 6."""
    demo.queue(default_concurrency_limit=8)
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
