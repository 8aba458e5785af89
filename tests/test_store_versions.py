"""Opening databases written by other versions: an older file (a real version-1 file, built with that
version's own schema) is migrated in place in one transaction with a backup kept; a newer one is
refused untouched with a clear message, by the store and by the commands."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from localchat.chat.store import SchemaVersionError, Store, StoreError
from localchat.chat.store import schema as store_schema


def write_v1_file(path: Path) -> None:
    """A database as localchat's schema version 1 wrote it (WAL, our application id, v1's tables)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    for statement in store_schema._SCHEMA_V1:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(f"PRAGMA application_id = {store_schema.APPLICATION_ID}")
    conn.execute("INSERT INTO conversations (title, created_at, updated_at, model, settings) VALUES ('old chat', 1, 2, 'm', '{}')")
    conn.execute("INSERT INTO messages (conversation_id, parent_id, role, content, token_ids, created_at) VALUES (1, NULL, 'user', 'hello', '[1,2]', 1)")
    conn.execute("INSERT INTO messages (conversation_id, parent_id, role, content, token_ids, created_at, finish_reason,"
                 " generated_tokens) VALUES (1, 1, 'assistant', 'hi there', '[3,4]', 2, 'stop', 2)")
    conn.execute("INSERT INTO messages (conversation_id, parent_id, role, content, token_ids, created_at, finish_reason)"
                 " VALUES (1, 1, 'assistant', 'cut off', '[5]', 3, 'streaming')")
    conn.execute("UPDATE conversations SET current_leaf_id = 2")
    conn.execute("COMMIT")
    conn.close()


def rows(path: Path) -> dict:
    conn = sqlite3.connect(path)
    try:
        return {
            "version": conn.execute("PRAGMA user_version").fetchone()[0],
            "conversations": conn.execute("SELECT id, title, current_leaf_id FROM conversations").fetchall(),
            "messages": conn.execute("SELECT id, parent_id, role, content, token_ids, finish_reason FROM messages ORDER BY id").fetchall(),
            "integrity": conn.execute("PRAGMA integrity_check").fetchall(),
        }
    finally:
        conn.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_version_1_file_is_migrated_in_place_with_a_backup(tmp_path):
    path = tmp_path / "chats.db"
    write_v1_file(path)
    before = rows(path)
    assert before["version"] == 1
    with Store(path) as store:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == store_schema.SCHEMA_VERSION
        messages = store.list_messages(1)
        assert [m.content for m in messages] == ["hello", "hi there", "cut off"]
        assert messages[1].token_ids == [3, 4] and messages[1].prefix_hit_tokens is None  # a v2 column, empty
        assert [m.content for m in store.current_path(1)] == ["hello", "hi there"]
        # The conversation goes on in the migrated file, and the interrupted reply gets a new sibling.
        store.append_message(1, 2, "user", "and now?")
        store.begin_reply(1, 1, model="m").finish("stop", content="again")
        assert [store.get_message(i).content for i in store.siblings(3).ids] == ["hi there", "cut off", "again"]
    after = rows(path)
    assert after["integrity"] == [("ok",)]
    assert after["messages"][:3] == before["messages"]
    backup = tmp_path / "chats.db.v1.bak"
    assert rows(backup) == before  # the file as it was, whole
    # Opening it again migrates nothing and makes no second backup.
    Store(path).close()
    assert sorted(p.name for p in tmp_path.glob("*.bak")) == ["chats.db.v1.bak"]


def test_an_existing_backup_is_never_overwritten(tmp_path):
    path = tmp_path / "chats.db"
    write_v1_file(path)
    (tmp_path / "chats.db.v1.bak").write_bytes(b"an older backup")
    Store(path).close()
    assert (tmp_path / "chats.db.v1.bak").read_bytes() == b"an older backup"
    assert rows(tmp_path / "chats.db.v1.1.bak")["version"] == 1


def test_a_migration_that_fails_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "chats.db"
    write_v1_file(path)
    before = rows(path)

    def broken(conn):
        conn.execute("ALTER TABLE messages ADD COLUMN half_done INTEGER")
        raise sqlite3.OperationalError("disk I/O error (injected)")

    monkeypatch.setattr(store_schema, "_MIGRATIONS", [*store_schema._MIGRATIONS, broken])
    with pytest.raises(StoreError, match="injected"):
        Store(path)
    assert rows(path) == before  # one transaction: not even version 2's columns were kept
    assert rows(tmp_path / "chats.db.v1.bak") == before


def _newer_file(tmp_path: Path) -> Path:
    path = tmp_path / "newer.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute(f"PRAGMA user_version = {store_schema.SCHEMA_VERSION + 1}")
    conn.close()
    return path


def test_a_newer_file_is_refused_untouched(tmp_path):
    path = _newer_file(tmp_path)
    before, listing = digest(path), sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SchemaVersionError, match=r"newer than this localchat understands .* upgrade localchat"):
        Store(path)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no backup, no journal left behind


@pytest.mark.parametrize("command", [["chats", "list"], ["chats", "import", "-"], ["app", "--port", "7999"]])
def test_the_commands_refuse_a_newer_file_with_a_message(tmp_path, command):
    path = _newer_file(tmp_path)
    before = digest(path)
    doc = json.dumps({"format": "localchat.conversation", "version": 1, "conversation": {}, "messages": []})
    proc = subprocess.run([sys.executable, "-m", "localchat", *command, "--db", str(path)], input=doc,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "newer than this localchat understands" in proc.stderr and "Traceback" not in proc.stderr
    assert digest(path) == before
