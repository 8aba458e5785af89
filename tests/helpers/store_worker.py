"""A separate process that writes to a conversation store, for tests/test_store.py.

Usage: store_worker.py MODE DB [args...]. It reports progress on stdout, one
line per event, flushed immediately, so the test can kill it at a known point:

  chain DB CONV TAG N GO      wait for file GO, then append N messages under the current leaf
  kill-mid-txn DB CONV K M    K committed appends (COMMITTED id), then one open transaction
                              with M large messages and a rename; prints IN_TXN and sleeps
  append-forever DB CONV      append under the current leaf until killed (COMMITTED id i)
  stream DB CONV PARENT       stream a reply, flush_interval 0.05 s (MSG id, FLUSHED n)
  open DB GO                  wait for GO, open (creating) the store, add one conversation

LOCALCHAT_TEST_BREAK=no-transaction swaps Store.transaction for plain
autocommit (and widens the read-then-write window) so the tests can show
their checks catch a store without transactions.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_store():
    # localchat.chat.store imports nothing of the model stack, so a worker starts fast.
    sys.path.insert(0, str(ROOT))
    from localchat.chat import store as module

    if os.environ.get("LOCALCHAT_TEST_BREAK") == "no-transaction":

        @contextlib.contextmanager
        def no_transaction(self):
            with self._lock, self._translate_errors():
                yield

        real_now = module.Store._now

        def slow_now(self):
            time.sleep(0.002)
            return real_now(self)

        module.Store.transaction = no_transaction
        module.Store._now = slow_now
    return module


def say(*parts: object) -> None:
    print(*parts, flush=True)


def wait_for(path: str) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.002)


def main(argv: list[str]) -> int:
    mode, db = argv[0], argv[1]
    store_mod = load_store()
    if mode == "open":
        wait_for(argv[2])
        with store_mod.Store(db) as store:
            c = store.create_conversation(f"from {os.getpid()}")
            store.append_message(c.id, None, "user", "hello")
        say("DONE")
        return 0

    store = store_mod.Store(db)
    conv = int(argv[2])
    if mode == "chain":
        tag, n, go = int(argv[3]), int(argv[4]), argv[5]
        say("READY")
        wait_for(go)
        for i in range(n):
            store.append_message(conv, store_mod.CURRENT, "user", f"w{tag}-{i}", token_ids=[tag, i])
        say("DONE")
        return 0

    if mode == "kill-mid-txn":
        k, m = int(argv[3]), int(argv[4])
        for i in range(k):
            msg = store.append_message(conv, store_mod.CURRENT, "user", f"committed-{i}", token_ids=[i])
            say("COMMITTED", msg.id)
        big = "x" * 100_000
        with store.transaction():
            for j in range(m):
                store.append_message(conv, store_mod.CURRENT, "assistant", f"uncommitted-{j}-{big}", token_ids=[j])
            store.rename_conversation(conv, "uncommitted title")
            say("IN_TXN")
            time.sleep(600)  # killed here
        return 3

    if mode == "append-forever":
        i = 0
        while True:
            msg = store.append_message(
                conv, store_mod.CURRENT, "user", f"msg-{i}", token_ids=list(range(i, i + i % 7))
            )
            say("COMMITTED", msg.id, i)
            i += 1

    if mode == "stream":
        parent = int(argv[3])
        writer = store.begin_reply(conv, parent, model="test", flush_interval=0.05)
        say("MSG", writer.message_id)
        for i in range(100_000):
            if writer.append(f"t{i} ", [i]):
                say("FLUSHED", i + 1)
            time.sleep(0.002)
        return 3

    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
