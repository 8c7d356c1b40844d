"""Writes of the trend stage: each stream's event-time clock, term counts, trends.

``advance_stream`` is the stage's one entry point. It moves a source's watermark up to
the stream's low watermark (``ingest.selectors.input_low_watermark``: everything
earlier is stored and enriched) and counts the events in between **in event-time
order** (ties by external id), as if it lived through them one by one:

- each event adds one to its bucket's total and to each of its terms, with its author;
- at each of a term's events the term is scored on the bucket-so-far
  (``mlengine.trends.score_terms``); the first event at which it passes every
  threshold is the trend's detection, and that event is its evidence.

So a verdict is a function of the events alone: the earliest event time at which the
bucket-so-far crosses the threshold, whatever the batch boundaries, arrival order,
worker count or replay speed. It is final when it is made, because the watermark has
passed the evidence and no earlier event can still come (an event that comes anyway is
late: stored, counted in ``StreamClock.late_events``, left out of the counts).

One task advances several streams: its own, and up to ``MAX_STREAMS_PER_ADVANCE``
others with work pending whose clocks no other worker holds. Each stream is still
counted on its own, bucket after bucket, but the streams step in lockstep rounds (the
``k``-th bucket of each), and a round's candidate windows of all of them are scored in
one ``score_terms`` call: one vectorised call over thousands of windows instead of one
small call per stream and bucket. Every verdict, count and hand-off is the one that
advancing each stream alone gives.

One worker advances a stream at a time (it holds the clock's row lock); different
streams advance in parallel, and a stream another worker holds is left to it. Term
counts and trends are written with absolute values, so the result does not depend on
which worker did it. New trends go to the alerts stage after commit. Event time and
allowed lateness: DESIGN.md, "Time".
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone
from psycopg2.extras import execute_values

from ingest import selectors as ingest_selectors
from ingest.models import Source
from ingest.selectors import TrendInput
from mlengine.forecast import forecast_volume, project_bucket_count
from mlengine.models import TOTAL_TERM, BucketCount, StreamClock, Trend
from mlengine.stories import StoryParams, choose_story
from mlengine.trends import (
    BoolArray,
    FloatArray,
    TrendParams,
    TrendScores,
    baseline_range,
    bucket_start,
    score_terms,
)
from mlengine.trends import suggest_bucket_s as ladder_bucket_s
from twiscope import pipeline

log = structlog.get_logger(__name__)

SAMPLE_EVENTS = 10
MAX_EVENTS_PER_ADVANCE = 5000
"""At most this many events of one stream are counted in one transaction; the rest in
the stream's next task."""
MAX_STREAMS_PER_ADVANCE = 32
"""At most this many streams besides its own join one advance (``advance_stream``)."""
MAX_EVENTS_PER_BATCH = 50_000
"""An advance takes no more streams once it holds this many events, so that a backlog
of every stream keeps the task well inside its time limit (about 0.2-0.3 ms an event,
stories included: ``bench/trend_stage.py``)."""


def params_for(bucket_s: int) -> TrendParams:
    """The detector parameters for a stream with ``bucket_s`` buckets (rest: settings)."""
    return TrendParams(
        bucket_s=bucket_s,
        baseline_buckets=settings.TRENDS_BASELINE_BUCKETS,
        min_history_buckets=settings.TRENDS_MIN_HISTORY_BUCKETS,
        min_score=settings.TRENDS_MIN_SCORE,
        min_events=settings.TRENDS_MIN_EVENTS,
        min_authors=settings.TRENDS_MIN_AUTHORS,
        emerging_sigmas=settings.TRENDS_EMERGING_SIGMAS,
    )


def bucket_s_for(source: Source) -> int:
    """The trend bucket (seconds) a new stream of ``source`` gets.

    ``config["trend_bucket_s"]`` when the source sets one; else, when the source tells
    its mean events per active day (``config["events_per_active_day"]``, as a replay
    does), the smallest bucket that holds twice ``TRENDS_MIN_EVENTS`` on average
    (``mlengine.trends.suggest_bucket_s``); else ``settings.TRENDS_BUCKET_S``.
    """
    config = source.config if isinstance(source.config, dict) else {}
    explicit = config.get("trend_bucket_s")
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    per_day = config.get("events_per_active_day")
    if isinstance(per_day, int | float) and per_day > 0:
        return ladder_bucket_s(float(per_day), min_events=settings.TRENDS_MIN_EVENTS)
    return int(settings.TRENDS_BUCKET_S)


def _lock_clock(source: Source) -> StreamClock:
    """The source's clock, created if new, locked ``FOR UPDATE`` (inside a transaction)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO mlengine_streamclock
                (source_id, bucket_s, late_events, counted_events)
            VALUES (%s, %s, 0, 0) ON CONFLICT (source_id) DO NOTHING
            """,
            [source.id, bucket_s_for(source)],
        )
    return StreamClock.objects.select_for_update().get(source_id=source.id)


def advance_stream(*, source_id: int) -> list[int]:
    """Count ``source_id``'s events up to its low watermark, and those of up to
    ``MAX_STREAMS_PER_ADVANCE`` other streams with work pending (no more once it holds
    ``MAX_EVENTS_PER_BATCH`` events); return the ids of ``source_id``'s new trends.

    Does nothing for a stream whose source is gone, declared no progress, or whose
    watermark cannot move. Counts at most ``MAX_EVENTS_PER_ADVANCE`` events of each
    stream (never splitting one event time) and queues that stream's advance again for
    the rest. One transaction for all the streams taken. Side effects after commit, per
    stream: its progress count, its new trends and confirmations to the alerts stage.

    Should the batch fail, it is rolled back whole and ``source_id`` is advanced alone,
    so that one stream that cannot be counted does not stall every stream batched with
    it (the failure is logged; that of ``source_id`` alone is raised).
    """
    source = Source.objects.filter(id=source_id).first()
    if source is None:
        return []
    try:
        streams = _advance(source, others=MAX_STREAMS_PER_ADVANCE)
    except Exception:
        log.exception("ml.batch_failed", source_id=source_id)
        streams = _advance(source, others=0)
    for stream in streams:
        if stream.new_trends:
            log.info("ml.trends_detected", source_id=stream.source_id, new=len(stream.new_trends))
    own = next((s for s in streams if s.source_id == source_id), None)
    return own.new_trends if own is not None else []


@dataclass
class _Stream:
    """One stream's share of an advance: its clock's ``bucket_s`` (seconds), the
    ``target`` watermark, the ``events`` to count (event-time order) and whether ``more``
    wait beyond them; filled by ``_count_streams``: the ids of its ``new_trends`` and of
    its predicted trends ``confirmed``."""

    source_id: int
    bucket_s: int
    target: datetime
    events: list[TrendInput]
    more: bool
    new_trends: list[int] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)


def _advance(source: Source, *, others: int) -> list[_Stream]:
    """Advance ``source``'s stream and up to ``others`` other streams with work pending,
    in one transaction, taking no more once ``MAX_EVENTS_PER_BATCH`` events are held;
    return the streams that had work (``source``'s first when it had). Side effects:
    counts, trends, stories and clocks of those streams; their hand-offs after commit."""
    with transaction.atomic():
        clocks = [_lock_clock(source), *_lock_pending_clocks(exclude=source.id, limit=others)]
        streams: list[_Stream] = []
        for clock in clocks:
            if sum(len(stream.events) for stream in streams) >= MAX_EVENTS_PER_BATCH:
                break  # the clocks left are released at commit, for their own tasks
            stream = _pending(clock)
            if stream is not None:
                streams.append(stream)
        _count_streams([stream for stream in streams if stream.events])
        for stream in streams:
            _close(stream)
    return streams


def _lock_pending_clocks(*, exclude: int, limit: int) -> list[StreamClock]:
    """Up to ``limit`` clocks of streams other than ``exclude`` that may have work
    pending, least recently advanced first, locked ``FOR UPDATE SKIP LOCKED`` (one
    query, never waits: a clock another worker holds is left to it).

    A stream may have work when its source declared input progress past the clock's
    watermark (the declared watermark bounds the low watermark from above; ``_pending``
    decides). A source with no clock yet is not taken: its own task creates the clock,
    and creating it here could wait on, or deadlock with, that task's insert.
    """
    if limit <= 0:
        return []
    return list(
        StreamClock.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(source__input_watermark__isnull=False)
        .filter(Q(watermark__isnull=True) | Q(watermark__lt=F("source__input_watermark")))
        .exclude(source_id=exclude)
        .order_by(F("advanced_at").asc(nulls_first=True), "source_id")[:limit]
    )


def _pending(clock: StreamClock) -> _Stream | None:
    """The work of the stream of ``clock`` (locked), or None when its watermark cannot
    move: the events from its watermark up to its low watermark, at most
    ``MAX_EVENTS_PER_ADVANCE`` (then cut before the first event time not wholly taken)."""
    target = ingest_selectors.input_low_watermark(clock.source_id)
    if target is None or (clock.watermark is not None and target <= clock.watermark):
        return None
    events = ingest_selectors.events_for_trends(
        clock.source_id, since=clock.watermark, until=target, limit=MAX_EVENTS_PER_ADVANCE + 1
    )
    more = len(events) > MAX_EVENTS_PER_ADVANCE
    if more:
        # Stop before the first event not taken, and before every event sharing its
        # time, so the next advance starts on a whole event time.
        target = events[MAX_EVENTS_PER_ADVANCE].created_at
        events = [e for e in events[:MAX_EVENTS_PER_ADVANCE] if e.created_at < target]
    return _Stream(clock.source_id, clock.bucket_s, target, events, more)


def _close(stream: _Stream) -> None:
    """Finish ``stream``'s advance (inside the transaction): its new trends into stories,
    its clock to the target; after commit, its progress and its hand-offs to the alerts
    stage, and its next advance when ``more`` events wait."""
    source_id, counted = stream.source_id, len(stream.events)
    if stream.new_trends:
        assign_stories(source_id, stream.new_trends)
    StreamClock.objects.filter(source_id=source_id).update(
        watermark=stream.target,
        counted_events=F("counted_events") + counted,
        advanced_at=timezone.now(),
    )
    transaction.on_commit(lambda: pipeline.add_progress("ml", source_id, counted))
    if stream.new_trends:
        pipeline.hand_off("ml", items=stream.new_trends, trend_ids=stream.new_trends)
    if stream.confirmed:
        pipeline.hand_off("ml", task="confirmations", trend_ids=stream.confirmed)
    if stream.more:
        pipeline.send("ml", source_id=source_id)


@dataclass
class _Cell:
    """A term's counts in the bucket-so-far, and what the scan learned about it."""

    events: int = 0
    authors: set[str] = field(default_factory=set)
    changed: bool = False
    trend: dict[str, Any] | None = None


Key = tuple[datetime, str]
"""``(bucket start, term)``."""


def _count_streams(streams: Sequence[_Stream]) -> None:
    """Count each stream's events (event-time order), bucket after bucket, the streams in
    lockstep: round ``k`` counts the ``k``-th bucket of every stream that has one, then
    scores all their candidate windows at once (``_score_round``), then records each
    bucket for the baselines of the buckets after it. A bucket's baseline holds only its
    own stream's earlier buckets, so each stream gets the verdicts it would alone.

    Per stream, a fixed number of queries whatever the number of buckets and terms
    (``_Scan``), one upsert of its buckets' counts, one insert of new trends and one
    update of grown ones. Side effects: those writes; ``new_trends`` and ``confirmed``
    of each stream.
    """
    scans = [
        _Scan(stream.source_id, params_for(stream.bucket_s), stream.events) for stream in streams
    ]
    now = timezone.now()
    for k in range(max((len(scan.starts) for scan in scans), default=0)):
        active = [scan for scan in scans if k < len(scan.starts)]
        windows = [scan.collect(scan.starts[k]) for scan in active]
        for scan, bucket_windows, verdicts in zip(
            active, windows, _score_round(windows), strict=True
        ):
            if bucket_windows is not None and verdicts is not None:
                scan.judge(scan.starts[k], bucket_windows, verdicts)
            scan.history.add_bucket(scan.starts[k], scan.cells)
    for stream, scan in zip(streams, scans, strict=True):
        scan.cells.save(stream.source_id)
        stream.new_trends, stream.confirmed = _save_trends(
            stream.source_id, scan.params, scan.cells, now
        )


def _open(trend: dict[str, Any] | None) -> bool:
    """Whether a cell can still be detected: no trend yet, or one predicted and not yet
    confirmed."""
    return trend is None or (bool(trend.get("predicted")) and not trend.get("confirmed_at"))


IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class _Windows:
    """The candidate windows of one stream's bucket: window ``i`` is term ``terms[i]``'s
    bucket-so-far at the bucket's event ``index[i]``. ``scored`` holds the keyword
    arguments of ``score_terms`` for them, each an array of shape ``(n,)`` (the stream's
    ``bucket_s`` included); ``before_events``, the term's events two buckets back, and
    ``projected``, its bucket projected to the end (events; ``TRENDS_EMERGING`` only),
    shape ``(n,)`` too. ``seen_at``: a term's events (indices) in the bucket before it
    trended (its samples, should it)."""

    params: TrendParams
    terms: list[str]
    index: list[int]
    scored: dict[str, npt.NDArray[Any]]
    before_events: IntArray
    projected: FloatArray | None
    seen_at: dict[str, list[int]]


@dataclass(frozen=True)
class _Verdicts:
    """``score_terms``'s verdicts on one ``_Windows``: ``scores`` on the counts so far,
    ``projected`` on the counts projected to the bucket's end (``scores`` again without
    ``TRENDS_EMERGING``), ``emerging``: the windows that are emerging detections."""

    scores: TrendScores
    projected: TrendScores
    emerging: BoolArray


class _Scan:
    """One stream's count in an advance: its events by bucket (``starts`` in order), the
    buckets-so-far (``cells``), the (bucket, term) ``candidates`` that may trend, and
    the baseline ``history``. ``collect`` then ``judge`` each bucket, in order."""

    def __init__(self, source_id: int, params: TrendParams, events: Sequence[TrendInput]) -> None:
        """Load what counting ``events`` (event-time order, at least one) needs: the
        buckets' counts and trends so far, and the baseline of the terms that may trend
        (three queries)."""
        self.params = params
        bucket = timedelta(seconds=params.bucket_s)
        self.by_bucket: dict[datetime, list[TrendInput]] = defaultdict(list)
        for event in events:
            self.by_bucket[bucket_start(event.created_at, params.bucket_s)].append(event)
        self.starts = sorted(self.by_bucket)
        terms = sorted({term for event in events for term in event.terms})
        self.cells = _Cells.load(source_id, self.starts, terms)
        # Only a term that reaches min_events in a bucket can trend there: load the
        # baseline of those alone (and of the totals).
        arriving: dict[Key, int] = defaultdict(int)
        for start, bucket_events in self.by_bucket.items():
            for event in bucket_events:
                for term in event.terms:
                    arriving[(start, term)] += 1
        self.candidates = {
            key
            for key, count in arriving.items()
            if _open(self.cells[key].trend) and self.cells[key].events + count >= params.min_events
        }
        self.history = _History.load(
            source_id,
            since=self.starts[0] - bucket * params.baseline_buckets,
            until=self.starts[-1],
            terms=sorted({term for _, term in self.candidates}),
        )

    def collect(self, start: datetime) -> _Windows | None:
        """Live through the bucket at ``start``'s new events in order, counting them,
        and return its candidate windows (None when there is none).

        Side effects: the bucket's cells (counts, authors, samples of trends already
        stored)."""
        params = self.params
        events = self.by_bucket[start]
        baseline = self.history.baseline(start, params)
        total = self.cells[(start, TOTAL_TERM)]
        rows: list[tuple[str, int, int, int, int, int, int, int, int, float]] = []
        seen_at: dict[str, list[int]] = defaultdict(list)
        for index, event in enumerate(events):
            total.events += 1
            if len(total.authors) < BucketCount.AUTHORS_CAP:
                total.authors.add(event.author)
            total.changed = True
            for term in event.terms:
                cell = self.cells[(start, term)]
                cell.events += 1
                if len(cell.authors) < BucketCount.AUTHORS_CAP:
                    cell.authors.add(event.author)
                cell.changed = True
                if cell.trend is not None:
                    _grow(cell, event)
                    if not _open(cell.trend):
                        continue
                else:
                    seen_at[term].append(index)
                if cell.events < params.min_events or (start, term) not in self.candidates:
                    continue
                hist_events, prev_events, before_events = baseline.terms.get(term, (0, 0, 0))
                source_authors = max(len(total.authors), baseline.max_authors)
                window = (cell.events, len(cell.authors), total.events, source_authors)
                elapsed = (event.created_at - start).total_seconds()
                rows.append(
                    (term, index, *window, hist_events, prev_events, before_events, elapsed)
                )
        if not rows:
            return None
        columns = list(zip(*rows, strict=True))
        n = len(rows)
        counts = np.asarray(columns[2])
        scored: dict[str, npt.NDArray[Any]] = {
            "events": counts,
            "authors": np.asarray(columns[3]),
            "bucket_total": np.asarray(columns[4]),
            "source_authors": np.asarray(columns[5]),
            "hist_events": np.asarray(columns[6]),
            "hist_total": np.full(n, baseline.total),
            "hist_buckets": np.full(n, baseline.buckets),
            "mean_bucket_total": np.full(n, baseline.mean_total),
            "prev_events": np.asarray(columns[7]),
            "bucket_s": np.full(n, params.bucket_s),
        }
        projected = None
        if settings.TRENDS_EMERGING:
            projected = project_bucket_count(
                counts, np.asarray(columns[9]), params.bucket_s, sigmas=params.emerging_sigmas
            )
        return _Windows(
            params=params,
            terms=list(columns[0]),
            index=list(columns[1]),
            scored=scored,
            before_events=np.asarray(columns[8]),
            projected=projected,
            seen_at=seen_at,
        )

    def judge(self, start: datetime, windows: _Windows, verdicts: _Verdicts) -> None:
        """Keep, per term of the bucket at ``start``, the first of its ``windows`` that
        passes: the detection, whatever the events after it.

        With ``TRENDS_EMERGING``, a window whose bucket, projected to its end at its rate
        so far (``mlengine.forecast.project_bucket_count``), passes the test while the
        term's count grows and accelerates against the two buckets before is an emerging
        detection: the trend is stored as ``predicted`` and confirmed (``confirmed_at``)
        at the first later window that passes as it is. The same rule as
        ``mlengine.trends.TermStream``. Side effects: the cells' trends and samples.
        """
        events = self.by_bucket[start]
        scores, projected = verdicts.scores, verdicts.projected
        for i in np.flatnonzero(scores.is_trend | verdicts.emerging):
            term, index = windows.terms[i], windows.index[i]
            cell = self.cells[(start, term)]
            event = events[index]
            if cell.trend is not None:
                if _open(cell.trend) and scores.is_trend[i]:
                    cell.trend["confirmed_at"] = event.created_at  # the prediction came true
                    cell.trend["score"] = max(cell.trend["score"], round(float(scores.score[i]), 4))
                    cell.trend["grown"] = True
                continue
            verdict = scores if scores.is_trend[i] else projected
            cell.trend = {
                "new": True,
                "predicted": not bool(scores.is_trend[i]),
                "confirmed_at": None,
                "expected": round(float(verdict.expected[i]), 4),
                "score": round(float(verdict.score[i]), 4),
                "velocity": round(float(verdict.velocity[i]), 4),
                "evidence_received_at": event.received_at,
                "evidence_created_at": event.created_at,
                "sample_event_ids": [event.id],
            }
            for after in windows.seen_at[term]:
                if after > index:
                    _grow(cell, events[after])


def _score_round(windows: Sequence[_Windows | None]) -> list[_Verdicts | None]:
    """Score the candidate windows of one round, of every stream, in one ``score_terms``
    call (and one more on the projected counts with ``TRENDS_EMERGING``); return each
    stream's verdicts, aligned with ``windows`` (None where it had none).

    The streams' parameters differ in ``bucket_s`` alone (``params_for``), which goes
    per window; every other step is elementwise, so each window's verdict is the one
    scoring its stream alone gives. Pure.
    """
    present = [w for w in windows if w is not None]
    if not present:
        return [None] * len(windows)
    params = present[0].params
    assert all(replace(w.params, bucket_s=params.bucket_s) == params for w in present)
    common = {
        name: np.concatenate([w.scored[name] for w in present])
        for name in present[0].scored
        if name != "events"
    }
    counts = np.concatenate([w.scored["events"] for w in present])
    scores = score_terms(params, events=counts, **common)
    projected = scores
    emerging = np.zeros_like(scores.is_trend)
    if all(w.projected is not None for w in present):
        projection = np.concatenate([w.projected for w in present if w.projected is not None])
        # Authors are projected with the posts (as TermStream does), so weighing by
        # author judges the projection at the ratio of posts to authors seen so far.
        scale = projection / np.maximum(counts, 1)
        projected = score_terms(
            params, events=projection, weigh_authors=common["authors"] * scale, **common
        )
        prev = common["prev_events"].astype(np.float64)
        before = np.concatenate([w.before_events for w in present]).astype(np.float64)
        growth = projection - prev
        accelerating = (growth > 0) & (growth > prev - before)
        emerging = projected.is_trend & accelerating & ~scores.is_trend
    verdicts: list[_Verdicts | None] = []
    offset = 0
    for w in windows:
        if w is None:
            verdicts.append(None)
            continue
        part = slice(offset, offset + len(w.terms))
        offset = part.stop
        verdicts.append(
            _Verdicts(
                scores=_part(scores, part),
                projected=_part(projected, part),
                emerging=emerging[part],
            )
        )
    return verdicts


def _part(scores: TrendScores, part: slice) -> TrendScores:
    """The verdicts of the windows in ``part``."""
    return TrendScores(
        expected=scores.expected[part],
        score=scores.score[part],
        velocity=scores.velocity[part],
        is_trend=scores.is_trend[part],
    )


def _grow(cell: _Cell, event: TrendInput) -> None:
    """A detected trend's bucket keeps filling: keep a few more sample posts."""
    assert cell.trend is not None
    samples = cell.trend["sample_event_ids"]
    if len(samples) < SAMPLE_EVENTS and event.id not in samples:
        samples.append(event.id)
    cell.trend["grown"] = True


@dataclass(frozen=True)
class _Baseline:
    """Sums over the baseline buckets before one bucket: ``terms`` maps a term to
    ``(events in the baseline, in the previous bucket, in the one before)``; ``total`` events,
    ``buckets`` with any event, their mean total, and the most authors of any."""

    terms: dict[str, tuple[int, int, int]]
    total: int
    buckets: int
    mean_total: float
    max_authors: int


@dataclass
class _History:
    """Per-bucket counts of some terms (and the totals) before the scanned buckets,
    extended with each bucket the scan completes. Every bucket in it is complete: the
    scan has passed it, so the watermark has."""

    events: dict[Key, int]
    total_authors: dict[datetime, int]
    terms: list[str]

    @classmethod
    def load(
        cls, source_id: int, *, since: datetime, until: datetime, terms: list[str]
    ) -> _History:
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
        history = cls(events={}, total_authors={}, terms=terms)
        for start, events, authors, term_events in rows:
            history.events[(start, TOTAL_TERM)] = events
            history.total_authors[start] = authors or 0
            for term, count in (json.loads(term_events) if term_events else {}).items():
                history.events[(start, term)] = int(count)
        return history

    def add_bucket(self, start: datetime, cells: _Cells) -> None:
        """Record the scanned bucket at ``start`` for the buckets after it."""
        total = cells.get((start, TOTAL_TERM))
        if total is None or not total.events:
            return
        self.events[(start, TOTAL_TERM)] = total.events
        self.total_authors[start] = len(total.authors)
        for term in self.terms:
            cell = cells.get((start, term))
            if cell is not None and cell.events:
                self.events[(start, term)] = cell.events

    def baseline(self, start: datetime, params: TrendParams) -> _Baseline:
        """The baseline of the bucket at ``start`` (``baseline_range``)."""
        since, until = baseline_range(start, params)
        prev = start - timedelta(seconds=params.bucket_s)
        before = prev - timedelta(seconds=params.bucket_s)
        terms: dict[str, list[int]] = {}
        total = buckets = 0
        max_authors = 0
        for (moment, term), events in self.events.items():
            if not since <= moment < until:
                continue
            if term == TOTAL_TERM:
                total += events
                buckets += 1
                max_authors = max(max_authors, self.total_authors.get(moment, 0))
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
        )


class _Cells(dict[Key, _Cell]):
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

    def __missing__(self, key: Key) -> _Cell:
        start, term = key
        counts = self.stored.get(start, {}).get(term)
        cell = _Cell(events=counts[0], authors=set(counts[1])) if counts else _Cell()
        self[key] = cell
        return cell

    @classmethod
    def load(cls, source_id: int, starts: list[datetime], terms: list[str]) -> _Cells:
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
                cells[(start, TOTAL_TERM)] = _Cell(events=events, authors=set(authors))
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
    sample_event_ids, predicted, confirmed_at
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


def _save_trends(
    source_id: int, params: TrendParams, cells: _Cells, now: datetime
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
                " %s, %s::timestamptz)",
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


def story_params() -> StoryParams:
    """The story layer's parameters in production (``TRENDS_STORY_MIN_OVERLAP``,
    ``TRENDS_EMERGING``), as the database path applies them."""
    return StoryParams(
        min_overlap=settings.TRENDS_STORY_MIN_OVERLAP, emerging=settings.TRENDS_EMERGING
    )


STORY_EVENTS_LIMIT = 50_000
"""At most this many events are read in one query for one ``assign_stories`` call (a
few hundred bytes each in memory: tens of MB at most). A call whose range holds more
reads each trend's posts and forecast volume in queries of their own instead."""


def assign_stories(source_id: int, trend_ids: Sequence[int]) -> None:
    """Put each new trend of ``source_id`` in a story, in event-time order of detection.

    The rule is ``mlengine.stories.choose_story``, on the same posts as the in-memory
    ``StoryDetector``: the trend's posts in its bucket up to its evidence and in the
    bucket before (at most ``max_postings`` a bucket), against each live story's. A live
    story is one with a member in the ``ttl`` before (the baseline window). A term
    already in a live story stays in it. Each trend also stores its story's forecast
    (``mlengine.forecast.forecast``) of posts per bucket holding any member, the current
    bucket projected to its end.

    Four queries whatever the number of trends: the new trends, the live stories'
    members, the events that any of their terms or the new trends' hold in the range the
    posts and forecasts need (``_StoryEvents``: the posts and volumes are then cut from
    them in memory, as ``events_for_term`` and ``volume_of_terms`` would read them), one
    update of all the new trends.

    Side effects: ``Trend.story`` and ``Trend.forecast`` of ``trend_ids``.
    """
    new = list(Trend.objects.filter(id__in=list(trend_ids)).order_by("evidence_created_at", "id"))
    if not new:
        return
    params = story_params()
    bucket_s = new[0].bucket_s
    ttl = timedelta(seconds=settings.TRENDS_BASELINE_BUCKETS * bucket_s)
    stories: dict[int, set[str]] = defaultdict(set)
    last_bucket: dict[int, datetime] = {}
    for story_id, term, start in Trend.objects.filter(
        source_id=source_id, story__isnull=False, bucket_start__gte=new[0].bucket_start - ttl
    ).values_list("story_id", "term", "bucket_start"):
        stories[story_id].add(term)
        last_bucket[story_id] = max(start, last_bucket.get(story_id, start))
    events = _StoryEvents.read(source_id, new, stories.values(), params)
    for trend in new:
        live = {
            sid: terms
            for sid, terms in stories.items()
            if last_bucket[sid] >= trend.bucket_start - ttl
        }
        joined = next((sid for sid, terms in live.items() if trend.term in terms), None)
        if joined is None:
            joined = _closest_story(events, trend, live, params)
        story_id = joined if joined is not None else trend.id
        stories[story_id].add(trend.term)
        last_bucket[story_id] = max(
            trend.bucket_start, last_bucket.get(story_id, trend.bucket_start)
        )
        trend.story_id = story_id
        trend.forecast = _story_forecast(events, trend, sorted(stories[story_id]), params)
    document = json.dumps(
        [{"id": t.id, "story_id": t.story_id, "forecast": t.forecast} for t in new]
    )
    with connection.cursor() as cursor:
        cursor.execute(_UPDATE_STORIES_SQL, [document])


_UPDATE_STORIES_SQL = """
UPDATE mlengine_trend AS tr SET story_id = v.story_id, forecast = v.forecast
FROM jsonb_to_recordset(%s::jsonb) AS v(id bigint, story_id bigint, forecast jsonb)
WHERE tr.id = v.id
"""


class _StoryEvents:
    """The events one ``assign_stories`` call reads, held in memory: ``posts`` and
    ``volume`` give what ``ingest.selectors.events_for_term`` and ``volume_of_terms``
    give, and ask them instead for a read outside what is held (other terms, another
    range or bucket size; every read when the range held more than
    ``STORY_EVENTS_LIMIT`` events)."""

    def __init__(
        self,
        source_id: int,
        held: Sequence[ingest_selectors.TermEvent] | None,
        *,
        terms: frozenset[str] = frozenset(),
        since: datetime | None = None,
        until: datetime | None = None,
        bucket_s: int = 0,
    ) -> None:
        self.source_id = source_id
        self.held = held is not None
        self.terms, self.since, self.until, self.bucket_s = terms, since, until, bucket_s
        # Per term, its events in event-time order (ties by external id), and their times.
        self.by_term: dict[str, list[ingest_selectors.TermEvent]] = defaultdict(list)
        for event in held or ():
            for term in event.matched:
                self.by_term[term].append(event)
        self.times = {
            term: [event.created_at for event in events] for term, events in self.by_term.items()
        }

    @classmethod
    def read(
        cls,
        source_id: int,
        trends: Sequence[Trend],
        stories: Iterable[set[str]],
        params: StoryParams,
    ) -> _StoryEvents:
        """One query: the events holding a term of ``trends`` or of ``stories`` from the
        earliest bucket a trend's posts or forecast look at to the latest evidence."""
        bucket_s = trends[0].bucket_s
        terms = frozenset({trend.term for trend in trends}.union(*stories))
        since = min(
            trend.bucket_start - timedelta(seconds=trend.bucket_s * max(params.horizon + 2, 1))
            for trend in trends
        )
        until = max(trend.evidence_created_at for trend in trends)
        held = ingest_selectors.events_with_terms(
            source_id,
            sorted(terms),
            since=since,
            until=until,
            bucket_s=bucket_s,
            limit=STORY_EVENTS_LIMIT + 1,
        )
        if len(held) > STORY_EVENTS_LIMIT:
            return cls(source_id, None)
        return cls(source_id, held, terms=terms, since=since, until=until, bucket_s=bucket_s)

    def _holds(self, terms: Iterable[str], since: datetime, until: datetime) -> bool:
        return (
            self.held
            and self.since is not None
            and self.until is not None
            and self.since <= since
            and until <= self.until
            and self.terms.issuperset(terms)
        )

    def _in_range(
        self, term: str, since: datetime, until: datetime
    ) -> list[ingest_selectors.TermEvent]:
        times = self.times.get(term, [])
        return self.by_term[term][bisect_left(times, since) : bisect_right(times, until)]

    def posts(
        self, term: str, *, since: datetime, until: datetime, limit: int
    ) -> list[tuple[int, tuple[str, ...]]]:
        """``(id, terms)`` of ``events_for_term(term, since, until, limit)``."""
        if not self._holds([term], since, until):
            return [
                (p.id, p.terms)
                for p in ingest_selectors.events_for_term(
                    self.source_id, term, since=since, until=until, limit=limit
                )
            ]
        return [(e.id, e.terms) for e in self._in_range(term, since, until)[: max(limit, 0)]]

    def volume(
        self, terms: Sequence[str], *, since: datetime, until: datetime, bucket_s: int
    ) -> dict[int, int]:
        """``volume_of_terms(terms, since, until, bucket_s)``."""
        if bucket_s != self.bucket_s or not self._holds(terms, since, until):
            return ingest_selectors.volume_of_terms(
                self.source_id, terms, since=since, until=until, bucket_s=bucket_s
            )
        buckets = {e.id: e.bucket for term in terms for e in self._in_range(term, since, until)}
        volume: dict[int, int] = defaultdict(int)
        for bucket in buckets.values():
            volume[bucket] += 1
        return dict(volume)


def _closest_story(
    events: _StoryEvents, trend: Trend, live: dict[int, set[str]], params: StoryParams
) -> int | None:
    """The live story ``trend`` joins by ``choose_story``, or None."""
    if not live:
        return None
    posts: list[tuple[int, tuple[str, ...]]] = []
    for start in (trend.bucket_start - timedelta(seconds=trend.bucket_s), trend.bucket_start):
        end = min(trend.evidence_created_at, start + timedelta(seconds=trend.bucket_s - 1e-6))
        posts += events.posts(trend.term, since=start, until=end, limit=params.max_postings)
    term_posts = {post_id for post_id, _ in posts}
    # |A ∩ B| needs B only within A: the story's posts among the term's own.
    candidates = {
        sid: {post_id for post_id, post_terms in posts if terms.intersection(post_terms)}
        for sid, terms in live.items()
    }
    return choose_story(term_posts, candidates, params.min_overlap)


def _story_forecast(
    events: _StoryEvents, trend: Trend, terms: list[str], params: StoryParams
) -> dict[str, Any]:
    """The story's forecast at ``trend`` (``mlengine.forecast``), as JSON."""
    bucket_s = trend.bucket_s
    now = int(trend.bucket_start.timestamp())
    since = trend.bucket_start - timedelta(seconds=bucket_s * (params.horizon + 2))
    volume = events.volume(terms, since=since, until=trend.evidence_created_at, bucket_s=bucket_s)
    result = forecast_volume(
        volume,
        bucket_start=now,
        current=volume.get(now, 0),
        elapsed_s=(trend.evidence_created_at - trend.bucket_start).total_seconds(),
        bucket_s=bucket_s,
        horizon=params.horizon,
    )
    return {
        "next_counts": [round(v, 2) for v in result.next_counts],
        "peak_volume": round(result.peak_volume, 2),
        "buckets_to_peak": result.buckets_to_peak,
        "time_to_peak_s": result.buckets_to_peak * bucket_s,
        "growth": round(result.growth, 4),
        "acceleration": round(result.acceleration, 4),
        "method": result.method,
        "bucket_s": bucket_s,
    }


def count_late_events(*, source_ids: Sequence[int]) -> int:
    """Recount ``StreamClock.late_events`` of ``source_ids``: events stored with an event
    time before the watermark that the counts do not hold (they came after the watermark
    passed them). Returns how many clocks changed."""
    changed = 0
    for clock in StreamClock.objects.filter(source_id__in=source_ids, watermark__isnull=False):
        if clock.watermark is None:
            continue
        stored = ingest_selectors.events_before(clock.source_id, clock.watermark)
        late = max(0, stored - clock.counted_events)
        if late != clock.late_events:
            changed += StreamClock.objects.filter(source_id=clock.source_id).update(
                late_events=late
            )
    return changed


def sweep_streams(*, active_within_s: float) -> int:
    """Queue an advance of every stream whose source received events in the last
    ``active_within_s`` seconds and whose low watermark is ahead of its clock (work a
    lost message left behind); recount their late events. Returns how many were queued.
    """
    since = timezone.now() - timedelta(seconds=active_within_s)
    ids = list(Source.objects.filter(last_received_at__gte=since).values_list("id", flat=True))
    clocks = dict(
        StreamClock.objects.filter(source_id__in=ids).values_list("source_id", "watermark")
    )
    behind = []
    for source_id in ids:
        target = ingest_selectors.input_low_watermark(source_id)
        current = clocks.get(source_id)
        if target is not None and (current is None or target > current):
            behind.append(source_id)
    with transaction.atomic():
        for source_id in behind:
            pipeline.send("ml", source_id=source_id)
    count_late_events(source_ids=ids)
    _reconcile_progress(ids)
    return len(behind)


def _reconcile_progress(source_ids: Sequence[int]) -> None:
    """Correct the pipeline's in-flight count of each stream from the tables: events
    stored, minus those counted, minus the late ones (never counted)."""
    stored = dict(Source.objects.filter(id__in=source_ids).values_list("id", "events_total"))
    for clock in StreamClock.objects.filter(source_id__in=source_ids):
        pipeline.reconcile_progress(
            clock.source_id,
            stored.get(clock.source_id, 0) - clock.counted_events - clock.late_events,
        )
