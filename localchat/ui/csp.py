"""The page's Content-Security-Policy: what the browser may load and run for it, sent with every response.

Everything comes from the app's own origin: no other host is ever contacted (fonts are the system's,
localchat/ui/app.py), so a script that got into the page could neither load code from elsewhere nor
send anything away (connect-src 'self'), embed frames or plugins, or post a form to another site. Gradio
runs its page from inline scripts and evaluates the `js=` code and each gr.HTML's js_on_load with
`new Function`, so scripts need 'unsafe-inline' and 'unsafe-eval'; the defence against markup from a
model, a user or an imported file is that it is escaped where it is rendered
(localchat/ui/markdown.py, localchat/ui/thread.py), which tests/test_xss.py checks in Chromium.
"""

from __future__ import annotations

POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self' 'unsafe-inline' 'unsafe-eval'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "font-src 'self' data:",
    "media-src 'self' data: blob:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "frame-src 'none'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

HEADERS = [
    (b"content-security-policy", POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """ASGI middleware: add the policy headers to every HTTP response (the page's and the API's)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *(h for h in HEADERS if h[0] not in names)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def middleware() -> list:
    """For FastAPI(middleware=...): how localchat/ui/app.py's launch passes it to Gradio's app."""
    from starlette.middleware import Middleware

    return [Middleware(SecurityHeaders)]
