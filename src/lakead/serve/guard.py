"""The service's gate: host, origin, token and body size, checked before a request is read.

A plain ASGI middleware, so that a refused request costs nothing: an unauthenticated or
oversized upload is answered before its body is parsed (a FastAPI dependency would run only
after the whole multipart body had been read into temporary files).

- Host: with ``allowed_hosts`` (the command line sets the loopback names when it binds to
  loopback), a request for another host name is refused, which defeats DNS rebinding (a web
  page whose name resolves to 127.0.0.1 cannot read this service's answers).
- Origin: a browser request that changes state (POST, DELETE, ...) from a page of another
  origin is refused: a web page the user happens to visit cannot create or delete models.
  Clients that are not browsers send no Origin header and are not affected.
- Token: with a token, every path except :data:`PUBLIC_PATHS` (the health check, the page
  and its files, the API description) needs ``Authorization: Bearer <token>``.
- Size: a body longer than ``max_body_bytes`` gets 413, from its Content-Length header when
  it has one, else as soon as the bytes received pass the limit.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Paths served without the token: they hold no model and no data.
PUBLIC_PATHS = ("/healthz", "/", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
PUBLIC_PREFIXES = ("/static/",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body_bytes: int,
        allowed_hosts: tuple[str, ...] | None = None,
    ) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts) if allowed_hosts else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "").lower()
        if self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            await _reply(send, 400, f"host {host!r} is not served here (allowed: {', '.join(self.allowed_hosts)})")
            return
        origin = headers.get("origin")
        if origin is not None and scope["method"] not in SAFE_METHODS and urlsplit(origin).netloc.lower() != host:
            await _reply(send, 403, f"cross-origin request from {origin} refused: use the page served by this service")
            return
        if self.token is not None and not is_public(scope["path"]):
            auth = headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), self.token):
                problem = "missing" if not auth else "wrong"
                await _reply(send, 401, f"{problem} token: send the header 'Authorization: Bearer <token>' "
                                        "(the token given to lakead serve --token)", {"www-authenticate": "Bearer"})
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _reply(send, 413, _too_large(int(length), self.max_body_bytes))
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body, and its
                    # handler answers 413 with this message.
                    raise HTTPException(413, _too_large(received, self.max_body_bytes, at_least=True))
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except HTTPException as exc:  # raised outside FastAPI's body parsing
            if started or exc.status_code != 413:
                raise
            await _reply(send, 413, str(exc.detail))


def _host_name(host: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``; ``[::1]:8000`` -> ``[::1]``."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    mib = 2**20
    what = "request body" if at_least else f"request body of {size / mib:.1f} MiB"
    return f"{what} is larger than the limit of {limit / mib:.1f} MiB (lakead serve --max-upload-mb)"


async def _reply(send: Send, status: int, detail: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail, "errors": []}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
