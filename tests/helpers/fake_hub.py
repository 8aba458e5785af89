"""A Hugging Face Hub on 127.0.0.1 for download tests (no network): the routes huggingface_hub 2.x uses.

- GET  /api/models/{repo}/revision/{rev}          repo info (its commit sha)        HfApi.repo_info
- GET  /api/models/{repo}/tree/{rev}?recursive=   the file listing                  HfApi.list_repo_tree
- HEAD /{repo}/resolve/{rev}/{file}               X-Repo-Commit, ETag, size         get_hf_file_metadata
- GET  /{repo}/resolve/{rev}/{file}               the bytes, honouring Range        http_get

Errors are answered as the Hub answers them (status + X-Error-Code), so huggingface_hub raises its own
GatedRepoError / RepositoryNotFoundError. `cut_once[file] = n` closes the connection after n bytes the
first time that file is fetched, to test that a cut transfer resumes; `fail[file] = status` answers its
GET with that status; `slow[file] = s` paces it (progress can be watched); every request is logged.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    cut_once: dict[str, int] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)  # file -> HTTP status its GET answers with
    slow: dict[str, float] = field(default_factory=dict)  # file -> seconds to wait after each 64 KiB sent
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range header)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def add_directory(self, repo_id: str, directory: Path, **kwargs) -> FakeRepo:
        files = {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
        self.repos[repo_id] = FakeRepo(files, **kwargs)
        return self.repos[repo_id]

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def fetched(self, filename: str) -> list[str | None]:
        """The Range headers of every GET of `filename` (None: from the start)."""
        return [rng for method, path, rng in self.log if method == "GET" and path.endswith("/" + filename)]


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ---- routing ----------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.fake.log.append((self.command, path, self.headers.get("Range")))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if api:
            repo = self._repo(api.group(1))
            if repo is None:
                return
            if api.group(2) == "revision":
                info = {"id": api.group(1), "sha": repo.commit, "private": False, "gated": repo.gated,
                        "siblings": [{"rfilename": name} for name in repo.files]}
                return self._json(info)
            return self._json([_tree_entry(name, data) for name, data in repo.files.items()])
        if resolve:
            repo = self._repo(resolve.group(1))
            if repo is None:
                return
            data = repo.files.get(resolve.group(3))
            if data is None:
                return self._error(404, "EntryNotFound", repo.commit)
            if not head and resolve.group(3) in self.fake.fail:
                return self._error(self.fake.fail[resolve.group(3)], "ServerError", repo.commit)
            return self._file(resolve.group(3), data, repo, head)
        self._error(404, "RepoNotFound")

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound")
        elif repo.gated and not self.headers.get("Authorization"):
            self._error(403, "GatedRepo")
            return None
        return repo

    # ---- answers ----------------------------------------------------------------------------
    def _json(self, value) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, commit: str | None = None) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _file(self, name: str, data: bytes, repo: FakeRepo, head: bool) -> None:
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{_oid(data)}"')
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        cut = self.fake.cut_once.pop(name, None)
        if cut is not None and cut < len(body):
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early, as on a dropped connection
            return
        pause = self.fake.slow.get(name)
        if pause:
            for offset in range(0, len(body), 64 * 1024):
                self.wfile.write(body[offset:offset + 64 * 1024])
                self.wfile.flush()
                time.sleep(pause)
            return
        self.wfile.write(body)


def _tree_entry(name: str, data: bytes) -> dict:
    return {"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
