"""Conversation store: conversation trees in SQLite, through sqlite-utils.

A conversation is a tree of messages. Editing a user message or regenerating a reply adds a
*sibling*; nothing is updated in place, so nothing a user wrote or received is lost. Each
conversation remembers its current leaf; the path from the root to that leaf is what the UI shows
and what the next prompt is built from (each message keeps the exact token ids it was prompted or
generated with).

Safety rules kept here: WAL journal, foreign keys on, ``busy_timeout`` so concurrent writers queue
instead of failing, and every write is a ``BEGIN IMMEDIATE`` transaction, so a read-modify-write
(e.g. "append under the current leaf") cannot interleave with another process's. Opening the file
safely is localchat/chat/store/schema.py's; export and import are transfer.py's.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import sqlite_utils

from localchat.chat.store import transfer
from localchat.chat.store.rows import (
    CONVERSATION_SELECT,
    CURRENT,
    STREAMING,
    UNSET,
    Conversation,
    CorruptDatabaseError,
    InvalidInputError,
    Message,
    NotFoundError,
    Siblings,
    StoreError,
    check_count,
    check_finish_reason,
    check_float,
    check_id,
    check_object,
    check_optional_text,
    check_role,
    check_text,
    check_token_ids,
    conversation_from_row,
    dump_ids,
    dump_object,
    is_corruption,
    message_from_row,
)
from localchat.chat.store.schema import connect, default_db_path
from localchat.chat.store.writer import DEFAULT_FLUSH_INTERVAL, ReplyWriter

DEFAULT_BUSY_TIMEOUT = 30.0


class Store:
    """All conversations in one SQLite file. Thread-safe; many processes may share the file."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        create: bool = True,
        check: bool = True,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        """Open (creating and migrating if needed) the database at ``path``.

        ``check`` runs ``PRAGMA quick_check`` first so damage is reported at open
        rather than in the middle of a conversation. ``create=False`` refuses to
        create a missing file.
        """
        self.db_path: Path | None = None if str(path) == ":memory:" else Path(path or default_db_path())
        self.flush_interval = flush_interval
        # One connection shared by the UI's handler threads and the engine's
        # streaming thread; the re-entrant lock serialises them and lets
        # operations nest inside transaction().
        self._lock = threading.RLock()
        self._conn = connect(self.db_path, create=create, check=check, busy_timeout=busy_timeout)
        self.db = sqlite_utils.Database(self._conn, execute_plugins=False)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the enclosed operations atomically; a nested call becomes a savepoint.

        Writes take the database write lock at ``BEGIN`` (IMMEDIATE), so a value
        read inside the block cannot be changed by another process before the
        block commits.
        """
        with self._lock, self._translate_errors():
            if self._conn.in_transaction:
                with self.db.atomic():  # sqlite-utils uses a SAVEPOINT when nested
                    yield
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._conn.execute("COMMIT")
            except BaseException:
                # Also reached when COMMIT itself fails (disk full, I/O error):
                # the transaction must not stay open and swallow later writes.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[None]:
        # A deferred transaction gives multi-query reads one consistent snapshot
        # without taking the write lock.
        with self._lock, self._translate_errors():
            if self._conn.in_transaction:
                yield
                return
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                if self._conn.in_transaction:
                    self._conn.execute("COMMIT")

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as exc:
            raise InvalidInputError(str(exc)) from exc
        except sqlite3.Error as exc:
            if is_corruption(exc):
                raise CorruptDatabaseError(f"{self.db_path or ':memory:'} is damaged: {exc}") from exc
            raise StoreError(f"database error on {self.db_path or ':memory:'}: {exc}") from exc

    def _now(self) -> float:
        return time.time()

    # ------------------------------------------------------------------ conversations

    def create_conversation(
        self,
        title: str = "",
        *,
        model: str | None = None,
        system_prompt: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Conversation:
        row = {
            "title": check_text(title, "title"),
            "model": check_optional_text(model, "model"),
            "system_prompt": check_optional_text(system_prompt, "system_prompt"),
            "settings": dump_object(check_object(settings, "settings") or {}),
        }
        with self.transaction():
            now = self._now()
            cid = self.db["conversations"].insert({**row, "created_at": now, "updated_at": now}).last_pk
            return self._conversation(cid)

    def get_conversation(self, conversation_id: int) -> Conversation:
        with self._read():
            return self._conversation(conversation_id)

    def rename_conversation(self, conversation_id: int, title: str) -> Conversation:
        return self.update_conversation(conversation_id, title=title)

    def update_conversation(
        self,
        conversation_id: int,
        *,
        title: str = UNSET,
        model: str | None = UNSET,
        system_prompt: str | None = UNSET,
        settings: dict[str, Any] = UNSET,
    ) -> Conversation:
        """Change the given fields (omitted ones are kept)."""
        changes: dict[str, Any] = {}
        if title is not UNSET:
            changes["title"] = check_text(title, "title")
        if model is not UNSET:
            changes["model"] = check_optional_text(model, "model")
        if system_prompt is not UNSET:
            changes["system_prompt"] = check_optional_text(system_prompt, "system_prompt")
        if settings is not UNSET:
            if settings is None:
                raise InvalidInputError("settings must be a JSON object (use {} for none)")
            changes["settings"] = dump_object(check_object(settings, "settings"))
        with self.transaction():
            self._conversation(conversation_id, count=False)
            self.db["conversations"].update(conversation_id, {**changes, "updated_at": self._now()})
            return self._conversation(conversation_id)

    def delete_conversation(self, conversation_id: int) -> None:
        """Delete a conversation and all its messages (the one deliberate way to lose data)."""
        with self.transaction():
            self._conversation(conversation_id, count=False)
            self.db.execute("UPDATE conversations SET current_leaf_id = NULL WHERE id = ?", [conversation_id])
            # One statement: the parent_id foreign key is checked when it ends, when
            # every message of the conversation is gone, so deletion order is moot.
            self.db.execute("DELETE FROM messages WHERE conversation_id = ?", [conversation_id])
            self.db.execute("DELETE FROM conversations WHERE id = ?", [conversation_id])

    def list_conversations(self, *, limit: int | None = None, offset: int = 0) -> list[Conversation]:
        """Conversations, most recently updated first."""
        sql = CONVERSATION_SELECT + " ORDER BY c.updated_at DESC, c.id DESC LIMIT ? OFFSET ?"
        with self._read():
            rows = self.db.query(sql, [-1 if limit is None else limit, offset])
            return [conversation_from_row(r) for r in rows]

    def search_conversations(self, text: str, *, limit: int | None = None) -> list[Conversation]:
        """Conversations whose title, system prompt or any message (any branch) contains ``text``.

        Substring match, case-insensitive for ASCII; newest first.
        """
        check_text(text, "search text")
        if not text:
            return self.list_conversations(limit=limit)
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql = (
            CONVERSATION_SELECT
            + " WHERE c.title LIKE :p ESCAPE '\\' OR c.system_prompt LIKE :p ESCAPE '\\'"
            " OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id"
            " AND m.content LIKE :p ESCAPE '\\')"
            " ORDER BY c.updated_at DESC, c.id DESC LIMIT :limit"
        )
        with self._read():
            rows = self.db.query(sql, {"p": pattern, "limit": -1 if limit is None else limit})
            return [conversation_from_row(r) for r in rows]

    def _conversation(self, conversation_id: int, *, count: bool = True) -> Conversation:
        check_id(conversation_id, "conversation id")
        # The message count costs a scan of the conversation's index entries;
        # per-message writes only need the row itself.
        select = CONVERSATION_SELECT if count else "SELECT c.* FROM conversations c"
        rows = list(self.db.query(select + " WHERE c.id = ?", [conversation_id]))
        if not rows:
            raise NotFoundError(f"no conversation with id {conversation_id}")
        return conversation_from_row(rows[0])

    # ------------------------------------------------------------------ messages

    def append_message(
        self,
        conversation_id: int,
        parent_id: int | None | Literal["current"],
        role: str,
        content: str,
        *,
        token_ids: Sequence[int] | None = None,
        model: str | None = None,
        sampling: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        prompt_tokens: int | None = None,
        generated_tokens: int | None = None,
        ttft_s: float | None = None,
        tokens_per_s: float | None = None,
        make_current: bool = True,
    ) -> Message:
        """Add a message under ``parent_id`` (None: a root; CURRENT: the current leaf).

        By default the new message becomes the conversation's current leaf.
        """
        if finish_reason == STREAMING:
            raise InvalidInputError("use begin_reply() for a reply that is still streaming")
        row = {
            "role": check_role(role),
            "content": check_text(content, "content"),
            "token_ids": dump_ids(check_token_ids(token_ids)),
            "model": check_optional_text(model, "model"),
            "sampling": dump_object(check_object(sampling, "sampling")),
            "finish_reason": check_finish_reason(finish_reason),
            "prompt_tokens": check_count(prompt_tokens, "prompt_tokens"),
            "generated_tokens": check_count(generated_tokens, "generated_tokens"),
            "ttft_s": check_float(ttft_s, "ttft_s"),
            "tokens_per_s": check_float(tokens_per_s, "tokens_per_s"),
        }
        with self.transaction():
            return self._insert_message(conversation_id, parent_id, row, make_current=make_current)

    def _insert_message(
        self,
        conversation_id: int,
        parent_id: int | None | Literal["current"],
        row: dict[str, Any],
        *,
        make_current: bool,
    ) -> Message:
        # Must run inside transaction(): the parent checks and the insert are one unit.
        conversation = self._conversation(conversation_id, count=False)
        if parent_id == CURRENT:
            parent_id = conversation.current_leaf_id
        if parent_id is not None:
            parent = self._message(parent_id)
            if parent.conversation_id != conversation_id:
                raise InvalidInputError(
                    f"parent message {parent_id} belongs to conversation {parent.conversation_id}, "
                    f"not {conversation_id}"
                )
        now = self._now()
        mid = self.db["messages"].insert(
            {**row, "conversation_id": conversation_id, "parent_id": parent_id, "created_at": now}
        ).last_pk
        changes: dict[str, Any] = {"updated_at": now}
        if make_current:
            changes["current_leaf_id"] = mid
        self.db["conversations"].update(conversation_id, changes)
        return self._message(mid)

    def get_message(self, message_id: int) -> Message:
        with self._read():
            return self._message(message_id)

    def _message(self, message_id: int) -> Message:
        check_id(message_id, "message id")
        rows = list(self.db.query("SELECT * FROM messages WHERE id = ?", [message_id]))
        if not rows:
            raise NotFoundError(f"no message with id {message_id}")
        return message_from_row(rows[0])

    def list_messages(self, conversation_id: int) -> list[Message]:
        """Every message of a conversation, all branches, oldest first (parents before children)."""
        with self._read():
            self._conversation(conversation_id, count=False)
            rows = self.db.query(
                "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", [conversation_id]
            )
            return [message_from_row(r) for r in rows]

    def path(self, message_id: int) -> list[Message]:
        """The messages from the root down to ``message_id``, inclusive."""
        with self._read():
            self._message(message_id)
            rows = self.db.query(
                """WITH RECURSIVE up(id, depth) AS (
                       SELECT ?, 0
                       UNION ALL
                       SELECT m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.id
                       WHERE m.parent_id IS NOT NULL)
                   SELECT messages.* FROM up JOIN messages ON messages.id = up.id ORDER BY up.depth DESC""",
                [message_id],
            )
            return [message_from_row(r) for r in rows]

    def current_path(self, conversation_id: int) -> list[Message]:
        """The branch the conversation is on: root to current leaf ([] if it has no messages)."""
        with self._read():
            leaf = self._conversation(conversation_id, count=False).current_leaf_id
            return [] if leaf is None else self.path(leaf)

    def siblings(self, message_id: int) -> Siblings:
        """The messages sharing ``message_id``'s parent (roots share the conversation), in order."""
        with self._read():
            message = self._message(message_id)
            ids = tuple(
                r[0]
                for r in self._conn.execute(
                    "SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS ? ORDER BY id",
                    [message.conversation_id, message.parent_id],
                )
            )
            return Siblings(ids=ids, index=ids.index(message_id))

    def switch_branch(self, message_id: int) -> list[Message]:
        """Make the branch through ``message_id`` current and return its path.

        The new leaf is the newest message under ``message_id`` (ids only grow,
        so it is always a leaf): coming back to a branch resumes where it was
        last extended.
        """
        with self.transaction():
            message = self._message(message_id)
            leaf = self._conn.execute(
                """WITH RECURSIVE down(id) AS (
                       SELECT ?
                       UNION ALL
                       SELECT m.id FROM messages m JOIN down ON m.parent_id = down.id)
                   SELECT max(id) FROM down""",
                [message_id],
            ).fetchone()[0]
            self.db["conversations"].update(message.conversation_id, {"current_leaf_id": leaf})
            return self.path(leaf)

    # ------------------------------------------------------------------ streaming

    def begin_reply(
        self,
        conversation_id: int,
        parent_id: int | None | Literal["current"],
        *,
        model: str | None = None,
        sampling: dict[str, Any] | None = None,
        flush_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sample_group: str | None = None,
    ) -> ReplyWriter:
        """Create an empty assistant message now and return a writer that saves it as it grows.

        The row exists (finish_reason ``"streaming"``) and is the current leaf
        from the first moment, so a crash keeps everything flushed so far.
        """
        row = {
            "role": "assistant",
            "content": "",
            "token_ids": "[]",
            "model": check_optional_text(model, "model"),
            "sampling": dump_object(check_object(sampling, "sampling")),
            "finish_reason": STREAMING,
            "sample_group": check_optional_text(sample_group, "sample_group"),
        }
        with self.transaction():
            message = self._insert_message(conversation_id, parent_id, row, make_current=True)
        interval = self.flush_interval if flush_interval is None else flush_interval
        return ReplyWriter(self, message, interval, clock)

    def _save_reply(self, message_id: int, changes: dict[str, Any]) -> Message:
        with self.transaction():
            cur = self._conn.execute(
                "UPDATE messages SET " + ", ".join(f"{k} = ?" for k in changes)
                + " WHERE id = ? AND finish_reason IS 'streaming'",
                [*changes.values(), message_id],
            )
            if cur.rowcount != 1:
                message = self._message(message_id)  # NotFoundError if the conversation was deleted
                raise StoreError(f"message {message_id} is already finished ({message.finish_reason})")
            message = self._message(message_id)
            if changes.get("finish_reason", STREAMING) != STREAMING:
                self.db["conversations"].update(message.conversation_id, {"updated_at": self._now()})
            return message

    # ------------------------------------------------------------------ export / import

    def export_json(self, conversation_id: int) -> str:
        """The whole conversation, every branch, as JSON text (see transfer.export_json)."""
        return transfer.export_json(self, conversation_id)

    def import_json(self, text: str | bytes) -> Conversation:
        """Add a conversation from ``export_json`` text as a new one; a bad file changes nothing."""
        return transfer.import_json(self, text)

    def export_markdown(self, conversation_id: int) -> str:
        """The current branch as Markdown, for reading or sharing."""
        return transfer.export_markdown(self, conversation_id)
