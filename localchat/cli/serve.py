"""`localchat serve`: the OpenAI-compatible API alone (no page), with the engine in its own process.

  localchat serve [--model NAME] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Clients point their OpenAI base URL at http://HOST:PORT/v1; Prometheus scrapes /metrics. It listens
on 127.0.0.1 unless --host says otherwise, and another address needs --api-key (or
$LOCALCHAT_API_KEY) or an explicit --allow-no-api-key (localchat/api/security.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from localchat import settings
from localchat.cli.common import add_engine_args, build_engine, engine_spec, error
from localchat.cli.shutdown import sigterm_as_interrupt


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API (no page)", description=__doc__.splitlines()[0])
    add_engine_args(p)
    p.add_argument("--host", default=settings.DEFAULT_HOST, help=f"address to listen on (default: {settings.DEFAULT_HOST}, this machine only)")
    p.add_argument("--port", type=int, default=settings.DEFAULT_API_PORT, help=f"port (default: {settings.DEFAULT_API_PORT})")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's registry name)")
    add_api_key_args(p)
    p.set_defaults(func=cmd_serve)


def add_api_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the API (default: ${settings.API_KEY_ENV} if set)")
    p.add_argument("--allow-no-api-key", action="store_true",
                   help="listen beyond 127.0.0.1 without an API key (anyone who can reach it can use it)")


def check_exposure(host: str, api_key: str | None, allow_no_api_key: bool, share: bool = False) -> str | None:
    """An error message when the address needs a key it lacks; prints the warning for non-loopback."""
    from localchat.api.security import exposure

    problem, warning = exposure(host, api_key, allow_no_api_key, share)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return problem


def cmd_serve(args: argparse.Namespace) -> int:
    from localchat.api.security import port_problem, resolve_api_key

    api_key = resolve_api_key(args.api_key)
    problem = check_exposure(args.host, api_key, args.allow_no_api_key) or port_problem(args.host, args.port)
    if problem:
        return error(problem)
    import uvicorn

    from localchat.api.server import create_app
    from localchat.engine import EngineProcess, EngineStopped

    # OpenMP threads spin while they wait, by default. Beside an API server and its clients on the
    # same CPUs, spinning engine threads starve them and themselves (benchmarks/api_load.py, 2 vCPUs:
    # 16 streaming clients got 23-57 tok/s spinning, 111-201 passive); the engine process inherits this.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        driver = EngineProcess(build_engine, **engine_spec(args))
    except (ValueError, EngineStopped) as exc:  # unknown model, refused architecture, bad sizes
        return error(str(exc))
    try:
        names = [args.served_model_name] if args.served_model_name else None
        app = create_app(driver, api_key=api_key, model_names=names)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"localchat: serving {driver.info.model_name} on http://{shown}:{args.port}/v1 (OpenAI API; "
              f"/metrics, /health; Ctrl-C stops)", flush=True)
        # Ctrl-C or SIGTERM: uvicorn stops accepting, gives running replies SHUTDOWN_GRACE_S to end, then
        # cancels them (each cancelled reply aborts its request, localchat/api/server.py); then the engine stops.
        with sigterm_as_interrupt():
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                        timeout_graceful_shutdown=settings.SHUTDOWN_GRACE_S)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        driver.shutdown()
