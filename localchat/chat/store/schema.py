"""The database file: its schema, its migrations, and opening it safely.

A file that is not an SQLite database, is damaged, or belongs to another application raises before
anything is written to it. The schema carries a version (``PRAGMA user_version``) and is upgraded by
ordered migrations; ``PRAGMA application_id`` marks the file as ours.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Callable

from localchat import settings
from localchat.chat.store.rows import (
    CorruptDatabaseError,
    NotFoundError,
    NotOurDatabaseError,
    SchemaVersionError,
    StoreError,
    is_corruption,
)

APPLICATION_ID = 0x4C434854  # "LCHT" in the SQLite header: how we recognise our own files
_SQLITE_MAGIC = b"SQLite format 3\x00"


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
    return settings.data_dir() / "chats.db"



# --------------------------------------------------------------------------- opening



def connect(db_path: Path | None, *, create: bool, check: bool, busy_timeout: float) -> sqlite3.Connection:
    """Open (creating and migrating if needed) the database at `db_path` (None: in memory)."""
    target = ":memory:" if db_path is None else str(db_path)
    if db_path is not None:
        if db_path.is_dir():
            raise StoreError(f"{db_path} is a directory, not a database file")
        if db_path.exists():
            with open(db_path, "rb") as f:
                header = f.read(len(_SQLITE_MAGIC))
            if header and header != _SQLITE_MAGIC:
                raise CorruptDatabaseError(
                    f"{db_path} is not an SQLite database (unrecognised header); "
                    "it has not been modified. Move it aside or choose another file with --db."
                )
        elif not create:
            raise NotFoundError(f"no database at {db_path}")
        else:
            db_path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: the driver never opens transactions behind our
    # back; every transaction here is explicit.
    conn = sqlite3.connect(
        target, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        _validate(conn, db_path, check=check)
        if db_path is not None:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"could not switch {db_path} to WAL mode (got {mode!r})")
        _migrate(conn, db_path)
    except sqlite3.Error as exc:
        conn.close()
        if is_corruption(exc):
            raise CorruptDatabaseError(
                f"{target} is damaged or not a database ({exc}); it has not been modified"
            ) from exc
        raise StoreError(f"cannot open {target}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn

def _validate(conn: sqlite3.Connection, db_path: Path | None, *, check: bool) -> None:
    """Refuse files that are damaged, foreign or too new, before writing anything."""
    where = db_path or ":memory:"
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

def _migrate(conn: sqlite3.Connection, db_path: Path | None) -> None:
    if conn.execute("PRAGMA user_version").fetchone()[0] >= len(_MIGRATIONS):
        check_tables(conn, db_path)
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have just created
        # or migrated the same file.
        _validate(conn, db_path, check=False)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in range(version, len(_MIGRATIONS)):
            _MIGRATIONS[step](conn)
            conn.execute(f"PRAGMA user_version = {step + 1}")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        check_tables(conn, db_path)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise

def check_tables(conn: sqlite3.Connection, db_path: Path | None) -> None:
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [t for t in _REQUIRED_TABLES if t not in names]
    if missing:
        raise CorruptDatabaseError(
            f"{db_path or ':memory:'} is marked as a localchat database but lacks tables "
            f"{', '.join(missing)}; it has not been modified"
        )
