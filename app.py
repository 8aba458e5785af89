"""localchat app entry point.

Until the browser UI lands this runs a terminal chat on the engine. Conversations are saved in the
SQLite store, and each turn re-uses the previous turns' KV blocks from the prefix cache.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from localchat.cli import add_engine_args, engine_from_args
    from localchat.driver import EngineDriver
    from localchat.models import ModelNotFoundError
    from localchat.sampling_params import SamplingParams
    from localchat.service import ChatService
    from localchat.store import Store, StoreError
    from localchat.terminal_chat import run_terminal_chat

    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--db", default=None, help="conversation database (default: $LOCALCHAT_DB or the user data dir)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    args = parser.parse_args(argv)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
        store = Store(args.db)
        engine = engine_from_args(args)
    except (ModelNotFoundError, StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    driver = EngineDriver(engine)
    try:
        return run_terminal_chat(ChatService(driver, store), system=args.system, params=params)
    finally:
        driver.shutdown()
        store.close()


if __name__ == "__main__":
    sys.exit(main())
