"""Named endpoints for scripts (`gradio_client`): send, regenerate and edit with plain arguments.

Gradio's own retry/edit events take gr.RetryData/gr.EditData, which gradio_client cannot send, so
these give tests and scripts the same operations the page has, each returning the whole reply.
"""

from __future__ import annotations

import gradio as gr

from localchat import settings
from localchat.chat.service import ChatService
from localchat.ui.handlers import EXPECTED_ERRORS, user_error
from localchat.ui.render import params_from_ui, title_from_message


def register_api(service: ChatService) -> None:
    """Register /send, /regenerate and /edit on the Blocks being built."""

    def api_params(temperature, top_p, max_tokens, seed, n, **more):
        try:
            return params_from_ui(temperature, top_p, max_tokens, seed, n, **more)
        except ValueError as exc:
            raise user_error(exc) from None

    def _collect(events) -> dict:
        last = None
        for item in events:
            last = item
        outs = last or []
        return {"message_ids": [e.message_id for e in outs], "texts": [e.text for e in outs], "finish_reasons": [e.finish_reason for e in outs]}

    def api_send(text: str, conversation_id: int | None = None, temperature: float = settings.DEFAULT_TEMPERATURE, top_p: float = settings.DEFAULT_TOP_P,
                 max_tokens: int = settings.DEFAULT_MAX_TOKENS, seed: int | None = None, n: int = 1, top_k: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, stop: str = "", beam_width: int = 0) -> dict:
        """Send a message (a new conversation when conversation_id is None) and return the full reply.
        `stop`: stop strings, one per line; `beam_width` > 1: beam search (its beams come back as texts)."""
        params = api_params(temperature, top_p, max_tokens, seed, n, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, stop=stop, beam_width=beam_width)
        try:
            if conversation_id is None:  # the conversation and its first message together, or neither
                title = title_from_message(text) if isinstance(text, str) else ""
                conversation, events = service.send_new(text, params, title=title)
                conversation_id = conversation.id
            else:
                events = service.send(conversation_id, text, params)
            out = _collect(events)
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        return {"conversation_id": conversation_id, **out}

    def api_regenerate(message_id: int, temperature: float = settings.DEFAULT_TEMPERATURE, top_p: float = settings.DEFAULT_TOP_P, max_tokens: int = settings.DEFAULT_MAX_TOKENS,
                       seed: int | None = None, n: int = 1) -> dict:
        """A new reply (n replies) as siblings of an assistant message."""
        params = api_params(temperature, top_p, max_tokens, seed, n)
        try:
            return _collect(service.regenerate(int(message_id), params))
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None

    def api_edit(message_id: int, text: str, temperature: float = settings.DEFAULT_TEMPERATURE, top_p: float = settings.DEFAULT_TOP_P, max_tokens: int = settings.DEFAULT_MAX_TOKENS,
                 seed: int | None = None, n: int = 1) -> dict:
        """An edited copy of a user message (a new branch) and its reply."""
        params = api_params(temperature, top_p, max_tokens, seed, n)
        try:
            return _collect(service.edit(int(message_id), text, params))
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None


    gr.api(api_send, api_name="send")
    gr.api(api_regenerate, api_name="regenerate")
    gr.api(api_edit, api_name="edit")
