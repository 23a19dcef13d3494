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
- Multipart: a multipart body that ends without its closing boundary (truncated) gets 400.
- Every answer, the gate's own included, carries ``X-Frame-Options: DENY``,
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and a
  Content-Security-Policy (the page: its own scripts and styles only; the API description
  also the inline start of Swagger UI and ReDoc, whose files this server serves itself).

The token is compared as bytes: the header's raw bytes against the token's UTF-8 bytes, so a
token with non-ASCII characters works (the page sends it UTF-8 encoded).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Paths served without the token: they hold no model and no data.
PUBLIC_PATHS = ("/healthz", "/", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
PUBLIC_PREFIXES = ("/static/", "/docs-assets/")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

#: The page and the API's answers: nothing but this service's own files.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
#: /docs and /redoc: Swagger UI / ReDoc from this server's own files (lakead.serve.docs), started inline.
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; worker-src blob:; base-uri 'none'; frame-ancestors 'none'")


def security_headers(path: str) -> list[tuple[bytes, bytes]]:
    csp = DOCS_CSP if path in ("/docs", "/redoc", "/docs/oauth2-redirect") else CSP
    return [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"content-security-policy", csp.encode())]


def served_hosts(host: str, extra: "list[str] | tuple[str, ...]" = ()) -> tuple[str, ...]:
    """The Host names a service bound to ``host`` answers: the loopback names, ``extra``
    (``--allowed-host``), and off loopback the machine's host name and FQDN and the bound
    address itself (an IP address typed as the host passes anyway, with ``allow_ip_hosts``)."""
    import socket

    hosts = ["127.0.0.1", "localhost", "[::1]", *(h.lower() for h in extra)]
    if host not in ("127.0.0.1", "localhost", "::1"):
        hosts += [n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n]
        if host not in ("0.0.0.0", "::"):
            hosts.append(f"[{host}]" if ":" in host else host.lower())
    return tuple(dict.fromkeys(hosts))


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


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
        allow_ip_hosts: bool = False,
    ) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts) if allowed_hosts else None
        # an address typed as such (http://192.0.2.7:8000/) cannot be a rebinding attack,
        # which needs a name that the attacker's DNS points here
        self.allow_ip_hosts = allow_ip_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = security_headers(scope["path"])
        raw_send = send

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await raw_send(message)

        raw = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        headers = {k: v.decode("latin-1") for k, v in raw.items()}
        host = headers.get("host", "").lower()
        name = _host_name(host)
        if self.allowed_hosts is not None and name not in self.allowed_hosts and not (
                self.allow_ip_hosts and _is_ip_literal(name)):
            await _reply(send, 400, f"host {host!r} is not served here (allowed: {', '.join(self.allowed_hosts)})")
            return
        origin = headers.get("origin")
        if origin is not None and scope["method"] not in SAFE_METHODS and urlsplit(origin).netloc.lower() != host:
            await _reply(send, 403, f"cross-origin request from {origin} refused: use the page served by this service")
            return
        if self.token is not None and not is_public(scope["path"]):
            auth = raw.get("authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
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
        closing = _closing_delimiter(headers.get("content-type", ""))
        tail = b""

        async def limited_receive() -> Message:
            nonlocal received, closing, tail
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_body_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body, and its
                    # handler answers 413 with this message.
                    raise HTTPException(413, _too_large(received, self.max_body_bytes, at_least=True))
                if closing is not None:
                    seen = tail + chunk
                    if closing in seen:
                        closing = None  # complete
                    else:
                        tail = seen[-len(closing):]
                        if not message.get("more_body", False):
                            raise HTTPException(400, "malformed multipart body: it ends before its closing boundary "
                                                     "(truncated upload?)")
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except HTTPException as exc:  # raised outside FastAPI's body parsing
            if started or exc.status_code not in (400, 413):
                raise
            await _reply(send, 413, str(exc.detail))


def _closing_delimiter(content_type: str) -> bytes | None:
    """``--boundary--`` of a multipart body, which its last part ends with."""
    if not content_type.lower().startswith("multipart/"):
        return None
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    return b"--" + m.group(1).encode("latin-1") + b"--" if m else None


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
