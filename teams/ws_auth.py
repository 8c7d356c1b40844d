"""WebSocket authentication: an API token in a header, or the session cookie.

Never in the URL: a query string lands in proxy and server logs. A token is given in
the handshake as either

- ``Sec-WebSocket-Protocol: twiscope.v1, token.<key>`` (what a browser's
  ``new WebSocket(url, ["twiscope.v1", "token." + key])`` sends): the server answers
  with ``twiscope.v1`` (``SUBPROTOCOL``), never echoing the token; or
- ``Authorization: Token <key>`` (clients that can set headers: scripts, the
  benchmarks), as on the REST API.

Either is allowed from any origin (a token is not ambient authority, so cross-site
WebSocket hijacking does not apply) and is checked as the API checks it
(``teams.services.authenticate_token``: revoked, expired or unknown is refused). The
socket joins ``teams.services.token_group`` of its token, so revoking the token closes
it at once.

``?token=<key>``, accepted before tokens were hashed, is refused: the socket is closed
with ``CLOSE_UNAUTHENTICATED`` (4401) and ``ws.auth.query_token_refused`` is logged
(the key is not), whatever else the handshake carries.

Otherwise the Django session cookie, but only when the handshake's ``Origin`` is the
socket's own origin (scheme, host and port of its ``Host`` header, the host one of
``ALLOWED_HOSTS``) or one of ``CSRF_TRUSTED_ORIGINS``: the rule of Django's CSRF
origin check. Browsers send cookies cross-site, so a session socket from any other
page must be refused.

The middleware sets ``scope["user"]`` and ``scope["auth"]``: ``"token"`` (then also
``scope["token_id"]``), ``"session"``, ``"none"`` (anonymous) or ``"origin-refused"``
(a session cookie from a foreign or missing ``Origin``; the user is anonymous). The
consumer accepts the handshake and then closes the socket with
``CLOSE_ORIGIN_REFUSED`` (4403) or ``CLOSE_UNAUTHENTICATED`` (4401): a close before the
accept reaches the client as a bare HTTP 403, whatever the code.

While the database or Redis is down (an error of ``UNAVAILABLE_ERRORS``: the token or
session lookup here, the channel layer or the sequence read in the consumer), the
socket is accepted and closed with ``CLOSE_UNAVAILABLE`` (4503), never answered with an
HTTP 500 at the handshake: the client retries with backoff and catches up over REST.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from asgiref.sync import sync_to_async
from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db import close_old_connections
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain

from teams.services import authenticate_token
from twiscope.outage import DEPENDENCY_ERRORS

SUBPROTOCOL = "twiscope.v1"
"""The subprotocol a browser offers beside its token; the server selects it."""
TOKEN_SUBPROTOCOL_PREFIX = "token."
"""An offered subprotocol ``token.<key>`` carries the API token ``<key>``."""

CLOSE_UNAUTHENTICATED = 4401
"""Close code of a socket with no valid credentials (no token, a bad token, no session)."""
CLOSE_ORIGIN_REFUSED = 4403
"""Close code of a socket offering a session cookie from an origin that is not allowed."""
CLOSE_UNAVAILABLE = 4503
"""Close code of a socket refused or dropped because the database or Redis is down:
"service unavailable, retry" (the WebSocket analogue of HTTP 503 + ``Retry-After``).
The client reconnects with backoff and, once in, catches up over REST."""

UNAVAILABLE_ERRORS = DEPENDENCY_ERRORS
"""The errors that mean "a dependency is down, retry later" (the database unreachable or
its connection lost; Redis or the broker refusing or timing out), as opposed to a bug:
the platform's one list, ``twiscope.outage.DEPENDENCY_ERRORS``."""

log = structlog.get_logger(__name__)


async def release_connections() -> None:
    """Close this scope's database connections that are broken or past their age.

    What channels does before each message (``aclose_old_connections``); a socket ended
    by an outage gets no further message, and its task may be cancelled once the close
    is sent, so it is done before. Django's function is called directly: channels'
    test communicator turns its own into a no-op, which would leave the test database
    held open.
    """
    await sync_to_async(close_old_connections)()


async def close_unavailable(send: Any, *, accepted: bool) -> None:
    """Accept the handshake unless ``accepted``, then close with ``CLOSE_UNAVAILABLE``.

    Side effects: sends ``websocket.accept`` (when not ``accepted``) and
    ``websocket.close`` through the ASGI ``send``. Accepting first is what carries the
    code to a browser: a close before the accept reaches it as a bare HTTP 403.
    """
    if not accepted:
        await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": CLOSE_UNAVAILABLE})


@database_sync_to_async
def _user_for_token(key: str) -> tuple[Any, int | None]:
    token = authenticate_token(key)
    if token is None:
        return AnonymousUser(), None
    return token.user, token.id


def offered_subprotocols(scope: dict[str, Any]) -> list[str]:
    """The subprotocols the client offered (``scope["subprotocols"]``, as channels
    parses ``Sec-WebSocket-Protocol``)."""
    return [str(p).strip() for p in scope.get("subprotocols") or []]


def presented_token(scope: dict[str, Any]) -> str | None:
    """The API token the handshake carries: an offered ``token.<key>`` subprotocol,
    else an ``Authorization: Token <key>`` header; None when neither."""
    for protocol in offered_subprotocols(scope):
        if protocol.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return protocol[len(TOKEN_SUBPROTOCOL_PREFIX) :]
    header = (_header(scope, b"authorization") or "").split()
    if len(header) == 2 and header[0].lower() == "token":
        return header[1]
    return None


def _query_has_token(scope: dict[str, Any]) -> bool:
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    return "token" in query


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _own_origin(scope: dict[str, Any]) -> str | None:
    """``<http|https>://<Host header>`` of the socket, or None when its host is not one
    of ``ALLOWED_HOSTS`` (what ``HttpRequest.get_host`` would refuse)."""
    host = _header(scope, b"host")
    if host is None:
        server = scope.get("server")
        if not server or server[1] is None:
            return None
        host = f"{server[0]}:{server[1]}"
    domain, _port = split_domain_port(host)
    if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
        return None
    scheme = "https" if scope.get("scheme") == "wss" else "http"
    return f"{scheme}://{host}"


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Whether the handshake's ``Origin`` may carry the session cookie.

    As Django's ``CsrfViewMiddleware._origin_verified``: the ``Origin`` must equal the
    socket's own origin (same scheme, host and port, the host allowed), or one of
    ``CSRF_TRUSTED_ORIGINS`` (``https://*.example.com`` entries match subdomains). A
    missing or ``null`` ``Origin`` is refused.
    """
    origin = _header(scope, b"origin")
    if not origin or origin == "null":
        return False
    if origin == _own_origin(scope) or origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    parsed = urlsplit(origin)
    return any(
        is_same_domain(parsed.netloc, urlsplit(trusted).netloc.lstrip("*"))
        for trusted in settings.CSRF_TRUSTED_ORIGINS
        if "*" in trusted and urlsplit(trusted).scheme == parsed.scheme
    )


def _has_session_cookie(scope: dict[str, Any]) -> bool:
    cookies = _header(scope, b"cookie") or ""
    name = settings.SESSION_COOKIE_NAME
    return any(part.strip().startswith(f"{name}=") for part in cookies.split(";"))


class TokenOrSessionAuthMiddleware:
    """ASGI middleware setting ``scope["user"]`` and ``scope["auth"]`` for sockets."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        """Resolve the caller, then run the inner app.

        When the token or session lookup fails with one of ``UNAVAILABLE_ERRORS`` (the
        database is down), the socket is accepted and closed with ``CLOSE_UNAVAILABLE``
        (4503) instead of the inner app running; an error raised by the inner app itself
        propagates (the consumer handles its own).
        """
        if _query_has_token(scope):
            log.warning("ws.auth.query_token_refused", path=scope.get("path"))
            return await self.inner(dict(scope, user=AnonymousUser(), auth="none"), receive, send)
        token = presented_token(scope)
        if token:
            try:
                user, token_id = await _user_for_token(token)
            except UNAVAILABLE_ERRORS as exc:
                return await self._unavailable(scope, receive, send, exc)
            return await self.inner(
                dict(scope, user=user, auth="token", token_id=token_id), receive, send
            )
        if origin_allowed(scope):
            reached = False

            async def inner(inner_scope: dict[str, Any], receive: Any, send: Any) -> Any:
                nonlocal reached
                reached = True
                return await self.inner(inner_scope, receive, send)

            try:
                return await AuthMiddlewareStack(inner)(dict(scope, auth="session"), receive, send)
            except UNAVAILABLE_ERRORS as exc:
                if reached:
                    raise
                return await self._unavailable(scope, receive, send, exc)
        auth = "origin-refused" if _has_session_cookie(scope) else "none"
        return await self.inner(dict(scope, user=AnonymousUser(), auth=auth), receive, send)

    @staticmethod
    async def _unavailable(
        scope: dict[str, Any], receive: Any, send: Any, exc: BaseException
    ) -> None:
        """Log the outage, then answer the handshake (``websocket.connect``) with an
        accept and a 4503 close; a client already gone gets nothing."""
        log.warning(
            "ws.auth.unavailable",
            path=scope.get("path"),
            error=type(exc).__name__,
            detail=str(exc)[:200],
            close_code=CLOSE_UNAVAILABLE,
        )
        await release_connections()
        message = await receive()
        if message["type"] == "websocket.connect":
            await close_unavailable(send, accepted=False)
