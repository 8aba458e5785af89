"""`localchat app` (and `python app.py`): the chat app in the browser, or in the terminal.

The page is served on 127.0.0.1 (this machine only) unless --host says otherwise; --share makes a
public Gradio link and is never on by default. Conversations are saved in the SQLite store, and each
turn re-uses the previous turns' KV blocks from the prefix cache.
"""

from __future__ import annotations

import argparse

from localchat import settings
from localchat.cli.common import add_engine_args, build_engine, engine_spec, error


def add_app_parser(sub) -> None:
    p = sub.add_parser("app", help="run the chat app in the browser (or --terminal)", description=__doc__.splitlines()[0])
    configure_app_parser(p)


def configure_app_parser(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--db", default=None, help="conversation database (default: $LOCALCHAT_DB or the user data dir)")
    p.add_argument("--terminal", action="store_true", help="chat in the terminal instead of the browser")
    p.add_argument("--host", default=settings.DEFAULT_HOST, help=f"address the UI listens on (default: {settings.DEFAULT_HOST}, this machine only)")
    p.add_argument("--port", type=int, default=settings.DEFAULT_PORT, help=f"port the UI listens on (default: {settings.DEFAULT_PORT})")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    p.add_argument("--system", default=None, help="system prompt (terminal chat)")
    p.add_argument("--max-tokens", type=int, default=settings.DEFAULT_MAX_TOKENS, help="(terminal chat)")
    p.add_argument("--temperature", type=float, default=settings.DEFAULT_TEMPERATURE, help="(terminal chat)")
    p.add_argument("--top-p", type=float, default=settings.DEFAULT_TOP_P, help="(terminal chat)")
    p.set_defaults(func=cmd_app)


def cmd_app(args: argparse.Namespace) -> int:
    from localchat.chat.service import ChatService
    from localchat.chat.store import Store, StoreError
    from localchat.engine import EngineProcess, EngineStopped, SamplingParams

    if not 0 < args.port < 65536:
        return error(f"--port must be in 1-65535, got {args.port}")
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
        store = Store(args.db)  # a corrupt or foreign database fails here, before the model loads
    except (StoreError, ValueError) as exc:
        return error(str(exc))
    try:
        # The engine runs in a process of its own, so serving the page never slows it down.
        driver = EngineProcess(build_engine, **engine_spec(args))
    except (ValueError, EngineStopped) as exc:  # unknown model, refused architecture, bad sizes
        store.close()
        return error(str(exc))
    try:
        service = ChatService(driver, store)
        if args.terminal:
            from localchat.chat.terminal import run_terminal_chat

            return run_terminal_chat(service, system=args.system, params=params)
        from localchat.ui.app import build_ui, launch

        print(f"localchat: serving {driver.info.model_name} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
        launch(build_ui(service), host=args.host, port=args.port, share=args.share)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        driver.shutdown()
        store.close()
