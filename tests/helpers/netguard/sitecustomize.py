"""Put on PYTHONPATH by tests/test_offline.py: every Python process of the app (the server and the
engine's process) records, and refuses, any connection or name lookup beyond this machine.
The log file is $LOCALCHAT_NET_LOG; nothing is done without it."""

import ipaddress
import os
import socket

LOG = os.environ.get("LOCALCHAT_NET_LOG")


def _local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").lower()
    if host in ("localhost", "", "0.0.0.0", "::"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _record(kind: str, what) -> None:
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {kind} {what!r}\n")


if LOG:
    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def _check(sock, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _record("connect", address)
            raise OSError(f"network access beyond this machine refused by the test: {address!r}")
        _record("local", address[:2] if isinstance(address, tuple) else address)

    def connect(self, address):
        _check(self, address)
        return _connect(self, address)

    def connect_ex(self, address):
        _check(self, address)
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            _record("lookup", host)
            raise socket.gaierror(socket.EAI_NONAME, f"name lookup refused by the test: {host!r}")
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
