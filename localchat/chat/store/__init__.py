"""Conversations as trees of messages in SQLite: rows (values and checks), schema (the file, its
migrations), store (the tree operations), writer (a reply saved as it streams), transfer (export and
import).

`Store` is imported on first use: it needs sqlite-utils (which imports pandas), ~0.7 s that the engine's
process and `localchat --help` would pay for nothing, since every command's parser imports this package."""

from localchat.lazy import lazy_attributes

from localchat.chat.store.rows import (
    CURRENT,
    ROLES,
    STREAMING,
    Conversation,
    CorruptDatabaseError,
    InvalidInputError,
    Message,
    NotFoundError,
    NotOurDatabaseError,
    SchemaVersionError,
    Siblings,
    StoreError,
)
from localchat.chat.store.schema import APPLICATION_ID, SCHEMA_VERSION, default_db_path
from localchat.chat.store.transfer import EXPORT_FORMAT
from localchat.chat.store.writer import ReplyWriter

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

__getattr__ = lazy_attributes(__name__, {"Store": "store"})
