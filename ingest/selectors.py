"""Reads of the ingest app: the stream's input progress, events by time, sources.

Counters (staged batches, events in flight, per-minute counts, event rates) are in
``ingest.counters``; the virality model's and the viral-post
rules' reads in ``ingest.virality_reads``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from django.db import connection
from django.db.models import Count, Max, Min, OuterRef, Q, QuerySet, Subquery

from ingest.models import DeadLetter, Event, Source, StagedBatch


@dataclass(frozen=True, slots=True)
class TrendInput:
    """One enriched event as the trend stage reads it.

    ``terms`` are its distinct hashtags, mentions, cashtags and keywords, in that order,
    each cut to ``TERM_MAX_CHARS`` (the term-count key); ``author`` is the
    distinct-author key (``Author.key``).
    """

    id: int
    external_id: str
    created_at: datetime
    received_at: datetime
    author: str
    terms: tuple[str, ...]


TERM_MAX_CHARS = 200
"""The longest term the trend stage counts (a key of ``mlengine.BucketCount.terms``)."""


def input_low_watermark(source_id: int) -> datetime | None:
    """The event time before which every event of ``source_id`` is stored and enriched.

    The minimum of the source's declared ``input_watermark``, the earliest event time of
    its staged batches, and the earliest event time of its stored but unenriched events
    (a low watermark, as in MillWheel: Akidau et al., VLDB 2013); a parked event (a dead
    letter of the enrich stage, ``Event.parked_at``) is not waited for. None until the
    source declared any progress. Read in this order (declared, staged, stored): a batch
    is stored by the transaction that deletes its staged row, so one moving between the
    reads is seen in one of them.
    """
    declared = Source.objects.filter(id=source_id).values_list("input_watermark", flat=True).first()
    if declared is None:
        return None
    low = declared
    staged = StagedBatch.objects.filter(source_id=source_id).aggregate(
        first=Min("earliest_event_at")
    )["first"]
    if staged is not None:
        low = min(low, staged)
    unenriched = Event.objects.filter(
        source_id=source_id, enriched_at__isnull=True, parked_at__isnull=True
    ).aggregate(first=Min("created_at"))["first"]
    if unenriched is not None:
        low = min(low, unenriched)
    return low


_RANGE_SQL = """
SELECT id, external_id, created_at, received_at, author_id, author_handle,
       hashtags, mentions, cashtags, keywords
FROM ingest_event
WHERE source_id = %s AND created_at >= %s AND created_at < %s AND parked_at IS NULL
ORDER BY created_at, external_id
LIMIT %s
"""


def events_for_trends(
    source_id: int, *, since: datetime | None, until: datetime, limit: int
) -> list[TrendInput]:
    """Events of ``source_id`` with ``since <= created_at < until`` (all before ``until``
    when ``since`` is None), in event-time order (ties by external id), at most
    ``limit``, parked events left out. Callers pass ``until`` at or below
    ``input_low_watermark`` so every event returned is enriched and no earlier one can
    still arrive."""
    with connection.cursor() as cursor:
        cursor.execute(
            _RANGE_SQL,
            [source_id, since or datetime.min.replace(tzinfo=UTC), until, limit],
        )
        return [_trend_input(row) for row in cursor.fetchall()]


_TERM_RANGE_SQL = """
SELECT id, external_id, created_at, received_at, author_id, author_handle,
       hashtags, mentions, cashtags, keywords
FROM ingest_event
WHERE source_id = %(source)s AND created_at >= %(since)s AND created_at <= %(until)s
  AND (%(term)s = ANY(hashtags) OR %(term)s = ANY(mentions) OR %(term)s = ANY(cashtags)
       OR %(term)s = ANY(keywords))
ORDER BY created_at, external_id
LIMIT %(limit)s
"""


def events_for_term(
    source_id: int, term: str, *, since: datetime, until: datetime, limit: int
) -> list[TrendInput]:
    """The events of ``source_id`` holding ``term`` with ``since <= created_at <=
    until``, in event-time order (ties by external id), at most ``limit``: a trend's
    posts, for the story layer (``mlengine.trends.story_assignment.assign_stories``)."""
    params: dict[str, Any] = {
        "source": source_id,
        "term": term,
        "since": since,
        "until": until,
        "limit": limit,
    }
    with connection.cursor() as cursor:
        cursor.execute(_TERM_RANGE_SQL, params)
        return [_trend_input(row) for row in cursor.fetchall()]


_VOLUME_SQL = """
SELECT floor(extract(epoch FROM created_at) / %(bucket_s)s)::bigint * %(bucket_s)s, count(*)
FROM ingest_event
WHERE source_id = %(source)s AND created_at >= %(since)s AND created_at <= %(until)s
  AND (hashtags && %(terms)s::varchar[] OR mentions && %(terms)s::varchar[]
       OR cashtags && %(terms)s::varchar[] OR keywords && %(terms)s::varchar[])
GROUP BY 1
"""


def volume_of_terms(
    source_id: int, terms: Sequence[str], *, since: datetime, until: datetime, bucket_s: int
) -> dict[int, int]:
    """Events of ``source_id`` holding any of ``terms`` with ``since <= created_at <=
    until``, per ``bucket_s`` bucket: ``{bucket start (epoch s): events}`` (a story's
    volume, for its forecast)."""
    params: dict[str, Any] = {
        "source": source_id,
        "terms": list(terms),
        "since": since,
        "until": until,
        "bucket_s": bucket_s,
    }
    with connection.cursor() as cursor:
        cursor.execute(_VOLUME_SQL, params)
        return {int(start): int(count) for start, count in cursor.fetchall()}


_TERMS_RANGE_SQL = """
SELECT id, created_at,
       floor(extract(epoch FROM created_at) / %(bucket_s)s)::bigint * %(bucket_s)s,
       hashtags, mentions, cashtags, keywords
FROM ingest_event
WHERE source_id = %(source)s AND created_at >= %(since)s AND created_at <= %(until)s
  AND (hashtags && %(terms)s::varchar[] OR mentions && %(terms)s::varchar[]
       OR cashtags && %(terms)s::varchar[] OR keywords && %(terms)s::varchar[])
ORDER BY created_at, external_id
LIMIT %(limit)s
"""


@dataclass(frozen=True, slots=True)
class TermEvent:
    """One event as the story layer reads it in bulk (``events_with_terms``).

    ``bucket``: the start (epoch s) of its ``bucket_s`` bucket, computed as
    ``volume_of_terms`` groups; ``matched``: the asked-for terms it holds, matched as
    ``events_for_term`` and ``volume_of_terms`` match them (a stored hashtag, mention,
    cashtag or keyword equal to the term); ``terms``: as ``TrendInput.terms``.
    """

    id: int
    created_at: datetime
    bucket: int
    matched: frozenset[str]
    terms: tuple[str, ...]


def events_with_terms(
    source_id: int,
    terms: Sequence[str],
    *,
    since: datetime,
    until: datetime,
    bucket_s: int,
    limit: int,
) -> list[TermEvent]:
    """The events of ``source_id`` holding any of ``terms`` with ``since <= created_at <=
    until``, in event-time order (ties by external id, the order of ``events_for_term``),
    at most ``limit``: in one query, what ``events_for_term`` and ``volume_of_terms``
    would read for any of ``terms`` in that range
    (``mlengine.trends.story_assignment.assign_stories``).
    """
    wanted = frozenset(terms)
    params: dict[str, Any] = {
        "source": source_id,
        "terms": sorted(wanted),
        "since": since,
        "until": until,
        "bucket_s": bucket_s,
        "limit": limit,
    }
    with connection.cursor() as cursor:
        cursor.execute(_TERMS_RANGE_SQL, params)
        return [
            TermEvent(
                id=row[0],
                created_at=row[1],
                bucket=int(row[2]),
                matched=wanted.intersection((*row[3], *row[4], *row[5], *row[6])),
                terms=distinct_terms(row[3:7]),
            )
            for row in cursor.fetchall()
        ]


def distinct_terms(arrays: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """``TrendInput.terms`` of an event's hashtags, mentions, cashtags and keywords."""
    return tuple(dict.fromkeys(t[:TERM_MAX_CHARS] for array in arrays for t in array))


def _trend_input(row: Sequence[Any]) -> TrendInput:
    from ingest.envelope import Author

    return TrendInput(
        id=row[0],
        external_id=row[1],
        created_at=row[2],
        received_at=row[3],
        author=Author(id=row[4], handle=row[5]).key(row[1])[:128],
        terms=distinct_terms(row[6:10]),
    )


def unenriched_texts(event_ids: Sequence[int]) -> list[tuple[int, str, str]]:
    """``(id, text, lang)`` of the events among ``event_ids`` not enriched yet nor parked.

    One query with the ids as one array parameter (the ORM's ``id__in`` prepares each of
    a batch's hundreds of ids in Python: a tenth of the enrich stage's time).
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, text, lang FROM ingest_event"
            " WHERE id = ANY(%s::bigint[]) AND enriched_at IS NULL AND parked_at IS NULL",
            [[int(event_id) for event_id in event_ids]],
        )
        return cursor.fetchall()


def texts_for_scoring(event_ids: Sequence[int]) -> list[tuple[int, str, int]]:
    """``(id, text, team id)`` of the events among ``event_ids`` that still exist (one
    query, the ids as one array parameter)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT e.id, e.text, s.team_id FROM ingest_event e"
            " JOIN ingest_source s ON s.id = e.source_id WHERE e.id = ANY(%s::bigint[])",
            [[int(event_id) for event_id in event_ids]],
        )
        return cursor.fetchall()


def source_of_events(event_ids: Sequence[int]) -> dict[int, int]:
    """``{event id: source id}`` of the events among ``event_ids`` that exist."""
    return dict(Event.objects.filter(id__in=list(event_ids)).values_list("id", "source_id"))


def parked_events(source_ids: Sequence[int]) -> dict[int, int]:
    """``{source id: events parked}``: the open dead letters of the enrich stage (each an
    event with ``parked_at`` set), per source among ``source_ids`` (absent: none)."""
    return dict(
        DeadLetter.objects.filter(
            stage="enrich", requeued_at__isnull=True, source_id__in=list(source_ids)
        )
        .values("source_id")
        .annotate(n=Count("id"))
        .values_list("source_id", "n")
    )


def unenriched_before(
    received_before: datetime, *, limit: int, after: tuple[datetime, int] | None = None
) -> list[tuple[int, int, datetime]]:
    """``(id, source_id, received_at)`` of events received before ``received_before``
    and still not enriched (nor parked), oldest first (by ``(received_at, id)``), at most ``limit``,
    after the cursor ``after`` (the ``(received_at, id)`` of the previous page's last
    row): a reader pages through them all, however many there are."""
    rows = Event.objects.filter(
        enriched_at__isnull=True, parked_at__isnull=True, received_at__lt=received_before
    )
    if after is not None:
        rows = rows.filter(Q(received_at__gt=after[0]) | Q(received_at=after[0], id__gt=after[1]))
    return list(
        rows.order_by("received_at", "id").values_list("id", "source_id", "received_at")[:limit]
    )


def source_counts(source_id: int) -> dict[str, int]:
    """``{"events", "dead_letters"}`` stored for ``source_id`` so far."""
    return {
        "events": Event.objects.filter(source_id=source_id).count(),
        "dead_letters": DeadLetter.objects.filter(source_id=source_id).count(),
    }


def events_before(source_id: int, moment: datetime) -> int:
    """How many events of ``source_id`` are stored with an event time before ``moment``,
    parked events left out (the trend stage counts them neither counted nor late)."""
    return Event.objects.filter(
        source_id=source_id, created_at__lt=moment, parked_at__isnull=True
    ).count()


def source_state(source: Source) -> str:
    """``"disabled"``, ``"failing"`` (its last error was permanent: it waits to be
    edited), ``"backing_off"`` (a temporary error: the next try waits until
    ``cursor["retry_at"]``) or ``"running"``."""
    if not source.enabled:
        return "disabled"
    if source.last_error and source.error_permanent:
        return "failing"
    retry_at = (source.cursor or {}).get("retry_at")
    if isinstance(retry_at, str) and datetime.fromisoformat(retry_at) > datetime.now(UTC):
        return "backing_off"
    return "running"


@dataclass(frozen=True, slots=True)
class BucketTotals:
    """One event-time bucket of a source (the anomaly stage's input): ``events``, how
    many of them carry a sentiment label (``labelled``) and how many are labelled
    "negative", and the latest processing time among them (``last_received_at``)."""

    events: int
    negative: int
    labelled: int
    last_received_at: datetime


_BUCKET_TOTALS_SQL = """
SELECT floor(extract(epoch FROM created_at) / %(bucket_s)s)::bigint * %(bucket_s)s,
       count(*),
       count(*) FILTER (WHERE sentiment_label = 'negative'),
       count(*) FILTER (WHERE sentiment_label <> ''),
       max(received_at)
FROM ingest_event
WHERE source_id = %(source)s AND created_at >= %(since)s AND created_at < %(until)s
  AND parked_at IS NULL
GROUP BY 1
"""


def bucket_totals(
    source_id: int, *, since: datetime, until: datetime, bucket_s: int
) -> dict[int, BucketTotals]:
    """Events of ``source_id`` with ``since <= created_at < until`` per ``bucket_s``
    bucket: ``{bucket start (epoch s): BucketTotals}``; empty buckets are absent; parked
    events left out. One query. Callers pass ``until`` at or below the stream's watermark."""
    params: dict[str, Any] = {
        "source": source_id,
        "since": since,
        "until": until,
        "bucket_s": bucket_s,
    }
    with connection.cursor() as cursor:
        cursor.execute(_BUCKET_TOTALS_SQL, params)
        return {
            int(start): BucketTotals(int(events), int(negative), int(labelled), received)
            for start, events, negative, labelled, received in cursor.fetchall()
        }


_TERM_BUCKETS_SQL = """
SELECT b, term, count(*) FROM (
    SELECT DISTINCT e.id,
           floor(extract(epoch FROM e.created_at) / %(bucket_s)s)::bigint * %(bucket_s)s AS b,
           t.term
    FROM ingest_event e,
         unnest(e.hashtags || e.mentions || e.cashtags || e.keywords) AS t(term)
    WHERE e.source_id = %(source)s AND e.created_at >= %(since)s AND e.created_at < %(until)s
      AND t.term = ANY(%(terms)s::varchar[])
) AS hits
GROUP BY b, term
"""


def term_bucket_counts(
    source_id: int, terms: Sequence[str], *, since: datetime, until: datetime, bucket_s: int
) -> dict[tuple[int, str], int]:
    """Events of ``source_id`` holding each of ``terms`` (as a hashtag, mention, cashtag
    or keyword) with ``since <= created_at < until``, per ``bucket_s`` bucket:
    ``{(bucket start (epoch s), term): events}``; zero counts are absent. One query."""
    if not terms:
        return {}
    params: dict[str, Any] = {
        "source": source_id,
        "terms": list(terms),
        "since": since,
        "until": until,
        "bucket_s": bucket_s,
    }
    with connection.cursor() as cursor:
        cursor.execute(_TERM_BUCKETS_SQL, params)
        return {(int(b), str(term)): int(n) for b, term, n in cursor.fetchall()}


_WATCH_BUCKETS_SQL = """
WITH w AS (
    SELECT key::bigint AS id,
           ARRAY(SELECT jsonb_array_elements_text(value))::varchar[] AS terms
    FROM jsonb_each(%(watches)s::jsonb)
)
SELECT w.id, floor(extract(epoch FROM e.created_at) / %(bucket_s)s)::bigint * %(bucket_s)s,
       count(*)
FROM ingest_event e
JOIN w ON e.hashtags && w.terms OR e.mentions && w.terms OR e.cashtags && w.terms
          OR e.keywords && w.terms
WHERE e.source_id = %(source)s AND e.created_at >= %(since)s AND e.created_at < %(until)s
GROUP BY 1, 2
"""


def watch_bucket_counts(
    source_id: int,
    watches: Mapping[int, Sequence[str]],
    *,
    since: datetime,
    until: datetime,
    bucket_s: int,
) -> dict[tuple[int, int], int]:
    """Events of ``source_id`` holding any of each watch's terms (as a hashtag, mention,
    cashtag or keyword: exact, as the events' arrays hold them) with ``since <=
    created_at < until``, per ``bucket_s`` bucket: ``{(bucket start (epoch s), watch
    id): events}``, each event counted once per watch however many of its terms it
    holds; zero counts are absent. ``watches``: ``{watch id: terms}``. One query (the
    watches as one JSON parameter, joined by array overlap ``&&``)."""
    if not watches:
        return {}
    params: dict[str, Any] = {
        "source": source_id,
        "watches": json.dumps({str(k): list(v) for k, v in watches.items()}),
        "since": since,
        "until": until,
        "bucket_s": bucket_s,
    }
    with connection.cursor() as cursor:
        cursor.execute(_WATCH_BUCKETS_SQL, params)
        return {(int(b), int(w)): int(n) for w, b, n in cursor.fetchall()}


_EVENT_BUCKETS_SQL = """
WITH RECURSIVE hit(b) AS (
    (SELECT floor(extract(epoch FROM created_at) / %(bucket_s)s)::bigint * %(bucket_s)s
     FROM ingest_event
     WHERE source_id = %(source)s AND created_at >= %(since)s AND created_at < %(until)s
     ORDER BY created_at LIMIT 1)
    UNION ALL
    SELECT (SELECT floor(extract(epoch FROM e.created_at) / %(bucket_s)s)::bigint * %(bucket_s)s
            FROM ingest_event e
            WHERE e.source_id = %(source)s AND e.created_at < %(until)s
              AND e.created_at >= to_timestamp(hit.b + %(bucket_s)s)
            ORDER BY e.created_at LIMIT 1)
    FROM hit WHERE hit.b IS NOT NULL
)
SELECT b FROM hit WHERE b IS NOT NULL LIMIT %(limit)s
"""


def event_buckets(
    source_id: int, *, since: datetime, until: datetime, bucket_s: int, limit: int
) -> list[int]:
    """The first ``limit`` ``bucket_s`` buckets of ``source_id`` holding an event with
    ``since <= created_at < until`` (parked events included): their starts in epoch
    seconds, ascending. One query that probes the source's time index once per bucket
    found (a loose index scan), so its cost is ``limit``, not the events in the range."""
    params: dict[str, Any] = {
        "source": source_id,
        "since": since,
        "until": until,
        "bucket_s": bucket_s,
        "limit": limit,
    }
    with connection.cursor() as cursor:
        cursor.execute(_EVENT_BUCKETS_SQL, params)
        return [int(b) for (b,) in cursor.fetchall()]


def first_event_time(source_id: int, *, before: datetime) -> datetime | None:
    """The earliest event time of ``source_id`` before ``before`` (None: no event)."""
    return cast(
        "datetime | None",
        Event.objects.filter(source_id=source_id, created_at__lt=before).aggregate(
            first=Min("created_at")
        )["first"],
    )


def open_dead_letter_keys(keys: Sequence[str]) -> set[str]:
    """The keys among ``keys`` of dead letters still parked (not requeued)."""
    if not keys:
        return set()
    return {
        key
        for key in DeadLetter.objects.filter(
            key__in=list(keys), requeued_at__isnull=True
        ).values_list("key", flat=True)
        if key is not None
    }


def parked_sources(stage: str, *, scope: str = "stream") -> set[int]:
    """Ids of the sources with an open dead letter of ``stage`` whose items are of
    ``scope`` (keys ``<stage>:<scope>:...``; for ``detect``, ``stream``: the streams the
    trend stage parked, ``anomalies``: the sources the anomaly stage parked), until an
    operator requeues them."""
    return {
        source_id
        for source_id in DeadLetter.objects.filter(
            stage=stage, requeued_at__isnull=True, key__startswith=f"{stage}:{scope}:"
        )
        .values_list("source_id", flat=True)
        .distinct()
        if source_id is not None
    }


def newest_event_time(team_ids: QuerySet[Any, Any], *, not_after: datetime) -> datetime | None:
    """The latest event time (``created_at``) of the sources of ``team_ids`` (a subquery
    of team ids) that is not after ``not_after``; None when they have no such event.

    One probe of the (source, event time) index per source, not a scan of the events: a
    row dated in the future (a clock gone wrong) is skipped, so it cannot hide the rest.
    """
    newest = Subquery(
        Event.objects.filter(source_id=OuterRef("pk"), created_at__lte=not_after)
        .order_by("-created_at")
        .values("created_at")[:1]
    )
    found: datetime | None = (
        Source.objects.filter(team_id__in=team_ids)
        .annotate(newest=newest)
        .aggregate(latest=Max("newest"))["latest"]
    )
    return found


@dataclass(frozen=True, slots=True)
class ExplainWindow:
    """What to read for one alert's explanation (``explain_windows``).

    The posts of ``source_id`` holding any of ``terms`` (as a hashtag, mention, cashtag
    or keyword; ``None``: every post of the source), parked ones left out. ``series_since``
    to ``until`` (event time) is counted per ``bucket_s`` bucket; ``start`` to ``until``
    is the alert's window, whose top terms, authors and evidence posts are read.
    ``until`` is inclusive: the event time of the detection. ``key`` names the window in
    the answer.
    """

    key: str
    source_id: int
    terms: tuple[str, ...] | None
    series_since: datetime
    start: datetime
    until: datetime
    bucket_s: int


@dataclass(frozen=True, slots=True)
class ExplainBucket:
    """One bucket of an ``ExplainWindow``'s series: ``events``, how many carry a
    sentiment label (``labelled``), how many are labelled negative, and the highest
    P(viral) among its scored posts (``max_virality``; None: none scored)."""

    events: int
    negative: int
    labelled: int
    max_virality: float | None


@dataclass(frozen=True, slots=True)
class ExplainPost:
    """An evidence post: ``id`` (the event's id), ``text``, ``author`` ("@handle", else
    the name, else the author id, else ""), ``created_at`` (event time) and ``why``:
    "first", "most_engaged" (most reposts + likes + replies at ingest) or "latest" of
    the window."""

    id: int
    text: str
    author: str
    created_at: datetime
    why: str


@dataclass(frozen=True, slots=True)
class ExplainReads:
    """What ``explain_windows`` read for one window: ``buckets`` ``{bucket start (epoch
    s): ExplainBucket}`` (empty buckets absent), ``posts`` in the window, its
    ``top_terms`` (up to 10 ``(term, posts)``, most first), ``top_authors`` (up to 5
    ``(author, posts)``, most first) and ``evidence`` (up to 3 posts: first, most
    engaged, latest; a post that is more than one of them is listed once, as the first
    that names it)."""

    buckets: dict[int, ExplainBucket]
    posts: int
    top_terms: list[tuple[str, int]]
    top_authors: list[tuple[str, int]]
    evidence: list[ExplainPost]


_EXPLAIN_WINDOWS_CTE = """
WITH w AS MATERIALIZED (
    SELECT v->>'key' AS key, (v->>'source')::bigint AS source,
           jsonb_typeof(v->'terms') = 'null' AS every_post,
           ARRAY(SELECT jsonb_array_elements_text(
                 CASE WHEN jsonb_typeof(v->'terms') = 'array' THEN v->'terms' ELSE '[]' END
           ))::varchar[] AS terms,
           (v->>'series_since')::timestamptz AS series_since,
           (v->>'start')::timestamptz AS start,
           (v->>'until')::timestamptz AS until,
           (v->>'bucket_s')::bigint AS bucket_s
    FROM jsonb_array_elements(%(windows)s::jsonb) AS j(v)
), hits AS MATERIALIZED (
    SELECT w.key, w.bucket_s, e.created_at >= w.start AS in_window, e.id, e.created_at,
           e.author_id, e.author_handle, e.author_name, e.sentiment_label,
           e.virality_score, e.hashtags, e.mentions, e.cashtags, e.keywords,
           COALESCE(CASE WHEN jsonb_typeof(e.metrics->'reposts') = 'number'
                         THEN (e.metrics->>'reposts')::float8 END, 0)
           + COALESCE(CASE WHEN jsonb_typeof(e.metrics->'likes') = 'number'
                           THEN (e.metrics->>'likes')::float8 END, 0)
           + COALESCE(CASE WHEN jsonb_typeof(e.metrics->'replies') = 'number'
                           THEN (e.metrics->>'replies')::float8 END, 0) AS engagement
    FROM w JOIN ingest_event e
      ON e.source_id = w.source AND e.created_at >= w.series_since
         AND e.created_at <= w.until AND e.parked_at IS NULL
         AND (w.every_post OR e.hashtags && w.terms OR e.mentions && w.terms
              OR e.cashtags && w.terms OR e.keywords && w.terms)
)
"""

_EXPLAIN_BUCKETS_SQL = (
    _EXPLAIN_WINDOWS_CTE
    + """
SELECT 'b', key, floor(extract(epoch FROM created_at) / bucket_s)::bigint * bucket_s,
       count(*), count(*) FILTER (WHERE sentiment_label = 'negative'),
       count(*) FILTER (WHERE sentiment_label <> ''), max(virality_score), NULL
FROM hits GROUP BY 2, 3
UNION ALL
SELECT 't', key, NULL, n, NULL, NULL, NULL, term FROM (
    SELECT key, term, count(*) AS n,
           row_number() OVER (PARTITION BY key ORDER BY count(*) DESC, term) AS rank
    FROM (SELECT DISTINCT h.key, h.id, t.term
          FROM hits h, unnest(h.hashtags || h.mentions || h.cashtags || h.keywords) AS t(term)
          WHERE h.in_window) AS terms
    GROUP BY key, term
) AS ranked WHERE rank <= 10
UNION ALL
SELECT 'a', key, NULL, n, NULL, NULL, NULL, author FROM (
    SELECT key, author, count(*) AS n,
           row_number() OVER (PARTITION BY key ORDER BY count(*) DESC, author) AS rank
    FROM (SELECT key, COALESCE('@' || NULLIF(author_handle, ''), NULLIF(author_name, ''),
                               NULLIF(author_id, '')) AS author
          FROM hits WHERE in_window) AS authors
    WHERE author IS NOT NULL
    GROUP BY key, author
) AS ranked WHERE rank <= 5
UNION ALL
SELECT 'n', key, NULL, count(*), NULL, NULL, NULL, NULL FROM hits WHERE in_window GROUP BY key
"""
)

_EXPLAIN_EVIDENCE_SQL = (
    _EXPLAIN_WINDOWS_CTE
    + """
SELECT picked.key, picked.why, picked.id, e.text,
       COALESCE('@' || NULLIF(picked.author_handle, ''), NULLIF(picked.author_name, ''),
                picked.author_id),
       picked.created_at
FROM (
    SELECT h.*, 'first' AS why, 1 AS pos,
           row_number() OVER (PARTITION BY key ORDER BY created_at, id) AS rank
    FROM hits h WHERE in_window
    UNION ALL
    SELECT h.*, 'most_engaged', 2,
           row_number() OVER (PARTITION BY key ORDER BY engagement DESC, created_at, id)
    FROM hits h WHERE in_window AND engagement > 0
    UNION ALL
    SELECT h.*, 'latest', 3,
           row_number() OVER (PARTITION BY key ORDER BY created_at DESC, id DESC)
    FROM hits h WHERE in_window
) AS picked
JOIN ingest_event e ON e.id = picked.id AND e.created_at = picked.created_at  -- their text
WHERE picked.rank = 1
ORDER BY picked.key, picked.pos
"""
)


def explain_windows(windows: Sequence[ExplainWindow]) -> dict[str, ExplainReads]:
    """For each of ``windows``, its series counts, top terms and authors and evidence
    posts: ``{window key: ExplainReads}`` (every key present, empty when no post). Two
    queries, whatever the number of windows (the windows travel as one JSON parameter).
    Read only."""
    if not windows:
        return {}
    params = {
        "windows": json.dumps(
            [
                {
                    "key": w.key,
                    "source": w.source_id,
                    "terms": None if w.terms is None else list(w.terms),
                    "series_since": w.series_since.isoformat(),
                    "start": w.start.isoformat(),
                    "until": w.until.isoformat(),
                    "bucket_s": w.bucket_s,
                }
                for w in windows
            ]
        )
    }
    buckets: dict[str, dict[int, ExplainBucket]] = {w.key: {} for w in windows}
    terms: dict[str, list[tuple[str, int]]] = {w.key: [] for w in windows}
    authors: dict[str, list[tuple[str, int]]] = {w.key: [] for w in windows}
    posts: dict[str, int] = dict.fromkeys(buckets, 0)
    evidence: dict[str, list[ExplainPost]] = {w.key: [] for w in windows}
    with connection.cursor() as cursor:
        cursor.execute(_EXPLAIN_BUCKETS_SQL, params)
        for part, key, start, n, negative, labelled, top, label in cursor.fetchall():
            if part == "b":
                buckets[key][int(start)] = ExplainBucket(int(n), int(negative), int(labelled), top)
            elif part == "t":
                terms[key].append((str(label), int(n)))
            elif part == "a":
                authors[key].append((str(label), int(n)))
            else:
                posts[key] = int(n)
        cursor.execute(_EXPLAIN_EVIDENCE_SQL, params)
        for key, why, id_, text, author, created_at in cursor.fetchall():
            if all(p.id != id_ for p in evidence[key]):
                evidence[key].append(ExplainPost(id_, text, author or "", created_at, why))
    return {
        key: ExplainReads(
            buckets=buckets[key],
            posts=posts[key],
            top_terms=sorted(terms[key], key=lambda t: (-t[1], t[0])),
            top_authors=sorted(authors[key], key=lambda a: (-a[1], a[0])),
            evidence=evidence[key],
        )
        for key in buckets
    }
