"""ChatService: conversations (Store) driven through the engine (EngineDriver).

The UI and the terminal app call this small API. Every message keeps the exact token ids it was
prompted or generated with, so the prompt for a reply is the concatenation of the path's ids and
its history hits the prefix cache block for block; generated text is never re-tokenized.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from localchat.chat.store import Conversation, Message, ReplyWriter, Store
from localchat.engine import EngineClient, SamplingParams
from localchat.model.chat_template import continuation_ids, prompt_ids


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


class ChatService:
    def __init__(self, driver: EngineClient, store: Store) -> None:
        self.driver = driver
        self.store = store
        self.info = driver.info
        self.tokenizer = driver.info.tokenizer

    # ------------------------------------------------------------- conversations
    def new_conversation(self, title: str = "", system_prompt: str | None = None, settings: dict | None = None) -> Conversation:
        return self.store.create_conversation(title, model=self.info.model_name, system_prompt=system_prompt, settings=settings)

    # Every reply is n samples of one request (n = 1 is the common case): each update yields the
    # list of all samples seen so far, ordered by sample index, and each sample is saved as its own
    # sibling assistant message.
    def send(self, conversation_id: int, text: str, params: SamplingParams) -> Iterator[list[ChatEvent]]:
        """Add a user message under the current leaf and stream the assistant's reply(ies)."""
        yield from self._reply(*self._sent(conversation_id, text), params)

    def edit(self, user_message_id: int, text: str, params: SamplingParams) -> Iterator[list[ChatEvent]]:
        """A new sibling of a user message with new text, and a reply to it."""
        yield from self._reply(*self._edited(user_message_id, text), params)

    def regenerate(self, assistant_message_id: int, params: SamplingParams) -> Iterator[list[ChatEvent]]:
        """New replies as siblings of an assistant message: the same prompt, all from cache."""
        yield from self._reply(*self._regenerated(assistant_message_id), params)

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
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the message is empty: write something first")
        user = {"role": "user", "content": text}
        history = self._as_messages(conversation_id, path)
        if not path:
            # The first user message carries the whole templated prompt, system prompt included.
            ids = prompt_ids(self.tokenizer, history + [user])
        elif path[-1].role == "assistant" and path[-1].token_ids and self._has_exact_ids(path):
            ids = continuation_ids(self.tokenizer, history, path[-1].token_ids, [user])
        else:
            ids = None  # the prompt is rendered from text for this path (imported or interrupted history)
        return self.store.append_message(conversation_id, parent_id, "user", text, token_ids=ids)

    @staticmethod
    def _has_exact_ids(path: list[Message]) -> bool:
        return all(m.token_ids for m in path)

    def prompt_ids(self, conversation_id: int, path: list[Message]) -> list[int]:
        """The prompt for a reply after `path` (which ends with a user message)."""
        first_turn_exact = bool(path) and path[0].role == "user" and path[0].token_ids
        if self._has_exact_ids(path) and first_turn_exact:
            return [t for m in path for t in m.token_ids]  # type: ignore[union-attr]
        return prompt_ids(self.tokenizer, self._as_messages(conversation_id, path))

    # ------------------------------------------------------------------- replies
    def _reply(self, conversation_id: int, path: list[Message], params: SamplingParams) -> Iterator[list[ChatEvent]]:
        """Stream every sample of one request (n forks sharing the prompt's blocks).

        A sample's assistant message is created when the sample first appears (the engine forks
        after the prompt's first token). When the request ends, the branch of sample 0 is current.
        """
        prompt = self.prompt_ids(conversation_id, path)
        stream = self.driver.submit(prompt_token_ids=prompt, params=params)
        writers: dict[int, ReplyWriter] = {}
        final = None
        try:
            for out in stream:
                events = [self._save_sample(conversation_id, path[-1].id, params, writers, o, out)
                          for o in sorted(out.outputs, key=lambda x: x.index)]
                if out.finished:
                    final = out
                    if 0 in writers:
                        self.store.switch_branch(writers[0].message_id)
                yield events
        finally:
            if final is None:  # the client went away or the engine failed: keep what was shown
                stream.abort()
                for writer in writers.values():
                    if not writer.finished:
                        writer.finish("abort")
                if 0 in writers:
                    self.store.switch_branch(writers[0].message_id)

    def _save_sample(self, conversation_id: int, parent_id: int, params: SamplingParams,
                     writers: dict[int, ReplyWriter], o, out) -> ChatEvent:
        writer = writers.get(o.index)
        if writer is None:
            writer = self.store.begin_reply(conversation_id, parent_id, model=self.info.model_name, sampling=params.to_dict())
            writers[o.index] = writer
        if o.token_ids and len(writer.token_ids) + len(o.delta_token_ids) != len(o.token_ids):
            writer.update(o.text, o.token_ids)  # a fork starts with its parent's tokens
        else:
            writer.append(o.delta_text, o.delta_token_ids)
        if out.finished and not writer.finished:
            _finish(writer, o, out.metrics)
        return _event(writer, o, out)


def _finish(writer, o, m) -> None:
    """Save a finished reply with its exact ids and its stats."""
    writer.finish(
        o.finish_reason or "stop",
        content=o.text,
        token_ids=o.token_ids,
        prompt_tokens=m.num_prompt_tokens,
        generated_tokens=len(o.token_ids),
        ttft_s=m.time_to_first_token,
        tokens_per_s=m.decode_tokens_per_s,
    )


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
        generated_tokens=len(o.token_ids),
        ttft_s=m.time_to_first_token,
        tokens_per_s=m.decode_tokens_per_s,
    )
