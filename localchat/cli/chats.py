"""``localchat chats``: list, export and import saved conversations."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from localchat.chat.store import NotFoundError, StoreError, default_db_path

__all__ = ["add_chats_parser", "run_chats"]

_DB_HELP = "conversation database (default: $LOCALCHAT_DB or the user data directory)"


def add_chats_parser(subparsers: Any) -> None:
    """Register the ``chats`` command on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "chats",
        help="list, export and import saved conversations",
        description="List, export and import saved conversations.",
    )
    parser.set_defaults(func=run_chats)
    parser.add_argument("--db", type=Path, default=None, metavar="PATH", help=_DB_HELP)
    # --db is accepted after the action too (`chats list --db x`); SUPPRESS keeps
    # the sub-parser from overwriting a value given before the action.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", type=Path, default=argparse.SUPPRESS, metavar="PATH", help=_DB_HELP)
    actions = parser.add_subparsers(dest="chats_command", metavar="{list,export,import}")
    actions.required = True

    lister = actions.add_parser("list", parents=[common], help="list conversations, newest first")
    lister.add_argument("--search", metavar="TEXT", help="only conversations containing TEXT")
    lister.add_argument("--limit", type=int, default=None, help="show at most this many")
    lister.add_argument("--json", action="store_true", help="print JSON instead of a table")

    exporter = actions.add_parser(
        "export", parents=[common], help="export one conversation (all branches as JSON, or the current branch as Markdown)"
    )
    exporter.add_argument("id", type=int, help="conversation id (see `chats list`)")
    exporter.add_argument("--format", choices=("json", "md"), default="json")
    exporter.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")

    importer = actions.add_parser("import", parents=[common], help="import a conversation exported as JSON")
    importer.add_argument("file", help="JSON file from `chats export`, or - for stdin")


def run_chats(args: argparse.Namespace) -> int:
    """Run a parsed ``chats`` command; returns the process exit code."""
    db_path = Path(args.db) if getattr(args, "db", None) else default_db_path()
    command = args.chats_command
    try:
        if command == "list":
            return _list(db_path, args)
        if command == "export":
            return _export(db_path, args)
        if command == "import":
            return _import(db_path, args)
        raise StoreError(f"unknown chats command {command!r}")
    except StoreError as exc:
        print(f"localchat chats {command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"localchat chats {command}: error: {exc}", file=sys.stderr)
        return 1


def _list(db_path: Path, args: argparse.Namespace) -> int:
    if not db_path.exists():
        # Listing must not create a database as a side effect.
        if args.json:
            print("[]")
        else:
            print(f"no conversations (no database at {db_path})")
        return 0
    from localchat.chat.store import Store

    with Store(db_path, create=False) as store:
        if args.search:
            conversations = store.search_conversations(args.search, limit=args.limit)
        else:
            conversations = store.list_conversations(limit=args.limit)
    if args.json:
        rows = [
            {
                "id": c.id,
                "title": c.title,
                "created_at": c.created_at,
                "updated_at": c.updated_at,
                "model": c.model,
                "messages": c.message_count,
            }
            for c in conversations
        ]
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    if not conversations:
        print("no conversations")
        return 0
    width = max(len("ID"), *(len(str(c.id)) for c in conversations))
    print(f"{'ID':>{width}}  {'UPDATED':16}  {'MSGS':>5}  TITLE")
    for c in conversations:
        updated = datetime.fromtimestamp(c.updated_at).strftime("%Y-%m-%d %H:%M")
        title = (c.title or "(untitled)").replace("\n", " ")
        print(f"{c.id:>{width}}  {updated:16}  {c.message_count:>5}  {title}")
    return 0


def _export(db_path: Path, args: argparse.Namespace) -> int:
    from localchat.chat.store import Store

    with Store(db_path, create=False) as store:
        text = store.export_json(args.id) if args.format == "json" else store.export_markdown(args.id)
    if args.output:
        out = Path(args.output)
        # Write then rename, so an interrupted export never leaves half a file under the real name.
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    else:
        sys.stdout.write(text)
    return 0


def _import(db_path: Path, args: argparse.Namespace) -> int:
    if args.file == "-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(args.file)
        if not path.exists():
            raise NotFoundError(f"no such file: {path}")
        data = path.read_bytes()
    from localchat.chat.store import Store

    with Store(db_path) as store:
        conversation = store.import_json(data)
    print(f"imported conversation {conversation.id} ({conversation.message_count} messages): {conversation.title}")
    return 0
