"""The pipeline statistics of ``/api/stats/`` and the sentiment series of
``/api/sentiment/``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection
from django.db.models import Sum

from ingest.counters import events_rate_name
from ingest.models import DeadLetter, Source
from mlengine import facade as ml
from teams.selectors import team_ids_for
from twiscope import hotcache
from twiscope.pipeline import queue_depths
from twiscope.queues import NAMES, QUEUES
from twiscope.redis import rate_total

LATENCY_WINDOW = 1000


def stats_for(user: AbstractBaseUser | AnonymousUser) -> dict[str, Any]:
    """The numbers of ``GET /api/stats/`` for the teams of ``user``.

    Returns ``events_total`` (events stored), ``events_per_s`` (events stored in the
    last 60 s of processing time, per second, from a rolling counter in Redis),
    ``queue_lag`` (messages waiting per queue: the broker is shared by all teams),
    ``queues`` (the same, in flow order, each with its ``name``, the ``work`` that runs
    on it and ``waiting``: the one definition of ``twiscope.queues``),
    ``alert_latency_ms`` (``p50``, ``p95``, ``p99`` of
    ``pushed_at − event_received_at`` over the team's last 1,000 pushed alerts, and
    ``n``), ``dead_letters_total``, ``sources_total``, and ``scoring``: the transformer
    heads' worker (``mlengine.facade.ScoringStats``: the share of the last minute's
    events they labelled, their backlog and its lag in seconds, the fallback lag, the
    active heads).

    The database numbers come from the hot cache (``twiscope.hotcache``, kinds
    ``events`` and ``alerts``: refreshed after the pipeline changes them); the live ones
    (``events_per_s``, the queues, ``scoring``) are Redis reads every time. One query
    (the caller's teams) on a cache hit.
    """
    team_list = list(team_ids_for(user).values_list("team_id", flat=True))
    stored = hotcache.cached(
        "stats",
        team_ids=team_list,
        kinds=("events", "alerts"),
        query=(),
        compute=lambda: stored_stats(team_list),
    )
    last_minute = rate_total([events_rate_name(team_id) for team_id in team_list], seconds=60)
    waiting = queue_depths(NAMES)
    return {
        "events_total": stored["events_total"],
        "events_per_s": round(last_minute / 60, 2),
        "queue_lag": waiting,
        "queues": [
            {"name": queue.name, "work": queue.work, "waiting": waiting[queue.name]}
            for queue in QUEUES
        ],
        "alert_latency_ms": stored["alert_latency_ms"],
        "dead_letters_total": stored["dead_letters_total"],
        "sources_total": stored["sources_total"],
        "scoring": dataclasses.asdict(ml.scoring_stats(team_list)),
    }


def stored_stats(team_ids: Sequence[int]) -> dict[str, Any]:
    """The database numbers of ``stats_for`` for ``team_ids``: ``events_total``,
    ``alert_latency_ms``, ``dead_letters_total``, ``sources_total``. Four queries."""
    teams = list(team_ids)
    sources = Source.objects.filter(team_id__in=teams)
    events_total = sources.aggregate(total=Sum("events_total"))["total"] or 0
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms), count(*)
            FROM (
                SELECT extract(epoch FROM pushed_at - event_received_at) * 1000 AS ms
                FROM alerts_alert
                WHERE team_id = ANY(%s) AND pushed_at IS NOT NULL
                ORDER BY id DESC LIMIT %s
            ) recent
            """,
            [teams, LATENCY_WINDOW],
        )
        percentiles, n = cursor.fetchone()
    p50, p95, p99 = (round(float(p), 1) for p in percentiles) if percentiles else (None,) * 3
    return {
        "events_total": int(events_total),
        "alert_latency_ms": {"p50": p50, "p95": p95, "p99": p99, "n": int(n)},
        "dead_letters_total": DeadLetter.objects.filter(source__team_id__in=teams).count(),
        "sources_total": sources.count(),
    }


SENTIMENT_LABELS = ("negative", "neutral", "positive")
SERIES_BUCKETS = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400)
"""The bucket sizes (seconds) a sentiment series picks from."""
MAX_SERIES_BUCKETS = 96
"""The most buckets a default ``bucket_s`` cuts a window into."""
MAX_BUCKETS = 2000
"""The most buckets one sentiment series may have, whichever ends and bucket are given
(``TooManyBuckets`` past it)."""


class TooManyBuckets(ValueError):
    """A sentiment window that would hold more than ``MAX_BUCKETS`` buckets."""

    def __init__(self, since: datetime, until: datetime, bucket_s: int) -> None:
        super().__init__(
            f"At most {MAX_BUCKETS} buckets: {since.isoformat()} to {until.isoformat()} "
            f"in buckets of {bucket_s} s is more; choose a shorter window or a larger bucket_s."
        )


@dataclass(frozen=True, slots=True)
class SentimentBucket:
    """Events of one event-time bucket by sentiment label (``counts``), and how many of
    them the transformer heads labelled (``by_transformer``; the rest: VADER's)."""

    start: datetime
    counts: dict[str, int]
    by_transformer: int


@dataclass(frozen=True, slots=True)
class SentimentSeries:
    """Sentiment over event time: ``buckets`` of ``bucket_s`` seconds from ``since``
    (inclusive) to ``until`` (exclusive), oldest first, empty buckets included."""

    since: datetime
    until: datetime
    bucket_s: int
    buckets: list[SentimentBucket]


def series_bucket_s(span: timedelta) -> int:
    """The smallest of ``SERIES_BUCKETS`` that cuts ``span`` into at most
    ``MAX_SERIES_BUCKETS`` buckets (the largest when none does)."""
    seconds = span.total_seconds()
    for bucket_s in SERIES_BUCKETS:
        if seconds / bucket_s <= MAX_SERIES_BUCKETS:
            return bucket_s
    return SERIES_BUCKETS[-1]


def latest_event_time(source_ids: Sequence[int]) -> datetime | None:
    """The latest event time among ``source_ids``' events (None: no events)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT max(created_at) FROM ingest_event WHERE source_id = ANY(%s)",
            [list(source_ids)],
        )
        row = cursor.fetchone()
    return row[0] if row else None


def sentiment_series(
    source_ids: Sequence[int],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    bucket_s: int | None = None,
) -> SentimentSeries | None:
    """Events of ``source_ids`` per event-time bucket and sentiment label.

    ``until`` defaults to just after the latest event of those sources (so an archive
    replayed from the past shows its own days), ``since`` to 24 h before ``until``,
    ``bucket_s`` to ``series_bucket_s(until - since)``. Buckets are aligned to the
    epoch (``date_bin``). Returns None when the sources have no events. One aggregate
    over the event-time index.

    Raises:
        TooManyBuckets: the window, once its missing ends are filled in, holds more
            than ``MAX_BUCKETS`` buckets (checked before any bucket is built).
    """
    if until is None:
        latest = latest_event_time(source_ids)
        if latest is None:
            return None
        until = latest + timedelta(microseconds=1)
    since = since or until - timedelta(hours=24)
    bucket_s = bucket_s or series_bucket_s(until - since)
    if (until - since).total_seconds() / bucket_s > MAX_BUCKETS:
        raise TooManyBuckets(since, until, bucket_s)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT date_bin(make_interval(secs => %s), created_at, 'epoch'::timestamptz) AS b,
                   sentiment_label, count(*), count(*) FILTER (WHERE scored_at IS NOT NULL
                                                              AND sentiment_model <> 'vader')
            FROM ingest_event
            WHERE source_id = ANY(%s) AND created_at >= %s AND created_at < %s
                  AND sentiment_label <> ''
            GROUP BY 1, 2
            """,
            [bucket_s, list(source_ids), since, until],
        )
        rows = cursor.fetchall()
    first = _epoch_floor(since, bucket_s)
    starts: list[datetime] = []
    while first + timedelta(seconds=len(starts) * bucket_s) < until:
        starts.append(first + timedelta(seconds=len(starts) * bucket_s))
    counts = [dict.fromkeys(SENTIMENT_LABELS, 0) for _ in starts]
    by_transformer = [0] * len(starts)
    for start, label, count, transformer in rows:
        i = int((start - first).total_seconds() // bucket_s)
        if 0 <= i < len(starts) and label in SENTIMENT_LABELS:
            counts[i][label] += int(count)
            by_transformer[i] += int(transformer)
    return SentimentSeries(
        since=since,
        until=until,
        bucket_s=bucket_s,
        buckets=[
            SentimentBucket(start=start, counts=c, by_transformer=t)
            for start, c, t in zip(starts, counts, by_transformer, strict=True)
        ],
    )


def _epoch_floor(moment: datetime, bucket_s: int) -> datetime:
    return datetime.fromtimestamp(moment.timestamp() // bucket_s * bucket_s, tz=moment.tzinfo)
