"""Replies streaming into the page: send, regenerate and edit.

The page script starts each one with a plain request (server_start_reply, no Gradio event): the answer is
the reply's frame with its first tokens, and the page clears the box itself. A thread of the reply's own
reads the engine's outputs into a LiveSlot (localchat/ui/live.py) that the page follows at most three times
a second; when the reply ends the page asks for the chat, the overview and the sidebar once (finish_reply),
and a reply that started a conversation has the page ask for it as soon as it shows (on_started). Stop (a
button, Escape) and a closed tab end the reply from their own events. The engine never waits for the page:
its outputs queue up (localchat/engine/driver.py) and each update shows the newest.
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
from localchat.ui.render import SETTING_NAMES, title_from_message

log = logging.getLogger(__name__)

STARTED_WAIT_S = 10.0  # how long on_started waits for its start to register (it is sent first)
FIRST_OUTPUT_WAIT_S = 0.2  # how long the reply's frame may wait for the engine's first tokens (server_start_reply)


@dataclass
class RunningReply:
    """A reply started from the page: read by its own thread (ReplyHandlers._read) until it ends."""

    slot: LiveSlot
    events: ReplyUpdates
    conv_id: int
    session: str  # the browser tab that started it (Gradio's session hash)
    params: object  # its SamplingParams
    new_chat: bool = False  # its message started the conversation
    final: list | None = None  # the newest update: one event per sample
    stop: bool = False  # asked to stop (the Stop button, Escape)
    abandoned: bool = False  # its tab was closed
    stopped: bool = False  # ended by a stop
    failure: Exception | None = None
    shown: threading.Event = field(default_factory=threading.Event)  # its first tokens, or its end
    ended: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Started:
    """A reply the engine has taken, before the page follows it."""

    conv_id: int
    events: ReplyUpdates
    live: LiveView
    params: object
    new_chat: bool = False


class ReplyHandlers(Handlers):
    """Handlers plus the replies: send, regenerate and edit (the page's events are wired in localchat/ui/app.py)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The page follows them on its own route, with the memory panel's data when it shows the panel
        # (localchat/ui/live.py).
        self.live_slots = LiveSlots(panel=lambda since: self.server_memory({"since": since}))
        self.replies: dict[str, RunningReply] = {}  # by slot key: running, or ended and not yet shown
        self.tabs: dict[str, str] = {}  # the page's own id for its tab -> its Gradio session (on_load)
        self._starting = threading.Lock()
        self._registered = threading.Condition()  # notified as a start registers its reply or its refusal
        self.refusals: dict[str, str] = {}  # by session: why its last start was refused (on_refused shows it)

    # ------------------------------------------------------------------ starting a reply
    def server_start_reply(self, arg) -> dict:
        """The page script starts a send, a regenerate or an edit itself (assets/ui.js startReply), as a plain
        request rather than a Gradio event: an event's statuses cost the page tens of ms of the engine's cores
        and put ~40 ms between the click and the request (benchmarks/NOTES.md, sessions 15 and 18).

        `arg`: {tab, action, conv, leaf, settings (render.SETTING_NAMES order), system, text, message_id}.
        The answer is the reply's key and frame, which the page shows and follows (localchat/ui/live.py), or
        {"error"}: the page then asks for the refusal as a Gradio event (on_refused), which shows it."""
        arg = arg if isinstance(arg, dict) else {}
        session = self.tabs.get(arg.get("tab")) if isinstance(arg.get("tab"), str) else None
        if session is None:
            return {"error": "The page is not connected to the app: reload it."}
        conv_id, values = _int_or_none(arg.get("conv")), arg.get("settings")
        with self._starting:  # one tab's two quick clicks: the second finds the first running
            try:
                if not isinstance(values, list) or len(values) != len(SETTING_NAMES):
                    raise err("The page sent no settings: reload it.")
                if self._running(session):
                    raise err("A reply is still being written: wait for it, or stop it (Stop or Escape) first.")
                reply = self._begin(self._prepare(arg, conv_id, values), session)
            except gr.Error as exc:
                self.refusals[session] = exc.message
                return {"error": exc.message}
            finally:
                with self._registered:
                    self._registered.notify_all()
        reply.shown.wait(FIRST_OUTPUT_WAIT_S)
        return {"key": reply.slot.key, "frame": reply.slot.view.html(reply.slot.events, reply.slot.key),
                "conv": reply.conv_id, "new_chat": reply.new_chat}

    def _prepare(self, arg: dict, conv_id, values) -> _Started:
        action = arg.get("action")
        if action == "send":
            return self._send(arg.get("text"), conv_id, arg.get("leaf"), arg.get("system"), values)
        if action == "regenerate":
            return self._regenerate_last(conv_id, arg.get("leaf"), values)
        if action == "regenerate_message":
            return self._regenerate(conv_id, _int_or_none(arg.get("message_id")), values)
        if action == "edit":
            return self._edit(conv_id, _int_or_none(arg.get("message_id")), arg.get("text"), values)
        raise err("The page asked for something the app does not do: reload it.")

    def on_refused(self, request: gr.Request, conv_id):
        """The page's start was refused (server_start_reply): the reason as a message, and the chat as saved
        (it may have changed in another tab: a message deleted there). Not while this tab's reply streams: its
        saved rows would show beside the reply being written."""
        session = self.session_of(request)
        message = self.refusals.pop(session, None)
        if conv_id is not None and not self._running(session):
            yield self.views(conv_id)
        raise err(message or "The reply could not start: the app did not answer. Reload the page.")

    def on_started(self, request: gr.Request):
        """A message that starts a conversation: the page asks for that conversation (to name it in the
        sidebar, with its title) as it sends the start, so that this event's work in the page and here
        overlaps the engine's first step instead of the reply's first seconds (benchmarks/NOTES.md,
        session 18). The start usually registers first; else this waits for it, or for its refusal."""
        session = self.session_of(request)

        def started() -> RunningReply | None:
            return next((r for r in list(self.replies.values()) if r.session == session and r.new_chat
                         and not r.ended.is_set()), None)

        with self._registered:
            self._registered.wait_for(lambda: started() is not None or session in self.refusals, STARTED_WAIT_S)
        reply = started()
        if reply is None:
            return {}  # refused (on_refused says why), or already over: its end brings the conversation
        return {**self._new_chat(reply), self.w.conv_list: self.sidebar(reply.conv_id)}

    def _new_chat(self, reply: RunningReply) -> dict:
        try:
            title = self.store.get_conversation(reply.conv_id).title or ""
        except StoreError:
            title = ""
        return {self.w.conv_state: reply.conv_id, self.w.title_box: title}

    def _send(self, text, conv_id, leaf, system, values) -> _Started:
        if not isinstance(text, str) or not text.strip():
            raise err("The message is empty: write something first.")
        params = self.read_params(values)
        try:
            if conv_id is None:
                system_prompt = system.strip() if isinstance(system, str) and system.strip() else None
                # The conversation and its first message together: a refused message leaves no empty chat.
                conv, events = self.service.send_new(text, params, title=title_from_message(text), system_prompt=system_prompt)
                return _Started(conv.id, events, LiveView(text, params.n, False), params, new_chat=True)
            self._resume_at(conv_id, leaf)
            events = self.service.send(conv_id, text, params)
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        return _Started(conv_id, events, LiveView(text, params.n, False), params)

    def _regenerate_last(self, conv_id, leaf, values) -> _Started:
        """The button under the chat: a new reply in place of the last one on the branch shown."""
        self._resume_at(conv_id, leaf)
        try:
            path = self.store.current_path(conv_id) if conv_id is not None else []
        except StoreError:
            path = []
        if not path or path[-1].role != "assistant":
            raise err("There is no reply to regenerate yet: send a message first.")
        return self._regenerate(conv_id, path[-1].id, values)

    def _edit(self, conv_id, message_id, text, values) -> _Started:
        """Edit on one of the user's messages: a new sibling with the new text, and its reply."""
        if not isinstance(text, str) or not text.strip():
            raise err("The edited message is empty: write something first.")
        params = self.read_params(values)
        self._own_message(conv_id, message_id, "user")
        try:
            events = self.service.edit(message_id, text, params)
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        return _Started(conv_id, events, LiveView(text, params.n, False), params)

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

    def _regenerate(self, conv_id, message_id, values) -> _Started:
        params = self.read_params(values)
        reply = self._own_message(conv_id, message_id, "assistant")
        try:
            events = self.service.regenerate(reply.id, params)
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        return _Started(conv_id, events, LiveView(None, params.n, False), params)

    def _begin(self, started: _Started, session: str) -> RunningReply:
        """Start the reply's reader; the page then follows the reply through its slot (localchat/ui/live.py)
        and asks for the final views when it ends (finish_reply).

        Gradio holds no worker and no pending event for the reply's length: the tab can open another
        conversation meanwhile, and a stop or a closed tab reaches the reply through events of their own
        (on_stop, on_unload). The frame goes out with the first tokens when the engine answers within
        FIRST_OUTPUT_WAIT_S (server_start_reply; a regenerate or a short message over a cached history): the
        page then draws once, after the engine's first step rather than during it."""
        for done in [r for r in list(self.replies.values()) if r.session == session and r.ended.is_set()]:
            self._forget(done)  # ended, and the tab has moved on without asking for it (its finish is harmless)
        live, params = started.live, started.params
        if params.is_beam_search:
            live.n, live.beam = params.beam_width, True
        slot = self.live_slots.open(live)
        reply = RunningReply(slot, started.events, started.conv_id, session, params, new_chat=started.new_chat)
        self.replies[slot.key] = reply
        threading.Thread(target=self._read, args=(reply,), name="lc-reply", daemon=True).start()
        return reply

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
        reply = self._reply_of(request, evt)
        if reply is None:
            # Already shown, or not this tab's: the chat as saved, unless a newer reply is streaming.
            running = self._running(self.session_of(request))
            yield {self.w.conv_list: self.sidebar(conv_id)} if running else {**self.views(conv_id), self.w.live: ""}
            return
        reply.ended.wait()  # at once, unless the page lost its stream early
        self._forget(reply)
        if reply.new_chat and conv_id is None:
            # The page still follows this reply (a page that moved on stops following and never asks), so
            # it shows its conversation, whether or not on_started has told it so yet.
            conv_id = reply.conv_id
        newer = any(r.session == reply.session and not r.ended.is_set() for r in list(self.replies.values()))
        if newer or reply.conv_id != conv_id:
            yield {self.w.conv_list: self.sidebar(conv_id)}
        else:
            yield self._final(reply)
        if reply.failure is not None:
            raise user_error(reply.failure)

    def _reply_of(self, request, evt) -> RunningReply | None:
        """The reply an event of the page names by its key, if it is this tab's."""
        key = (getattr(evt, "_data", None) or {}).get("key")
        reply = self.replies.get(key) if isinstance(key, str) else None
        return reply if reply is not None and reply.session == self.session_of(request) else None

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
        self.refusals.pop(session, None)
        for tab in [t for t, s in list(self.tabs.items()) if s == session]:
            self.tabs.pop(tab, None)

    def on_load(self, request: gr.Request, tab):
        """The page opened: `tab` is the id its script made for itself, which its starts carry (the page does
        not know its Gradio session)."""
        if isinstance(tab, str) and 16 <= len(tab) <= 64:
            self.tabs[tab] = self.session_of(request)
        return super().on_load(request)

    def _running(self, session: str) -> list[RunningReply]:
        return [r for r in list(self.replies.values()) if r.session == session and not r.ended.is_set()]

    def _forget(self, reply: RunningReply) -> None:
        self.replies.pop(reply.slot.key, None)
        self.live_slots.forget(reply.slot)

    def _final(self, reply: RunningReply) -> dict:
        w, final, params = self.w, reply.final, reply.params
        group = final is not None and (params.n > 1 or params.is_beam_search)
        # The export beside the chat no longer holds it all.
        out = {**self.views(reply.conv_id, compare_of=final[0].message_id if group else None), w.live: "",
               w.conv_list: self.sidebar(reply.conv_id), w.export_file: gr.update(visible=False)}
        if reply.new_chat:
            out.update(self._new_chat(reply))
        if reply.stopped:
            out[w.status] = '<p class="lc-note">Stopped: the reply so far is saved.</p>'
        elif reply.failure is not None:
            out[w.status] = '<p class="lc-note lc-error">The reply failed; what was written so far is saved.</p>'
        return out
