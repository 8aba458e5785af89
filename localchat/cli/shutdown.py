"""Stopping cleanly: Ctrl-C and SIGTERM stop taking work, end what runs, save, and exit within seconds.

Both signals become KeyboardInterrupt in the main thread (`sigterm_as_interrupt`), so a service
manager's SIGTERM takes the same path as Ctrl-C. `serve_page` serves the page until then, and
`shut_down` ends the app in an order that loses nothing: the engine stops first (no new request is
taken; each running reply ends with EngineStopped, and ChatService saves its text so far with
finish_reason "abort"), the replies get a moment to be written, then the web server and the database
close. The engine's own process ignores Ctrl-C (localchat/engine/process.py) so that this order holds.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

from localchat import settings


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def shut_down(driver, store, *, service=None, page=None, grace_s: float = settings.SHUTDOWN_GRACE_S) -> None:
    """Stop the engine (running replies end and are saved), wait up to `grace_s` for them to be written,
    then close the page's server and the database. Safe to call twice."""
    driver.shutdown()
    deadline = time.monotonic() + grace_s
    while service is not None and service.live and time.monotonic() < deadline:
        time.sleep(0.05)
    if page is not None:
        page.close(verbose=False)
    store.close()


def serve_page(build_page: Callable, driver, store, *, service=None, **launch_kwargs) -> int:
    """Serve the page (localchat/ui/app.py launch) until Ctrl-C or SIGTERM, then `shut_down`."""
    from localchat.ui.app import launch

    page = None
    with sigterm_as_interrupt():
        try:
            page = build_page()
            launch(page, prevent_thread_lock=True, **launch_kwargs)
            while page.is_running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            print("localchat: stopping (replies in progress are saved as they are)", flush=True)
        finally:
            shut_down(driver, store, service=service, page=page)
    return 0
