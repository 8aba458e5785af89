"""Conversations as trees of messages in SQLite: rows (values and checks), schema (the file, its
migrations), store (the tree operations), writer (a reply saved as it streams), transfer (export and
import)."""

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
from localchat.chat.store.store import Store
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
