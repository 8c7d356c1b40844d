"""Writes of the ml stage: term counts per event-time bucket, watermarks, trends.

``update_trends`` is the stage's one entry point for new events. It claims them (a
conditional UPDATE on ``Event.trends_at``, so a redelivered task counts nothing
twice), adds them to their buckets' term counts, advances the source's watermark,
scores every term the batch touched (``mlengine.trends``) and upserts the trends it
finds. New trends go to the alerts stage after commit.

Locks are always taken in one order (events, term counts sorted by term and bucket,
source, trends sorted by term and bucket) so parallel ml workers cannot deadlock.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Value
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone
from psycopg2.extras import execute_values

from ingest.envelope import Author
from ingest.models import Source
from mlengine.models import TOTAL_TERM, TermCount
from mlengine.trends import TermWindow, TrendParams, baseline_range, bucket_start, score_term

log = structlog.get_logger(__name__)

SAMPLE_EVENTS = 10


def params_for(source: Source) -> TrendParams:
    """The detector parameters of ``source`` (its bucket size, the rest from settings)."""
    return TrendParams(
        bucket_s=source.trend_bucket_s or settings.TRENDS_BUCKET_S,
        baseline_buckets=settings.TRENDS_BASELINE_BUCKETS,
        min_history_buckets=settings.TRENDS_MIN_HISTORY_BUCKETS,
        min_score=settings.TRENDS_MIN_SCORE,
        min_events=settings.TRENDS_MIN_EVENTS,
        min_authors=settings.TRENDS_MIN_AUTHORS,
    )


@dataclass
class _Cell:
    """One (bucket, term) of a batch being counted."""

    events: int = 0
    authors: set[str] = field(default_factory=set)
    last_received_at: datetime | None = None
    last_created_at: datetime | None = None
    sample_ids: list[int] = field(default_factory=list)


_CLAIM_SQL = """
UPDATE ingest_event SET trends_at = statement_timestamp()
WHERE id = ANY(%s) AND trends_at IS NULL AND enriched_at IS NOT NULL
RETURNING id, source_id, external_id, created_at, received_at, author_id, author_handle,
          hashtags, mentions, cashtags, keywords
"""

_UPSERT_COUNTS_SQL = f"""
INSERT INTO mlengine_termcount AS t (source_id, bucket_start, term, events, authors)
VALUES %s
ON CONFLICT (source_id, term, bucket_start) DO UPDATE SET
    events = t.events + excluded.events,
    authors = (
        SELECT coalesce(array_agg(a), '{{}}') FROM (
            SELECT DISTINCT unnest(t.authors || excluded.authors) AS a
            LIMIT {TermCount.AUTHORS_CAP}
        ) merged
    )
RETURNING term, bucket_start, events, cardinality(authors)
"""

_UPSERT_TREND_SQL = """
INSERT INTO mlengine_trend AS tr (
    source_id, term, bucket_start, bucket_s, events, expected, score, authors_count,
    velocity, detected_at, updated_at, evidence_received_at, evidence_created_at,
    sample_event_ids
) VALUES %s
ON CONFLICT (source_id, term, bucket_start) DO UPDATE SET
    events = GREATEST(tr.events, excluded.events),
    expected = excluded.expected,
    score = GREATEST(tr.score, excluded.score),
    authors_count = GREATEST(tr.authors_count, excluded.authors_count),
    velocity = excluded.velocity,
    updated_at = excluded.updated_at
RETURNING id, (xmax = 0) AS inserted
"""


def update_trends(*, event_ids: Sequence[int]) -> list[int]:
    """Count enriched events into their trend buckets; return ids of new trends.

    Events already counted, not yet enriched, or gone are skipped. An event whose
    bucket ended at or before its source's watermark is late: it is marked counted,
    added to ``Source.late_events`` and left out of the counts.

    Side effect after commit: ``alerts.evaluate_trends`` with the new trend ids.
    """
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(_CLAIM_SQL, [list(event_ids)])
            claimed = cursor.fetchall()
        by_source: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
        for row in claimed:
            by_source[row[1]].append(row)
        new_trends: list[int] = []
        for source_id in sorted(by_source):
            source = Source.objects.filter(id=source_id).first()
            if source is None:
                continue
            new_trends.extend(_count_source_batch(source, by_source[source_id]))
        if new_trends:
            transaction.on_commit(lambda: _after_trends(new_trends))
    return new_trends


def _after_trends(trend_ids: list[int]) -> None:
    from alerts import tasks as alert_tasks

    alert_tasks.evaluate_trends.apply_async(kwargs={"trend_ids": trend_ids})


def _terms(row: tuple[Any, ...]) -> list[str]:
    hashtags, mentions, cashtags, keywords = row[7], row[8], row[9], row[10]
    return [*hashtags, *mentions, *cashtags, *keywords]


def _count_source_batch(source: Source, rows: list[tuple[Any, ...]]) -> list[int]:
    params = params_for(source)
    lateness = timedelta(seconds=settings.TRENDS_ALLOWED_LATENESS_S)
    bucket = timedelta(seconds=params.bucket_s)
    old_watermark = source.watermark
    cells: dict[tuple[datetime, str], _Cell] = defaultdict(_Cell)
    late = 0
    for row in rows:
        event_id, _, external_id, created_at, received_at, author_id, handle = row[:7]
        start = bucket_start(created_at, params.bucket_s)
        if old_watermark is not None and start + bucket <= old_watermark:
            late += 1
            continue
        author = Author(id=author_id, handle=handle).key(external_id)
        for term in [TOTAL_TERM, *_terms(row)]:
            cell = cells[(start, term[:200])]
            cell.events += 1
            cell.authors.add(author[:128])
            if cell.last_received_at is None or received_at >= cell.last_received_at:
                cell.last_received_at = received_at
                cell.last_created_at = created_at
            if len(cell.sample_ids) < SAMPLE_EVENTS:
                cell.sample_ids.append(event_id)

    counts: dict[tuple[datetime, str], tuple[int, int]] = {}
    if cells:
        values = [
            (source.id, start, term, cell.events, sorted(cell.authors)[: TermCount.AUTHORS_CAP])
            for (start, term), cell in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        ]
        with connection.cursor() as cursor:
            returned = execute_values(
                cursor.cursor,
                _UPSERT_COUNTS_SQL,
                values,
                template="(%s, %s, %s, %s, %s::varchar[])",
                page_size=2000,
                fetch=True,
            )
        counts = {(start, term): (events, authors) for term, start, events, authors in returned}

    max_created = max(row[3] for row in rows)
    last_received = max(row[4] for row in rows)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            UPDATE ingest_source SET
                watermark = GREATEST(coalesce(watermark, '-infinity'::timestamptz), %s),
                late_events = late_events + %s,
                last_received_at = GREATEST(coalesce(last_received_at, %s), %s)
            WHERE id = %s
            """,
            [max_created - lateness, late, last_received, last_received, source.id],
        )
    if late:
        log.info("ml.late_events", source_id=source.id, late=late)
    return _detect(source, params, cells, counts)


def _detect(
    source: Source,
    params: TrendParams,
    cells: dict[tuple[datetime, str], _Cell],
    counts: dict[tuple[datetime, str], tuple[int, int]],
) -> list[int]:
    """Score the terms the batch touched; upsert trends; return ids of new ones."""
    candidates: dict[datetime, list[str]] = defaultdict(list)
    for (start, term), (events, _) in counts.items():
        if term != TOTAL_TERM and events >= params.min_events:
            candidates[start].append(term)
    if not candidates:
        return []
    now = timezone.now()
    trend_rows = []
    for start, terms in sorted(candidates.items()):
        history = _history(source.id, start, terms, params)
        total_events, total_authors = counts[(start, TOTAL_TERM)]
        for term in terms:
            events, authors = counts[(start, term)]
            hist_events, prev_events = history["terms"].get(term, (0, 0))
            window = TermWindow(
                term=term,
                events=events,
                authors=authors,
                bucket_total=total_events,
                source_authors=max(total_authors, history["max_authors"]),
                hist_events=hist_events,
                hist_total=history["total"],
                hist_buckets=history["buckets"],
                mean_bucket_total=history["mean_total"],
                prev_events=prev_events,
            )
            verdict = score_term(window, params)
            if not verdict.is_trend:
                continue
            cell = cells[(start, term)]
            trend_rows.append(
                (
                    source.id,
                    term,
                    start,
                    params.bucket_s,
                    events,
                    verdict.expected,
                    verdict.score,
                    authors,
                    verdict.velocity,
                    now,
                    now,
                    cell.last_received_at,
                    cell.last_created_at,
                    cell.sample_ids,
                )
            )
    if not trend_rows:
        return []
    trend_rows.sort(key=lambda r: (r[1], r[2]))
    with connection.cursor() as cursor:
        returned = execute_values(
            cursor.cursor,
            _UPSERT_TREND_SQL,
            trend_rows,
            template="(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::bigint[])",
            fetch=True,
        )
    new_ids = [trend_id for trend_id, inserted in returned if inserted]
    if new_ids:
        log.info("ml.trends_detected", source_id=source.id, new=len(new_ids))
    return new_ids


def _history(
    source_id: int, start: datetime, terms: list[str], params: TrendParams
) -> dict[str, Any]:
    """Baseline sums of ``terms`` and of the totals before the bucket at ``start``.

    Returns ``{"terms": {term: (hist_events, prev_bucket_events)}, "total": int,
    "buckets": int, "mean_total": float, "max_authors": int}``.
    """
    since, until = baseline_range(start, params)
    prev = start - timedelta(seconds=params.bucket_s)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT term,
                   sum(events),
                   sum(events) FILTER (WHERE bucket_start = %s),
                   count(*),
                   max(cardinality(authors))
            FROM mlengine_termcount
            WHERE source_id = %s AND bucket_start >= %s AND bucket_start < %s
              AND term = ANY(%s)
            GROUP BY term
            """,
            [prev, source_id, since, until, [TOTAL_TERM, *terms]],
        )
        rows = cursor.fetchall()
    result: dict[str, Any] = {
        "terms": {},
        "total": 0,
        "buckets": 0,
        "mean_total": 0.0,
        "max_authors": 0,
    }
    for term, hist, prev_events, buckets, max_authors in rows:
        if term == TOTAL_TERM:
            result["total"] = int(hist)
            result["buckets"] = int(buckets)
            result["mean_total"] = int(hist) / max(int(buckets), 1)
            result["max_authors"] = int(max_authors or 0)
        else:
            result["terms"][term] = (int(hist), int(prev_events or 0))
    return result


def close_stream(*, source_id: int, event_time: datetime) -> bool:
    """Advance ``source_id``'s watermark past ``event_time`` once its events are counted.

    Returns False (the caller retries later) while any staged batch or uncounted event
    of the source remains; True when the watermark moved (or the source is gone).
    """
    from ingest.models import Event
    from ingest.services import source_has_pending_batches

    source = Source.objects.filter(id=source_id).first()
    if source is None:
        return True
    if (
        source_has_pending_batches(source_id)
        or Event.objects.filter(source_id=source_id, trends_at__isnull=True).exists()
    ):
        return False
    bucket_s = params_for(source).bucket_s
    end = bucket_start(event_time, bucket_s) + timedelta(seconds=bucket_s)
    advance_watermarks(source_ids=[source_id], to=end)
    log.info("ml.stream_closed", source_id=source_id, watermark=end.isoformat())
    return True


def advance_watermarks(*, source_ids: Sequence[int], to: datetime) -> int:
    """Move the watermarks of ``source_ids`` forward to ``to`` (never backwards), in one
    UPDATE; returns how many sources it touched."""
    return Source.objects.filter(id__in=source_ids).update(
        watermark=Greatest(Coalesce("watermark", Value(to)), Value(to))
    )


def advance_idle_watermarks() -> int:
    """Close the buckets of live sources that went quiet (processing-time timeout).

    A live source whose last event arrived more than ``TRENDS_IDLE_ADVANCE_S`` ago has
    its watermark moved to now minus the allowed lateness: for live sources event time
    tracks processing time. Replay sources are closed by ``close_stream`` instead.
    Returns how many sources moved.
    """
    now = timezone.now()
    idle_since = now - timedelta(seconds=settings.TRENDS_IDLE_ADVANCE_S)
    target = now - timedelta(seconds=settings.TRENDS_ALLOWED_LATENESS_S)
    ids = list(
        Source.objects.filter(enabled=True, last_received_at__lt=idle_since)
        .exclude(kind=Source.Kind.REPLAY)
        .values_list("id", flat=True)
    )
    return advance_watermarks(source_ids=ids, to=target)
