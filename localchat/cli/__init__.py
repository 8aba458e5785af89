"""`localchat` (and `python -m localchat`): one entry point, one subcommand per thing to do.

  app       the chat app in the browser (or the terminal chat with --terminal), with the API beside it
  serve     the OpenAI-compatible API alone (/v1/chat/completions, /v1/completions, /metrics)
  generate  a reply, or many from a JSONL file
  chats     list, export and import saved conversations
  models    list, download and remove models (Hub repositories, GGUF files)
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
from localchat.cli.models import add_models_parser
from localchat.cli.serve import add_serve_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat", description="Local LLM chat on a PagedAttention engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_app_parser(sub)
    add_serve_parser(sub)
    add_generate_parser(sub)
    add_chats_parser(sub)
    add_models_parser(sub)
    add_bench_parser(sub)
    return parser


# Arguments that are text for the model or the store: bytes that are not UTF-8 (carried by Python as
# surrogates) are decoded as a UTF-8 decoder would, with U+FFFD (localchat/text.py). File names stay as
# given (the file system takes them as they are); any other argument that is not UTF-8 is refused.
TEXT_ARGS = frozenset({"prompt", "system", "stop", "search", "served_model_name"})
PATH_ARGS = frozenset({"db", "requests", "file", "output", "model"})


def check_text_args(args: argparse.Namespace) -> str | None:
    """Repair the text arguments in place; the error for another argument that is not UTF-8, or None."""
    from localchat.text import repair, text_problem

    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if not any(isinstance(v, str) and text_problem(v) for v in values) or name in PATH_ARGS:
            continue
        if name not in TEXT_ARGS:
            return f"--{name.replace('_', '-')} is not valid UTF-8 text"
        setattr(args, name, [repair(v) for v in value] if isinstance(value, list) else repair(value))
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    problem = check_text_args(args)
    if problem is not None:
        from localchat.cli.common import error

        return error(problem)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
