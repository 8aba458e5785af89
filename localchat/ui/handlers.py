"""The page's event handlers: every widget event of localchat/ui/app.py lands on a method here.

They call ChatService and the Store and render with localchat/ui/render.py and memory_panel.py;
nothing here touches tensors or block ids. Errors the user can fix come back as gr.Error messages,
never as tracebacks.
"""

from __future__ import annotations

import logging
import time

import gradio as gr

from localchat import settings
from localchat.chat.service import ChatService
from localchat.chat.store import StoreError
from localchat.engine import RequestError, SamplingParams
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

MAX_SAMPLES = settings.UI_MAX_SAMPLES  # columns for n samples side by side
STREAM_INTERVAL_S = 0.05  # at most this often a streamed update goes to the browser
MEMORY_INTERVAL_S = 0.4  # at most this often a streamed update redraws the memory panel
EXPECTED_ERRORS = (ValueError, StoreError, RequestError, RuntimeError)


def user_error(exc: BaseException) -> gr.Error:
    """A clear message for the browser (never a stack trace); the trace goes to the log."""
    log.info("request failed: %s", exc)
    return err(str(exc) or exc.__class__.__name__)


def err(message: str) -> gr.Error:
    return gr.Error(message, title="localchat", duration=6, print_exception=False)


class Handlers:
    def __init__(self, service: ChatService) -> None:
        self.service = service
        self.store = service.store
        self.driver = service.driver
        self.stop_requested: set[str] = set()  # session hashes whose current reply should stop

    def session_of(self, request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or ""

    # ------------------------------------------------------------ pure-ish views
    def memory_html(self) -> str:
        try:
            return render_memory_html(self.driver.snapshot(), title=f"KV cache · {self.service.info.model_name}")
        except Exception as exc:  # noqa: BLE001 - the panel must never break the page
            log.exception("memory snapshot failed")
            return render_memory_html(None) + f"<!-- {type(exc).__name__} -->"

    def sidebar(self, conv_id):
        choices = conversation_choices(self.store.list_conversations(limit=200))
        value = str(conv_id) if conv_id is not None and any(v == str(conv_id) for _, v in choices) else None
        return gr.Radio(choices=choices, value=value)

    def default_nav(self, path) -> int | None:
        for m in reversed(path):
            if self.store.siblings(m.id).count > 1:
                return m.id
        return path[-1].id if path else None

    def current_path(self, conv_id):
        try:
            return self.store.current_path(conv_id) if conv_id is not None else []
        except StoreError:  # deleted meanwhile (another tab): show an empty chat
            return []

    def chat_view(self, conv_id, nav_id=None):
        """(chatbot, nav_state, nav label, prev button, next button) for the conversation's branch."""
        path = self.current_path(conv_id)
        ids = [m.id for m in path]
        if nav_id not in ids:
            nav_id = self.default_nav(path)
        if nav_id is None:
            label, has_prev, has_next = "", False, False
        else:
            sib = self.store.siblings(nav_id)
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

    def hidden_samples(self):
        return [gr.Row(visible=False)] + [gr.Markdown(value="", visible=False) for _ in range(MAX_SAMPLES)]

    def read_params(self, temperature, top_p, max_tokens, seed, n):
        try:
            params = params_from_ui(temperature, top_p, max_tokens, seed, n)
        except ValueError as exc:
            raise user_error(exc) from None
        if params.n > MAX_SAMPLES:
            raise err(f"n must be at most {MAX_SAMPLES} here (the UI shows up to {MAX_SAMPLES} samples side by side)")
        return params

    # ----------------------------------------------------------------- streaming
    def stream_reply(self, events_iter, base: list[dict], n: int, session: str):
        """ChatService events as widget updates: (chatbot, status, memory panel, samples row, *columns).

        The memory panel is redrawn from the stream too (besides the timer), at most every
        MEMORY_INTERVAL_S, so even a reply faster than the timer shows its live blocks.
        """
        last = last_mem = 0.0
        final = None
        stopped = False
        for events in events_iter:
            if session in self.stop_requested:
                events_iter.close()  # ChatService aborts the request and keeps what was shown
                stopped = True
                break
            if not events:
                continue
            final = events[0]
            now = time.monotonic()
            if now - last < STREAM_INTERVAL_S and not events[0].finished:
                continue
            last = now
            mem = gr.skip()
            if now - last_mem >= MEMORY_INTERVAL_S and not events[0].finished:
                mem, last_mem = self.memory_html(), now
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
                yield (chat, "generating…", mem, *self.hidden_samples())
        self.stop_requested.discard(session)
        if stopped:
            yield (gr.skip(), "Stopped: the reply so far is saved.", *([gr.skip()] * (MAX_SAMPLES + 2)))
        elif final is not None:
            yield (gr.skip(), stats_line(final), *([gr.skip()] * (MAX_SAMPLES + 2)))

    def start(self, text, conv_id, temperature, top_p, max_tokens, seed, n, request: gr.Request = None):
        """Validate before anything is saved; clear the box and start the memory timer."""
        self.stop_requested.discard(self.session_of(request))
        if not isinstance(text, str) or not text.strip():
            raise err("The message is empty: write something first.")
        params = self.read_params(temperature, top_p, max_tokens, seed, n)
        return "", text, params.to_dict(), gr.Timer(active=True)

    def generate_send(self, pending, conv_id, params_dict, system_prompt, request: gr.Request = None):
        params = SamplingParams.from_dict(params_dict)
        try:
            if conv_id is None:
                system = system_prompt.strip() if isinstance(system_prompt, str) and system_prompt.strip() else None
                conv = self.service.new_conversation(title_from_message(pending), system_prompt=system, settings={"sampling": params_dict})
                conv_id = conv.id
            base = chat_messages(self.store.current_path(conv_id)) + [{"role": "user", "content": safe_markdown(pending)}]
            events = self.service.send(conv_id, pending, params)
            first = True
            for update in self.stream_reply(events, base, params.n, self.session_of(request)):
                if first:  # the new conversation shows in the sidebar while its reply streams
                    yield (conv_id, self.sidebar(conv_id), self.store.get_conversation(conv_id).title, *update)
                    first = False
                else:
                    yield (conv_id, gr.skip(), gr.skip(), *update)
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None

    def start_regenerate(self, conv_id, temperature, top_p, max_tokens, seed, n, request: gr.Request = None):
        self.stop_requested.discard(self.session_of(request))
        path = self.current_path(conv_id)
        if not path or path[-1].role != "assistant":
            raise err("There is no reply to regenerate yet: send a message first.")
        params = self.read_params(temperature, top_p, max_tokens, seed, n)
        return params.to_dict(), gr.Timer(active=True)

    def generate_regenerate(self, conv_id, params_dict, request: gr.Request = None):
        params = SamplingParams.from_dict(params_dict)
        try:
            path = self.store.current_path(conv_id)
            reply = path[-1]
            base = chat_messages(path[:-1])
            events = self.service.regenerate(reply.id, params)
            for update in self.stream_reply(events, base, params.n, self.session_of(request)):
                yield update
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None

    def start_edit(self, conv_id, edit_id, text, temperature, top_p, max_tokens, seed, n, request: gr.Request = None):
        self.stop_requested.discard(self.session_of(request))
        if edit_id is None or edit_id not in {m.id for m in self.current_path(conv_id)}:
            raise err("Select one of your messages in the chat first, then edit it here.")
        if not isinstance(text, str) or not text.strip():
            raise err("The edited message is empty: write something first.")
        params = self.read_params(temperature, top_p, max_tokens, seed, n)
        return text, params.to_dict(), gr.Timer(active=True)

    def generate_edit(self, edit_id, pending, params_dict, request: gr.Request = None):
        params = SamplingParams.from_dict(params_dict)
        try:
            original = self.store.get_message(edit_id)
            before = self.store.path(original.parent_id) if original.parent_id is not None else []
            base = chat_messages(before) + [{"role": "user", "content": safe_markdown(pending)}]
            events = self.service.edit(edit_id, pending, params)
            for update in self.stream_reply(events, base, params.n, self.session_of(request)):
                yield update
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None

    def finish(self, conv_id, nav_id):
        """After a reply: stop the timer, redraw from the store (the saved branch) and the sidebar."""
        try:
            title_value = self.store.get_conversation(conv_id).title if conv_id is not None else ""
        except StoreError:
            title_value = ""
        return (gr.Timer(active=False), self.memory_html(), self.sidebar(conv_id), title_value, *self.chat_view(conv_id, None))

    # ------------------------------------------------------------- other events
    def on_load(self):
        conversations = self.store.list_conversations(limit=1)
        conv_id = conversations[0].id if conversations else None
        title_value = conversations[0].title if conversations else ""
        return (conv_id, self.sidebar(conv_id), title_value, self.memory_html(), *self.chat_view(conv_id))

    def on_pick(self, value):
        try:
            conv_id = int(value) if value not in (None, "") else None
            conv = self.store.get_conversation(conv_id) if conv_id is not None else None
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        return (conv_id, conv.title if conv else "", conv.system_prompt or "" if conv else gr.skip(), "", *self.hidden_samples(), *self.chat_view(conv_id))

    def on_new(self):
        return (None, gr.Radio(value=None), "", "", *self.hidden_samples(), *self.chat_view(None))

    def on_rename(self, conv_id, new_title):
        if conv_id is None:
            raise err("Start or pick a conversation first.")
        if not isinstance(new_title, str) or not new_title.strip():
            raise err("The title is empty: write a title first.")
        try:
            self.store.rename_conversation(conv_id, new_title.strip())
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        gr.Info("Renamed.")
        return self.sidebar(conv_id)

    def on_delete(self, conv_id):
        if conv_id is None:
            raise err("There is no conversation selected to delete.")
        try:
            self.store.delete_conversation(conv_id)
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        rest = self.store.list_conversations(limit=1)
        new_id = rest[0].id if rest else None
        return (new_id, self.sidebar(new_id), rest[0].title if rest else "", *self.hidden_samples(), *self.chat_view(new_id))

    def on_navigate(self, conv_id, nav_id, step):
        if conv_id is None or nav_id is None:
            return self.chat_view(conv_id, nav_id)
        try:
            sib = self.store.siblings(nav_id)
            target = sib.index + step
            if not 0 <= target < sib.count:
                return self.chat_view(conv_id, nav_id)
            self.store.switch_branch(sib.ids[target])
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        return self.chat_view(conv_id, sib.ids[target])

    def on_select(self, conv_id, evt: gr.SelectData):
        path = self.current_path(conv_id)
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not isinstance(index, int) or not 0 <= index < len(path):
            return (*self.chat_view(conv_id), gr.skip(), gr.skip())
        message = path[index]
        if message.role == "user":
            return (*self.chat_view(conv_id, message.id), message.id, message.content)
        return (*self.chat_view(conv_id, message.id), None, "")

    def on_stop(self, request: gr.Request = None):
        """Ask this browser session's running reply to stop (it aborts and keeps what was shown)."""
        self.stop_requested.add(self.session_of(request))
