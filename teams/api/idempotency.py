"""Idempotent writes: every POST and PATCH of the API honours an ``Idempotency-Key``.

A client that sends ``Idempotency-Key: <1 to 255 visible ASCII characters>`` with a
POST or PATCH may retry it safely: the first response is kept for
``IDEMPOTENCY_TTL_S`` (default 24 h) per caller (the authenticated user and the
credential used: the ``Authorization`` header's token, or the session), and a retry
with the same key and the same request (method, path with query, and body; a JSON
body compared by its parsed value, so key order and spacing do not matter) gets that
response again, status, body and ``Content-Type`` / ``Location`` headers, with
``Idempotent-Replayed: true``, without the write being done again. Then:

- the same key with another request: ``422`` ``{"Idempotency-Key": ["..."]}``;
- the same key while the first is still running: ``409`` ``{"detail": "..."}`` with
  ``Retry-After: 1`` (the first holds the key, claimed by an atomic ``SET NX`` with an
  expiry of ``IDEMPOTENCY_LOCK_S``, so a crashed request frees it);
- a key that is empty or over 255 characters, or not visible ASCII: ``400``
  ``{"Idempotency-Key": ["..."]}``.

What is kept: a response the view finished with a status below 500, except 401, 403,
408, 409, 425 and 429, which say the write was not done and may be on retry (a member
refused today may be an owner tomorrow); for anything else the key is released and a
retry runs again. Without the header, or on a view that takes no credentials (the
signed webhook intake: no token to scope a key to, and idempotent by ``external_id``),
nothing changes.

Why Redis (Django's cache, ``CACHES`` on Redis) rather than PostgreSQL: a key lives a
day and then must go, which Redis expiry does without a table, a sweeper or write
amplification on the system of record; the in-flight claim is one atomic ``SET NX``;
and losing the keys with Redis loses only the replay of a retry, never data. The cost:
a process that dies between its write's commit and storing the response leaves the
claim to expire (``IDEMPOTENCY_LOCK_S``), after which a retry runs the write again.

Implemented once, as ``IdempotencyMiddleware`` (in ``MIDDLEWARE`` after the
authentication middleware): it authenticates the caller with the DRF view's own
authentication classes before the view runs, so every DRF view, today's and
tomorrow's, is covered without declaring anything. This module is imported when the
middleware loads, after settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.views import APIView

HEADER: Final = "Idempotency-Key"
"""The request header naming a write's key."""
REPLAYED_HEADER: Final = "Idempotent-Replayed"
"""Set to ``true`` on a response that is a stored one, replayed."""
METHODS: Final = frozenset({"POST", "PATCH"})
"""The methods that honour a key."""
MAX_KEY_CHARS: Final = 255
KEPT_HEADERS: Final = ("Content-Type", "Location")
"""The response headers replayed with the status and body."""
NOT_KEPT: Final = frozenset({401, 403, 408, 409, 425, 429})
"""Statuses under 500 that are not kept: the write was not done and may be on retry."""
_PENDING: Final = "pending"
_DONE: Final = "done"


def honours(view_class: type[Any] | None) -> bool:
    """Whether a view honours ``Idempotency-Key`` on its POST and PATCH: a DRF view that
    authenticates its callers (keys are scoped to a caller's credentials)."""
    return (
        isinstance(view_class, type)
        and issubclass(view_class, APIView)
        and bool(view_class.authentication_classes)
    )


def _key_error(key: str) -> str | None:
    if not key:
        return "Must not be empty."
    if len(key) > MAX_KEY_CHARS:
        return f"Ensure this value has at most {MAX_KEY_CHARS} characters (it has {len(key)})."
    if not all("!" <= c <= "~" for c in key):
        return "Use visible ASCII characters only (no spaces)."
    return None


def _fingerprint(request: HttpRequest) -> str:
    """sha256 of the request's method, path with query, and body (JSON canonicalised)."""
    body = request.body
    if request.content_type == "application/json":
        # Not JSON after all: compared as bytes (the view will refuse it).
        with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
            body = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256()
    for part in (request.method or "").encode(), request.get_full_path().encode(), body:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def record_key(user_pk: Any, credential: str, key: str) -> str:
    """The cache key of ``key`` for a caller: their user id and the credential they used
    (the ``Authorization`` header, or ``session:<session key>``), both hashed."""
    scope = hashlib.sha256(f"{user_pk}\0{credential}\0{key}".encode()).hexdigest()
    return f"idempotency:{scope}"


def _caller_scope(request: HttpRequest, view_class: type[APIView]) -> tuple[Any, str] | None:
    """``(user id, credential)`` of the caller as the view would authenticate them, or
    None when they are not authenticated (the view then answers 401 or 403 itself)."""
    drf_request = Request(
        request, authenticators=[auth() for auth in view_class.authentication_classes]
    )
    try:
        user = drf_request.user
    except exceptions.APIException:
        return None
    if not user.is_authenticated:
        return None
    if drf_request.auth is not None:
        credential = request.headers.get("Authorization", "")
    else:
        credential = f"session:{request.session.session_key}"
    return user.pk, credential


@dataclass(frozen=True)
class _Claim:
    cache_key: str
    fingerprint: str


def _error(status: int, body: dict[str, Any]) -> JsonResponse:
    response = JsonResponse(body, status=status)
    if status == 409:
        response["Retry-After"] = "1"
    return response


def _replay(record: dict[str, Any]) -> HttpResponse:
    response = HttpResponse(record["body"], status=record["status"])
    for name, value in record["headers"].items():
        response[name] = value
    response[REPLAYED_HEADER] = "true"
    return response


class IdempotencyMiddleware:
    """Honours ``Idempotency-Key`` on every API POST and PATCH (module docstring).

    Side effects: one cache ``SET NX`` and one ``SET`` (or ``DELETE``) per keyed write,
    and a second authentication of its caller (one token lookup) before the view's own.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        claim: _Claim | None = request.__dict__.pop("_idempotency_claim", None)
        if claim is not None:
            self._settle(claim, response)
        return response

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: Any,
        view_kwargs: Any,
    ) -> HttpResponseBase | None:
        """Claims the key, or answers a replay, 409, 422 or 400 without running the view."""
        key = request.headers.get(HEADER)
        view_class = getattr(view_func, "cls", None)
        if key is None or request.method not in METHODS or not honours(view_class):
            return None
        problem = _key_error(key)
        if problem is not None:
            return _error(400, {HEADER: [problem]})
        scope = _caller_scope(request, view_class)  # type: ignore[arg-type]
        if scope is None:
            return None
        claim = _Claim(record_key(*scope, key), _fingerprint(request))
        for _attempt in range(2):
            if cache.add(
                claim.cache_key,
                {"state": _PENDING, "fingerprint": claim.fingerprint},
                timeout=settings.IDEMPOTENCY_LOCK_S,
            ):
                request._idempotency_claim = claim  # type: ignore[attr-defined]
                return None
            record = cache.get(claim.cache_key)
            if record is None:
                continue  # released or expired since: claim it again
            if record["fingerprint"] != claim.fingerprint:
                return _error(
                    422,
                    {
                        HEADER: [
                            "This key was used with a different request (method, path or "
                            "body); use a new key for a new request."
                        ]
                    },
                )
            if record["state"] == _PENDING:
                break
            return _replay(record)
        return _error(
            409, {"detail": "A request with this Idempotency-Key is in progress; retry later."}
        )

    @staticmethod
    def _settle(claim: _Claim, response: HttpResponseBase) -> None:
        """Keeps ``response`` under the claim for ``IDEMPOTENCY_TTL_S``, or releases it."""
        keep = (
            isinstance(response, HttpResponse)
            and response.status_code < 500
            and response.status_code not in NOT_KEPT
        )
        if not keep:
            cache.delete(claim.cache_key)
            return
        assert isinstance(response, HttpResponse)
        record = {
            "state": _DONE,
            "fingerprint": claim.fingerprint,
            "status": response.status_code,
            "body": response.content,
            "headers": {name: response[name] for name in KEPT_HEADERS if name in response},
        }
        cache.set(claim.cache_key, record, timeout=settings.IDEMPOTENCY_TTL_S)
