"""Schema version 2: a reply's prefix-cache tokens, log-probability and sample group, kept through the
migration of older files and through export and import (localchat/chat/store)."""

from __future__ import annotations

import json

import pytest

from localchat.chat.store import InvalidInputError, Store
from localchat.chat.store import schema as store_schema


def reply_with_details(store: Store, group: str | None = "g1"):
    c = store.create_conversation("details")
    u = store.append_message(c.id, None, "user", "hi", token_ids=[1, 2, 3])
    w = store.begin_reply(c.id, u.id, model="m", sample_group=group)
    w.append("hello", [4, 5])
    w.finish("stop", prompt_tokens=3, prefix_hit_tokens=2, cumulative_logprob=-1.5, ttft_s=0.1, tokens_per_s=20.0)
    return c, store.get_message(w.message_id)


def test_a_version_1_file_is_migrated_and_keeps_everything(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    monkeypatch.setattr(store_schema, "_MIGRATIONS", store_schema._MIGRATIONS[:1])
    with Store(path) as old:
        assert old.db.execute("PRAGMA user_version").fetchone()[0] == 1
        c = old.create_conversation("old")
        old.append_message(c.id, None, "user", "kept", token_ids=[1])
    monkeypatch.undo()
    with Store(path) as new:
        assert new.db.execute("PRAGMA user_version").fetchone()[0] == len(store_schema._MIGRATIONS) >= 2
        (m,) = new.current_path(c.id)
        assert m.content == "kept" and m.prefix_hit_tokens is None and m.sample_group is None
        _, reply = reply_with_details(new)
        assert (reply.prefix_hit_tokens, reply.cumulative_logprob, reply.sample_group) == (2, -1.5, "g1")


def test_details_survive_export_and_import(tmp_path):
    with Store(tmp_path / "a.db") as store:
        c, reply = reply_with_details(store)
        exported = store.export_json(c.id)
        doc = json.loads(exported)
        saved = doc["messages"][1]
        assert (saved["prefix_hit_tokens"], saved["cumulative_logprob"], saved["sample_group"]) == (2, -1.5, "g1")
        assert "sample_group" not in doc["messages"][0]  # written only when set: older readers see what they know
        with Store(tmp_path / "b.db") as other:
            copy = other.import_json(exported)
            assert other.export_json(copy.id) == exported
            assert other.current_path(copy.id)[-1].prefix_hit_tokens == 2


@pytest.mark.parametrize("field, value", [("prefix_hit_tokens", -1), ("cumulative_logprob", float("nan")),
                                          ("sample_group", 5)])
def test_bad_details_are_refused_and_nothing_is_written(tmp_path, field, value):
    with Store(tmp_path / "a.db") as store:
        c, _ = reply_with_details(store)
        doc = json.loads(store.export_json(c.id))
        doc["messages"][1][field] = value
        text = json.dumps(doc).replace("NaN", "1e999")
        before = len(store.list_conversations())
        with pytest.raises(InvalidInputError, match=field if field != "cumulative_logprob" else "cumulative_logprob|JSON"):
            store.import_json(text)
        assert len(store.list_conversations()) == before
