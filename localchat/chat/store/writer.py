"""Saving a streamed assistant reply as it grows (crash-safe: flushed every few seconds and at the end)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from localchat.chat.store.rows import (
    STREAMING,
    InvalidInputError,
    Message,
    StoreError,
    check_count,
    check_finish_reason,
    check_float,
    check_text,
    check_token_ids,
    dump_ids,
)

if TYPE_CHECKING:
    from localchat.chat.store.store import Store

DEFAULT_FLUSH_INTERVAL = 2.0



class ReplyWriter:
    """Saves a streamed assistant reply as it grows.

    Call ``append`` (deltas) or ``update`` (whole text so far) per token or
    chunk; the row is rewritten when ``flush_interval`` seconds have passed
    since the last save, and always by ``finish``. As a context manager, an
    exception finishes the reply with ``finish_reason="error"`` (or ``"abort"``
    for interrupts) so a failed generation keeps what was shown.
    """

    def __init__(
        self, store: Store, message: Message, flush_interval: float, clock: Callable[[], float]
    ) -> None:
        self._store = store
        self.message_id = message.id
        self.conversation_id = message.conversation_id
        self.flush_interval = flush_interval
        self._clock = clock
        self._parts: list[str] = []
        self._token_ids: list[int] = []
        self._dirty = False
        self._last_flush = clock()
        self.finished = False
        self.flush_count = 0

    @property
    def content(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def token_ids(self) -> list[int]:
        return list(self._token_ids)

    def append(self, text: str = "", token_ids: Sequence[int] = ()) -> bool:
        """Add a chunk; returns True if this call saved the reply."""
        self.check_open()
        self._parts.append(check_text(text, "text"))
        self._token_ids.extend(check_token_ids(token_ids) or ())
        self._dirty = True
        return self._maybe_flush()

    def update(self, content: str, token_ids: Sequence[int] | None = None) -> bool:
        """Replace the text (and ids, if given) so far; returns True if this call saved the reply."""
        self.check_open()
        self._parts = [check_text(content, "content")]
        if token_ids is not None:
            self._token_ids = check_token_ids(token_ids) or []
        self._dirty = True
        return self._maybe_flush()

    def flush(self) -> None:
        """Save the reply so far now."""
        self.check_open()
        if self._dirty:
            self._store._save_reply(
                self.message_id, {"content": self.content, "token_ids": dump_ids(self._token_ids)}
            )
            self._dirty = False
            self.flush_count += 1
        self._last_flush = self._clock()

    def finish(
        self,
        finish_reason: str = "stop",
        *,
        content: str | None = None,
        token_ids: Sequence[int] | None = None,
        prompt_tokens: int | None = None,
        generated_tokens: int | None = None,
        ttft_s: float | None = None,
        tokens_per_s: float | None = None,
        prefix_hit_tokens: int | None = None,
        cumulative_logprob: float | None = None,
    ) -> Message:
        """Save the final text, finish reason and stats; the message is immutable afterwards."""
        self.check_open()
        if finish_reason == STREAMING or not check_finish_reason(finish_reason):
            raise InvalidInputError(f"finish_reason {finish_reason!r} does not finish a reply")
        if content is not None:
            self._parts = [check_text(content, "content")]
        if token_ids is not None:
            self._token_ids = check_token_ids(token_ids) or []
        message = self._store._save_reply(
            self.message_id,
            {
                "content": self.content,
                "token_ids": dump_ids(self._token_ids),
                "finish_reason": finish_reason,
                "prompt_tokens": check_count(prompt_tokens, "prompt_tokens"),
                "generated_tokens": check_count(
                    len(self._token_ids) if generated_tokens is None else generated_tokens,
                    "generated_tokens",
                ),
                "ttft_s": check_float(ttft_s, "ttft_s"),
                "tokens_per_s": check_float(tokens_per_s, "tokens_per_s"),
                "prefix_hit_tokens": check_count(prefix_hit_tokens, "prefix_hit_tokens"),
                "cumulative_logprob": check_float(cumulative_logprob, "cumulative_logprob"),
            },
        )
        self.finished = True
        self._dirty = False
        return message

    def _maybe_flush(self) -> bool:
        if self._clock() - self._last_flush >= self.flush_interval:
            self.flush()
            return True
        return False

    def check_open(self) -> None:
        if self.finished:
            raise StoreError(f"reply {self.message_id} is already finished")

    def __enter__(self) -> ReplyWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.finished:
            return
        if exc_type is None:
            self.finish("stop")
            return
        try:
            self.finish("error" if issubclass(exc_type, Exception) else "abort")
        except StoreError:
            pass  # never hide the exception that ended the stream
