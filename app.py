"""localchat app entry point.

Until the browser UI lands this runs a terminal chat on the engine, with the whole conversation
kept as exact token ids so each turn re-uses the previous turns' KV blocks from the prefix cache.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from localchat.cli import add_engine_args, engine_from_args
    from localchat.terminal_chat import run_terminal_chat

    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--system", default=None)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)
    engine = engine_from_args(args)
    return run_terminal_chat(engine, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature)


if __name__ == "__main__":
    sys.exit(main())
