"""``GET /health/``: whether this web process reaches its dependencies.

No authentication (load balancers and ``make run``'s users ask it). Answers ``200``
with ``{"status": "ok", "database": "ok", "redis": "ok"}`` when PostgreSQL answers
``SELECT 1`` and Redis answers ``PING``; otherwise ``503`` with ``Retry-After``,
``"status": "unavailable"``, ``"down": [...]`` (``"database"``, ``"redis"``) and, for
each dependency down, ``"down: <error class>"`` in its field. Each check has its own
error handling, so one dependency down never hides the other's state.
"""

from __future__ import annotations

import json

import structlog
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from twiscope.outage import DATABASE_ERRORS, REDIS_ERRORS, RETRY_AFTER_S
from twiscope.redis import get_redis

log = structlog.get_logger(__name__)


def _database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DATABASE_ERRORS as exc:
        log.warning("health.database_down", error=repr(exc)[:300])
        return f"down: {type(exc).__name__}"
    return "ok"


def _redis() -> str:
    try:
        get_redis().ping()
    except REDIS_ERRORS as exc:
        log.warning("health.redis_down", error=repr(exc)[:300])
        return f"down: {type(exc).__name__}"
    return "ok"


@never_cache
@require_GET
def health(request: HttpRequest) -> HttpResponse:
    """The dependencies' state (see the module docstring)."""
    checks = {"database": _database(), "redis": _redis()}
    down = [name for name, state in checks.items() if state != "ok"]
    body: dict[str, object] = {"status": "unavailable" if down else "ok", **checks}
    if down:
        body["down"] = down
    response = HttpResponse(
        json.dumps(body), status=503 if down else 200, content_type="application/json"
    )
    if down:
        response["Retry-After"] = str(RETRY_AFTER_S)
    return response
