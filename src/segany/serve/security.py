"""ASGI guards of the server: the optional access token, same-origin changes and the
request body limit.

Both answer with the API's error shape, ``{"detail": "one line"}``.
"""

from __future__ import annotations

import secrets
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_COOKIE = "segany_token"
API_PREFIX = "/api/"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison, so response times do not reveal the token."""
    return given is not None and secrets.compare_digest(given.encode(), token.encode())


def request_token(scope: Scope) -> str | None:
    """The token a request carries: ``Authorization: Bearer T`` or the ``segany_token``
    cookie (set when the browser opens ``/?token=T``)."""
    authorization = _header(scope, b"authorization")
    if authorization is not None:
        kind, _, value = authorization.partition(" ")
        if kind.lower() == "bearer":
            return value.strip()
    cookie = _header(scope, b"cookie")
    if cookie is not None:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(cookie)
        except Exception:  # a malformed cookie header carries no token
            return None
        if TOKEN_COOKIE in jar:
            return jar[TOKEN_COOKIE].value
    return None


class TokenGuard:
    """Refuses every ``/api/`` request without the token (401). The page and its static
    files are public: they hold no data, and the page asks for the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith(API_PREFIX)
            and not token_matches(request_token(scope), self.token)
        ):
            response = JSONResponse(
                {
                    "detail": "this server needs a token: send 'Authorization: Bearer TOKEN' "
                    "or open the page as /?token=TOKEN"
                },
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``[::1]``."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0]


class HostGuard:
    """Refuses requests whose ``Host`` is not one of ``allowed`` (400). A server on
    127.0.0.1 is only ever asked for as 127.0.0.1 or localhost; any other name means a
    web page reaching it through DNS rebinding."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app, self.allowed = app, set(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = _header(scope, b"host") or ""
        if scope["type"] == "http" and _host_name(host) not in self.allowed:
            names = ", ".join(sorted(self.allowed))
            response = JSONResponse(
                {"detail": f"requests for host {host!r} are refused; this server answers {names}"},
                status_code=400,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class SameOriginGuard:
    """Refuses API changes (POST, PUT, PATCH, DELETE) sent by a page of another site (403):
    a browser names the sending page in ``Origin``, and it must be this server. Without it
    any web page could post forms (uploads, "segment everything") to a local server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin")
        if (
            scope["type"] == "http"
            and scope["method"] in UNSAFE_METHODS
            and scope["path"].startswith(API_PREFIX)
            and origin is not None
            and urlsplit(origin).netloc != _header(scope, b"host")
        ):
            response = JSONResponse(
                {"detail": f"changes from another site ({origin}) are refused"}, status_code=403
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413: at once when Content-Length
    says so, else as soon as the streamed body grows past it (nothing more is read)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return f"request body is larger than the server's limit of {self.max_bytes / 2**20:g} MB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI passes HTTPException through its body parsing unchanged.
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)
