"""An ASGI middleware that puts one script first in the page's <head>.

Gradio adds a page's `head` and `js` after its own modules have started, which is too late for
assets/quiet_timers.js: it must wrap requestAnimationFrame before Gradio's status tracker keeps a
reference to it. So the page's HTML (GET of the root path, uncompressed text/html) gets the script
right after <head>; every other response passes through untouched.
"""

from __future__ import annotations

HEAD = b"<head>"


class EarlyScript:
    def __init__(self, app, script: str) -> None:
        self.app = app
        self.tag = b"<script>" + script.encode("utf-8") + b"</script>"

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "GET" or scope.get("path") not in ("/", ""):
            await self.app(scope, receive, send)
            return
        start: dict = {}
        chunks: list[bytes] = []

        async def rewrite(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            headers, body = _with_script(start.get("headers", []), b"".join(chunks), self.tag)
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def _with_script(headers: list, body: bytes, tag: bytes) -> tuple[list, bytes]:
    named = {k.lower(): v for k, v in headers}
    if not named.get(b"content-type", b"").startswith(b"text/html") or named.get(b"content-encoding") or HEAD not in body:
        return headers, body
    body = body.replace(HEAD, HEAD + tag, 1)
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"] + [(b"content-length", str(len(body)).encode())]
    return headers, body
