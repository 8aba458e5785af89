"""Replies streaming into the page: send, regenerate and edit.

Each action is one short Gradio event: it starts the reply, clears the box and sends the user's message
and the reply's frame, and ends. A thread of the reply's own reads the engine's outputs into a LiveSlot
(localchat/ui/live.py) that the page follows at most five times a second; when the reply ends the page
asks for the chat, the overview and the sidebar once (finish_reply). Stop (a button, Escape) and a
closed tab end the reply from their own events. The engine never waits for the page: its outputs queue
up (localchat/engine/driver.py) and each update shows the newest.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import gradio as gr

from localchat.chat.service import ReplyUpdates
from localchat.chat.store import StoreError
from localchat.ui.compare import LiveView
from localchat.ui.handlers import EXPECTED_ERRORS, Handlers, _int_or_none, err, user_error
from localchat.ui.live import LiveSlot, LiveSlots
from localchat.ui.render import title_from_message

log = logging.getLogger(__name__)

FIRST_OUTPUT_WAIT_S = 0.2  # how long the reply's frame may wait for the engine's first tokens (_stream)


@dataclass
class RunningReply:
    """A reply started from the page: read by its own thread (ReplyHandlers._read) until it ends."""

    slot: LiveSlot
    events: ReplyUpdates
    conv_id: int
    session: str  # the browser tab that started it (Gradio's session hash)
    params: object  # its SamplingParams
    final: list | None = None  # the newest update: one event per sample
    stop: bool = False  # asked to stop (the Stop button, Escape)
    abandoned: bool = False  # its tab was closed
    stopped: bool = False  # ended by a stop
    failure: Exception | None = None
    shown: threading.Event = field(default_factory=threading.Event)  # its first tokens, or its end
    ended: threading.Event = field(default_factory=threading.Event)


class ReplyHandlers(Handlers):
    """Handlers plus the three streaming actions (the page's events are wired in localchat/ui/app.py)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The page follows them on its own route, with the memory panel's data when it shows the panel
        # (localchat/ui/live.py).
        self.live_slots = LiveSlots(panel=lambda since: self.server_memory({"since": since}))
        self.replies: dict[str, RunningReply] = {}  # by slot key: running, or ended and not yet shown

    # Gradio passes the request and the event data to the parameters annotated with their types; they
    # come first here because the settings widgets' values follow as *values (render.SETTING_NAMES).
    def send_message(self, request: gr.Request, text, conv_id, leaf, system, *values):
        def prepare():
            if not isinstance(text, str) or not text.strip():
                raise err("The message is empty: write something first.")
            params = self.read_params(values)
            w = self.w
            first = {w.msg: "", w.export_file: gr.update(visible=False)}
            cid = conv_id
            try:
                if cid is None:
                    system_prompt = system.strip() if isinstance(system, str) and system.strip() else None
                    # The conversation and its first message together: a refused message leaves no empty chat.
                    conv, events = self.service.send_new(text, params, title=title_from_message(text), system_prompt=system_prompt)
                    cid = conv.id
                    first.update({w.conv_state: cid, w.conv_list: self.sidebar(cid), w.title_box: title_from_message(text)})
                else:
                    self._resume_at(cid, leaf)
                    events = self.service.send(cid, text, params)
                return cid, events, LiveView(text, params.n, False), params, first
            except EXPECTED_ERRORS as exc:
                raise user_error(exc) from None

        yield from self._run(request, conv_id, prepare, restore=False)

    def regenerate_last(self, request: gr.Request, conv_id, leaf, *values):
        """The button under the chat: a new reply in place of the last one on the branch shown."""
        def prepare():
            self._resume_at(conv_id, leaf)
            try:
                path = self.store.current_path(conv_id) if conv_id is not None else []
            except StoreError:
                path = []
            if not path or path[-1].role != "assistant":
                raise err("There is no reply to regenerate yet: send a message first.")
            return self._regenerate(conv_id, path[-1].id, values)

        yield from self._run(request, conv_id, prepare)

    def regenerate_message(self, request: gr.Request, evt: gr.EventData, conv_id, *values):
        """↻ on a reply: a new sibling of that reply (the branch then continues from it)."""
        message_id = _int_or_none((getattr(evt, "_data", None) or {}).get("message_id"))
        yield from self._run(request, conv_id, lambda: self._regenerate(conv_id, message_id, values))

    def edit_message(self, request: gr.Request, evt: gr.EventData, conv_id, *values):
        """Edit on one of the user's messages: a new sibling with the new text, and its reply."""
        data = getattr(evt, "_data", None) or {}
        message_id, text = _int_or_none(data.get("message_id")), data.get("text")

        def prepare():
            if not isinstance(text, str) or not text.strip():
                raise err("The edited message is empty: write something first.")
            params = self.read_params(values)
            self._own_message(conv_id, message_id, "user")
            try:
                events = self.service.edit(message_id, text, params)
            except EXPECTED_ERRORS as exc:
                raise user_error(exc) from None
            return conv_id, events, LiveView(text, params.n, False), params, {}

        yield from self._run(request, conv_id, prepare)

    def _run(self, request, conv_id, prepare, *, restore: bool = True):
        """Check the request and start it (prepare), then stream it. The page hides a replaced reply or
        an edited message at once (assets/ui.js); if the request is refused, it is shown again."""
        session = self.session_of(request)
        try:
            if self._running(session):
                raise err("A reply is still being written: wait for it, or stop it (Stop or Escape) first.")
            cid, events, live, params, first = prepare()
        except gr.Error:
            if restore and conv_id is not None:
                yield self.views(conv_id)
            raise
        if params.is_beam_search:
            live.n, live.beam = params.beam_width, True
        # Only the reply's placeholder: nothing else is rendered before the request reaches the engine.
        first.update({self.w.compare: "", self.w.status: ""})
        yield from self._stream(cid, events, live, params, session, first)

    # ------------------------------------------------------------------ shared
    def _own_message(self, conv_id, message_id, role: str):
        try:
            message = self.store.get_message(message_id) if message_id is not None else None
        except StoreError:
            message = None
        if message is None or message.conversation_id != conv_id or message.role != role:
            raise err("That message is not in this conversation any more.")
        return message

    def _resume_at(self, conv_id, leaf) -> None:
        """Continue on the branch the page shows (its switches are saved, but may still be on the way)."""
        leaf = _int_or_none(leaf)
        if conv_id is None or leaf is None:
            return
        try:
            if self.store.get_message(leaf).conversation_id == conv_id and self.store.get_conversation(conv_id).current_leaf_id != leaf:
                self.store.switch_branch(leaf)
        except StoreError:
            pass  # deleted meanwhile: the reply goes where the store says

    def _regenerate(self, conv_id, message_id, values):
        params = self.read_params(values)
        reply = self._own_message(conv_id, message_id, "assistant")
        try:
            events = self.service.regenerate(reply.id, params)
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        return conv_id, events, LiveView(None, params.n, False), params, {}

    def _stream(self, conv_id, events, live: LiveView, params, session: str, first: dict):
        """Start the reply's reader and send its frame; the event then ends, and the page follows the reply
        through its slot (localchat/ui/live.py) and asks for the final views when it ends (finish_reply).

        Gradio holds no worker and no pending event for the reply's length: the tab can open another
        conversation meanwhile, and a stop or a closed tab reaches the reply through events of their own
        (on_stop, on_unload). The frame goes out with the first tokens when the engine answers
        within FIRST_OUTPUT_WAIT_S (a regenerate or a short message over a cached history): the page then
        draws once, after the engine's first step rather than during it."""
        for done in [r for r in list(self.replies.values()) if r.session == session and r.ended.is_set()]:
            self._forget(done)  # ended, and the tab has moved on without asking for it (its finish is harmless)
        slot = self.live_slots.open(live)
        reply = RunningReply(slot, events, conv_id, session, params)
        self.replies[slot.key] = reply
        threading.Thread(target=self._read, args=(reply,), name="lc-reply", daemon=True).start()
        reply.shown.wait(FIRST_OUTPUT_WAIT_S)
        if reply.ended.is_set():  # stopped, refused or already written: the whole reply at once
            self._forget(reply)
            yield {**first, **self._final(reply)}
            if reply.failure is not None:
                raise user_error(reply.failure)
            return
        first[self.w.live] = live.html(slot.events, slot.key)
        yield first

    def _read(self, reply: RunningReply) -> None:
        """The reply's own thread: hands each engine output to the page's slot until the reply ends."""
        try:
            for update in reply.events:
                if reply.stop or reply.abandoned:
                    break
                if update:
                    reply.final = update
                    reply.slot.publish(update)
                    reply.shown.set()
        except EXPECTED_ERRORS as exc:
            reply.failure = exc
        except Exception as exc:  # noqa: BLE001 - never a silent thread: the page shows the failure
            log.exception("reading a reply failed")
            reply.failure = exc
        finally:
            reply.events.close()  # a stop, an error or a closed tab: ChatService aborts and keeps the text
            reply.stopped = reply.stop and not reply.abandoned
            reply.ended.set()
            reply.shown.set()
            self.live_slots.close(reply.slot)
            if reply.abandoned:
                self._forget(reply)

    def finish_reply(self, request: gr.Request, evt: gr.EventData, conv_id):
        """The page saw its reply end (assets/ui.js): the chat, overview and sidebar are rendered again,
        once. If the page shows another conversation now, or a newer reply streams, only the sidebar."""
        key = (getattr(evt, "_data", None) or {}).get("key")
        reply = self.replies.get(key) if isinstance(key, str) else None
        if reply is None or reply.session != self.session_of(request):
            # Already shown, or not this tab's: the chat as saved, unless a newer reply is streaming.
            running = self._running(self.session_of(request))
            yield {self.w.conv_list: self.sidebar(conv_id)} if running else {**self.views(conv_id), self.w.live: ""}
            return
        reply.ended.wait()  # at once, unless the page lost its stream early
        self._forget(reply)
        newer = any(r.session == reply.session and not r.ended.is_set() for r in list(self.replies.values()))
        if newer or reply.conv_id != conv_id:
            yield {self.w.conv_list: self.sidebar(conv_id)}
        else:
            yield self._final(reply)
        if reply.failure is not None:
            raise user_error(reply.failure)

    def on_stop(self, request: gr.Request):
        """Stop this browser session's running replies (each aborts and keeps what was written)."""
        for reply in self._running(self.session_of(request)):
            reply.stop = True
            reply.events.interrupt()

    def on_unload(self, request: gr.Request):
        """The tab was closed or reloaded: its replies end (what they wrote is kept)."""
        session = self.session_of(request)
        for reply in list(self.replies.values()):
            if reply.session == session:
                reply.abandoned = True
                reply.events.interrupt()
                if reply.ended.is_set():
                    self._forget(reply)

    def _running(self, session: str) -> list[RunningReply]:
        return [r for r in list(self.replies.values()) if r.session == session and not r.ended.is_set()]

    def _forget(self, reply: RunningReply) -> None:
        self.replies.pop(reply.slot.key, None)
        self.live_slots.forget(reply.slot)

    def _final(self, reply: RunningReply) -> dict:
        w, final, params = self.w, reply.final, reply.params
        group = final is not None and (params.n > 1 or params.is_beam_search)
        out = {**self.views(reply.conv_id, compare_of=final[0].message_id if group else None), w.live: "",
               w.conv_list: self.sidebar(reply.conv_id)}
        if reply.stopped:
            out[w.status] = '<p class="lc-note">Stopped: the reply so far is saved.</p>'
        elif reply.failure is not None:
            out[w.status] = '<p class="lc-note lc-error">The reply failed; what was written so far is saved.</p>'
        return out
