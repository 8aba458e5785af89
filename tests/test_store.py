"""Tests for localchat.chat.store (conversation trees in SQLite) and the `chats` CLI."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import queue
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localchat.chat.store import schema as store_schema
from localchat.cli import main as localchat_main
from localchat.cli.chats import add_chats_parser, run_chats
from localchat.chat.store import (
    APPLICATION_ID,
    CURRENT,
    SCHEMA_VERSION,
    STREAMING,
    CorruptDatabaseError,
    InvalidInputError,
    NotFoundError,
    NotOurDatabaseError,
    SchemaVersionError,
    Siblings,
    Store,
    StoreError,
    default_db_path,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "helpers" / "store_worker.py"


# --------------------------------------------------------------------------- helpers


def chats_main(argv):
    return localchat_main(["chats", *argv])


def add_sibling(store, message_id, content, **fields):
    """A new sibling of a message, as ChatService adds an edit or a regenerate; it becomes current."""
    original = store.get_message(message_id)
    return store.append_message(original.conversation_id, original.parent_id, original.role, content, **fields)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chats.db"


@pytest.fixture
def store(db_path: Path):
    s = Store(db_path)
    # A strictly increasing fake wall clock makes "newest first" deterministic.
    ticks = itertools.count(1_700_000_000.0, 1.0)
    s._now = lambda: next(ticks)
    yield s
    s.close()


def dump(path: Path) -> str:
    """Every row, index, trigger and sequence value, via a separate connection."""
    conn = sqlite3.connect(path)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def conversation_with_branches(store: Store):
    """u1 -> (a1, a2); u1' (edit of u1) -> a3 -> u2 -> a4. Current leaf: a4."""
    c = store.create_conversation("Branches", model="smollm2", system_prompt="Be brief.", settings={"temperature": 0.7})
    u1 = store.append_message(c.id, None, "user", "Hello", token_ids=[1, 2, 3])
    a1 = store.append_message(
        c.id, u1.id, "assistant", "Hi!", token_ids=[4, 5], model="smollm2",
        sampling={"temperature": 0.7, "top_p": 0.9}, finish_reason="stop",
        prompt_tokens=3, generated_tokens=2, ttft_s=0.125, tokens_per_s=31.5,
    )
    a2 = add_sibling(store, a1.id, "Hello there!", token_ids=[6, 7, 8], model="smollm2", finish_reason="stop")
    u1e = add_sibling(store, u1.id, "Hello, world", token_ids=[1, 2, 9])
    a3 = store.append_message(c.id, u1e.id, "assistant", "Hi, world.", token_ids=[10], finish_reason="length")
    u2 = store.append_message(c.id, a3.id, "user", "¿Qué tal? 🙂 \"quotes\" \\ back\nslash", token_ids=[2**40, 0])
    a4 = store.append_message(c.id, u2.id, "assistant", "Bien.", token_ids=[])
    return c, dict(u1=u1, a1=a1, a2=a2, u1e=u1e, a3=a3, u2=u2, a4=a4)


class Worker:
    """A store_worker.py process whose stdout lines arrive on a queue (so reads can time out)."""

    def __init__(self, *args: object, env_extra: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float = 30.0) -> str:
        line = self.lines.get(timeout=timeout)
        if line is None:
            self.proc.wait(timeout=10)
            raise AssertionError(f"worker exited {self.proc.returncode}: {self.proc.stderr.read()}")
        return line

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert self.proc.returncode == -signal.SIGKILL

    def finish(self, timeout: float = 60.0) -> int:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode


def assert_chain(store: Store, conversation_id: int) -> list:
    """The conversation is a single chain and the current leaf is its end; returns it."""
    messages = store.list_messages(conversation_id)
    children: dict[int | None, int] = {}
    for m in messages:
        children[m.parent_id] = children.get(m.parent_id, 0) + 1
    forks = {p: n for p, n in children.items() if n > 1}
    assert not forks, f"concurrent appends forked the chain at {forks}"
    path = store.current_path(conversation_id)
    assert [m.id for m in path] == [m.id for m in messages]
    return path


# --------------------------------------------------------------------------- opening, schema, safety


def test_default_db_path_honours_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALCHAT_DB", str(tmp_path / "env.db"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "env.db"
    monkeypatch.delenv("LOCALCHAT_DB")
    assert default_db_path() == tmp_path / "xdg" / "localchat" / "chats.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / ".local" / "share" / "localchat" / "chats.db"
    # Store() with no path uses it and creates the directory.
    with Store() as s:
        assert s.db_path == default_db_path()
    assert default_db_path().exists()


def test_fresh_database_is_wal_with_foreign_keys_version_and_indexes(store, db_path):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(store_schema._MIGRATIONS)
    assert store.db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert {"conversations", "messages"} <= set(store.db.table_names())
    indexes = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"messages_by_conversation_parent", "messages_by_parent", "conversations_by_updated"} <= indexes
    # The UI's queries use those indexes rather than scanning.
    plan = " ".join(
        r[3] for r in store.db.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE conversation_id = 1 AND parent_id IS 2 ORDER BY id"
        )
    )
    assert "messages_by_conversation_parent" in plan
    plan = " ".join(
        r[3] for r in store.db.execute("EXPLAIN QUERY PLAN SELECT * FROM conversations ORDER BY updated_at DESC, id DESC")
    )
    assert "conversations_by_updated" in plan
    # Reopening an up-to-date database changes nothing.
    store.close()
    before = dump(db_path)
    Store(db_path).close()
    assert dump(db_path) == before


def test_memory_database_works():
    with Store(":memory:") as s:
        c = s.create_conversation("m")
        s.append_message(c.id, None, "user", "hi")
        assert len(s.current_path(c.id)) == 1


def test_migrations_run_in_order_once_and_roll_back_on_failure(db_path, monkeypatch):
    with Store(db_path) as s:
        c = s.create_conversation("old")
        s.append_message(c.id, None, "user", "kept")

    def broken(conn):
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(store_schema, "_MIGRATIONS", [*store_schema._MIGRATIONS, broken])
    before = dump(db_path)
    with pytest.raises(RuntimeError, match="migration bug"):
        Store(db_path)
    assert dump(db_path) == before  # the current version, no half_done table

    calls = []

    def add_pinned(conn):
        calls.append(1)
        conn.execute("ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0")

    shipped = [m for m in store_schema._MIGRATIONS if m is not broken]
    monkeypatch.setattr(store_schema, "_MIGRATIONS", [*shipped, add_pinned])
    with Store(db_path) as s:
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == len(shipped) + 1
        assert "pinned" in s.db["conversations"].columns_dict
        assert [m.content for m in s.current_path(c.id)] == ["kept"]
    Store(db_path).close()
    assert calls == [1]


def test_newer_schema_version_is_refused_untouched(db_path):
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    digest = sha256(db_path)
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        Store(db_path)
    assert sha256(db_path) == digest


def test_garbage_file_is_a_clear_error_and_never_overwritten(tmp_path):
    for name, content in {
        "text.db": b"these are my notes, not a database\n" * 50,
        "random.db": random.Random(1).randbytes(8192),
        "short.db": b"SQLite",
    }.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CorruptDatabaseError, match="not an SQLite database|damaged") as info:
            Store(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, StoreError)
        assert path.read_bytes() == content


def test_damaged_database_is_a_clear_error_and_never_overwritten(db_path):
    with Store(db_path) as s:
        c = s.create_conversation("to be damaged")
        with s.transaction():
            for i in range(400):
                s.append_message(c.id, CURRENT, "user", f"message {i} " + "z" * 500)
    assert not Path(str(db_path) + "-wal").exists() or Path(str(db_path) + "-wal").stat().st_size == 0
    data = bytearray(db_path.read_bytes())
    assert len(data) > 40 * 4096
    data[10 * 4096 : 30 * 4096] = random.Random(2).randbytes(20 * 4096)
    db_path.write_bytes(bytes(data))
    with pytest.raises(CorruptDatabaseError, match="damaged"):
        Store(db_path)
    assert db_path.read_bytes() == bytes(data)
    # Truncation is damage too.
    db_path.write_bytes(bytes(data[: 20 * 4096]))
    with pytest.raises(CorruptDatabaseError):
        Store(db_path)
    assert db_path.read_bytes() == bytes(data[: 20 * 4096])


def test_foreign_sqlite_database_is_refused_untouched(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute("INSERT INTO notes VALUES ('mine')")
    conn.commit()
    conn.close()
    digest = sha256(path)
    with pytest.raises(NotOurDatabaseError, match="not a localchat one.*notes"):
        Store(path)
    assert sha256(path) == digest
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    conn.close()


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with Store(empty) as s:  # a zero-byte file holds nothing to lose: it becomes a store
        assert s.list_conversations() == []
    with pytest.raises(NotFoundError, match="no database"):
        Store(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


# --------------------------------------------------------------------------- conversations


def test_create_rename_update_delete_list_newest_first(store):
    a = store.create_conversation("A", model="m1", system_prompt="sys", settings={"max_tokens": 64})
    b = store.create_conversation("B")
    c = store.create_conversation()
    assert (a.title, a.model, a.system_prompt, a.settings, a.current_leaf_id, a.message_count) == (
        "A", "m1", "sys", {"max_tokens": 64}, None, 0,
    )
    assert c.title == "" and c.settings == {}
    assert [x.id for x in store.list_conversations()] == [c.id, b.id, a.id]
    store.append_message(a.id, None, "user", "bump")  # activity moves A to the top
    assert [x.id for x in store.list_conversations()] == [a.id, c.id, b.id]
    renamed = store.rename_conversation(b.id, "B renamed")
    assert renamed.title == "B renamed" and renamed.updated_at > renamed.created_at
    assert [x.id for x in store.list_conversations(limit=2)] == [b.id, a.id]
    assert [x.id for x in store.list_conversations(limit=2, offset=2)] == [c.id]
    updated = store.update_conversation(c.id, model="m2", system_prompt=None, settings={"temperature": 0})
    assert (updated.model, updated.system_prompt, updated.settings, updated.title) == ("m2", None, {"temperature": 0}, "")
    assert store.get_conversation(a.id).message_count == 1
    store.delete_conversation(a.id)
    assert [x.id for x in store.list_conversations()] == [c.id, b.id]
    with pytest.raises(NotFoundError):
        store.get_conversation(a.id)


def test_delete_removes_every_branch_only_of_that_conversation_and_ids_are_never_reused(store):
    keep, _ = conversation_with_branches(store)
    gone, msgs = conversation_with_branches(store)
    top = max(m.id for m in msgs.values())
    keep_export = store.export_json(keep.id)
    store.delete_conversation(gone.id)
    assert store.db.execute("SELECT count(*) FROM messages WHERE conversation_id = ?", [gone.id]).fetchone()[0] == 0
    assert store.export_json(keep.id) == keep_export
    for m in msgs.values():
        with pytest.raises(NotFoundError):
            store.get_message(m.id)
    fresh = store.create_conversation("new")
    assert fresh.id > gone.id
    assert store.append_message(fresh.id, None, "user", "x").id > top


def test_search_matches_title_prompt_and_any_branch(store):
    c, msgs = conversation_with_branches(store)  # "Hi!" is only on a side branch
    other = store.create_conversation("Cooking 100% pasta")
    third = store.create_conversation("Cooking 100x rice", system_prompt="You are a CHEF")
    store.append_message(third.id, None, "user", "snake_case please")
    assert [x.id for x in store.search_conversations("hi!")] == [c.id]
    assert [x.id for x in store.search_conversations("QUÉ")] == []  # ASCII-only case folding
    assert [x.id for x in store.search_conversations("qué")] == [c.id]
    assert [x.id for x in store.search_conversations("100%")] == [other.id]  # % is literal
    assert [x.id for x in store.search_conversations("e_c")] == [third.id]  # _ is literal
    assert [x.id for x in store.search_conversations("chef")] == [third.id]
    assert {x.id for x in store.search_conversations("cooking")} == {other.id, third.id}
    assert store.search_conversations("nowhere to be found") == []
    assert len(store.search_conversations("")) == 3


# --------------------------------------------------------------------------- messages and branches


def test_append_path_and_current_leaf(store):
    c = store.create_conversation("t")
    u = store.append_message(c.id, None, "user", "q", token_ids=[5, 6])
    a = store.append_message(c.id, u.id, "assistant", "r", token_ids=[7], finish_reason="stop",
                             sampling={"temperature": 0.0}, prompt_tokens=2, generated_tokens=1,
                             ttft_s=0.5, tokens_per_s=12.25, model="m")
    assert store.get_conversation(c.id).current_leaf_id == a.id
    got = store.get_message(a.id)
    assert got == a
    assert (got.parent_id, got.role, got.content, got.token_ids, got.sampling, got.finish_reason) == (
        u.id, "assistant", "r", [7], {"temperature": 0.0}, "stop",
    )
    assert (got.prompt_tokens, got.generated_tokens, got.ttft_s, got.tokens_per_s, got.model) == (2, 1, 0.5, 12.25, "m")
    assert [m.id for m in store.path(a.id)] == [u.id, a.id]
    assert [m.id for m in store.current_path(c.id)] == [u.id, a.id]
    # CURRENT appends under the current leaf; make_current=False leaves the leaf alone.
    u2 = store.append_message(c.id, CURRENT, "user", "next")
    assert u2.parent_id == a.id
    side = store.append_message(c.id, a.id, "user", "aside", make_current=False)
    assert store.get_conversation(c.id).current_leaf_id == u2.id
    assert [m.id for m in store.path(side.id)] == [u.id, a.id, side.id]
    # Prompt ids of the branch are the concatenation of the path's exact ids.
    assert [t for m in store.current_path(c.id)[:2] for t in m.token_ids] == [5, 6, 7]
    assert store.current_path(store.create_conversation("empty").id) == []


def test_siblings_switch_edit_and_regenerate(store):
    c, m = conversation_with_branches(store)
    assert store.siblings(m["a1"].id).ids == (m["a1"].id, m["a2"].id)
    assert store.siblings(m["a1"].id).index == 0
    assert store.siblings(m["a2"].id).index == 1 and store.siblings(m["a2"].id).count == 2
    # Roots are siblings of each other within their conversation only.
    conversation_with_branches(store)
    assert store.siblings(m["u1"].id).ids == (m["u1"].id, m["u1e"].id)
    assert store.siblings(m["u1e"].id).index == 1
    assert store.siblings(m["a4"].id).ids == (m["a4"].id,)
    assert [x.id for x in store.current_path(c.id)] == [m["u1e"].id, m["a3"].id, m["u2"].id, m["a4"].id]

    # Switching to the old root resumes that branch at its newest leaf.
    path = store.switch_branch(m["u1"].id)
    assert [x.id for x in path] == [m["u1"].id, m["a2"].id]
    assert store.get_conversation(c.id).current_leaf_id == m["a2"].id
    path = store.switch_branch(m["a1"].id)
    assert [x.id for x in path] == [m["u1"].id, m["a1"].id]
    path = store.switch_branch(m["u1e"].id)
    assert [x.id for x in path][-1] == m["a4"].id

    # Edit: a new user sibling, same parent, becomes current; the original is untouched.
    e = add_sibling(store, m["u2"].id, "edited", token_ids=[42])
    assert (e.parent_id, e.role, e.content, e.token_ids) == (m["a3"].id, "user", "edited", [42])
    assert store.siblings(e.id).ids == (m["u2"].id, e.id)
    assert store.get_message(m["u2"].id) == m["u2"]
    assert store.get_conversation(c.id).current_leaf_id == e.id

    # Regenerate: a new assistant sibling with its own stats, becomes current.
    r = add_sibling(store, m["a3"].id, "again", token_ids=[11, 12], finish_reason="stop", generated_tokens=2)
    assert (r.parent_id, r.role, r.generated_tokens) == (m["u1e"].id, "assistant", 2)
    assert store.siblings(r.id).ids == (m["a3"].id, r.id)
    assert store.current_path(c.id)[-1].id == r.id
    assert store.get_message(m["a3"].id) == m["a3"]
    assert store.get_conversation(c.id).message_count == 9



def test_deep_chain_through_the_per_message_api(store):
    c = store.create_conversation("deep")
    ids = []

    def turn(i):
        role = "user" if i % 2 == 0 else "assistant"
        ids.append(store.append_message(c.id, CURRENT, role, f"turn {i}", token_ids=[i]).id)

    for i in range(500):  # each append its own committed (fsynced) transaction
        turn(i)
    with store.transaction():  # the same calls, one commit
        for i in range(500, 2000):
            turn(i)
    path = store.current_path(c.id)
    assert [m.id for m in path] == ids
    assert [t for m in path for t in m.token_ids] == list(range(2000))
    assert [m.id for m in store.path(ids[999])] == ids[:1000]
    assert store.siblings(ids[1500]) == Siblings(ids=(ids[1500],), index=0)
    # A branch near the root: switching back to the original root goes to the deep leaf.
    side = add_sibling(store, ids[0], "other first turn")
    assert store.siblings(side.id).index == 1
    assert [m.id for m in store.current_path(c.id)] == [side.id]
    assert store.switch_branch(ids[0])[-1].id == ids[-1]
    exported = store.export_json(c.id)
    assert store.export_json(store.import_json(exported).id) == exported


def test_wide_tree_thousands_of_siblings(store):
    c = store.create_conversation("wide")
    u = store.append_message(c.id, None, "user", "pick a number")
    first = store.append_message(c.id, u.id, "assistant", "0", token_ids=[0])
    with store.transaction():  # per-message API, one commit
        regenerated = [add_sibling(store, first.id, str(i), token_ids=[i], finish_reason="stop").id for i in range(1, 2500)]
    all_ids = (first.id, *regenerated)
    s = store.siblings(regenerated[1233])
    assert s.ids == all_ids and s.index == 1234 and s.count == 2500
    # Navigate like the UI's "<" and ">" buttons.
    here = store.current_path(c.id)[-1].id
    assert here == all_ids[-1]
    for step in range(5):
        sib = store.siblings(here)
        here = sib.ids[sib.index - 1]
        assert store.switch_branch(here)[-1].id == here
    assert store.get_message(here).content == str(2500 - 6)
    # Children under different siblings stay separate.
    deep = store.append_message(c.id, all_ids[10], "user", "more")
    assert [m.id for m in store.path(deep.id)] == [u.id, all_ids[10], deep.id]
    assert store.siblings(deep.id).ids == (deep.id,)
    assert store.get_conversation(c.id).message_count == 2502


def test_big_random_tree_batched(store):
    rng = random.Random(7)
    messages = []
    for i in range(1, 5001):
        parent = None if i == 1 or rng.random() < 0.01 else rng.randrange(max(1, i - 60), i)
        messages.append({
            "id": i, "parent": parent, "role": rng.choice(["user", "assistant"]),
            "content": f"m{i}", "token_ids": [rng.randrange(49152) for _ in range(rng.randrange(8))],
            "created_at": 1_700_000_000.0 + i / 1000, "model": None, "sampling": None,
            "finish_reason": None, "prompt_tokens": None, "generated_tokens": None,
            "ttft_s": None, "tokens_per_s": None,
        })
    doc = {"format": "localchat.conversation", "version": 1,
           "conversation": {"title": "big", "created_at": 1.5, "updated_at": 2.5, "model": None,
                            "system_prompt": None, "settings": {}, "current_leaf": 4321},
           "messages": messages}
    c = store.import_json(json.dumps(doc))
    assert c.message_count == 5000
    by_local = {i + 1: m for i, m in enumerate(store.list_messages(c.id))}
    # The path to the leaf follows the generated parents exactly.
    expected, node = [], 4321
    while node is not None:
        expected.append(node)
        node = messages[node - 1]["parent"]
    assert [m.id for m in store.current_path(c.id)] == [by_local[i].id for i in reversed(expected)]
    # Siblings agree with a brute-force grouping.
    for local in rng.sample(range(1, 5001), 200):
        parent = messages[local - 1]["parent"]
        group = [m["id"] for m in messages if m["parent"] == parent]
        s = store.siblings(by_local[local].id)
        assert s.ids == tuple(by_local[g].id for g in group) and s.index == group.index(local)
    exported = store.export_json(c.id)
    assert json.loads(exported)["messages"] == messages
    assert store.export_json(store.import_json(exported).id) == exported


def test_threads_sharing_one_store(store):
    c = store.create_conversation("threads")
    errors = []

    def work(t):
        try:
            for i in range(100):
                store.append_message(c.id, CURRENT, "user", f"{t}-{i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(assert_chain(store, c.id)) == 400


# --------------------------------------------------------------------------- streaming


def test_reply_writer_saves_as_it_grows(store, db_path):
    c = store.create_conversation("stream")
    u = store.append_message(c.id, None, "user", "count")
    now = [100.0]
    w = store.begin_reply(c.id, u.id, model="m", sampling={"temperature": 1.0}, flush_interval=2.0, clock=lambda: now[0])
    assert w.flush_interval == 2.0 and Store(db_path).flush_interval == 2.0  # the default
    reader = Store(db_path)  # another connection sees only what was saved
    row = reader.get_message(w.message_id)
    assert (row.content, row.token_ids, row.finish_reason, row.parent_id) == ("", [], STREAMING, u.id)
    assert reader.get_conversation(c.id).current_leaf_id == w.message_id
    assert w.append("one ", [1]) is False
    now[0] += 1.0
    assert w.append("two ", [2]) is False
    assert reader.get_message(w.message_id).content == ""
    now[0] += 1.0
    assert w.append("three ", [3]) is True
    assert (reader.get_message(w.message_id).content, reader.get_message(w.message_id).token_ids) == ("one two three ", [1, 2, 3])
    now[0] += 0.5
    assert w.update("one two three four", [1, 2, 3, 4]) is False
    final = w.finish("length", prompt_tokens=5, ttft_s=0.2, tokens_per_s=40.0)
    assert (final.content, final.token_ids, final.finish_reason) == ("one two three four", [1, 2, 3, 4], "length")
    assert (final.prompt_tokens, final.generated_tokens, final.ttft_s, final.tokens_per_s) == (5, 4, 0.2, 40.0)
    assert reader.get_message(w.message_id) == final
    with pytest.raises(StoreError, match="already finished"):
        w.append("more")
    # A finished message is immutable even to raw SQL: history is never rewritten.
    raw = sqlite3.connect(db_path, isolation_level=None)
    with pytest.raises(sqlite3.IntegrityError, match="cannot be changed"):
        raw.execute("UPDATE messages SET content = 'rewritten' WHERE id = ?", [final.id])
    other = store.create_conversation("other")
    with pytest.raises(sqlite3.IntegrityError, match="another conversation"):
        raw.execute(
            "INSERT INTO messages (conversation_id, parent_id, role, content, created_at) VALUES (?, ?, 'user', 'x', 0)",
            [other.id, u.id],
        )
    raw.close()
    reader.close()


def test_reply_writer_context_manager_keeps_text_on_error(store):
    c = store.create_conversation("err")
    u = store.append_message(c.id, None, "user", "q")
    with pytest.raises(RuntimeError):
        with store.begin_reply(c.id, u.id, flush_interval=60) as w:
            w.append("partial answer", [9, 9])
            raise RuntimeError("engine died")
    m = store.get_message(w.message_id)
    assert (m.content, m.token_ids, m.finish_reason) == ("partial answer", [9, 9], "error")
    with store.begin_reply(c.id, CURRENT) as w2:
        w2.append("ok")
    assert store.get_message(w2.message_id).finish_reason == "stop"
    assert store.get_message(w2.message_id).parent_id == m.id
    # A streamed regenerate is a reply under the same parent.
    with store.begin_reply(c.id, store.get_message(m.id).parent_id) as w3:
        w3.append("retry")
    assert store.siblings(w3.message_id).ids == (m.id, w3.message_id)


# --------------------------------------------------------------------------- export / import


def test_export_import_export_is_identical_and_lossless(store, tmp_path):
    c, m = conversation_with_branches(store)
    store.switch_branch(m["a1"].id)
    exported = store.export_json(c.id)
    doc = json.loads(exported)
    assert doc["format"] == "localchat.conversation" and doc["version"] == 1
    assert len(doc["messages"]) == 7 and doc["conversation"]["current_leaf"] == 2
    assert doc["messages"][5]["token_ids"] == [2**40, 0]
    # Import into a different database that already has other rows: new ids, same bytes.
    other = Store(tmp_path / "other.db")
    for _ in range(3):
        conversation_with_branches(other)
    imported = other.import_json(exported)
    assert imported.id != c.id
    assert other.export_json(imported.id) == exported
    # And back into the first database, twice.
    again = store.import_json(other.export_json(imported.id))
    assert store.export_json(again.id) == exported
    assert store.export_json(store.import_json(exported.encode()).id) == exported
    # Field by field, the import is the original (ids aside).
    originals = store.list_messages(c.id)
    copies = other.list_messages(imported.id)
    id_map = {a.id: b.id for a, b in zip(originals, copies)}
    for a, b in zip(originals, copies):
        assert b.parent_id == (None if a.parent_id is None else id_map[a.parent_id])
        assert (a.role, a.content, a.token_ids, a.created_at, a.model, a.sampling, a.finish_reason,
                a.prompt_tokens, a.generated_tokens, a.ttft_s, a.tokens_per_s) == (
                b.role, b.content, b.token_ids, b.created_at, b.model, b.sampling, b.finish_reason,
                b.prompt_tokens, b.generated_tokens, b.ttft_s, b.tokens_per_s)
    got, want = other.get_conversation(imported.id), store.get_conversation(c.id)
    assert (got.title, got.created_at, got.updated_at, got.model, got.system_prompt, got.settings) == (
        want.title, want.created_at, want.updated_at, want.model, want.system_prompt, want.settings)
    assert got.current_leaf_id == id_map[want.current_leaf_id]
    other.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["system", "user", "assistant", "tool"]),
                             st.text(max_size=30), st.none() | st.lists(st.integers(0, 2**62), max_size=5)),
                   max_size=25),
    leaf_pick=st.integers(0, 10_000),
)
def test_random_trees_round_trip(store, shape, leaf_pick):
    c = store.create_conversation("prop", settings={"k": [1, "two", None]})
    ids: list[int] = []
    for pick, role, text, token_ids in shape:
        parent = None if not ids or pick % (len(ids) + 1) == len(ids) else ids[pick % len(ids)]
        ids.append(store.append_message(c.id, parent, role, text, token_ids=token_ids).id)
    if ids:
        store.switch_branch(ids[leaf_pick % len(ids)])
    exported = store.export_json(c.id)
    copy = store.import_json(exported)
    assert store.export_json(copy.id) == exported
    assert [m.content for m in store.current_path(copy.id)] == [m.content for m in store.current_path(c.id)]


def test_markdown_export_of_current_path(store):
    c, m = conversation_with_branches(store)
    md = store.export_markdown(c.id)
    assert md.startswith("# Branches\n")
    assert "- Model: smollm2" in md and "## System\n\nBe brief." in md
    assert "Messages on this branch: 4 of 7" in md
    assert md.index("Hello, world") < md.index("Hi, world.") < md.index("¿Qué tal?") < md.index("Bien.")
    assert "Hi!" not in md and "Hello there!" not in md  # other branches are not on this path
    assert "*finish: length*" in md
    store.switch_branch(m["a1"].id)
    md = store.export_markdown(c.id)
    assert "Hi!" in md and "Bien." not in md and "31.5 tok/s" in md


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error_and_changes_nothing(store, db_path):
    c, m = conversation_with_branches(store)
    other, om = conversation_with_branches(store)
    before = dump(db_path)
    missing = 987654
    cases = [
        (NotFoundError, f"no conversation with id {missing}", lambda: store.get_conversation(missing)),
        (NotFoundError, f"no conversation with id {missing}", lambda: store.rename_conversation(missing, "x")),
        (NotFoundError, f"no conversation with id {missing}", lambda: store.delete_conversation(missing)),
        (NotFoundError, f"no conversation with id {missing}", lambda: store.append_message(missing, None, "user", "x")),
        (NotFoundError, f"no conversation with id {missing}", lambda: store.export_json(missing)),
        (NotFoundError, f"no conversation with id {missing}", lambda: store.export_markdown(missing)),
        (NotFoundError, f"no conversation with id {missing}", lambda: store.begin_reply(missing, None)),
        (NotFoundError, f"no message with id {missing}", lambda: store.get_message(missing)),
        (NotFoundError, f"no message with id {missing}", lambda: store.path(missing)),
        (NotFoundError, f"no message with id {missing}", lambda: store.siblings(missing)),
        (NotFoundError, f"no message with id {missing}", lambda: store.switch_branch(missing)),
        (NotFoundError, f"no message with id {missing}", lambda: store.append_message(c.id, missing, "user", "x")),
        (InvalidInputError, f"parent message {om['a4'].id} belongs to conversation {other.id}",
         lambda: store.append_message(c.id, om["a4"].id, "user", "x")),
        (InvalidInputError, "belongs to conversation", lambda: store.begin_reply(c.id, om["u1"].id)),
        (InvalidInputError, "needs a role", lambda: store.append_message(c.id, m["a4"].id, "", "x")),
        (InvalidInputError, "needs a role", lambda: store.append_message(c.id, m["a4"].id, None, "x")),
        (InvalidInputError, "unknown role 'robot'", lambda: store.append_message(c.id, m["a4"].id, "robot", "x")),
        (InvalidInputError, "content must be a string", lambda: store.append_message(c.id, None, "user", None)),
        (InvalidInputError, "not valid Unicode", lambda: store.append_message(c.id, None, "user", "bad \ud800")),
        (InvalidInputError, "token_ids must be 64-bit integers", lambda: store.append_message(c.id, None, "user", "x", token_ids=[1, "2"])),
        (InvalidInputError, "token_ids must be 64-bit integers", lambda: store.append_message(c.id, None, "user", "x", token_ids=[True])),
        (InvalidInputError, "token_ids must be 64-bit integers", lambda: store.append_message(c.id, None, "user", "x", token_ids=[2**64])),
        (InvalidInputError, "token_ids must be a list", lambda: store.append_message(c.id, None, "user", "x", token_ids="123")),
        (InvalidInputError, "ttft_s must be a finite number", lambda: store.append_message(c.id, None, "user", "x", ttft_s=float("nan"))),
        (InvalidInputError, "generated_tokens must be a non-negative", lambda: store.append_message(c.id, None, "user", "x", generated_tokens=-1)),
        (InvalidInputError, "begin_reply", lambda: store.append_message(c.id, None, "assistant", "x", finish_reason=STREAMING)),
        (InvalidInputError, "message id must be an integer", lambda: store.get_message("1")),
        (InvalidInputError, "settings must be a JSON object", lambda: store.create_conversation("x", settings=[1])),
        (InvalidInputError, "not JSON-serialisable", lambda: store.update_conversation(c.id, settings={"f": object()})),
        (InvalidInputError, "title must be a string", lambda: store.rename_conversation(c.id, None)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    assert dump(db_path) == before


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "invalid JSON"),
        (b"\xff\xfe\x00garbage", "invalid JSON"),
        ('{"format": "something else"}', "not a localchat export"),
        ('[]', "not a localchat export"),
        ('{"format": "localchat.conversation", "version": 2}', "unsupported export version 2"),
    ],
)
def test_import_rejects_non_exports(store, db_path, text, message):
    before = dump(db_path)
    with pytest.raises(InvalidInputError, match=message):
        store.import_json(text)
    assert dump(db_path) == before


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["messages"][2].update(parent=99), "parent 99 is not an earlier message"),
        (lambda d: d["messages"].reverse(), "is not an earlier message"),
        (lambda d: d["messages"][3].update(id=1), "duplicate id 1"),
        (lambda d: d["messages"][4].update(role=""), "needs a role"),
        (lambda d: d["messages"][4].update(role="wizard"), "unknown role"),
        (lambda d: d["messages"][1].update(token_ids=[1.5]), "token_ids"),
        (lambda d: d["messages"][1].update(extra="x"), "unknown keys \\['extra'\\]"),
        (lambda d: d["messages"][6].pop("created_at"), "created_at must be a finite number"),
        (lambda d: d["conversation"].update(current_leaf=42), "current_leaf 42"),
        (lambda d: d["conversation"].update(colour="red"), "unknown conversation keys"),
        (lambda d: d.update(messages={}), "must be a list"),
    ],
)
def test_import_rejects_bad_files_atomically(store, db_path, mutate, message):
    c, _ = conversation_with_branches(store)
    doc = json.loads(store.export_json(c.id))
    mutate(doc)
    before = dump(db_path)
    with pytest.raises(InvalidInputError, match=message):
        store.import_json(json.dumps(doc))
    assert dump(db_path) == before


# --------------------------------------------------------------------------- processes: crashes and concurrency


def test_kill_writer_mid_transaction_keeps_committed_and_drops_half_written(db_path):
    with Store(db_path) as s:
        c = s.create_conversation("crash")
    worker = Worker("kill-mid-txn", db_path, c.id, 25, 60)
    committed = []
    while (line := worker.next_line()) != "IN_TXN":
        committed.append(int(line.split()[1]))
    # The open transaction has already spilled ~6 MB of uncommitted pages into
    # the WAL: the crash leaves half-written data on disk, not just in memory.
    wal = Path(str(db_path) + "-wal")
    assert wal.stat().st_size > 2_000_000
    worker.kill()

    with Store(db_path) as s:
        messages = s.list_messages(c.id)
        assert [m.id for m in messages] == committed
        assert [m.content for m in messages] == [f"committed-{i}" for i in range(25)]
        assert [m.token_ids for m in messages] == [[i] for i in range(25)]
        conversation = s.get_conversation(c.id)
        assert conversation.title == "crash"
        assert conversation.current_leaf_id == committed[-1]
        assert s.db.execute("SELECT count(*) FROM messages WHERE content LIKE 'uncommitted%'").fetchone()[0] == 0
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # And the store carries on.
        assert s.append_message(c.id, CURRENT, "user", "after").parent_id == committed[-1]


def test_kill_check_catches_a_store_without_transactions(db_path):
    """Control: the same crash against a store whose transaction() does nothing must be caught."""
    with Store(db_path) as s:
        c = s.create_conversation("crash")
    worker = Worker("kill-mid-txn", db_path, c.id, 3, 3, env_extra={"LOCALCHAT_TEST_BREAK": "no-transaction"})
    while worker.next_line() != "IN_TXN":
        pass
    worker.kill()
    with Store(db_path) as s:
        leaked = s.db.execute("SELECT count(*) FROM messages WHERE content LIKE 'uncommitted%'").fetchone()[0]
        assert leaked == 3  # what the real test asserts is 0
        assert s.get_conversation(c.id).title == "uncommitted title"


def test_kill_writer_at_random_moments_loses_nothing_committed(db_path):
    rng = random.Random(11)
    with Store(db_path) as s:
        c = s.create_conversation("random kills")
    reported: list[int] = []
    for _ in range(5):
        worker = Worker("append-forever", db_path, c.id)
        for _ in range(rng.randrange(5, 40)):
            reported.append(int(worker.next_line().split()[1]))
        time.sleep(rng.uniform(0, 0.03))
        worker.kill()
        # Only lines printed before the kill count; later commits may exist too.
        while True:
            try:
                line = worker.lines.get(timeout=2)
            except queue.Empty:
                break
            if line is None:
                break
            if re.fullmatch(r"COMMITTED \d+ \d+", line):  # a line cut by the kill is not a report
                reported.append(int(line.split()[1]))
        with Store(db_path) as s:
            assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            messages = s.list_messages(c.id)
            ids = [m.id for m in messages]
            assert set(reported) <= set(ids)
            # Every row is complete, and each append's message and leaf update
            # committed together: the chain is whole and the leaf is its end.
            assert_chain(s, c.id)
            for m in messages:
                i = int(m.content.split("-")[1])
                assert m.token_ids == list(range(i, i + i % 7))


def test_two_processes_appending_to_one_conversation(db_path, tmp_path):
    with Store(db_path) as s:
        c = s.create_conversation("shared")
        root = s.append_message(c.id, None, "system", "root")
    go = tmp_path / "go"
    n = 200
    workers = [Worker("chain", db_path, c.id, tag, n, go) for tag in (1, 2)]
    for w in workers:
        assert w.next_line() == "READY"
    go.touch()
    for w in workers:
        assert w.finish() == 0, w.proc.stderr.read()
    with Store(db_path) as s:
        path = assert_chain(s, c.id)
        assert len(path) == 2 * n + 1 and path[0].id == root.id
        for tag in (1, 2):
            mine = [m.content for m in path if m.content.startswith(f"w{tag}-")]
            assert mine == [f"w{tag}-{i}" for i in range(n)]
        both = {m.content[:2] for m in path[1:]}
        assert both == {"w1", "w2"}


def test_two_process_check_catches_unlocked_read_then_write(db_path, tmp_path):
    """Control: without transactions both processes read the same leaf and fork the chain."""
    with Store(db_path) as s:
        c = s.create_conversation("shared")
        s.append_message(c.id, None, "system", "root")
    go = tmp_path / "go"
    workers = [
        Worker("chain", db_path, c.id, tag, 100, go, env_extra={"LOCALCHAT_TEST_BREAK": "no-transaction"})
        for tag in (1, 2)
    ]
    for w in workers:
        assert w.next_line() == "READY"
    go.touch()
    for w in workers:
        w.finish()
    with Store(db_path) as s:
        with pytest.raises(AssertionError, match="forked"):
            assert_chain(s, c.id)


def test_processes_creating_a_fresh_database_at_once(tmp_path):
    path = tmp_path / "fresh" / "chats.db"
    go = tmp_path / "go"
    workers = [Worker("open", path, go) for _ in range(3)]
    time.sleep(0.3)
    go.touch()
    for w in workers:
        assert w.finish() == 0, w.proc.stderr.read()
    with Store(path) as s:
        assert len(s.list_conversations()) == 3
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_crash_mid_stream_keeps_what_was_shown(db_path):
    with Store(db_path) as s:
        c = s.create_conversation("stream crash")
        u = s.append_message(c.id, None, "user", "talk")
    worker = Worker("stream", db_path, c.id, u.id)
    message_id = int(worker.next_line().split()[1])
    flushed = []
    while len(flushed) < 3:
        flushed.append(int(worker.next_line().split()[1]))
    worker.kill()
    with Store(db_path) as s:
        m = s.get_message(message_id)
        k = len(m.token_ids)
        assert k >= flushed[-1]
        assert m.token_ids == list(range(k))
        assert m.content == "".join(f"t{i} " for i in range(k))
        assert m.finish_reason == STREAMING  # the UI can show it as interrupted
        assert s.get_conversation(c.id).current_leaf_id == message_id


# --------------------------------------------------------------------------- CLI


def test_cli_list_export_import(db_path, tmp_path, capsys):
    with Store(db_path) as s:
        c, _ = conversation_with_branches(s)
        s.create_conversation("Second chat")
        expected_json = s.export_json(c.id)
        expected_md = s.export_markdown(c.id)

    assert chats_main(["--db", str(db_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "Second chat" in out and "Branches" in out and out.index("Second chat") < out.index("Branches")
    assert chats_main(["list", "--db", str(db_path), "--json", "--search", "qué"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [c.id]

    assert chats_main(["--db", str(db_path), "export", str(c.id)]) == 0
    assert capsys.readouterr().out == expected_json
    assert chats_main(["--db", str(db_path), "export", str(c.id), "--format", "md"]) == 0
    assert capsys.readouterr().out == expected_md
    out_file = tmp_path / "conv.json"
    assert chats_main(["--db", str(db_path), "export", str(c.id), "--output", str(out_file)]) == 0
    assert out_file.read_text(encoding="utf-8") == expected_json

    other_db = tmp_path / "other.db"
    assert chats_main(["--db", str(other_db), "import", str(out_file)]) == 0
    assert "imported conversation 1 (7 messages)" in capsys.readouterr().out
    with Store(other_db) as s:
        assert s.export_json(1) == expected_json

    # Errors: exit 1 with a clear message, nothing created or changed.
    before = dump(db_path)
    assert chats_main(["--db", str(db_path), "export", "999"]) == 1
    assert "no conversation with id 999" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "localchat.conversation", "version": 1, "conversation": {}, "messages": 5}')
    assert chats_main(["--db", str(db_path), "import", str(bad)]) == 1
    assert "error" in capsys.readouterr().err
    assert chats_main(["--db", str(db_path), "import", str(tmp_path / "nope.json")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert dump(db_path) == before
    assert chats_main(["--db", str(out_file), "list"]) == 1
    assert "not an SQLite database" in capsys.readouterr().err
    assert out_file.read_text(encoding="utf-8") == expected_json
    assert chats_main(["--db", str(tmp_path / "none.db"), "list"]) == 0
    assert not (tmp_path / "none.db").exists()


def test_cli_mounts_under_a_parent_parser_and_uses_env_default(db_path, monkeypatch, capsys):
    with Store(db_path) as s:
        s.create_conversation("Via env")
    parser = argparse.ArgumentParser(prog="localchat")
    sub = parser.add_subparsers(dest="command")
    add_chats_parser(sub)
    monkeypatch.setenv("LOCALCHAT_DB", str(db_path))
    args = parser.parse_args(["chats", "list"])
    assert args.command == "chats" and run_chats(args) == 0
    assert "Via env" in capsys.readouterr().out
    monkeypatch.setenv("LOCALCHAT_DB", str(db_path.parent / "elsewhere.db"))
    for argv in (["chats", "--db", str(db_path), "list"], ["chats", "list", "--db", str(db_path)]):
        assert run_chats(parser.parse_args(argv)) == 0
        assert "Via env" in capsys.readouterr().out


def test_cli_as_a_module_in_a_subprocess(db_path, tmp_path):
    with Store(db_path) as s:
        c, _ = conversation_with_branches(s)
        expected = s.export_json(c.id)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "localchat", "chats", "--db", str(db_path), *a],
                                    capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    result = run("export", str(c.id), "--format", "json")
    assert result.returncode == 0 and result.stdout == expected
    result = run("export", "12345")
    assert result.returncode == 1 and "no conversation with id 12345" in result.stderr
