"""Replies streaming into the page: send, regenerate and edit.

Each action is one generator event. Its first update clears the box and shows the user's message and
the reply's skeleton at once; from then on the page follows the reply through a LiveSlot
(localchat/ui/live.py) at most ten times a second, and Gradio carries nothing but a heartbeat until
the reply ends, when the chat, the overview and the sidebar are rendered again, once. The engine never
waits for the page: its outputs queue up (localchat/engine/driver.py) and each ask shows the newest.
"""

from __future__ import annotations

import time

import gradio as gr

from localchat.chat.store import StoreError
from localchat.ui.compare import LiveView
from localchat.ui.handlers import EXPECTED_ERRORS, Handlers, _int_or_none, err, user_error
from localchat.ui.live import LiveSlots
from localchat.ui.render import title_from_message

HEARTBEAT_S = 1.0  # while a reply streams, an empty update this often lets Gradio notice a closed tab
FIRST_OUTPUT_WAIT_S = 0.2  # how long the reply's frame may wait for the engine's first tokens (_stream)


class ReplyHandlers(Handlers):
    """Handlers plus the three streaming actions (the page's events are wired in localchat/ui/app.py)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.live_slots = LiveSlots()  # the page follows them on its own route (localchat/ui/live.py)

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
        self.stop_requested.discard(session)
        try:
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
        """Read the reply; the page follows it through its slot (localchat/ui/live.py), not Gradio.

        The reply's frame goes out with its first tokens when the engine answers within FIRST_OUTPUT_WAIT_S
        (a regenerate or a short new message over a cached history): the page then draws once, after the
        engine's first step rather than during it, on the two cores they share. Otherwise (a long prompt)
        the frame goes out then, and the tokens follow through the slot."""
        w = self.w
        slot = self.live_slots.open(live)
        with_tokens = events.wait_output(FIRST_OUTPUT_WAIT_S)
        if not with_tokens:
            first[w.live] = live.html([], slot.key)
            yield first
        final, stopped, failure = None, False, None
        beat = time.monotonic()
        try:
            for update in events:
                if session in self.stop_requested:
                    stopped = True
                    break
                if not update:
                    continue
                final = update
                slot.publish(update)
                now = time.monotonic()
                if w.live not in first:
                    first[w.live] = live.html(update, slot.key)
                    beat = now
                    yield first
                elif now - beat >= HEARTBEAT_S:
                    beat = now
                    yield {w.status: gr.skip()}  # nothing changes; Gradio notices a closed tab here
        except EXPECTED_ERRORS as exc:
            failure = exc
        finally:
            events.close()  # a stop, an error or a closed tab: ChatService aborts and keeps the text
            self.live_slots.close(slot)
        self.stop_requested.discard(session)
        ending = self._final(conv_id, final, stopped, failure, params)
        # Ended before its frame was shown (stopped, or refused by the engine): the frame's other
        # changes (the emptied message box, a new conversation's row) still go out.
        yield ending if w.live in first else {**first, **ending}
        if failure is not None:
            raise user_error(failure)

    def _final(self, conv_id, final, stopped: bool, failure, params) -> dict:
        w = self.w
        group = final is not None and (params.n > 1 or params.is_beam_search)
        out = {**self.views(conv_id, compare_of=final[0].message_id if group else None), w.live: "",
               w.conv_list: self.sidebar(conv_id)}
        if stopped:
            out[w.status] = '<p class="lc-note">Stopped: the reply so far is saved.</p>'
        elif failure is not None:
            out[w.status] = '<p class="lc-note lc-error">The reply failed; what was written so far is saved.</p>'
        return out
