"""`localchat app` (and `python app.py`): the chat app in the browser, or in the terminal.

The page is served on 127.0.0.1 (this machine only) unless --host says otherwise; --share makes a
public Gradio link and is never on by default. Conversations are saved in the SQLite store, and each
turn re-uses the previous turns' KV blocks from the prefix cache.

The OpenAI-compatible API (localchat/api/) is served on the same port, on the same engine client,
so its requests share the prefix cache and show in the memory panel (--no-api turns it off). Another
address or --share needs --api-key (which then also guards the page) or --allow-no-api-key.
With --engine-url the same page drives a remote OpenAI-compatible server instead of a local engine.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading

from localchat import settings
from localchat.cli.common import add_engine_args, build_engine, engine_spec, error
from localchat.cli.serve import add_api_key_args, check_exposure
from localchat.cli.shutdown import shut_down, sigterm_as_interrupt


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
    p.add_argument("--no-api", action="store_true", help="do not serve the OpenAI API (/v1, /metrics) beside the page")
    add_api_key_args(p)
    p.add_argument("--engine-url", default=None,
                   help="drive the page with a remote OpenAI-compatible server (vLLM, SGLang, llama.cpp, localchat serve) instead of a local engine")
    p.add_argument("--engine-api-key", default=None, help=f"the key for --engine-url (default: ${settings.ENGINE_API_KEY_ENV} if set)")
    p.add_argument("--engine-model", default=None, help="the model to ask --engine-url for (default: the first it lists)")
    p.set_defaults(func=cmd_app)


def cmd_app(args: argparse.Namespace) -> int:
    with sigterm_as_interrupt():  # SIGTERM stops the app as Ctrl-C does (localchat/cli/shutdown.py)
        try:
            return _run_app(args)
        except KeyboardInterrupt:  # before the app was up (while the model loads): nothing to save yet
            print("localchat: stopped", file=sys.stderr)
            return 130


def _run_app(args: argparse.Namespace) -> int:
    from localchat.chat.service import ChatService
    from localchat.chat.store import Store, StoreError
    from localchat.api.security import is_loopback, resolve_api_key
    from localchat.engine import EngineStopped, SamplingParams

    if not 0 < args.port < 65536:
        return error(f"--port must be in 1-65535, got {args.port}")
    api_key = resolve_api_key(args.api_key)
    exposed = args.share or not is_loopback(args.host)
    if not args.terminal and (problem := check_exposure(args.host, api_key, args.allow_no_api_key, share=args.share)):
        return error(problem)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
        store = Store(args.db)  # a corrupt or foreign database fails here, before the model loads
    except (StoreError, ValueError) as exc:
        return error(str(exc))
    if not args.terminal:  # import the page's modules (Gradio: seconds) while the engine process loads its model
        threading.Thread(target=importlib.import_module, args=("localchat.ui.app",), daemon=True).start()
    try:
        driver = _engine_client(args)
    except (ValueError, EngineStopped) as exc:  # unknown model, refused architecture, bad sizes, unreachable server
        store.close()
        return error(str(exc))
    service = None
    try:
        service = ChatService(driver, store)
        if args.terminal:
            from localchat.chat.terminal import run_terminal_chat

            return run_terminal_chat(service, system=args.system, params=params)
        from localchat.cli.shutdown import serve_page
        from localchat.ui.app import build_ui

        routes = _api_routes(args, driver, api_key)
        beside = "; OpenAI API at /v1, /metrics" if routes else ""
        print(f"localchat: serving {driver.info.model_name} on http://{args.host}:{args.port}{beside} (Ctrl-C stops)", flush=True)
        # Until Ctrl-C or SIGTERM; then the engine stops, running replies are saved, the server closes.
        return serve_page(lambda: build_ui(service, switcher=_switcher(args, driver)), driver, store, service=service,
                          host=args.host, port=args.port, share=args.share, routes=routes,
                          auth=_page_auth(api_key) if exposed else None)
    except KeyboardInterrupt:
        return 0
    finally:
        shut_down(driver, store, service=service)


def _engine_client(args: argparse.Namespace):
    """A remote server's client with --engine-url; else the engine in a process of its own, so
    serving the page never slows it down."""
    if args.engine_url:
        import os

        from localchat.api.remote import RemoteEngineClient

        key = args.engine_api_key or os.environ.get(settings.ENGINE_API_KEY_ENV) or None
        return RemoteEngineClient(args.engine_url, api_key=key, model=args.engine_model)
    from localchat.chat.engine_switch import SwitchableEngine
    from localchat.engine import EngineProcess

    # Switchable: the page's model picker can replace the engine process with one on another model.
    return SwitchableEngine(EngineProcess(build_engine, **engine_spec(args)))


def _switcher(args: argparse.Namespace, driver):
    """The model picker's switcher: a new engine process per model, ordered by what memory allows."""
    from localchat.chat.engine_switch import ModelSwitcher, SwitchableEngine
    from localchat.cli.common import swap_plan
    from localchat.engine import EngineProcess

    if not isinstance(driver, SwitchableEngine):
        return None  # a remote engine: the server chooses its model
    spec = engine_spec(args)
    return ModelSwitcher(driver, start=lambda name: EngineProcess(build_engine, **{**spec, "model": name}),
                         plan=lambda new, current: swap_plan(spec, new, current))


def _api_routes(args: argparse.Namespace, driver, api_key: str | None) -> list:
    """The API's routes on the page's port, over the page's own engine client (none for a remote
    engine: that server is the API)."""
    if args.no_api or not driver.info.accepts_token_ids:
        return []
    from localchat.api.server import ApiServer

    return ApiServer(driver, api_key=api_key).router().routes


def _page_auth(api_key: str | None):
    """Beyond this machine, the key guards the page too (a login: any user name, the key as password)."""
    if api_key is None:
        return None
    import secrets

    return lambda _user, password: secrets.compare_digest(str(password).encode(), api_key.encode())
