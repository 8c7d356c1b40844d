"""Rate limits of the API: one throttle for every view, its scope chosen per request.

Scopes and their settings (DRF rate strings, read from the environment):

- ``export`` (``API_RATE_EXPORT``): a view's ``export`` action
  (``GET /api/events/export/``), whatever else the request holds;
- ``write`` (``API_RATE_WRITE``): any method but GET, HEAD and OPTIONS;
- ``search`` (``API_RATE_SEARCH``): a read with a non-empty ``q`` (``/api/events/?q=``);
- ``read`` (``API_RATE_READ``): every other read.

A budget belongs to a caller and a scope: each API token has its own (two tokens of
one user are two budgets, so one integration cannot starve another), a user's browser
sessions share one, and an anonymous caller (the signed webhook intake) is counted by
address (``TRUSTED_PROXY_HOPS``: which ``X-Forwarded-For`` entry, if any, to believe).
Counting is a fixed window in Redis (``twiscope.ratelimit``: one atomic ``INCR`` per
request, exact under concurrency).

Past the limit: ``429`` ``{"detail": "Request was throttled. Expected available in N
seconds."}`` with ``Retry-After: N`` (DRF's answer to ``Throttled``). Every request that
reaches the throttle (an authenticated caller, or a view open to anonymous ones) is
answered with the headers of draft-ietf-httpapi-ratelimit-headers (-06):
``RateLimit-Limit`` (the scope's limit), ``RateLimit-Remaining`` (what is left in this
window) and ``RateLimit-Reset`` (seconds until the window resets), set by
``RateLimitHeadersMiddleware``. A request refused before it (401: no or bad
credentials) carries none: it spent nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from rest_framework.permissions import SAFE_METHODS
from rest_framework.throttling import BaseThrottle

from teams.models import ApiToken
from twiscope import ratelimit

if TYPE_CHECKING:
    # DRF imports this module while rest_framework.views loads (its settings name it).
    from rest_framework.request import Request
    from rest_framework.views import APIView

SCOPE_SETTINGS: Final = {
    "read": "API_RATE_READ",
    "write": "API_RATE_WRITE",
    "search": "API_RATE_SEARCH",
    "export": "API_RATE_EXPORT",
}
"""Each scope and the setting holding its rate."""
EXPORT_ACTION: Final = "export"
"""The viewset action that is an export."""
SEARCH_PARAM: Final = "q"
"""The query parameter that makes a read a search."""
_WINDOW_ATTR: Final = "_ratelimit_window"


def scope_for(request: Request, view: APIView) -> str:
    """The scope (a key of ``SCOPE_SETTINGS``) that ``request`` to ``view`` spends."""
    if getattr(view, "action", None) == EXPORT_ACTION:
        return "export"
    if request.method not in SAFE_METHODS:
        return "write"
    if request.query_params.get(SEARCH_PARAM, "").strip():
        return "search"
    return "read"


@lru_cache(maxsize=32)
def _parsed(text: str) -> ratelimit.Rate:
    return ratelimit.parse_rate(text)


def rate_for(scope: str) -> ratelimit.Rate:
    """The rate of ``scope``, read from its setting now (so a settings override holds)."""
    return _parsed(getattr(settings, SCOPE_SETTINGS[scope]))


class ApiRateThrottle(BaseThrottle):
    """The API's one throttle class (``DEFAULT_THROTTLE_CLASSES``): module docstring.

    Side effects: one Redis round trip per request; the window it counted is kept on
    the request for ``RateLimitHeadersMiddleware``.

    Raises:
        redis.RedisError: Redis is down (answered 503 by ``twiscope.outage``).
    """

    def __init__(self) -> None:
        self.window: ratelimit.Window | None = None

    def caller(self, request: Request) -> str:
        """Whose budget the request spends: ``token:<id>``, ``user:<id>`` (a session) or
        ``ip:<address>``."""
        user = request.user
        if user is not None and user.is_authenticated:
            if isinstance(request.auth, ApiToken):
                return f"token:{request.auth.pk}"
            return f"user:{user.pk}"
        return f"ip:{self.get_ident(request)}"

    def allow_request(self, request: Request, view: APIView) -> bool:
        scope = scope_for(request, view)
        self.window = ratelimit.hit(f"{scope}:{self.caller(request)}", rate_for(scope))
        setattr(request._request, _WINDOW_ATTR, self.window)
        return self.window.allowed

    def wait(self) -> float | None:
        """Seconds until the window resets (DRF's ``Retry-After``)."""
        return None if self.window is None else self.window.reset_s


class RateLimitHeadersMiddleware:
    """Adds ``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` to the
    response of every request the throttle counted (including its 429)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> Any:
        response = self.get_response(request)
        window: ratelimit.Window | None = getattr(request, _WINDOW_ATTR, None)
        if window is not None:
            response["RateLimit-Limit"] = str(window.limit)
            response["RateLimit-Remaining"] = str(window.remaining)
            response["RateLimit-Reset"] = str(window.reset_s)
        return response
