"""What the store holds, as Python values: errors, conversations, messages, and the checks every
value passes before it is written (so a bad value fails clearly, before the transaction starts)."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from localchat.text import text_problem

ROLES = ("system", "user", "assistant", "tool")
STREAMING = "streaming"  # finish_reason of a reply still being generated (or cut off by a crash)
CURRENT: Literal["current"] = "current"  # parent_id meaning "the conversation's current leaf"


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
    prefix_hit_tokens: int | None = None
    cumulative_logprob: float | None = None
    sample_group: str | None = None


@dataclass(frozen=True)
class Siblings:
    """A message's siblings (itself included, oldest first) and its index among them."""

    ids: tuple[int, ...]
    index: int

    @property
    def count(self) -> int:
        return len(self.ids)


UNSET: Any = object()


def is_corruption(exc: sqlite3.Error) -> bool:
    # SQLITE_CORRUPT and SQLITE_NOTADB surface as the bare DatabaseError class;
    # "locked", "busy", I/O errors are OperationalError and must not be reported as corruption.
    return type(exc) is sqlite3.DatabaseError


def check_role(role: object) -> str:
    if not isinstance(role, str) or not role:
        raise InvalidInputError(f"a message needs a role, one of {', '.join(ROLES)}; got {role!r}")
    if role not in ROLES:
        raise InvalidInputError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return role


def check_text(value: object, what: str) -> str:
    # The one rule for text (localchat/model/text.py): lone surrogates, which SQLite would refuse
    # mid-transaction, are refused here, before the transaction starts.
    problem = text_problem(value)
    if problem is not None:
        raise InvalidInputError(f"{what} {problem}")
    return value  # type: ignore[return-value]


def check_optional_text(value: object, what: str) -> str | None:
    return None if value is None else check_text(value, what)


def check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{what} must be an integer id, got {value!r}")
    return value


def check_token_ids(value: object) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidInputError(f"token_ids must be a list of integers, got {type(value).__name__}")
    ids = list(value)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not (-(2**63) <= t < 2**63):
            raise InvalidInputError(f"token_ids must be 64-bit integers, found {t!r}")
    return ids


def check_count(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def check_float(value: object, what: str, *, required: bool = False) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def check_object(value: object, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} is not JSON-serialisable: {exc}") from None
    return value


def check_finish_reason(value: object) -> str | None:
    value = check_optional_text(value, "finish_reason")
    if value == "":
        raise InvalidInputError("finish_reason must not be empty (use None)")
    return value


def dump_ids(ids: list[int] | None) -> str | None:
    return None if ids is None else json.dumps(ids, separators=(",", ":"))


def dump_object(obj: dict[str, Any] | None) -> str | None:
    # Sorted keys make the stored text, and so every export, independent of insertion order.
    return None if obj is None else json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False)


def message_from_row(row: dict[str, Any]) -> Message:
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
        prefix_hit_tokens=row.get("prefix_hit_tokens"),
        cumulative_logprob=row.get("cumulative_logprob"),
        sample_group=row.get("sample_group"),
    )


def conversation_from_row(row: dict[str, Any]) -> Conversation:
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


CONVERSATION_SELECT = (
    "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
    " FROM conversations c"
)

