"""Who may reach the API: this machine only unless asked, and beyond it only with a key.

`localchat serve` and `localchat app` listen on 127.0.0.1. Another address (or a public --share
link) exposes every conversation the engine serves, so they refuse it without an API key unless
the user says --allow-no-api-key, and they always print a warning when listening beyond loopback.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from localchat import settings


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def resolve_api_key(flag_value: str | None) -> str | None:
    """--api-key, else $LOCALCHAT_API_KEY; an empty value means none."""
    value = flag_value if flag_value is not None else os.environ.get(settings.API_KEY_ENV)
    if value is None or not value.strip():
        return None
    return value.strip()


def exposure(host: str, api_key: str | None, allow_no_api_key: bool, share: bool = False) -> tuple[str | None, str | None]:
    """(error, warning) for listening on `host`: an error refuses to start, a warning is printed."""
    where = "a public share link" if share else f"{host}, beyond this machine"
    if is_loopback(host) and not share:
        return None, None
    if api_key is None and not allow_no_api_key:
        return (f"refusing to serve on {where} without an API key: pass --api-key KEY (or set "
                f"{settings.API_KEY_ENV}), or --allow-no-api-key if anyone who can reach it may use it"), None
    guard = "API calls need the key" if api_key else "ANYONE who can reach it can read and use every conversation"
    return None, f"warning: listening on {where}; {guard}"


def port_problem(host: str, port: int) -> str | None:
    """Why the server cannot listen on host:port (checked before the model loads), or None."""
    if not 0 < port < 65536:
        return f"--port must be in 1-65535, got {port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot listen on {host}: {exc}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port} ({exc.strerror or exc}): is another server using the port?"
    return None
