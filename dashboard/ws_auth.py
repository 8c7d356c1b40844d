"""WebSocket authentication: an API token in the query string, or the session cookie.

- ``?token=<key>``: a DRF token; allowed from any origin (a token is not ambient
  authority, so cross-site WebSocket hijacking does not apply).
- Otherwise the Django session cookie, but only when the ``Origin`` header names an
  allowed host: browsers send cookies cross-site, so a session socket from a foreign
  page must be refused.

Anything else leaves ``scope["user"]`` anonymous; the consumer then closes the socket.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.request import split_domain_port, validate_host
from rest_framework.authtoken.models import Token


@database_sync_to_async
def _user_for_token(key: str) -> Any:
    token = Token.objects.select_related("user").filter(key=key).first()
    if token is None or not token.user.is_active:
        return AnonymousUser()
    return token.user


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Whether the handshake's ``Origin`` host is one of ``ALLOWED_HOSTS``."""
    headers = dict(scope.get("headers", []))
    origin = headers.get(b"origin")
    if not origin:
        return False
    host = urlparse(origin.decode("latin-1")).netloc
    domain, _ = split_domain_port(host)
    return bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS)


class TokenOrSessionAuthMiddleware:
    """ASGI middleware setting ``scope["user"]`` (and ``scope["auth"]``) for sockets."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.session_stack = AuthMiddlewareStack(inner)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = (query.get("token") or [""])[0]
        if token:
            user = await _user_for_token(token)
            return await self.inner(dict(scope, user=user, auth="token"), receive, send)
        if origin_allowed(scope):
            return await self.session_stack(dict(scope, auth="session"), receive, send)
        return await self.inner(dict(scope, user=AnonymousUser(), auth="none"), receive, send)
