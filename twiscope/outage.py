"""What the platform does while PostgreSQL or Redis is down: tell transient dependency
errors apart, answer HTTP with a JSON 503 instead of a 500 page, and wait with backoff.

``dependency_down(exc)`` names the dependency behind an exception: ``"database"`` for
Django's ``OperationalError``/``InterfaceError`` (connection refused or lost, server
starting up or shutting down), ``"redis"`` for redis-py's ``ConnectionError``/
``TimeoutError`` and kombu's ``OperationalError`` (the Celery broker), looked for in
the exception and in what caused it; ``None`` for anything else.

``DependencyUnavailableMiddleware`` (first in ``MIDDLEWARE``) turns a request that
failed on one of them into ``503 Service Unavailable`` with ``Retry-After:
RETRY_AFTER_S`` and DRF's error shape, ``{"detail": ..., "unavailable": "database" |
"redis"}``: from a view (DRF or plain), and from another middleware too (the session
and authentication middleware read the database and the cache), whatever ``DEBUG``.
Django turns an exception into a 500 response inside each middleware layer
(``convert_exception_to_response``), before an outer middleware could see it, so the
exception is noted on the request by a ``got_request_exception`` receiver (sent for
every such conversion) and the 500 it became is replaced here. Each is logged once as
``http.dependency_unavailable`` with the path and the error.

``wait_out(call, what=...)`` runs ``call`` until it does not fail on a dependency,
sleeping with capped exponential backoff and full jitter in between (AWS Architecture
Blog, "Exponential Backoff And Jitter", 2015), and closes Django's broken database
connections before each new try (a management command has no request cycle to do it).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import kombu.exceptions
import redis.exceptions
import structlog
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django import db
from django.core.signals import got_request_exception
from django.http import HttpRequest, HttpResponse, HttpResponseBase

log = structlog.get_logger(__name__)

Dependency = Literal["database", "redis"]
T = TypeVar("T")

RETRY_AFTER_S = 5
"""``Retry-After`` of a 503, in seconds: about how long a restarted server takes."""
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
DATABASE_ERRORS: tuple[type[BaseException], ...] = (db.OperationalError, db.InterfaceError)
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
)
DEPENDENCY_ERRORS = DATABASE_ERRORS + REDIS_ERRORS
"""Every exception class ``dependency_down`` recognises (for ``except`` clauses)."""
_NOTE = "_twiscope_dependency_down"


def dependency_down(exc: BaseException | None) -> Dependency | None:
    """The dependency ``exc`` (or an exception in its ``__cause__``/``__context__``
    chain) says is unreachable, or ``None`` when it is about something else."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DATABASE_ERRORS):
            return "database"
        if isinstance(exc, REDIS_ERRORS):
            return "redis"
        exc = exc.__cause__ or exc.__context__
    return None


def unavailable_response(dependency: Dependency) -> HttpResponse:
    """``503`` with ``Retry-After`` and a JSON body in DRF's error shape."""
    body = {
        "detail": f"The {dependency} is unavailable; retry in a few seconds.",
        "unavailable": dependency,
    }
    response = HttpResponse(json.dumps(body), status=503, content_type="application/json")
    response["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _note_exception(sender: Any, request: HttpRequest | None = None, **_: Any) -> None:
    """``got_request_exception`` receiver: remember on ``request`` which dependency the
    exception being handled (``sys.exc_info()``, as Django sends the signal from its
    ``except`` block) came from."""
    import sys

    dependency = dependency_down(sys.exc_info()[1])
    if request is not None and dependency is not None:
        setattr(request, _NOTE, (dependency, repr(sys.exc_info()[1])[:300]))


got_request_exception.connect(_note_exception, dispatch_uid="twiscope.outage.note_exception")


class DependencyUnavailableMiddleware:
    """Answer ``503`` + ``Retry-After`` (JSON) for a request that failed because the
    database or Redis is unreachable (see the module docstring). Sync and async."""

    sync_capable = True
    async_capable = True

    def __init__(
        self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]
    ) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        response = self.get_response(request)
        # Any response: a file (whitenoise) or a stream is not an HttpResponse.
        assert isinstance(response, HttpResponseBase)
        return self._replace(request, response)

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)  # type: ignore[misc]
        return self._replace(request, response)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """A view's exception: answered here, before Django renders its 500."""
        dependency = dependency_down(exception)
        if dependency is None:
            return None
        return self._answer(request, dependency, repr(exception)[:300])

    @classmethod
    def _replace(cls, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        """``response``, or the 503 when it is the 500 of a noted dependency error."""
        note = getattr(request, _NOTE, None)
        if note is None or response.status_code != 500:
            return response
        return cls._answer(request, *note)

    @staticmethod
    def _answer(request: HttpRequest, dependency: Dependency, error: str) -> HttpResponse:
        log.warning(
            "http.dependency_unavailable",
            dependency=dependency,
            path=request.path,
            method=request.method,
            error=error,
        )
        return unavailable_response(dependency)


def close_broken_connections() -> None:
    """Close every Django database connection, so the next query connects afresh.

    A connection the server dropped stays unusable until closed; closing one that is
    already broken may raise again, which is logged, not raised.
    """
    for connection in db.connections.all(initialized_only=True):
        try:
            connection.close()
        except DATABASE_ERRORS as exc:
            log.info("outage.close_failed", alias=connection.alias, error=repr(exc)[:300])


def backoff_s(
    attempt: int, first_s: float = BACKOFF_FIRST_S, cap_s: float = BACKOFF_MAX_S
) -> float:
    """Seconds to sleep before try ``attempt`` (1-based) after a failure: a uniformly
    random value in ``[0, min(cap_s, first_s * 2**(attempt-1))]`` ("full jitter"), at
    least 0.05 s."""
    return max(0.05, random.uniform(0, min(cap_s, first_s * 2 ** (attempt - 1))))


def wait_out(
    call: Callable[[], T],
    *,
    what: str,
    give_up_after_s: float | None = None,
    on_wait: Callable[[Dependency, BaseException, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``'s result, retried while it fails on an unreachable dependency.

    Between tries: ``close_broken_connections()``, a log line ``outage.waiting`` (with
    ``what``, the dependency, the try and the delay), ``on_wait(dependency, exc,
    delay_s)`` when given, and a sleep of ``backoff_s(try)``. ``call`` must be safe to
    repeat (idempotent, or harmless when its first try half happened). Other
    exceptions propagate at once. Raises the last dependency error when
    ``give_up_after_s`` (seconds since the first failure) has passed; never gives up
    when ``None``. Logs ``outage.recovered`` after a success that followed failures.
    """
    attempt = 0
    first_failure: float | None = None
    while True:
        try:
            result = call()
        except DEPENDENCY_ERRORS as exc:
            dependency = dependency_down(exc) or "database"
            attempt += 1
            now = time.monotonic()
            first_failure = first_failure if first_failure is not None else now
            if give_up_after_s is not None and now - first_failure >= give_up_after_s:
                log.error("outage.gave_up", what=what, dependency=dependency, attempts=attempt)
                raise
            close_broken_connections()
            delay = backoff_s(attempt)
            log.warning(
                "outage.waiting",
                what=what,
                dependency=dependency,
                attempt=attempt,
                delay_s=round(delay, 2),
                error=repr(exc)[:300],
            )
            if on_wait is not None:
                on_wait(dependency, exc, delay)
            sleep(delay)
            continue
        if first_failure is not None:
            log.info(
                "outage.recovered",
                what=what,
                attempts=attempt,
                seconds=round(time.monotonic() - first_failure, 2),
            )
        return result
