"""Conversation store: conversation trees in SQLite, through sqlite-utils.

A conversation is a tree of messages. Editing a user message or regenerating a
reply adds a *sibling*; nothing is updated in place, so nothing a user wrote or
received is lost. Each conversation remembers its current leaf; the path from
the root to that leaf is what the UI shows and what the next prompt is built
from (each message keeps the exact token ids it was prompted or generated with).

Safety rules kept here:

* WAL journal, foreign keys on, ``busy_timeout`` so concurrent writers queue
  instead of failing, and every write is a ``BEGIN IMMEDIATE`` transaction, so
  a read-modify-write (e.g. "append under the current leaf") cannot interleave
  with another process's.
* A file that is not an SQLite database, is damaged, or belongs to another
  application raises before anything is written to it.
* The schema carries a version (``PRAGMA user_version``) and is upgraded by
  ordered migrations; ``PRAGMA application_id`` marks the file as ours.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import sqlite_utils

__all__ = [
    "APPLICATION_ID",
    "CURRENT",
    "EXPORT_FORMAT",
    "ROLES",
    "SCHEMA_VERSION",
    "STREAMING",
    "Conversation",
    "CorruptDatabaseError",
    "InvalidInputError",
    "Message",
    "NotFoundError",
    "NotOurDatabaseError",
    "ReplyWriter",
    "SchemaVersionError",
    "Siblings",
    "Store",
    "StoreError",
    "default_db_path",
]

APPLICATION_ID = 0x4C434854  # "LCHT" in the SQLite header: how we recognise our own files
EXPORT_FORMAT = "localchat.conversation"
EXPORT_VERSION = 1
ROLES = ("system", "user", "assistant", "tool")
STREAMING = "streaming"  # finish_reason of a reply still being generated (or cut off by a crash)
CURRENT: Literal["current"] = "current"  # parent_id meaning "the conversation's current leaf"
DEFAULT_FLUSH_INTERVAL = 2.0
DEFAULT_BUSY_TIMEOUT = 30.0
_SQLITE_MAGIC = b"SQLite format 3\x00"


# --------------------------------------------------------------------------- errors


class StoreError(ValueError):
    """Base class of every error the store raises on purpose."""


class NotFoundError(StoreError):
    """An id that names no conversation or message (or a database file that does not exist)."""


class InvalidInputError(StoreError):
    """Arguments or an import file that would break the tree; nothing was written."""


class CorruptDatabaseError(StoreError):
    """The file is not a readable SQLite database; it is left exactly as it was."""


class NotOurDatabaseError(StoreError):
    """A valid SQLite database that belongs to something else; it is left untouched."""


class SchemaVersionError(StoreError):
    """The database was written by a newer localchat than this one."""


# --------------------------------------------------------------------------- rows


@dataclass
class Conversation:
    id: int
    title: str
    created_at: float  # unix seconds
    updated_at: float
    model: str | None
    system_prompt: str | None
    settings: dict[str, Any]
    current_leaf_id: int | None
    message_count: int = 0


@dataclass
class Message:
    id: int
    conversation_id: int
    parent_id: int | None
    role: str
    content: str
    token_ids: list[int] | None  # None: never tokenized; [] is a real empty sequence
    created_at: float
    model: str | None = None
    sampling: dict[str, Any] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None


@dataclass(frozen=True)
class Siblings:
    """A message's siblings (itself included, oldest first) and its index among them."""

    ids: tuple[int, ...]
    index: int

    @property
    def count(self) -> int:
        return len(self.ids)


# --------------------------------------------------------------------------- schema

# Each migration takes the schema from version i to i + 1 and runs inside the
# caller's transaction, so it must not use executescript() (which commits).
# Migrations that rebuild a table must also leave foreign keys consistent,
# since PRAGMA foreign_keys cannot be switched off inside a transaction.
_SCHEMA_V1 = (
    """CREATE TABLE conversations (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        title           TEXT NOT NULL DEFAULT '',
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL,
        model           TEXT,
        system_prompt   TEXT,
        settings        TEXT NOT NULL DEFAULT '{}',
        current_leaf_id INTEGER REFERENCES messages(id) ON DELETE SET NULL
    )""",
    """CREATE TABLE messages (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id  INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        parent_id        INTEGER REFERENCES messages(id),
        role             TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
        content          TEXT NOT NULL,
        token_ids        TEXT,
        created_at       REAL NOT NULL,
        model            TEXT,
        sampling         TEXT,
        finish_reason    TEXT,
        prompt_tokens    INTEGER,
        generated_tokens INTEGER,
        ttft_s           REAL,
        tokens_per_s     REAL
    )""",
    # Siblings, children and "all messages of a conversation" (rowid order comes free).
    "CREATE INDEX messages_by_conversation_parent ON messages (conversation_id, parent_id)",
    # Subtree walks, and the foreign-key check on parent_id when a conversation is deleted.
    "CREATE INDEX messages_by_parent ON messages (parent_id)",
    # The conversation list, newest first.
    "CREATE INDEX conversations_by_updated ON conversations (updated_at DESC, id DESC)",
    # Foreign-key check on current_leaf_id when messages are deleted.
    "CREATE INDEX conversations_by_leaf ON conversations (current_leaf_id)",
    # The triggers back up the checks in Store so that no writer, ours or not,
    # can graft a branch across conversations or rewrite history.
    """CREATE TRIGGER messages_parent_same_conversation BEFORE INSERT ON messages
    WHEN NEW.parent_id IS NOT NULL
     AND NEW.conversation_id IS NOT (SELECT conversation_id FROM messages WHERE id = NEW.parent_id)
    BEGIN SELECT RAISE(ABORT, 'parent message belongs to another conversation'); END""",
    """CREATE TRIGGER messages_never_move BEFORE UPDATE OF conversation_id, parent_id ON messages
    WHEN NEW.conversation_id IS NOT OLD.conversation_id OR NEW.parent_id IS NOT OLD.parent_id
    BEGIN SELECT RAISE(ABORT, 'messages cannot be moved'); END""",
    """CREATE TRIGGER messages_finished_are_immutable BEFORE UPDATE ON messages
    WHEN OLD.finish_reason IS NOT 'streaming'
     AND (NEW.role IS NOT OLD.role OR NEW.content IS NOT OLD.content
          OR NEW.token_ids IS NOT OLD.token_ids OR NEW.finish_reason IS NOT OLD.finish_reason)
    BEGIN SELECT RAISE(ABORT, 'a finished message cannot be changed; add a sibling instead'); END""",
    """CREATE TRIGGER conversations_leaf_same_conversation BEFORE UPDATE OF current_leaf_id ON conversations
    WHEN NEW.current_leaf_id IS NOT NULL
     AND NEW.id IS NOT (SELECT conversation_id FROM messages WHERE id = NEW.current_leaf_id)
    BEGIN SELECT RAISE(ABORT, 'current leaf belongs to another conversation'); END""",
)


def _migrate_to_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


# _MIGRATIONS[i] upgrades version i to i + 1. Append only; never edit a shipped one.
_MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_to_v1]
SCHEMA_VERSION = len(_MIGRATIONS)
_REQUIRED_TABLES = ("conversations", "messages")


def default_db_path() -> Path:
    """``$LOCALCHAT_DB``, else ``$XDG_DATA_HOME/localchat/chats.db``, else ``~/.local/share/...``."""
    env = os.environ.get("LOCALCHAT_DB")
    if env:
        return Path(env).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME")
    base = Path(data_home).expanduser() if data_home else Path.home() / ".local" / "share"
    return base / "localchat" / "chats.db"


# --------------------------------------------------------------------------- validation helpers

_UNSET: Any = object()


def _is_corruption(exc: sqlite3.Error) -> bool:
    # SQLITE_CORRUPT and SQLITE_NOTADB surface as the bare DatabaseError class;
    # "locked", "busy", I/O errors are OperationalError and must not be reported as corruption.
    return type(exc) is sqlite3.DatabaseError


def _check_role(role: object) -> str:
    if not isinstance(role, str) or not role:
        raise InvalidInputError(f"a message needs a role, one of {', '.join(ROLES)}; got {role!r}")
    if role not in ROLES:
        raise InvalidInputError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return role


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: SQLite would refuse them mid-transaction
        raise InvalidInputError(f"{what} is not valid Unicode text ({exc.reason})") from None
    return value


def _check_optional_text(value: object, what: str) -> str | None:
    return None if value is None else _check_text(value, what)


def _check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{what} must be an integer id, got {value!r}")
    return value


def _check_token_ids(value: object) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidInputError(f"token_ids must be a list of integers, got {type(value).__name__}")
    ids = list(value)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not (-(2**63) <= t < 2**63):
            raise InvalidInputError(f"token_ids must be 64-bit integers, found {t!r}")
    return ids


def _check_count(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _check_float(value: object, what: str, *, required: bool = False) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _check_object(value: object, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} is not JSON-serialisable: {exc}") from None
    return value


def _check_finish_reason(value: object) -> str | None:
    value = _check_optional_text(value, "finish_reason")
    if value == "":
        raise InvalidInputError("finish_reason must not be empty (use None)")
    return value


def _dump_ids(ids: list[int] | None) -> str | None:
    return None if ids is None else json.dumps(ids, separators=(",", ":"))


def _dump_object(obj: dict[str, Any] | None) -> str | None:
    # Sorted keys make the stored text, and so every export, independent of insertion order.
    return None if obj is None else json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False)


def _message_from_row(row: dict[str, Any]) -> Message:
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        parent_id=row["parent_id"],
        role=row["role"],
        content=row["content"],
        token_ids=None if row["token_ids"] is None else json.loads(row["token_ids"]),
        created_at=row["created_at"],
        model=row["model"],
        sampling=None if row["sampling"] is None else json.loads(row["sampling"]),
        finish_reason=row["finish_reason"],
        prompt_tokens=row["prompt_tokens"],
        generated_tokens=row["generated_tokens"],
        ttft_s=row["ttft_s"],
        tokens_per_s=row["tokens_per_s"],
    )


def _conversation_from_row(row: dict[str, Any]) -> Conversation:
    return Conversation(
        id=row["id"],
        title=row["title"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        model=row["model"],
        system_prompt=row["system_prompt"],
        settings=json.loads(row["settings"]),
        current_leaf_id=row["current_leaf_id"],
        message_count=row.get("message_count", 0),
    )


_CONVERSATION_SELECT = (
    "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
    " FROM conversations c"
)

# Keys of an exported message, in the order they are written.
_EXPORT_MESSAGE_KEYS = (
    "id", "parent", "role", "content", "token_ids", "created_at", "model", "sampling",
    "finish_reason", "prompt_tokens", "generated_tokens", "ttft_s", "tokens_per_s",
)
_EXPORT_CONVERSATION_KEYS = (
    "title", "created_at", "updated_at", "model", "system_prompt", "settings", "current_leaf",
)


# --------------------------------------------------------------------------- store


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
        self._conn = self._connect(create=create, check=check, busy_timeout=busy_timeout)
        self.db = sqlite_utils.Database(self._conn, execute_plugins=False)

    # ------------------------------------------------------------------ opening

    def _connect(self, *, create: bool, check: bool, busy_timeout: float) -> sqlite3.Connection:
        target = ":memory:" if self.db_path is None else str(self.db_path)
        if self.db_path is not None:
            if self.db_path.is_dir():
                raise StoreError(f"{self.db_path} is a directory, not a database file")
            if self.db_path.exists():
                with open(self.db_path, "rb") as f:
                    header = f.read(len(_SQLITE_MAGIC))
                if header and header != _SQLITE_MAGIC:
                    raise CorruptDatabaseError(
                        f"{self.db_path} is not an SQLite database (unrecognised header); "
                        "it has not been modified. Move it aside or choose another file with --db."
                    )
            elif not create:
                raise NotFoundError(f"no database at {self.db_path}")
            else:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the driver never opens transactions behind our
        # back; every transaction here is explicit.
        conn = sqlite3.connect(
            target, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._validate(conn, check=check)
            if self.db_path is not None:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"could not switch {self.db_path} to WAL mode (got {mode!r})")
            self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            if _is_corruption(exc):
                raise CorruptDatabaseError(
                    f"{target} is damaged or not a database ({exc}); it has not been modified"
                ) from exc
            raise StoreError(f"cannot open {target}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _validate(self, conn: sqlite3.Connection, *, check: bool) -> None:
        """Refuse files that are damaged, foreign or too new, before writing anything."""
        where = self.db_path or ":memory:"
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")]
        if app_id != APPLICATION_ID and (app_id != 0 or version != 0 or names):
            listed = ", ".join(sorted(names)[:8]) or "none"
            raise NotOurDatabaseError(
                f"{where} is an SQLite database but not a localchat one (application_id {app_id:#x}, "
                f"tables: {listed}); it has not been modified. Choose another file with --db."
            )
        if version > len(_MIGRATIONS):
            raise SchemaVersionError(
                f"{where} has schema version {version}, newer than this localchat understands "
                f"({len(_MIGRATIONS)}); upgrade localchat to open it"
            )
        if check and app_id == APPLICATION_ID:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise CorruptDatabaseError(
                    f"{where} is damaged ({'; '.join(problems[:3])}); it has not been modified"
                )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] >= len(_MIGRATIONS):
            self._check_tables(conn)
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have just created
            # or migrated the same file.
            self._validate(conn, check=False)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version, len(_MIGRATIONS)):
                _MIGRATIONS[step](conn)
                conn.execute(f"PRAGMA user_version = {step + 1}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self._check_tables(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _check_tables(self, conn: sqlite3.Connection) -> None:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in _REQUIRED_TABLES if t not in names]
        if missing:
            raise CorruptDatabaseError(
                f"{self.db_path or ':memory:'} is marked as a localchat database but lacks tables "
                f"{', '.join(missing)}; it has not been modified"
            )

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
            if _is_corruption(exc):
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
            "title": _check_text(title, "title"),
            "model": _check_optional_text(model, "model"),
            "system_prompt": _check_optional_text(system_prompt, "system_prompt"),
            "settings": _dump_object(_check_object(settings, "settings") or {}),
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
        title: str = _UNSET,
        model: str | None = _UNSET,
        system_prompt: str | None = _UNSET,
        settings: dict[str, Any] = _UNSET,
    ) -> Conversation:
        """Change the given fields (omitted ones are kept)."""
        changes: dict[str, Any] = {}
        if title is not _UNSET:
            changes["title"] = _check_text(title, "title")
        if model is not _UNSET:
            changes["model"] = _check_optional_text(model, "model")
        if system_prompt is not _UNSET:
            changes["system_prompt"] = _check_optional_text(system_prompt, "system_prompt")
        if settings is not _UNSET:
            if settings is None:
                raise InvalidInputError("settings must be a JSON object (use {} for none)")
            changes["settings"] = _dump_object(_check_object(settings, "settings"))
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
        sql = _CONVERSATION_SELECT + " ORDER BY c.updated_at DESC, c.id DESC LIMIT ? OFFSET ?"
        with self._read():
            rows = self.db.query(sql, [-1 if limit is None else limit, offset])
            return [_conversation_from_row(r) for r in rows]

    def search_conversations(self, text: str, *, limit: int | None = None) -> list[Conversation]:
        """Conversations whose title, system prompt or any message (any branch) contains ``text``.

        Substring match, case-insensitive for ASCII; newest first.
        """
        _check_text(text, "search text")
        if not text:
            return self.list_conversations(limit=limit)
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql = (
            _CONVERSATION_SELECT
            + " WHERE c.title LIKE :p ESCAPE '\\' OR c.system_prompt LIKE :p ESCAPE '\\'"
            " OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id"
            " AND m.content LIKE :p ESCAPE '\\')"
            " ORDER BY c.updated_at DESC, c.id DESC LIMIT :limit"
        )
        with self._read():
            rows = self.db.query(sql, {"p": pattern, "limit": -1 if limit is None else limit})
            return [_conversation_from_row(r) for r in rows]

    def _conversation(self, conversation_id: int, *, count: bool = True) -> Conversation:
        _check_id(conversation_id, "conversation id")
        # The message count costs a scan of the conversation's index entries;
        # per-message writes only need the row itself.
        select = _CONVERSATION_SELECT if count else "SELECT c.* FROM conversations c"
        rows = list(self.db.query(select + " WHERE c.id = ?", [conversation_id]))
        if not rows:
            raise NotFoundError(f"no conversation with id {conversation_id}")
        return _conversation_from_row(rows[0])

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
            "role": _check_role(role),
            "content": _check_text(content, "content"),
            "token_ids": _dump_ids(_check_token_ids(token_ids)),
            "model": _check_optional_text(model, "model"),
            "sampling": _dump_object(_check_object(sampling, "sampling")),
            "finish_reason": _check_finish_reason(finish_reason),
            "prompt_tokens": _check_count(prompt_tokens, "prompt_tokens"),
            "generated_tokens": _check_count(generated_tokens, "generated_tokens"),
            "ttft_s": _check_float(ttft_s, "ttft_s"),
            "tokens_per_s": _check_float(tokens_per_s, "tokens_per_s"),
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
        _check_id(message_id, "message id")
        rows = list(self.db.query("SELECT * FROM messages WHERE id = ?", [message_id]))
        if not rows:
            raise NotFoundError(f"no message with id {message_id}")
        return _message_from_row(rows[0])

    def list_messages(self, conversation_id: int) -> list[Message]:
        """Every message of a conversation, all branches, oldest first (parents before children)."""
        with self._read():
            self._conversation(conversation_id, count=False)
            rows = self.db.query(
                "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", [conversation_id]
            )
            return [_message_from_row(r) for r in rows]

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
            return [_message_from_row(r) for r in rows]

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

    def edit_message(
        self, message_id: int, content: str, *, token_ids: Sequence[int] | None = None
    ) -> Message:
        """Add an edited copy of a user message as its new sibling; it becomes current."""
        with self.transaction():
            original = self._message(message_id)
            if original.role != "user":
                raise InvalidInputError(
                    f"message {message_id} is a {original.role} message; only user messages are edited "
                    "(regenerate assistant replies)"
                )
            return self.append_message(
                original.conversation_id, original.parent_id, "user", content, token_ids=token_ids
            )

    def regenerate(
        self,
        message_id: int,
        content: str,
        *,
        token_ids: Sequence[int] | None = None,
        model: str | None = None,
        sampling: dict[str, Any] | None = None,
        finish_reason: str | None = "stop",
        prompt_tokens: int | None = None,
        generated_tokens: int | None = None,
        ttft_s: float | None = None,
        tokens_per_s: float | None = None,
    ) -> Message:
        """Add a new reply as a sibling of assistant message ``message_id``; it becomes current.

        To stream the new reply instead, call ``begin_reply(conversation_id,
        get_message(message_id).parent_id)``.
        """
        with self.transaction():
            original = self._regenerable(message_id)
            return self.append_message(
                original.conversation_id, original.parent_id, "assistant", content,
                token_ids=token_ids, model=model, sampling=sampling, finish_reason=finish_reason,
                prompt_tokens=prompt_tokens, generated_tokens=generated_tokens,
                ttft_s=ttft_s, tokens_per_s=tokens_per_s,
            )

    def _regenerable(self, message_id: int) -> Message:
        original = self._message(message_id)
        if original.role != "assistant":
            raise InvalidInputError(
                f"message {message_id} is a {original.role} message; only assistant replies are "
                "regenerated (edit user messages)"
            )
        return original

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
    ) -> ReplyWriter:
        """Create an empty assistant message now and return a writer that saves it as it grows.

        The row exists (finish_reason ``"streaming"``) and is the current leaf
        from the first moment, so a crash keeps everything flushed so far.
        """
        row = {
            "role": "assistant",
            "content": "",
            "token_ids": "[]",
            "model": _check_optional_text(model, "model"),
            "sampling": _dump_object(_check_object(sampling, "sampling")),
            "finish_reason": STREAMING,
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
        """The whole conversation, every branch, as JSON text.

        Message ids in the file are local (1..n in creation order), so the same
        conversation exports to the same bytes in any database.
        """
        with self._read():
            conversation = self._conversation(conversation_id)
            messages = self.list_messages(conversation_id)
        local = {m.id: i for i, m in enumerate(messages, start=1)}
        head = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "conversation": {
                "title": conversation.title,
                "created_at": conversation.created_at,
                "updated_at": conversation.updated_at,
                "model": conversation.model,
                "system_prompt": conversation.system_prompt,
                "settings": conversation.settings,
                "current_leaf": local.get(conversation.current_leaf_id),  # type: ignore[arg-type]
            },
        }
        rows = [
            {
                "id": local[m.id],
                "parent": None if m.parent_id is None else local[m.parent_id],
                "role": m.role,
                "content": m.content,
                "token_ids": m.token_ids,
                "created_at": m.created_at,
                "model": m.model,
                "sampling": m.sampling,
                "finish_reason": m.finish_reason,
                "prompt_tokens": m.prompt_tokens,
                "generated_tokens": m.generated_tokens,
                "ttft_s": m.ttft_s,
                "tokens_per_s": m.tokens_per_s,
            }
            for m in messages
        ]

        def dump(obj: object) -> str:
            return json.dumps(obj, ensure_ascii=False, allow_nan=False)

        # One message per line: readable, diffable, and a long token list stays on one line.
        body = "".join(f"\n  {dump(r)}," for r in rows).rstrip(",")
        return dump(head)[:-1] + f', "messages": [{body}\n]}}\n'

    def import_json(self, text: str | bytes) -> Conversation:
        """Add a conversation from ``export_json`` text as a new conversation.

        The file is validated in full before anything is written, and written in
        one transaction: a bad file changes nothing.
        """
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"not a localchat export: invalid JSON ({exc})") from None
        conversation, messages, leaf = _parse_export(doc)
        with self.transaction():
            cid = self.db["conversations"].insert(conversation).last_pk
            # Ids are taken in one block above anything ever used (AUTOINCREMENT
            # never reuses), keeping file order, so parents stay older than children.
            base = self._conn.execute(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),"
                " coalesce((SELECT max(id) FROM messages), 0))"
            ).fetchone()[0]
            new_id = {local: base + i for i, local in enumerate((m["id"] for m in messages), start=1)}
            rows = [
                {
                    **{k: v for k, v in m.items() if k not in ("id", "parent")},
                    "id": new_id[m["id"]],
                    "conversation_id": cid,
                    "parent_id": None if m["parent"] is None else new_id[m["parent"]],
                }
                for m in messages
            ]
            if rows:
                self.db["messages"].insert_all(rows, batch_size=500)
            if leaf is not None:
                self.db["conversations"].update(cid, {"current_leaf_id": new_id[leaf]})
            return self._conversation(cid)

    def export_markdown(self, conversation_id: int) -> str:
        """The current branch as Markdown, for reading or sharing."""
        with self._read():
            conversation = self._conversation(conversation_id)
            path = self.current_path(conversation_id)
        lines = [f"# {conversation.title or 'Untitled conversation'}", ""]
        created = datetime.fromtimestamp(conversation.created_at, tz=timezone.utc)
        lines.append(f"- Created: {created:%Y-%m-%d %H:%M} UTC")
        if conversation.model:
            lines.append(f"- Model: {conversation.model}")
        lines.append(f"- Messages on this branch: {len(path)} of {conversation.message_count}")
        if conversation.system_prompt:
            lines += ["", "## System", "", conversation.system_prompt]
        for m in path:
            lines += ["", f"## {m.role.capitalize()}", "", m.content]
            details = []
            if m.finish_reason == STREAMING:
                details.append("interrupted")
            elif m.finish_reason and m.finish_reason != "stop":
                details.append(f"finish: {m.finish_reason}")
            if m.generated_tokens is not None:
                details.append(f"{m.generated_tokens} tokens")
            if m.tokens_per_s is not None:
                details.append(f"{m.tokens_per_s:.1f} tok/s")
            if details:
                lines += ["", f"*{' · '.join(details)}*"]
        return "\n".join(lines) + "\n"



def _parse_export(doc: object) -> tuple[dict[str, Any], list[dict[str, Any]], int | None]:
    """Validate an export document; returns (conversation row, message rows, local leaf id)."""
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise InvalidInputError(f"not a localchat export (expected \"format\": \"{EXPORT_FORMAT}\")")
    version = doc.get("version")
    if version != EXPORT_VERSION:
        raise InvalidInputError(f"unsupported export version {version!r} (this localchat reads {EXPORT_VERSION})")
    extra = set(doc) - {"format", "version", "conversation", "messages"}
    if extra:
        raise InvalidInputError(f"unknown top-level keys {sorted(extra)}")
    conv = doc.get("conversation")
    if not isinstance(conv, dict):
        raise InvalidInputError("\"conversation\" must be an object")
    # Unknown keys are refused rather than dropped: an import must lose nothing.
    extra = set(conv) - set(_EXPORT_CONVERSATION_KEYS)
    if extra:
        raise InvalidInputError(f"unknown conversation keys {sorted(extra)}")
    settings = conv.get("settings", {})
    if settings is None:
        settings = {}
    conversation = {
        "title": _check_text(conv.get("title", ""), "conversation title"),
        "created_at": _check_float(conv.get("created_at"), "conversation created_at", required=True),
        "updated_at": _check_float(conv.get("updated_at"), "conversation updated_at", required=True),
        "model": _check_optional_text(conv.get("model"), "conversation model"),
        "system_prompt": _check_optional_text(conv.get("system_prompt"), "system_prompt"),
        "settings": _dump_object(_check_object(settings, "settings")),
    }
    raw_messages = doc.get("messages")
    if not isinstance(raw_messages, list):
        raise InvalidInputError("\"messages\" must be a list")
    seen: set[int] = set()
    messages: list[dict[str, Any]] = []
    for n, m in enumerate(raw_messages):
        where = f"message #{n + 1}"
        if not isinstance(m, dict):
            raise InvalidInputError(f"{where} must be an object")
        extra = set(m) - set(_EXPORT_MESSAGE_KEYS)
        if extra:
            raise InvalidInputError(f"{where}: unknown keys {sorted(extra)}")
        try:
            local = _check_id(m.get("id"), "id")
            if local in seen:
                raise InvalidInputError(f"duplicate id {local}")
            parent = m.get("parent")
            if parent is not None and (_check_id(parent, "parent") not in seen):
                raise InvalidInputError(f"parent {parent} is not an earlier message in this file")
            messages.append({
                "id": local,
                "parent": parent,
                "role": _check_role(m.get("role")),
                "content": _check_text(m.get("content"), "content"),
                "token_ids": _dump_ids(_check_token_ids(m.get("token_ids"))),
                "created_at": _check_float(m.get("created_at"), "created_at", required=True),
                "model": _check_optional_text(m.get("model"), "model"),
                "sampling": _dump_object(_check_object(m.get("sampling"), "sampling")),
                "finish_reason": _check_finish_reason(m.get("finish_reason")),
                "prompt_tokens": _check_count(m.get("prompt_tokens"), "prompt_tokens"),
                "generated_tokens": _check_count(m.get("generated_tokens"), "generated_tokens"),
                "ttft_s": _check_float(m.get("ttft_s"), "ttft_s"),
                "tokens_per_s": _check_float(m.get("tokens_per_s"), "tokens_per_s"),
            })
        except InvalidInputError as exc:
            raise InvalidInputError(f"{where}: {exc}") from None
        seen.add(local)
    leaf = conv.get("current_leaf")
    if leaf is not None and _check_id(leaf, "current_leaf") not in seen:
        raise InvalidInputError(f"current_leaf {leaf} is not a message in this file")
    return conversation, messages, leaf


# --------------------------------------------------------------------------- streaming writer


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
        self._check_open()
        self._parts.append(_check_text(text, "text"))
        self._token_ids.extend(_check_token_ids(token_ids) or ())
        self._dirty = True
        return self._maybe_flush()

    def update(self, content: str, token_ids: Sequence[int] | None = None) -> bool:
        """Replace the text (and ids, if given) so far; returns True if this call saved the reply."""
        self._check_open()
        self._parts = [_check_text(content, "content")]
        if token_ids is not None:
            self._token_ids = _check_token_ids(token_ids) or []
        self._dirty = True
        return self._maybe_flush()

    def flush(self) -> None:
        """Save the reply so far now."""
        self._check_open()
        if self._dirty:
            self._store._save_reply(
                self.message_id, {"content": self.content, "token_ids": _dump_ids(self._token_ids)}
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
    ) -> Message:
        """Save the final text, finish reason and stats; the message is immutable afterwards."""
        self._check_open()
        if finish_reason == STREAMING or not _check_finish_reason(finish_reason):
            raise InvalidInputError(f"finish_reason {finish_reason!r} does not finish a reply")
        if content is not None:
            self._parts = [_check_text(content, "content")]
        if token_ids is not None:
            self._token_ids = _check_token_ids(token_ids) or []
        message = self._store._save_reply(
            self.message_id,
            {
                "content": self.content,
                "token_ids": _dump_ids(self._token_ids),
                "finish_reason": finish_reason,
                "prompt_tokens": _check_count(prompt_tokens, "prompt_tokens"),
                "generated_tokens": _check_count(
                    len(self._token_ids) if generated_tokens is None else generated_tokens,
                    "generated_tokens",
                ),
                "ttft_s": _check_float(ttft_s, "ttft_s"),
                "tokens_per_s": _check_float(tokens_per_s, "tokens_per_s"),
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

    def _check_open(self) -> None:
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
