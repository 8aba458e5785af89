"""Export and import: a conversation, every branch, as JSON text (and its current branch as Markdown).

Message ids in a file are local (1..n in creation order), so the same conversation exports to the
same bytes in any database; an import is validated in full before anything is written, and written
in one transaction: a bad file changes nothing.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from localchat.text import TextError, decode_utf8

from localchat.chat.store.rows import (
    STREAMING,
    Conversation,
    InvalidInputError,
    check_count,
    check_finish_reason,
    check_float,
    check_id,
    check_object,
    check_optional_text,
    check_role,
    check_text,
    check_token_ids,
    dump_ids,
    dump_object,
)

if TYPE_CHECKING:
    from localchat.chat.store.store import Store

EXPORT_FORMAT = "localchat.conversation"
EXPORT_VERSION = 1

# Keys of an exported message, in the order they are written.
_EXPORT_MESSAGE_KEYS = (
    "id", "parent", "role", "content", "token_ids", "created_at", "model", "sampling",
    "finish_reason", "prompt_tokens", "generated_tokens", "ttft_s", "tokens_per_s",
)
# Written only when set (schema version 2's reply details), so a file without them is what
# earlier versions wrote and read.
_OPTIONAL_MESSAGE_KEYS = ("prefix_hit_tokens", "cumulative_logprob", "sample_group")
_EXPORT_CONVERSATION_KEYS = (
    "title", "created_at", "updated_at", "model", "system_prompt", "settings", "current_leaf",
)


def _parse_message(m: object, seen: set[int]) -> dict[str, Any]:
    """One exported message as a row; its parent must be an earlier message of the file."""
    if not isinstance(m, dict):
        raise InvalidInputError("must be an object")
    extra = set(m) - set(_EXPORT_MESSAGE_KEYS) - set(_OPTIONAL_MESSAGE_KEYS)
    if extra:
        raise InvalidInputError(f"unknown keys {sorted(extra)}")
    local = check_id(m.get("id"), "id")
    if local in seen:
        raise InvalidInputError(f"duplicate id {local}")
    parent = m.get("parent")
    if parent is not None and (check_id(parent, "parent") not in seen):
        raise InvalidInputError(f"parent {parent} is not an earlier message in this file")
    return {
        "id": local,
        "parent": parent,
        "role": check_role(m.get("role")),
        "content": check_text(m.get("content"), "content"),
        "token_ids": dump_ids(check_token_ids(m.get("token_ids"))),
        "created_at": check_float(m.get("created_at"), "created_at", required=True),
        "model": check_optional_text(m.get("model"), "model"),
        "sampling": dump_object(check_object(m.get("sampling"), "sampling")),
        "finish_reason": check_finish_reason(m.get("finish_reason")),
        "prompt_tokens": check_count(m.get("prompt_tokens"), "prompt_tokens"),
        "generated_tokens": check_count(m.get("generated_tokens"), "generated_tokens"),
        "ttft_s": check_float(m.get("ttft_s"), "ttft_s"),
        "tokens_per_s": check_float(m.get("tokens_per_s"), "tokens_per_s"),
        "prefix_hit_tokens": check_count(m.get("prefix_hit_tokens"), "prefix_hit_tokens"),
        "cumulative_logprob": check_float(m.get("cumulative_logprob"), "cumulative_logprob"),
        "sample_group": check_optional_text(m.get("sample_group"), "sample_group"),
    }


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
        "title": check_text(conv.get("title", ""), "conversation title"),
        "created_at": check_float(conv.get("created_at"), "conversation created_at", required=True),
        "updated_at": check_float(conv.get("updated_at"), "conversation updated_at", required=True),
        "model": check_optional_text(conv.get("model"), "conversation model"),
        "system_prompt": check_optional_text(conv.get("system_prompt"), "system_prompt"),
        "settings": dump_object(check_object(settings, "settings")),
    }
    raw_messages = doc.get("messages")
    if not isinstance(raw_messages, list):
        raise InvalidInputError("\"messages\" must be a list")
    seen: set[int] = set()
    messages: list[dict[str, Any]] = []
    for n, m in enumerate(raw_messages):
        try:
            messages.append(_parse_message(m, seen))
        except InvalidInputError as exc:
            raise InvalidInputError(f"message #{n + 1}: {exc}") from None
        seen.add(messages[-1]["id"])
    leaf = conv.get("current_leaf")
    if leaf is not None and check_id(leaf, "current_leaf") not in seen:
        raise InvalidInputError(f"current_leaf {leaf} is not a message in this file")
    return conversation, messages, leaf




def export_json(store: Store, conversation_id: int) -> str:
    """The whole conversation, every branch, as JSON text.

    Message ids in the file are local (1..n in creation order), so the same
    conversation exports to the same bytes in any database.
    """
    with store._read():
        conversation = store._conversation(conversation_id)
        messages = store.list_messages(conversation_id)
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
            **{k: getattr(m, k) for k in _OPTIONAL_MESSAGE_KEYS if getattr(m, k) is not None},
        }
        for m in messages
    ]

    def dump(obj: object) -> str:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)

    # One message per line: readable, diffable, and a long token list stays on one line.
    body = "".join(f"\n  {dump(r)}," for r in rows).rstrip(",")
    return dump(head)[:-1] + f', "messages": [{body}\n]}}\n'

def import_json(store: Store, text: str | bytes) -> Conversation:
    """Add a conversation from ``export_json`` text as a new conversation.

    The file is validated in full before anything is written, and written in
    one transaction: a bad file changes nothing.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = decode_utf8(bytes(text), "the file")
        except TextError as exc:
            raise InvalidInputError(f"not a localchat export: invalid JSON ({exc})") from None
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"not a localchat export: invalid JSON ({exc})") from None
    conversation, messages, leaf = _parse_export(doc)
    with store.transaction():
        cid = store.db["conversations"].insert(conversation).last_pk
        # Ids are taken in one block above anything ever used (AUTOINCREMENT
        # never reuses), keeping file order, so parents stay older than children.
        base = store._conn.execute(
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
            store.db["messages"].insert_all(rows, batch_size=500)
        if leaf is not None:
            store.db["conversations"].update(cid, {"current_leaf_id": new_id[leaf]})
        return store._conversation(cid)

def export_markdown(store: Store, conversation_id: int) -> str:
    """The current branch as Markdown, for reading or sharing."""
    with store._read():
        conversation = store._conversation(conversation_id)
        path = store.current_path(conversation_id)
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



