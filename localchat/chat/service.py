"""ChatService: conversations (Store) driven through the engine (EngineDriver).

The UI and the terminal app call this small API. Every message keeps the exact token ids it was
prompted or generated with, so the prompt for a reply is the concatenation of the path's ids and
its history hits the prefix cache block for block; generated text is never re-tokenized.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from localchat.chat.store import Conversation, Message, ReplyWriter, Store
from localchat.engine import EngineClient, EngineStopped, SamplingParams
from localchat.model.chat_template import continuation_ids, prompt_ids
from localchat.text import check_text


@dataclass
class ChatEvent:
    """One streamed update of an assistant reply."""

    message_id: int
    delta_text: str
    text: str
    finished: bool
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    index: int = 0  # sample (or beam rank) within its request
    cumulative_logprob: float | None = None


@dataclass
class LiveReply:
    """A reply being generated: which conversation and message each engine sample belongs to.

    The memory panel names the owner of each block from this (request id -> conversation, sample).
    """

    request_id: str
    conversation_id: int
    parent_id: int  # the message being replied to
    n: int
    beam: bool
    message_ids: dict[int, int] = field(default_factory=dict)  # sample index -> assistant message id


class ReplyUpdates:
    """A reply's updates (iterate: each is a list of ChatEvent, one per sample); `interrupt` ends it from
    another thread."""

    def __init__(self, updates: Iterator[list[ChatEvent]], stream, forget: Callable[[], None]) -> None:
        self._updates = updates
        self._stream = stream
        self._forget = forget  # for updates closed before they started (their own cleanup never ran)

    def __iter__(self) -> "ReplyUpdates":
        return self

    def __next__(self) -> list[ChatEvent]:
        return next(self._updates)

    def close(self) -> None:
        self._updates.close()
        self._forget()

    def interrupt(self) -> None:
        """End the reply from another thread than its reader's (a stop, a closed tab): the engine aborts
        it and sends its last output, so the reader sees it end and the text so far is saved."""
        with contextlib.suppress(EngineStopped):
            self._stream.abort()


class ChatService:
    def __init__(self, driver: EngineClient, store: Store) -> None:
        self.driver = driver
        self.store = store
        self.live: dict[str, LiveReply] = {}  # request id -> the reply it is writing

    @property
    def info(self):
        """The engine's info, read each time: the app can switch models (localchat/chat/engine_switch.py)."""
        return self.driver.info

    @property
    def tokenizer(self):
        return self.driver.info.tokenizer

    # ------------------------------------------------------------- conversations
    def new_conversation(self, title: str = "", system_prompt: str | None = None, settings: dict | None = None) -> Conversation:
        return self.store.create_conversation(title, model=self.info.model_name, system_prompt=system_prompt, settings=settings)

    # Every reply is n samples of one request (n = 1 is the common case): each update yields the
    # list of all samples seen so far, ordered by sample index, and each sample is saved as its own
    # sibling assistant message.
    #
    # send, edit and regenerate check the request and start it at once, in one transaction with the
    # user message's row: a message the engine refuses (too long for the context or the KV cache, not
    # text) raises here and writes nothing. Iterate the result for the reply's updates.
    def send(self, conversation_id: int, text: str, params: SamplingParams) -> ReplyUpdates:
        """Add a user message under the current leaf and stream the assistant's reply(ies)."""
        return self._start(lambda: self._sent(conversation_id, text), params)

    def send_new(self, text: str, params: SamplingParams, *, title: str = "", system_prompt: str | None = None,
                 settings: dict | None = None) -> tuple[Conversation, ReplyUpdates]:
        """A new conversation whose first message is `text`, and its reply: both or nothing (a refused
        message leaves no empty conversation behind)."""
        made: list[Conversation] = []

        def where():
            _check_message(text)  # before the title made from it is checked
            made.append(self.new_conversation(title, system_prompt, settings))
            return self._sent(made[0].id, text)

        events = self._start(where, params)
        return self.store.get_conversation(made[0].id), events

    def edit(self, user_message_id: int, text: str, params: SamplingParams) -> ReplyUpdates:
        """A new sibling of a user message with new text, and a reply to it."""
        return self._start(lambda: self._edited(user_message_id, text), params)

    def regenerate(self, assistant_message_id: int, params: SamplingParams) -> ReplyUpdates:
        """New replies as siblings of an assistant message: the same prompt, all from cache."""
        return self._start(lambda: self._regenerated(assistant_message_id), params)

    def _start(self, where, params: SamplingParams) -> ReplyUpdates:
        stream = None
        try:
            with self.store.transaction():
                conversation_id, path = where()
                stream = self._submit(conversation_id, path, params)
        except BaseException:
            if stream is not None:  # submitted, but the message could not be saved: take the request back
                with contextlib.suppress(EngineStopped):
                    stream.abort()
            raise
        # Known as live from now on (the memory panel names its sequences by it), even while a page
        # waits for the first output before reading the updates.
        self.live[stream.request_id] = LiveReply(stream.request_id, conversation_id, path[-1].id, params.n,
                                                 params.is_beam_search)
        return ReplyUpdates(self._reply(conversation_id, path, params, stream), stream,
                            lambda: self.live.pop(stream.request_id, None))

    # ----------------------------------------------- where a reply goes: (conversation, path to reply to)
    def _sent(self, conversation_id: int, text: str) -> tuple[int, list[Message]]:
        path = self.store.current_path(conversation_id)
        user = self._add_user(conversation_id, path, text, parent_id=path[-1].id if path else None)
        return conversation_id, path + [user]

    def _edited(self, user_message_id: int, text: str) -> tuple[int, list[Message]]:
        original = self.store.get_message(user_message_id)
        if original.role != "user":
            raise ValueError(f"message {user_message_id} is a {original.role} message; only user messages are edited")
        path = self.store.path(original.parent_id) if original.parent_id is not None else []
        user = self._add_user(original.conversation_id, path, text, parent_id=original.parent_id)
        return original.conversation_id, path + [user]

    def _regenerated(self, assistant_message_id: int) -> tuple[int, list[Message]]:
        original = self.store.get_message(assistant_message_id)
        if original.role != "assistant" or original.parent_id is None:
            raise ValueError(f"message {assistant_message_id} is not an assistant reply")
        return original.conversation_id, self.store.path(original.parent_id)

    # ------------------------------------------------------------------ prompts
    def _system(self, conversation_id: int) -> list[dict]:
        system = self.store.get_conversation(conversation_id).system_prompt
        return [{"role": "system", "content": system}] if system else []

    def _as_messages(self, conversation_id: int, path: list[Message]) -> list[dict]:
        return self._system(conversation_id) + [{"role": m.role, "content": m.content} for m in path]

    def _add_user(self, conversation_id: int, path: list[Message], text: str, parent_id: int | None) -> Message:
        _check_message(text)
        user = {"role": "user", "content": text}
        history = self._as_messages(conversation_id, path)
        if not self.info.accepts_token_ids:
            ids = None  # a remote engine tokenizes on its server: the conversation is kept as text
        elif not path:
            # The first user message carries the whole templated prompt, system prompt included.
            ids = prompt_ids(self.tokenizer, history + [user])
        elif path[-1].role == "assistant" and path[-1].token_ids and self._has_exact_ids(path):
            try:
                ids = continuation_ids(self.tokenizer, history, path[-1].token_ids, [user])
            except ValueError:
                ids = None  # a template that rewrites history (Qwen3 drops old <think> blocks): render from text
        else:
            ids = None  # the prompt is rendered from text for this path (imported or interrupted history)
        # The model is recorded with the ids: they are that model's tokenizer's.
        return self.store.append_message(conversation_id, parent_id, "user", text, token_ids=ids,
                                         model=self.info.model_name if ids is not None else None)

    def _has_exact_ids(self, path: list[Message]) -> bool:
        """Whether the path's saved ids can be the prompt as they are: every message has ids, made by this
        model's tokenizer (after a model switch an older reply's ids belong to another vocabulary)."""
        model = self.info.model_name
        return all(m.token_ids for m in path) and all(m.model in (None, model) for m in path)

    def prompt_ids(self, conversation_id: int, path: list[Message]) -> list[int]:
        """The prompt for a reply after `path` (which ends with a user message)."""
        first_turn_exact = bool(path) and path[0].role == "user" and path[0].token_ids
        if self._has_exact_ids(path) and first_turn_exact:
            return [t for m in path for t in m.token_ids]  # type: ignore[union-attr]
        return prompt_ids(self.tokenizer, self._as_messages(conversation_id, path))

    # ------------------------------------------------------------------- replies
    def _submit(self, conversation_id: int, path: list[Message], params: SamplingParams):
        if self.info.accepts_token_ids:
            return self.driver.submit(prompt_token_ids=self.prompt_ids(conversation_id, path), params=params)
        # a remote engine (localchat/api/remote.py) takes the conversation as messages
        return self.driver.submit(messages=self._as_messages(conversation_id, path), params=params)

    def _reply(self, conversation_id: int, path: list[Message], params: SamplingParams, stream) -> Iterator[list[ChatEvent]]:
        """Stream every sample of one request (n forks sharing the prompt's blocks).

        A sample's assistant message is created when the sample first appears (the engine forks
        after the prompt's first token). When the request ends, the branch of sample 0 is current.
        """
        writers: dict[int, ReplyWriter] = {}
        model = getattr(stream, "model_name", None) or self.info.model_name  # the engine that serves this stream
        live = self.live[stream.request_id]  # registered by _start, before anyone waits on the stream
        # Replies of one request (n samples, a beam search) share a group, so they can be compared later.
        group = uuid.uuid4().hex if params.n > 1 or params.is_beam_search else None
        final = None
        ended = "abort"  # how an unfinished reply is saved: stopped (a closed page, shutdown) or failed
        try:
            for out in stream:
                events = [self._save_sample(conversation_id, path[-1].id, params, writers, o, out, group, model)
                          for o in sorted(out.outputs, key=lambda x: x.index)]
                live.message_ids = {i: w.message_id for i, w in writers.items()}
                if out.finished:
                    final = out
                    for writer in writers.values():  # a beam that no hypothesis kept
                        if not writer.finished:
                            writer.finish("abort")
                    if 0 in writers:
                        self.store.switch_branch(writers[0].message_id)
                yield events
        except Exception as exc:
            if not isinstance(exc, EngineStopped):
                ended = "error"  # the engine failed this request (RequestFailed): shown as such, regenerable
            raise
        finally:
            try:
                if final is None:  # the client went away or the engine failed: keep what was shown
                    with contextlib.suppress(EngineStopped):  # a stopped engine has nothing left to free
                        stream.abort()
                    for writer in writers.values():
                        if not writer.finished:
                            writer.finish(ended)
                    if 0 in writers:
                        self.store.switch_branch(writers[0].message_id)
            finally:
                # Last: shutting down waits for `live` to empty before it closes the store (cli/shutdown.py).
                self.live.pop(stream.request_id, None)

    def _save_sample(self, conversation_id: int, parent_id: int, params: SamplingParams,
                     writers: dict[int, ReplyWriter], o, out, group: str | None = None,
                     model: str | None = None) -> ChatEvent:
        writer = writers.get(o.index)
        if writer is None:
            writer = self.store.begin_reply(conversation_id, parent_id, model=model or self.info.model_name,
                                            sampling=params.to_dict(), sample_group=group)
            writers[o.index] = writer
        if o.token_ids and len(writer.token_ids) + len(o.delta_token_ids) != len(o.token_ids):
            writer.update(o.text, o.token_ids)  # a fork starts with its parent's tokens
        else:
            writer.append(o.delta_text, o.delta_token_ids)
        if out.finished and not writer.finished:
            _finish(writer, o, out.metrics)
        return _event(writer, o, out)


def _check_message(text) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the message is empty: write something first")
    check_text(text, "the message")  # a lone surrogate (localchat/text.py): a clear error, not the tokenizer's


def _finish(writer, o, m) -> None:
    """Save a finished reply with its exact ids and its stats."""
    writer.finish(
        o.finish_reason or "stop",
        content=o.text,
        token_ids=o.token_ids,
        prompt_tokens=m.num_prompt_tokens,
        generated_tokens=_generated(o, m),
        ttft_s=m.time_to_first_token,
        tokens_per_s=m.decode_tokens_per_s,
        prefix_hit_tokens=m.prefix_hit_tokens,
        cumulative_logprob=_finite_or_none(o.cumulative_logprob),
    )


def _generated(o, m) -> int:
    """A sample's generated tokens: its ids, or what a remote engine (which sends no ids) counted."""
    return len(o.token_ids) if o.token_ids or not o.text else m.num_generated_tokens


def _finite_or_none(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _event(writer, o, out) -> ChatEvent:
    m = out.metrics
    return ChatEvent(
        message_id=writer.message_id,
        delta_text=o.delta_text,
        text=o.text,
        finished=out.finished,
        finish_reason=o.finish_reason,
        prompt_tokens=m.num_prompt_tokens,
        prefix_hit_tokens=m.prefix_hit_tokens,
        generated_tokens=_generated(o, m),
        ttft_s=m.time_to_first_token,
        tokens_per_s=m.decode_tokens_per_s,
        index=o.index,
        cumulative_logprob=o.cumulative_logprob,
    )
