"""The API's token authentication: ``Authorization: Token <key>``, hashed tokens.

django-rest-knox's ``TokenAuthentication`` parses the header (and names the scheme in
the 401's ``WWW-Authenticate``); the check is ``teams.services.authenticate_token``, the
one the WebSocket handshake uses too: one query by the key's digest, refusing a
revoked or expired token or an inactive user, and ``last_used_at`` written at most
once a minute. Knox's own check is not used: it loads all of the user's tokens on every
request and deletes expired ones as it meets them (an owner would never see an expired
token in their list); here an expired token stays listed until revoked.
"""

from __future__ import annotations

from typing import Any

from knox.auth import TokenAuthentication
from rest_framework import exceptions

from teams.services import authenticate_token


class ApiTokenAuthentication(TokenAuthentication):
    """``Authorization: Token <key>``; ``request.auth`` is the ``teams.ApiToken``.

    Raises:
        rest_framework.exceptions.AuthenticationFailed: the header names the Token
            scheme but the key opens no live token (a 401).
    """

    def authenticate_credentials(self, token: bytes) -> tuple[Any, Any]:
        try:
            key = token.decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        found = authenticate_token(key)
        if found is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        return found.user, found
