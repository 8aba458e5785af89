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

    def api_params(temperature, top_p, max_tokens, seed, n):
        try:
            return params_from_ui(temperature, top_p, max_tokens, seed, n)
        except ValueError as exc:
            raise user_error(exc) from None

    def _collect(events) -> dict:
        last = None
        for item in events:
            last = item
        outs = last or []
        return {"message_ids": [e.message_id for e in outs], "texts": [e.text for e in outs], "finish_reasons": [e.finish_reason for e in outs]}

    def api_send(text: str, conversation_id: int | None = None, temperature: float = settings.DEFAULT_TEMPERATURE, top_p: float = settings.DEFAULT_TOP_P,
                 max_tokens: int = settings.DEFAULT_MAX_TOKENS, seed: int | None = None, n: int = 1) -> dict:
        """Send a message (a new conversation when conversation_id is None) and return the full reply."""
        params = api_params(temperature, top_p, max_tokens, seed, n)
        try:
            if conversation_id is None:
                conversation_id = service.new_conversation(title_from_message(text) if isinstance(text, str) else "").id
            out = _collect(service.send(conversation_id, text, params))
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
