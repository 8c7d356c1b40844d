"""The cache of the API's hot reads, invalidated by the pipeline through per-team
generation counters in Redis.

A pipeline stage that changes what a cached read shows bumps the generation of that
``kind`` for the teams it touched, after its transaction commits (``bump_on_commit``):

- ``events``: events persisted, dead letters parked, sources created or changed
  (``/api/stats/``'s stored totals);
- ``trends``: a trend stream advanced (trends inserted, counted, confirmed, withdrawn,
  joined to stories);
- ``alerts``: alerts fired, pushed or updated, a rule renamed (the alerts list, and
  ``/api/stats/``'s alert latency).

A cached value is keyed by the view, the caller's sorted team ids, the request's
normalised query and the current generations of the kinds it depends on, so a bump makes
every older entry unreachable at once (it then expires after ``HOT_CACHE_TTL_S``, the
safety net should a bump ever be lost). A reader takes the generations before it reads
the database and a writer bumps after commit, so an entry stored under a generation
never holds data older than that generation's commit.

Every app may import this module: it imports only ``teams.selectors`` (the caller's
teams), the lowest layer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from rest_framework.request import Request
from rest_framework.response import Response

from teams.selectors import team_ids_for
from twiscope.redis import get_redis

KINDS = ("events", "trends", "alerts")
"""What a generation counts changes of (see the module docstring)."""

GEN_KEY = "twiscope:gen:{kind}:{team}"
VALUE_KEY = "hot:{view}:{digest}"

T = TypeVar("T")


def ttl_s() -> int:
    """``settings.HOT_CACHE_TTL_S`` (seconds; 0 turns the cache off), 300 by default."""
    return int(getattr(settings, "HOT_CACHE_TTL_S", 300))


def bump(kind: str, team_ids: Iterable[int]) -> None:
    """Increment the ``kind`` generation of each of ``team_ids`` (one Redis round trip).

    Raises:
        ValueError: ``kind`` is not one of ``KINDS``.
        redis.RedisError: Redis is away (the caller's task is retried like any other
            Redis failure of the pipeline).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; one of {', '.join(KINDS)}")
    teams = sorted({int(t) for t in team_ids})
    if not teams:
        return
    pipe = get_redis().pipeline(transaction=False)
    for team in teams:
        pipe.incr(GEN_KEY.format(kind=kind, team=team))
    pipe.execute()


def bump_on_commit(kind: str, team_ids: Iterable[int]) -> None:
    """``bump(kind, team_ids)`` once the current transaction commits (at once outside
    one); ``team_ids`` is read now."""
    teams = sorted({int(t) for t in team_ids})
    if teams:
        transaction.on_commit(lambda: bump(kind, teams))


def generations(kinds: Sequence[str], team_ids: Sequence[int]) -> list[int]:
    """The current generation of each ``(kind, team)``, kinds outer, teams inner (0
    where never bumped). One Redis ``MGET``."""
    keys = [GEN_KEY.format(kind=kind, team=team) for kind in kinds for team in team_ids]
    if not keys:
        return []
    values = cast("list[bytes | None]", get_redis().mget(keys))
    return [int(v) if v is not None else 0 for v in values]


def cached(
    view: str,
    *,
    team_ids: Iterable[int],
    kinds: Sequence[str],
    query: Iterable[tuple[str, str]],
    compute: Callable[[], T],
) -> T:
    """The value of ``compute()`` for this caller's teams and query, from the cache when
    no generation of ``kinds`` of ``team_ids`` has moved since it was stored.

    ``view`` names the read (part of the key), ``query`` is its parameters (sorted
    here, so their order in the URL does not matter). ``compute`` must depend on
    nothing but the database rows of those kinds and teams and the query, and return a
    picklable value. Costs two Redis round trips on a hit and none of the database's.
    With ``HOT_CACHE_TTL_S`` 0, ``compute()`` every time.
    """
    ttl = ttl_s()
    if ttl <= 0:
        return compute()
    teams = sorted({int(t) for t in team_ids})
    gens = generations(kinds, teams)
    material = repr((teams, list(kinds), gens, sorted(query)))
    key = VALUE_KEY.format(view=view, digest=hashlib.sha256(material.encode()).hexdigest())
    value = cache.get(key)
    if value is not None:
        return cast("T", value)
    value = compute()
    cache.set(key, value, ttl)
    return value


def query_items(params: Any, *, exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """A request's query parameters (a ``QueryDict``) as sorted ``(name, value)``
    pairs, every value of a repeated name included, ``exclude`` left out."""
    skip = set(exclude)
    return sorted(
        (name, value) for name, values in params.lists() if name not in skip for value in values
    )


def caller_team_ids(request: Request) -> list[int]:
    """The ids of the teams of ``request``'s user (one query; empty if anonymous)."""
    return list(team_ids_for(request.user).values_list("team_id", flat=True))


class HotListMixin:
    """A list endpoint whose first page comes from the hot cache (``cached``).

    ``hot_view`` names it, ``hot_kinds`` are the generations its rows depend on. Only
    the first page of a JSON answer is cached (no ``cursor``, ``page`` absent or 1):
    what dashboards poll; a catch-up following ``next`` reads the database. The key
    holds the scheme and host too, since the answer's ``next`` link carries them. A
    hit costs the caller's authentication, one query for their teams, and two Redis
    round trips.
    """

    hot_view: str = ""
    hot_kinds: tuple[str, ...] = ()

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        # No docstring: drf-spectacular would show it instead of the view's own.
        params = request.query_params
        first_page = "cursor" not in params and params.get("page", "1") == "1"
        json = getattr(request, "accepted_renderer", None) is not None and (
            request.accepted_renderer.format == "json"
        )
        if not (first_page and json):
            return super().list(request, *args, **kwargs)  # type: ignore[misc]
        query = [
            ("_scheme", request.scheme or ""),
            ("_host", request.get_host()),
            *query_items(params),
        ]
        data = cached(
            self.hot_view,
            team_ids=caller_team_ids(request),
            kinds=self.hot_kinds,
            query=query,
            compute=lambda: super(HotListMixin, self).list(request, *args, **kwargs).data,  # type: ignore[misc]
        )
        return Response(data)
