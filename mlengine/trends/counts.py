"""What the trend stage's count (``mlengine.trends.scan``) reads and writes: the
buckets-so-far (``BucketCount`` rows; only the batch's terms travel, ``Cells``), the
baseline of the buckets before them (``History``), and the trends detected: inserted,
grown or confirmed (``save_trends``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from psycopg2.extras import execute_values

from mlengine.models import TOTAL_TERM
from mlengine.trends.detector import (
    TrendParams,
    baseline_range,
)


@dataclass
class Cell:
    """A term's counts in the bucket-so-far, and what the scan learned about it."""

    events: int = 0
    authors: set[str] = field(default_factory=set)
    changed: bool = False
    trend: dict[str, Any] | None = None


Key = tuple[datetime, str]
"""``(bucket start, term)``."""


@dataclass(frozen=True)
class _Baseline:
    """Sums over the baseline buckets before one bucket: ``terms`` maps a term to
    ``(events in the baseline, in the previous bucket, in the one before)``; ``total`` events,
    ``buckets`` with any event, their mean total, and the most authors of any. ``long``,
    ``long_total``, ``long_buckets`` and ``present``: a term's events, all events, the
    buckets with any event and those with the term, over the ``TrendParams.long_buckets``
    before (what the always-on test reads)."""

    terms: dict[str, tuple[int, int, int]]
    total: int
    buckets: int
    mean_total: float
    max_authors: int
    long: dict[str, int]
    long_total: int
    long_buckets: int
    present: dict[str, int]


@dataclass
class History:
    """Per-bucket counts of some terms (and the totals) before the scanned buckets,
    extended with each bucket the scan completes. Every bucket in it is complete: the
    scan has passed it, so the watermark has."""

    buckets: dict[datetime, dict[str, int]]
    """Per bucket start, its events (``TOTAL_TERM``) and those of ``terms`` it holds."""
    total_authors: dict[datetime, int]
    terms: list[str]

    @classmethod
    def load(cls, source_id: int, *, since: datetime, until: datetime, terms: list[str]) -> History:
        """Counts of ``terms`` and of the totals in buckets ``[since, until)`` (one query:
        each bucket's totals and the events of those of ``terms`` it holds)."""
        with connection.cursor() as cursor:
            cursor.execute(
                """
                SELECT b.bucket_start, b.events, cardinality(b.authors),
                       (SELECT jsonb_object_agg(t.key, t.value -> 0) FROM jsonb_each(b.terms) t
                        WHERE t.key = ANY(%s::text[]))
                FROM mlengine_bucketcount b
                WHERE b.source_id = %s AND b.bucket_start >= %s AND b.bucket_start < %s
                """,
                [terms, source_id, since, until],
            )
            rows = cursor.fetchall()
        history = cls(buckets={}, total_authors={}, terms=terms)
        for start, events, authors, term_events in rows:
            counts = {
                term: int(n) for term, n in (json.loads(term_events) if term_events else {}).items()
            }
            counts[TOTAL_TERM] = events
            history.buckets[start] = counts
            history.total_authors[start] = authors or 0
        return history

    def add_bucket(self, start: datetime, cells: Cells) -> None:
        """Record the scanned bucket at ``start`` for the buckets after it."""
        total = cells.get((start, TOTAL_TERM))
        if total is None or not total.events:
            return
        # A scanned bucket may also be a loaded one: what the scan did not touch keeps
        # its stored count.
        counts = self.buckets.setdefault(start, {})
        counts[TOTAL_TERM] = total.events
        self.total_authors[start] = len(total.authors)
        for term in self.terms:
            cell = cells.get((start, term))
            if cell is not None and cell.events:
                counts[term] = cell.events

    def baseline(self, start: datetime, params: TrendParams) -> _Baseline:
        """The baseline of the bucket at ``start`` (``baseline_range``)."""
        since, until = baseline_range(start, params)
        long_since = start - timedelta(seconds=params.bucket_s * params.long_buckets)
        prev = start - timedelta(seconds=params.bucket_s)
        before = prev - timedelta(seconds=params.bucket_s)
        terms: dict[str, list[int]] = {}
        total = buckets = 0
        max_authors = 0
        long: dict[str, int] = {}
        present: dict[str, int] = {}
        long_total = long_buckets = 0
        for moment, counts in self.buckets.items():
            if not long_since <= moment < until:
                continue
            recent = moment >= since
            for term, events in counts.items():
                if term == TOTAL_TERM:
                    long_total += events
                    long_buckets += 1
                    if recent:
                        total += events
                        buckets += 1
                        max_authors = max(max_authors, self.total_authors.get(moment, 0))
                    continue
                if not events:
                    continue
                long[term] = long.get(term, 0) + events
                present[term] = present.get(term, 0) + 1
                if not recent:
                    continue
                sums = terms.setdefault(term, [0, 0, 0])
                sums[0] += events
                if moment == prev:
                    sums[1] += events
                if moment == before:
                    sums[2] += events
        return _Baseline(
            terms={term: (v[0], v[1], v[2]) for term, v in terms.items()},
            total=total,
            buckets=buckets,
            mean_total=total / max(buckets, 1),
            max_authors=max_authors,
            long=long,
            long_total=long_total,
            long_buckets=long_buckets,
            present=present,
        )


class Cells(dict[Key, Cell]):
    """The buckets-so-far of the scanned buckets, by ``(bucket start, term)``: the stored
    counts (``BucketCount``) of the batch's terms, any trend already detected, and what
    the scan adds. A term's cell is built from its bucket's row when first asked for.

    Only the batch's terms travel, both ways: a bucket's other terms stay in PostgreSQL
    (``save`` merges the changed ones into the stored map), so a task costs Python time
    in proportion to its batch, not to the bucket (a live bucket may hold 100,000 posts).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stored: dict[datetime, dict[str, list[Any]]] = {}

    def __missing__(self, key: Key) -> Cell:
        start, term = key
        counts = self.stored.get(start, {}).get(term)
        cell = Cell(events=counts[0], authors=set(counts[1])) if counts else Cell()
        self[key] = cell
        return cell

    @classmethod
    def load(cls, source_id: int, starts: list[datetime], terms: list[str]) -> Cells:
        """The stored counts of ``terms`` (and the totals) in the buckets at ``starts``,
        and the trends of ``terms`` already detected in them: two queries."""
        cells = cls()
        with connection.cursor() as cursor:
            cursor.execute(
                """
                SELECT b.bucket_start, b.events, b.authors,
                       (SELECT jsonb_object_agg(t.key, t.value) FROM jsonb_each(b.terms) t
                        WHERE t.key = ANY(%s::text[]))
                FROM mlengine_bucketcount b
                WHERE b.source_id = %s AND b.bucket_start = ANY(%s)
                """,
                [terms, source_id, starts],
            )
            # Django's PostgreSQL backend hands jsonb over as text.
            for start, events, authors, term_counts in cursor.fetchall():
                cells.stored[start] = json.loads(term_counts) if term_counts else {}
                cells[(start, TOTAL_TERM)] = Cell(events=events, authors=set(authors))
            cursor.execute(
                """
                SELECT bucket_start, term, expected, score, velocity, sample_event_ids,
                       predicted, confirmed_at
                FROM mlengine_trend
                WHERE source_id = %s AND bucket_start = ANY(%s) AND term = ANY(%s)
                """,
                [source_id, starts, terms],
            )
            for row in cursor.fetchall():
                start, term, expected, score, velocity, samples, predicted, confirmed_at = row
                cells[(start, term)].trend = {
                    "new": False,
                    "expected": expected,
                    "score": score,
                    "velocity": velocity,
                    "sample_event_ids": list(samples),
                    "predicted": predicted,
                    "confirmed_at": confirmed_at,
                    "was_confirmed": confirmed_at is not None,
                }
        return cells

    def save(self, source_id: int) -> None:
        """Write every bucket with a changed cell: its totals, and its changed terms
        merged into the stored map (one statement)."""
        changed: dict[datetime, dict[str, list[Any]]] = {}
        for (start, term), cell in self.items():
            if not cell.changed:
                continue
            counts = changed.setdefault(start, {})
            if term != TOTAL_TERM:
                counts[term] = [cell.events, sorted(cell.authors)]
        values = []
        for start in sorted(changed):
            total = self[(start, TOTAL_TERM)]
            values.append(
                (
                    source_id,
                    start,
                    total.events,
                    sorted(total.authors),
                    json.dumps(changed[start], ensure_ascii=False),
                )
            )
        if not values:
            return
        with connection.cursor() as cursor:
            execute_values(
                cursor.cursor,
                _UPSERT_COUNTS_SQL,
                values,
                template="(%s, %s, %s, %s::varchar[], %s::jsonb)",
            )


_UPSERT_COUNTS_SQL = """
INSERT INTO mlengine_bucketcount AS b (source_id, bucket_start, events, authors, terms)
VALUES %s
ON CONFLICT (source_id, bucket_start) DO UPDATE SET
    events = excluded.events, authors = excluded.authors, terms = b.terms || excluded.terms
"""


_INSERT_TRENDS_SQL = """
INSERT INTO mlengine_trend (
    source_id, term, bucket_start, bucket_s, events, expected, score, authors_count,
    velocity, detected_at, updated_at, evidence_received_at, evidence_created_at,
    sample_event_ids, predicted, confirmed_at, projected, always_on
) VALUES %s
ON CONFLICT (source_id, term, bucket_start) DO NOTHING
RETURNING id
"""

_UPDATE_TRENDS_SQL = """
UPDATE mlengine_trend AS tr SET
    events = v.events, authors_count = v.authors_count,
    sample_event_ids = v.samples, updated_at = v.updated_at,
    score = v.score, confirmed_at = v.confirmed_at
FROM (VALUES %%s) AS v(
    bucket_start, term, events, authors_count, samples, updated_at, score, confirmed_at,
    newly_confirmed
)
WHERE tr.source_id = %s AND tr.bucket_start = v.bucket_start AND tr.term = v.term
RETURNING tr.id, v.newly_confirmed
"""


def save_trends(
    source_id: int, params: TrendParams, cells: Cells, now: datetime
) -> tuple[list[int], list[int]]:
    """Insert the trends detected in this scan; update those that grew or whose
    prediction came true. Returns ``(new trend ids, newly confirmed trend ids)``."""
    new_rows = []
    grown = []
    for (start, term), cell in sorted(cells.items()):
        trend = cell.trend
        if trend is None:
            continue
        if trend["new"]:
            new_rows.append(
                (
                    source_id,
                    term,
                    start,
                    params.bucket_s,
                    cell.events,
                    trend["expected"],
                    trend["score"],
                    len(cell.authors),
                    trend["velocity"],
                    now,
                    now,
                    trend["evidence_received_at"],
                    trend["evidence_created_at"],
                    trend["sample_event_ids"],
                    bool(trend.get("predicted")),
                    trend.get("confirmed_at"),
                    trend.get("projected"),
                    bool(trend.get("always_on")),
                )
            )
        elif trend.get("grown"):
            newly = trend.get("confirmed_at") is not None and not trend.get("was_confirmed")
            grown.append(
                (
                    start,
                    term,
                    cell.events,
                    len(cell.authors),
                    trend["sample_event_ids"],
                    now,
                    trend["score"],
                    trend.get("confirmed_at"),
                    newly,
                )
            )
    new_ids: list[int] = []
    confirmed: list[int] = []
    with connection.cursor() as cursor:
        if new_rows:
            returned = execute_values(
                cursor.cursor,
                _INSERT_TRENDS_SQL,
                new_rows,
                template="(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::bigint[],"
                " %s, %s::timestamptz, %s::double precision, %s)",
                fetch=True,
            )
            new_ids = [row[0] for row in returned]
        if grown:
            # execute_values fills the one %s left after mogrify; source_id is bound here.
            update_sql = cursor.mogrify(_UPDATE_TRENDS_SQL, [source_id]).decode()
            returned = execute_values(
                cursor.cursor,
                update_sql,
                grown,
                template="(%s::timestamptz, %s::varchar, %s::int, %s::int, %s::bigint[],"
                " %s::timestamptz, %s::float8, %s::timestamptz, %s::boolean)",
                fetch=True,
            )
            confirmed = [row[0] for row in returned if row[1]]
    return new_ids, confirmed


_WITHDRAW_SQL = """
UPDATE mlengine_trend SET withdrawn_at = bucket_start + make_interval(secs => bucket_s)
WHERE source_id = %s AND predicted AND confirmed_at IS NULL AND withdrawn_at IS NULL
  AND bucket_start + make_interval(secs => bucket_s) <= %s
RETURNING id
"""


def withdraw_predictions(source_id: int, watermark: datetime) -> list[int]:
    """Withdraw the predictions of ``source_id`` whose bucket the watermark has closed
    (``bucket_start + bucket_s <= watermark``) without their count passing: their
    ``withdrawn_at`` becomes the bucket's end (event time). Returns their ids, ordered.
    One statement (the partial index ``trend_open_prediction`` finds them); a second call
    finds none left."""
    with connection.cursor() as cursor:
        cursor.execute(_WITHDRAW_SQL, [source_id, watermark])
        return sorted(row[0] for row in cursor.fetchall())
