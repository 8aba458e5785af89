"""`localchat` (and `python -m localchat`): one entry point, one subcommand per thing to do.

  app       the chat app in the browser (or the terminal chat with --terminal)
  generate  a reply, or many from a JSONL file
  chats     list, export and import saved conversations
  bench     the benchmark suites against transformers and llama.cpp

Each subcommand's module registers its own flags; imports stay inside the commands so that
`localchat --help` and `localchat chats` start without loading torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from localchat.cli.app import add_app_parser
from localchat.cli.bench import add_bench_parser
from localchat.cli.chats import add_chats_parser
from localchat.cli.generate import add_generate_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat", description="Local LLM chat on a PagedAttention engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_app_parser(sub)
    add_generate_parser(sub)
    add_chats_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
