"""Writes of the trend stage: each stream's event-time clock, term counts, trends.

``advance_stream`` is the stage's one entry point. It moves a source's watermark up to
the stream's low watermark (``ingest.selectors.input_low_watermark``: everything
earlier is stored and enriched) and counts the events in between **in event-time
order** (ties by external id), as if it lived through them one by one:

- each event adds one to its bucket's total and to each of its terms, with its author;
- at each of a term's events the term is scored on the bucket-so-far
  (``mlengine.trends.detector.score_terms``); the first event at which it passes every
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

The pieces: the count itself, ``mlengine.trends.scan``; the stored counts and trends it
reads and writes, ``mlengine.trends.counts``; the stories of new trends,
``mlengine.trends.story_assignment``; the parameters, ``mlengine.trends.params``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import structlog
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from ingest import selectors as ingest_selectors
from ingest import services as ingest_services
from ingest.models import Source
from mlengine.models import StreamClock
from mlengine.trends.counts import withdraw_predictions
from mlengine.trends.params import bucket_s_for
from mlengine.trends.scan import Stream, count_streams
from mlengine.trends.story_assignment import assign_stories
from twiscope import guard, hotcache, pipeline
from twiscope.queues import DETECT

log = structlog.get_logger(__name__)

MAX_EVENTS_PER_ADVANCE = 5000
"""At most this many events of one stream are counted in one transaction; the rest in
the stream's next task."""
MAX_STREAMS_PER_ADVANCE = 32
"""At most this many streams besides its own join one advance (``advance_stream``)."""
MAX_EVENTS_PER_BATCH = 50_000
"""An advance takes no more streams once it holds this many events, so that a backlog
of every stream keeps the task well inside its time limit (about 0.2-0.3 ms an event,
stories included: ``bench/trend_stage.py``)."""


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


SCOPE = "stream"
"""The trend stage's items, for ``twiscope.guard``: a stream's step, named
``<source id>@<clock watermark, ISO>`` (the step the stream failed to take)."""


def advance_stream(*, source_id: int) -> list[int]:
    """Count ``source_id``'s events up to its low watermark, and those of up to
    ``MAX_STREAMS_PER_ADVANCE`` other streams with work pending (no more once it holds
    ``MAX_EVENTS_PER_BATCH`` events); return the ids of ``source_id``'s new trends.

    Does nothing for a stream whose source is gone, declared no progress, whose
    watermark cannot move, or that is parked (an open dead letter of this stage).
    Counts at most ``MAX_EVENTS_PER_ADVANCE`` events of each stream (never splitting
    one event time) and queues that stream's advance again for the rest. One
    transaction for all the streams taken. Side effects after commit, per stream: its
    progress count, its new trends, confirmations and withdrawals to the alerts stage.

    Should the batch fail, it is rolled back whole and ``source_id`` is advanced alone
    (``twiscope.guard.run_guarded``), so that one stream that cannot be counted does not
    stall every stream batched with it. A stream whose step fails alone
    ``DEAD_LETTER_MAX_ATTEMPTS`` times (over deliveries; the same step: the clock does
    not move) is parked: a dead letter names the source and the step, and no advance
    takes the stream until ``manage.py requeue`` re-drives it, from where it stopped,
    so nothing is skipped or counted twice. Fewer failures are logged and left for the
    next hand-off or the sweeper.

    Raises: ``twiscope.guard.TRANSIENT_ERRORS`` (the database or Redis away).
    """
    source = Source.objects.filter(id=source_id).first()
    if source is None:
        return []
    parked = ingest_selectors.parked_sources(DETECT)
    if source_id in parked:
        log.info("detect.stream_parked", source_id=source_id)
        return []
    try:
        streams = _advance(source, others=MAX_STREAMS_PER_ADVANCE, parked=parked)
    except guard.TRANSIENT_ERRORS:
        raise
    except Exception:  # one stream of the batch, maybe not this one: try it alone
        log.exception("detect.batch_failed", source_id=source_id)
        watermark = (
            StreamClock.objects.filter(source_id=source_id)
            .values_list("watermark", flat=True)
            .first()
        )
        step = f"{source_id}@{watermark.isoformat() if watermark is not None else 'start'}"
        streams = guard.run_guarded(
            DETECT,
            SCOPE,
            [step],
            lambda _: _advance(source, others=0, parked=parked),
            park=lambda failures: _park_stream(source_id, watermark, failures),
        ).results
    for stream in streams:
        if stream.new_trends:
            log.info(
                "detect.trends_detected", source_id=stream.source_id, new=len(stream.new_trends)
            )
    own = next((s for s in streams if s.source_id == source_id), None)
    return own.new_trends if own is not None else []


def _park_stream(
    source_id: int, watermark: datetime | None, failures: list[guard.Failure[str]]
) -> None:
    """Dead-letter the stream step that failed ``DEAD_LETTER_MAX_ATTEMPTS`` times: the
    stream is parked (``ingest.selectors.parked_sources``) until requeued."""
    target = ingest_selectors.input_low_watermark(source_id)
    ingest_services.park_items(
        stage=DETECT,
        items=[
            ingest_services.ParkedItem(
                key=f"{DETECT}:{SCOPE}:{failure.item}",
                source_id=source_id,
                reason=f"counting the stream failed {failure.attempts} times from its "
                f"watermark {watermark.isoformat() if watermark else '(start)'}: "
                f"{failure.summary}; the stream is parked until requeued",
                error=failure.short_traceback,
                attempts=failure.attempts,
                payload={
                    "scope": SCOPE,
                    "item": failure.item,
                    "source_id": source_id,
                    "watermark": watermark.isoformat() if watermark else None,
                    "target": target.isoformat() if target else None,
                    "resend": {"task": None, "kwarg": None, "kwargs": {"source_id": source_id}},
                },
            )
            for failure in failures
        ],
    )


def _advance(source: Source, *, others: int, parked: set[int]) -> list[Stream]:
    """Advance ``source``'s stream and up to ``others`` other streams with work pending
    (none of the ``parked`` ones),
    in one transaction, taking no more once ``MAX_EVENTS_PER_BATCH`` events are held;
    return the streams that had work (``source``'s first when it had). Side effects:
    counts, trends, stories and clocks of those streams; their hand-offs after commit."""
    with transaction.atomic():
        clocks = [
            _lock_clock(source),
            *_lock_pending_clocks(exclude={source.id, *parked}, limit=others),
        ]
        streams: list[Stream] = []
        for clock in clocks:
            if sum(len(stream.events) for stream in streams) >= MAX_EVENTS_PER_BATCH:
                break  # the clocks left are released at commit, for their own tasks
            stream = _pending(clock)
            if stream is not None:
                streams.append(stream)
        count_streams([stream for stream in streams if stream.events])
        for stream in streams:
            _close(stream)
        if streams:  # their trends may have changed: counted, new, confirmed, withdrawn
            hotcache.bump_on_commit(
                "trends",
                Source.objects.filter(id__in=[s.source_id for s in streams]).values_list(
                    "team_id", flat=True
                ),
            )
    return streams


def _lock_pending_clocks(*, exclude: set[int], limit: int) -> list[StreamClock]:
    """Up to ``limit`` clocks of streams not in ``exclude`` that may have work
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
        .exclude(source_id__in=exclude)
        .order_by(F("advanced_at").asc(nulls_first=True), "source_id")[:limit]
    )


def _pending(clock: StreamClock) -> Stream | None:
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
    return Stream(clock.source_id, clock.bucket_s, target, events, more)


def _close(stream: Stream) -> None:
    """Finish ``stream``'s advance (inside the transaction): its new trends into stories,
    its predictions whose bucket the target closed withdrawn (``withdraw_predictions``),
    its clock to the target; after commit, its progress and its hand-offs to the alerts
    stage, and its next advance when ``more`` events wait."""
    source_id, counted = stream.source_id, len(stream.events)
    if stream.new_trends:
        assign_stories(source_id, stream.new_trends)
    stream.withdrawn = withdraw_predictions(source_id, stream.target)
    StreamClock.objects.filter(source_id=source_id).update(
        watermark=stream.target,
        counted_events=F("counted_events") + counted,
        advanced_at=timezone.now(),
    )
    transaction.on_commit(lambda: pipeline.add_progress(DETECT, source_id, counted))
    if stream.new_trends:
        pipeline.hand_off(DETECT, items=stream.new_trends, trend_ids=stream.new_trends)
    if stream.confirmed:
        pipeline.hand_off(DETECT, task="confirmations", trend_ids=stream.confirmed)
    if stream.withdrawn:
        pipeline.hand_off(DETECT, task="withdrawals", trend_ids=stream.withdrawn)
    if stream.more:
        pipeline.send(DETECT, source_id=source_id)


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
    parked = ingest_selectors.parked_sources(DETECT)
    behind = []
    for source_id in ids:
        if source_id in parked:
            continue
        target = ingest_selectors.input_low_watermark(source_id)
        current = clocks.get(source_id)
        if target is not None and (current is None or target > current):
            behind.append(source_id)
    with transaction.atomic():
        for source_id in behind:
            pipeline.send(DETECT, source_id=source_id)
    count_late_events(source_ids=ids)
    _reconcile_progress(ids)
    return len(behind)


def _reconcile_progress(source_ids: Sequence[int]) -> None:
    """Correct the pipeline's in-flight count of each stream from the tables: events
    stored, minus those counted, minus the late ones (never counted), minus the parked
    ones (dead letters of the enrich stage: never counted either)."""
    stored = dict(Source.objects.filter(id__in=source_ids).values_list("id", "events_total"))
    parked = ingest_selectors.parked_events(source_ids)
    for clock in StreamClock.objects.filter(source_id__in=source_ids):
        pipeline.reconcile_progress(
            clock.source_id,
            stored.get(clock.source_id, 0)
            - clock.counted_events
            - clock.late_events
            - parked.get(clock.source_id, 0),
        )
