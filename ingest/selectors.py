"""Reads of the ingest app: staged work, the stream's input progress, events by time."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from django.conf import settings
from django.db import connection
from django.db.models import Min

from ingest.models import AUTHOR_KEY, AUTHOR_KEY_SQL, DeadLetter, Event, Source
from twiscope import pipeline
from twiscope.redis import get_redis

BATCH_KEY_PREFIX = "twiscope:batch:"
"""Staged batch keys: ``twiscope:batch:<source id>:<uuid>``."""
PENDING_BATCHES_KEY = "twiscope:pending-batches"
STAGED_EVENT_TIME_KEY = "twiscope:staged-event-time:{source_id}"


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


def batch_source_id(batch_key: str) -> int | None:
    """The source id in a staged batch's key, or None for a key of another shape."""
    _, _, rest = batch_key.partition(BATCH_KEY_PREFIX)
    source_id, _, _ = rest.partition(":")
    return int(source_id) if source_id.isdigit() else None


def staged_batches(source_id: int) -> int:
    """How many batches of ``source_id`` are staged and not yet persisted."""
    return cast(int, get_redis().zcard(STAGED_EVENT_TIME_KEY.format(source_id=source_id)))


def input_low_watermark(source_id: int) -> datetime | None:
    """The event time before which every event of ``source_id`` is stored and enriched.

    The minimum of the source's declared ``input_watermark``, the earliest event time of
    its staged batches, and the earliest event time of its stored but unenriched events
    (a low watermark, as in MillWheel: Akidau et al., VLDB 2013). None until the source
    declared any progress. Read in this order (declared, staged, stored) so that a batch
    moving from Redis to PostgreSQL between the reads is seen in one of them.
    """
    declared = Source.objects.filter(id=source_id).values_list("input_watermark", flat=True).first()
    if declared is None:
        return None
    low = declared
    staged = cast(
        "list[tuple[bytes, float]]",
        get_redis().zrange(
            STAGED_EVENT_TIME_KEY.format(source_id=source_id), 0, 0, withscores=True
        ),
    )
    if staged:
        low = min(low, datetime.fromtimestamp(staged[0][1], tz=UTC))
    unenriched = Event.objects.filter(source_id=source_id, enriched_at__isnull=True).aggregate(
        first=Min("created_at")
    )["first"]
    if unenriched is not None:
        low = min(low, unenriched)
    return low


_RANGE_SQL = """
SELECT id, external_id, created_at, received_at, author_id, author_handle,
       hashtags, mentions, cashtags, keywords
FROM ingest_event
WHERE source_id = %s AND created_at >= %s AND created_at < %s
ORDER BY created_at, external_id
LIMIT %s
"""


def events_for_trends(
    source_id: int, *, since: datetime | None, until: datetime, limit: int
) -> list[TrendInput]:
    """Events of ``source_id`` with ``since <= created_at < until`` (all before ``until``
    when ``since`` is None), in event-time order (ties by external id), at most
    ``limit``. Callers pass ``until`` at or below ``input_low_watermark`` so every event
    returned is enriched and no earlier one can still arrive."""
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
    posts, for the story layer (``mlengine.services.assign_stories``)."""
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
    would read for any of ``terms`` in that range (``mlengine.services.assign_stories``).
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
                terms=_terms(row[3:7]),
            )
            for row in cursor.fetchall()
        ]


def _terms(arrays: Sequence[Sequence[str]]) -> tuple[str, ...]:
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
        terms=_terms(row[6:10]),
    )


def unenriched_texts(event_ids: Sequence[int]) -> list[tuple[int, str, str]]:
    """``(id, text, lang)`` of the events among ``event_ids`` not enriched yet.

    One query with the ids as one array parameter (the ORM's ``id__in`` prepares each of
    a batch's hundreds of ids in Python: a tenth of the enrich stage's time).
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, text, lang FROM ingest_event"
            " WHERE id = ANY(%s::bigint[]) AND enriched_at IS NULL",
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


@dataclass(frozen=True, slots=True)
class ViralityPost:
    """A post to score for virality, or one of its author's earlier posts.

    ``author``: ``"<source id>:<author key>"`` (``ingest.models.AUTHOR_KEY``): a history
    is one author's within one source. ``created_at``: event time. ``text`` and
    ``is_reply`` (``reply_to`` set, or the payload's v1.1 ``in_reply_to_user_id_str``)
    are "" / False on history rows; ``reposts`` / ``likes`` (the event's ``metrics``)
    are None on posts to score, and ``likes`` also where the source did not count them.
    """

    id: int
    author: str
    created_at: datetime
    text: str = ""
    is_reply: bool = False
    reposts: int | None = None
    likes: int | None = None


@dataclass(frozen=True, slots=True)
class ViralityInputs:
    """``posts``: the events among the ids asked for that exist and have an author key;
    ``history``: for each of them, its author's latest earlier posts with a repost count
    (each row once, however many posts share it), in no particular order."""

    posts: list[ViralityPost]
    history: list[ViralityPost]


def virality_inputs(event_ids: Sequence[int], *, window: int) -> ViralityInputs:
    """The events among ``event_ids`` and their authors' trailing history, in one query.

    For each event: up to ``window`` of the latest events of the same source and author
    (``AUTHOR_KEY``) with a ``metrics["reposts"]`` (a count: the envelope admits only
    non-negative integers) and a strictly earlier ``created_at``: a LATERAL join on the
    ``event_author_reposts_time`` index (about ``window`` index entries per event,
    whatever the source's size), deduplicated by id before the counts are read. Events
    with no author key get no history. Read only.
    """
    author = AUTHOR_KEY_SQL.format(t="e")
    earlier_author = AUTHOR_KEY_SQL.format(t="p")
    sql = f"""
WITH ev AS MATERIALIZED (
    SELECT e.id, e.source_id, e.created_at, e.text, {author} AS author,
           e.reply_to <> '' OR COALESCE(e.raw->>'in_reply_to_user_id_str', '')
                               NOT IN ('', 'NA') AS is_reply
    FROM ingest_event e WHERE e.id = ANY(%s::bigint[])
), earlier AS (
    SELECT DISTINCT ev.source_id, ev.author, h.id
    FROM ev CROSS JOIN LATERAL (
        SELECT p.id FROM ingest_event p
        WHERE p.source_id = ev.source_id AND {earlier_author} = ev.author
          AND p.metrics ? 'reposts' AND p.created_at < ev.created_at
        ORDER BY p.created_at DESC
        LIMIT %s
    ) h
), hist AS (
    SELECT earlier.*, p.created_at, (p.metrics->>'reposts')::float8 AS reposts,
           CASE WHEN jsonb_typeof(p.metrics->'likes') = 'number'
                THEN (p.metrics->>'likes')::float8 END AS likes
    FROM earlier JOIN ingest_event p ON p.id = earlier.id
)
SELECT true, ev.id, ev.source_id, ev.author, ev.created_at, ev.text, ev.is_reply, NULL, NULL
FROM ev WHERE ev.author IS NOT NULL
UNION ALL
SELECT false, id, source_id, author, created_at, '', false, reposts, likes FROM hist
"""
    with connection.cursor() as cursor:
        cursor.execute(sql, [[int(event_id) for event_id in event_ids], int(window)])
        rows = cursor.fetchall()
    posts: list[ViralityPost] = []
    history: list[ViralityPost] = []
    for to_score, id_, source_id, key, created_at, text, is_reply, reposts, likes in rows:
        post = ViralityPost(
            id=id_,
            author=f"{source_id}:{key}",
            created_at=created_at,
            text=text,
            is_reply=bool(is_reply),
            reposts=None if reposts is None else int(reposts),
            likes=None if likes is None else int(likes),
        )
        (posts if to_score else history).append(post)
    return ViralityInputs(posts=posts, history=history)


@dataclass(frozen=True, slots=True)
class ScoredPost:
    """A post the virality model scored, as the "viral_post" alert rules read it.

    ``author``: the distinct-author key (``ingest.models.AUTHOR_KEY``, "" when the
    source tells none); ``author_label``: "@handle", else the name, else the key.
    ``terms``: its distinct hashtags, mentions, cashtags and keywords (as
    ``TrendInput.terms``). ``virality_score``: P(viral), 0-1; ``virality_model``:
    "name vN". ``created_at``: event time; ``received_at``: processing time.
    """

    id: int
    source_id: int
    source_name: str
    team_id: int
    author: str
    author_label: str
    text: str
    url: str
    terms: tuple[str, ...]
    virality_score: float
    virality_model: str
    created_at: datetime
    received_at: datetime


def scored_posts(event_ids: Sequence[int]) -> list[ScoredPost]:
    """The events among ``event_ids`` that exist and carry a virality score, ordered by
    event time then id (one query). Read only."""
    rows = (
        Event.objects.filter(id__in=[int(i) for i in event_ids], virality_score__isnull=False)
        .select_related("source")
        .annotate(author_key=AUTHOR_KEY)
        .order_by("created_at", "id")
    )
    posts = []
    for e in rows:
        key = e.author_key or ""
        label = f"@{e.author_handle}" if e.author_handle else (e.author_name or key)
        assert e.virality_score is not None
        posts.append(
            ScoredPost(
                id=e.id,
                source_id=e.source_id,
                source_name=e.source.name,
                team_id=e.source.team_id,
                author=key,
                author_label=label,
                text=e.text,
                url=e.url,
                terms=_terms((e.hashtags, e.mentions, e.cashtags, e.keywords)),
                virality_score=e.virality_score,
                virality_model=e.virality_model,
                created_at=e.created_at,
                received_at=e.received_at,
            )
        )
    return posts


def unenriched_before(received_before: datetime, *, limit: int) -> list[tuple[int, int]]:
    """``(id, source_id)`` of events received before ``received_before`` and still not
    enriched, oldest first, at most ``limit``."""
    return list(
        Event.objects.filter(enriched_at__isnull=True, received_at__lt=received_before)
        .order_by("received_at")
        .values_list("id", "source_id")[:limit]
    )


def in_flight_events(source_id: int, *, redis_only: bool = False) -> int:
    """Events of ``source_id`` accepted but not yet through the trend stage (approx.).

    Staged batches count ``INGEST_BATCH_SIZE`` each (an upper bound that costs one
    Redis call); stored events not yet counted by the trend stage come from the
    pipeline's progress counters (``twiscope.pipeline.in_flight``), and are at least
    the stored, unenriched ones (a PostgreSQL count, skipped with ``redis_only``: a
    cheaper estimate that may be low when Redis lost its counters).
    """
    staged = staged_batches(source_id) * settings.INGEST_BATCH_SIZE
    stored = pipeline.in_flight(source_id)
    if not redis_only:
        stored = max(
            stored, Event.objects.filter(source_id=source_id, enriched_at__isnull=True).count()
        )
    return staged + stored


def source_counts(source_id: int) -> dict[str, int]:
    """``{"events", "dead_letters"}`` stored for ``source_id`` so far."""
    return {
        "events": Event.objects.filter(source_id=source_id).count(),
        "dead_letters": DeadLetter.objects.filter(source_id=source_id).count(),
    }


def events_before(source_id: int, moment: datetime) -> int:
    """How many events of ``source_id`` are stored with an event time before ``moment``."""
    return Event.objects.filter(source_id=source_id, created_at__lt=moment).count()


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


SOURCE_MINUTE_KEY = "twiscope:source-events:{source_id}:{minute}"
"""Events stored for a source in one minute (unix minute), kept a little over an hour."""


def events_last_hour(source_id: int, *, now: float | None = None) -> int:
    """Events stored for ``source_id`` in the last 60 whole minutes (processing time),
    from the per-minute counts ``ingest.services.count_source_events`` keeps."""
    minute = int((time.time() if now is None else now) // 60)
    keys = [
        SOURCE_MINUTE_KEY.format(source_id=source_id, minute=m)
        for m in range(minute - 59, minute + 1)
    ]
    values = cast("list[bytes | None]", get_redis().mget(keys))
    return sum(int(v) for v in values if v is not None)


def events_rate_name(team_id: int) -> str:
    """The rolling counter of events stored for a team (see ``twiscope.redis``; added to
    by ``ingest.services`` as batches persist)."""
    return f"events:team:{team_id}"


EVENTS_RATE_ALL = "events:all"
"""The rolling counter of events stored, all teams together."""


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
GROUP BY 1
"""


def bucket_totals(
    source_id: int, *, since: datetime, until: datetime, bucket_s: int
) -> dict[int, BucketTotals]:
    """Events of ``source_id`` with ``since <= created_at < until`` per ``bucket_s``
    bucket: ``{bucket start (epoch s): BucketTotals}``; empty buckets are absent. One
    query. Callers pass ``until`` at or below the stream's watermark."""
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


def first_event_time(source_id: int, *, before: datetime) -> datetime | None:
    """The earliest event time of ``source_id`` before ``before`` (None: no event)."""
    return cast(
        "datetime | None",
        Event.objects.filter(source_id=source_id, created_at__lt=before).aggregate(
            first=Min("created_at")
        )["first"],
    )
