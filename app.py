"""localchat app entry point: the browser chat UI (Gradio) on the PagedAttention engine.

`python app.py` serves the UI on http://127.0.0.1:7860 (`--host`/`--port` to change; `--share`
makes a public Gradio link and is never on by default). `python app.py --terminal` runs the
terminal chat instead. Conversations are saved in the SQLite store, and each turn re-uses the
previous turns' KV blocks from the prefix cache.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from localchat.cli import add_engine_args

    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--db", default=None, help="conversation database (default: $LOCALCHAT_DB or the user data dir)")
    parser.add_argument("--terminal", action="store_true", help="chat in the terminal instead of the browser")
    parser.add_argument("--host", default="127.0.0.1", help="address the UI listens on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port the UI listens on (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    parser.add_argument("--system", default=None, help="system prompt (terminal chat)")
    parser.add_argument("--max-tokens", type=int, default=512, help="(terminal chat)")
    parser.add_argument("--temperature", type=float, default=0.7, help="(terminal chat)")
    parser.add_argument("--top-p", type=float, default=0.95, help="(terminal chat)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from localchat.cli import engine_from_args
    from localchat.driver import EngineDriver
    from localchat.models import ModelNotFoundError
    from localchat.sampling_params import SamplingParams
    from localchat.service import ChatService
    from localchat.store import Store, StoreError

    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port must be in 1-65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
        store = Store(args.db)  # a corrupt or foreign database fails here, before the model loads
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        engine = engine_from_args(args)
    except (ModelNotFoundError, ValueError) as exc:
        store.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    driver = EngineDriver(engine)
    try:
        service = ChatService(driver, store)
        if args.terminal:
            from localchat.terminal_chat import run_terminal_chat

            return run_terminal_chat(service, system=args.system, params=params)
        from localchat.ui.app import build_ui, launch

        print(f"localchat: serving {engine.model_name} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
        launch(build_ui(service), host=args.host, port=args.port, share=args.share)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        driver.shutdown()
        store.close()


if __name__ == "__main__":
    sys.exit(main())
