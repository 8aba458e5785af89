"""The real app on tiny models, for tests that start it as a user would (and kill it).

`save_tiny_model` writes a tiny random-weight Llama with the default tokenizer as a model directory,
so `localchat app --model DIR` / `localchat generate --model DIR` run the real entry points in seconds.
Run as a script, this module starts the page on a scripted engine (helpers/scripted.py): every
reply is a fixed text chosen by the prompt, for tests that need to know what the model "writes".

  python tests/helpers/tiny_app.py --db FILE --port N [--payloads FILE.json] [--flush-interval S]

`AppProcess` starts a command (the real `localchat app`/`serve`, or this script) as a user would, and
stops or kills it; `read_messages` and `integrity` look at its database from outside.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
STARTUP_S = 240  # a loaded 2-core machine takes a while to import torch, transformers and gradio twice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """A localchat command (`app`, `serve`, or this module's scripted page) in a session of its own,
    waited for until it answers on its port; its output goes to a log file beside `log_dir`'s files."""

    def __init__(self, args: list[str], log_dir: Path, *, ready_path: str = "/", module: str = "localchat",
                 env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = Path(log_dir) / f"app.{self.port}.log"
        self.log = open(self.log_path, "wb")
        command = [sys.executable, "-m", module] if module else [sys.executable]
        self.proc = subprocess.Popen([*command, *args, "--port", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})}, cwd=HERE.parent.parent)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the app exited while starting:\n{self.output()}")
            try:
                urllib.request.urlopen(self.url + ready_path.lstrip("/"), timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        self.proc.kill()
        raise AssertionError(f"the app did not start:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """Processes the app started (its engine process)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                found.append(int(stat.parent.name))
        return found

    def signal(self, signum: int, *, group: bool = False) -> None:
        if group:  # as a terminal's Ctrl-C does: every process of the session
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)

    def wait_gone(self, children: list[int], timeout: float = 60) -> int:
        """Wait for the app and `children` to end; returns the app's exit code."""
        code = self.proc.wait(timeout=timeout)
        self.log.close()
        deadline = time.monotonic() + timeout
        while any(process_alive(pid) for pid in children):
            if time.monotonic() > deadline:
                raise AssertionError(f"processes outlived the app: {[p for p in children if process_alive(p)]}")
            time.sleep(0.1)
        return code

    def kill(self) -> None:
        children = self.children()
        self.signal(signal.SIGKILL)
        self.wait_gone(children, timeout=30)

    def stop(self) -> int:
        children = self.children()
        self.signal(signal.SIGTERM)
        return self.wait_gone(children)


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def read_messages(path: Path) -> dict[int, tuple]:
    """Every message as the database holds it now: id -> (conversation, parent, role, content, finish_reason)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT id, conversation_id, parent_id, role, content, finish_reason FROM messages")}
    finally:
        conn.close()


def integrity(path: Path) -> list:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A model directory (config, safetensors, tokenizer) for `--model DIR`; written once."""
    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        return directory
    import torch
    from transformers import LlamaForCausalLM

    from helpers.tiny import default_tokenizer, tiny_llama_config

    tokenizer = default_tokenizer()
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id, max_position_embeddings=2048)
    tmp = directory.with_name(directory.name + ".tmp")
    LlamaForCausalLM(config).eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE.parent))  # tests/, for `helpers.*` here and in the engine process
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--payloads", default=None, help="JSON list of texts the scripted model writes")
    p.add_argument("--flush-interval", type=float, default=None)
    args = p.parse_args(argv)

    from localchat.chat.service import ChatService
    from localchat.chat.store import Store
    from localchat.cli.shutdown import serve_page
    from localchat.engine import EngineProcess
    from localchat.ui.app import build_ui

    from helpers.scripted import scripted_tiny_engine

    payloads = Path(args.payloads).read_text(encoding="utf-8") if args.payloads else "[]"
    store = Store(args.db, **({"flush_interval": args.flush_interval} if args.flush_interval is not None else {}))
    driver = EngineProcess(scripted_tiny_engine, payloads_json=payloads, num_blocks=1024, block_size=16,
                           config_overrides={"max_position_embeddings": 8192})  # room for long imported conversations
    service = ChatService(driver, store)
    print(f"localchat test app on http://127.0.0.1:{args.port}", flush=True)
    return serve_page(lambda: build_ui(service), driver, store, service=service, host="127.0.0.1", port=args.port, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
