"""The anomaly stage: the streaming detector (``mlengine.anomalies.detector``) on every source's
series, in event time, writing series points and anomalies.

Series, per source (``mlengine.models.Series``):

- ``volume``: events per 5-minute bucket (0 for a bucket with none);
- ``negative_share``: the share of the bucket's labelled events labelled "negative"
  (NaN, a missing value to the detector, when none is labelled);
- ``term``: events holding a term (hashtag, mention, cashtag or keyword), for the
  terms of the source's trends of the last 24 h of event time (``ACTIVE_TERM_S``),
  at most ``ANOMALY_MAX_TERMS`` (those of the latest trends; a series already watched
  keeps its place). A term series that appears is warmed up on the term's counts of
  the two days before (``backfill_buckets``), so it can alert at once; one whose term has
  had no trend for 24 h is retired;
- ``watch``: events holding any of a watch's terms (``mlengine.models.Watch``), for
  each enabled watch of the source's team that covers the source, counted once per
  event (``ingest.selectors.watch_bucket_counts``: one query per source and run for all
  its watches). Watches are read at the start of each run: a new (or re-enabled) watch's
  series is warmed up as a new term series is; a disabled watch's series, or one that
  no longer covers the source, is retired; a watch whose terms changed has its series
  retired and a new one started for the new terms (``Series.watch_terms``: the old
  history counted other posts). Going back to terms a retired series counted
  reactivates that series (warmed up afresh).

``advance_anomalies`` steps, for each source, the 5-minute buckets (``BUCKET_S``, the
detector's tuning) that are complete below its stream's watermark
(``StreamClock.watermark``: every earlier event is stored, enriched and counted) and
not yet stepped, at most ``ANOMALY_MAX_BUCKETS`` per source and run. All series of all
sources go through one detector per value transform (counts: Anscombe's; shares: none,
with their own noise floor), one bucket step at a time, vectorised across series: a
source with fewer buckets to step gives NaN, which leaves its rows untouched.

A source whose events lie far apart (a feed with items back years, a replayed archive)
would make that one step per empty bucket: two months of event time a minute. So each
source moves through its buckets by moves (``_Run``, ``jump``): a bucket with an event
(or a run of fewer than ``JUMP_MIN`` empty ones) is a bucket step as above, shared with
the other sources stepping in that move; a longer run of empty buckets (every series fed
0, the share NaN), cut where the watched terms may change, is one jump: each detector
holds the source's series at those values for the whole run (``Detector.hold``: the same
states and Steps as stepping it, bit for bit, at the cost of the run's first two weeks
at most); the points of the run's buckets that the run keeps are written in bulk
(those before the run's pruning cutoff would be deleted in the same transaction, so
they are not written at all), and anomalies are opened, grown and closed at the buckets
where the Steps say so, in the order stepping would. A run's budget counts a jump as
``ANOMALY_JUMP_COST`` buckets per series of the source, and the points of the jumped
buckets it keeps (two weeks of every series, once it jumps that far) count against
``ANOMALY_MAX_POINTS``, so a run stays about as long whatever the spacing of the events
and the number of series, and a sparse source catches up in a few runs.

Everything is a function of the events' event times and of the trends (themselves
final once the watermark passes them), so a replay at any speed, in any number of
runs, gives the same points and anomalies. One run at a time holds the stage's
advisory lock; state, points, anomalies and the cursor are written in one transaction,
so a redelivered task finds the buckets stepped and does nothing. New anomalies go to
the alerts stage after commit. Negative shares read each event's label as it stands
when its bucket is stepped (the transformer heads may relabel after VADER; DESIGN.md,
"Time").
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Q
from django.utils import timezone

from ingest import selectors as ingest_selectors
from ingest import services as ingest_services
from ingest.models import Source
from mlengine.anomalies.detector import Detector, Held
from mlengine.anomalies.persistence import RunWrites
from mlengine.anomalies.series import (
    BUCKET_S,
    COUNTS,
    SHARES,
    STATE_KEYS,
    Group,
    Open,
    Plan,
    Slot,
    State,
    backfill_buckets,
    load_state,
    params_for,
)
from mlengine.models import Anomaly, Series, StreamClock, Trend, Watch
from twiscope import guard, pipeline
from twiscope.queues import DETECT

log = structlog.get_logger(__name__)

ACTIVE_TERM_S = 24 * 3600
"""A term is watched while it had a trend in this many seconds of event time before."""
LOCK_KEY = 7_406_310_001
"""The stage's PostgreSQL advisory lock (one run at a time)."""
K = TypeVar("K", str, int)
"""A new series' key while it is warmed up: a term, or a watch id."""
JUMP_MIN = 12
"""Empty buckets (an hour) from which a run of them is jumped rather than stepped: a
jump costs a few milliseconds whatever its length, a shared bucket step far less."""


@dataclass(frozen=True)
class AdvanceResult:
    """What a run did: buckets stepped (summed over sources), the new anomalies' ids,
    and whether a source has complete buckets left (the caller runs again). Of the
    buckets, ``steps`` were stepped one at a time (a detector update each, shared by
    the sources stepping together) and the rest crossed in ``jumps`` runs of empty
    buckets (``Detector.hold``)."""

    buckets: int
    anomaly_ids: list[int]
    more: bool
    steps: int = 0
    jumps: int = 0


def _floor(moment: datetime) -> datetime:
    epoch = int(moment.timestamp()) // BUCKET_S * BUCKET_S
    return datetime.fromtimestamp(epoch, tz=UTC)


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


SCOPE = "anomalies"
"""The anomaly stage's items, for ``twiscope.guard``: source ids (a source's series)."""


def advance_anomalies(*, max_buckets: int | None = None, jump: bool = True) -> AdvanceResult:
    """Step every source's complete, unstepped buckets through the detectors; write the
    series' state, points and anomalies; return what it did.

    At most ``max_buckets`` (default ``ANOMALY_MAX_BUCKETS``) buckets per source, where
    a run of empty buckets crossed in one move (``jump``: the module docstring) counts as
    ``ANOMALY_JUMP_COST`` per series of the source; ``jump=False`` steps every bucket
    one at a time (the same results, slower: for tests and benchmarks). Does nothing
    when another run holds the stage's lock. Side effects: ``Series``, ``SeriesPoint``
    (pruned past ``ANOMALY_RETENTION_S`` behind each source's latest bucket),
    ``Anomaly``; after commit, the new anomalies go to the alerts stage, and
    those that grew or closed to its alert updates (``alerts.update_anomaly_alerts``).

    Should the run fail, it is rolled back and run again per source, bisecting the
    sources (``twiscope.guard.run_guarded``), so one source whose series cannot be
    stepped does not stop every other source's; a source that fails alone
    ``DEAD_LETTER_MAX_ATTEMPTS`` times (over runs) is parked (a dead letter of the
    ``detect`` stage, key ``detect:anomalies:<source id>``) and left out of later runs
    until it is requeued.

    Raises: ``twiscope.guard.TRANSIENT_ERRORS`` (the database or Redis away).
    """
    limit = max_buckets or settings.ANOMALY_MAX_BUCKETS
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [LOCK_KEY])
            if not cursor.fetchone()[0]:
                return AdvanceResult(0, [], False)
        parked = ingest_selectors.parked_sources(DETECT, scope=SCOPE)
        try:
            with transaction.atomic():
                runs = [_advance(limit, jump=jump, exclude=parked)]
        except guard.TRANSIENT_ERRORS:
            raise
        except Exception:  # one source's, maybe: step them apart to find it
            log.exception("detect.anomaly_run_failed")
            sources = list(
                StreamClock.objects.filter(watermark__isnull=False)
                .exclude(source_id__in=parked)
                .order_by("source_id")
                .values_list("source_id", flat=True)
            )
            runs = guard.run_guarded(
                DETECT,
                SCOPE,
                sources,
                lambda ids: [_advance(limit, jump=jump, only=set(ids))],
                park=_park_sources,
            ).results
    stepped = sum(run.buckets for run in runs)
    new_ids = [i for run in runs for i in run.anomaly_ids]
    steps, jumps = sum(run.steps for run in runs), sum(run.jumps for run in runs)
    log.info(
        "detect.anomalies_advanced",
        buckets=stepped,
        steps=steps,
        jumps=jumps,
        runs=len(runs),
        new=len(new_ids),
    )
    return AdvanceResult(stepped, new_ids, any(run.more for run in runs), steps, jumps)


def _advance(
    limit: int,
    *,
    jump: bool = True,
    exclude: Collection[int] = (),
    only: Collection[int] | None = None,
) -> AdvanceResult:
    """One run over the sources due (those in ``only`` when given, none in ``exclude``),
    inside the caller's transaction; hands new and changed anomalies on after commit."""
    run = _Run(limit, jump=jump, exclude=exclude, only=only)
    if not run.plans:
        return AdvanceResult(0, [], False)
    run.step_all()
    new_ids = run.save()
    if new_ids:
        pipeline.hand_off(
            DETECT,
            items=[f"anomaly:{i}" for i in new_ids],
            task="anomalies",
            anomaly_ids=new_ids,
        )
    if run.updated_ids:
        # Their alerts follow the window (``alert.updated``); a lost message is
        # made good by the alerts sweeper, which compares alert and anomaly.
        pipeline.hand_off(DETECT, task="anomaly_updates", anomaly_ids=sorted(set(run.updated_ids)))
    return AdvanceResult(
        sum(p.n for p in run.plans),
        new_ids,
        any(p.more for p in run.plans),
        run.steps,
        run.jumps,
    )


def _park_sources(failures: list[guard.Failure[int]]) -> None:
    """Dead-letter the sources whose series failed ``DEAD_LETTER_MAX_ATTEMPTS`` runs."""
    ingest_services.park_items(
        stage=DETECT,
        items=[
            ingest_services.ParkedItem(
                key=f"{DETECT}:{SCOPE}:{failure.item}",
                source_id=failure.item,
                reason=f"stepping the source's anomaly series failed {failure.attempts} "
                f"times: {failure.summary}; its series are parked until requeued",
                error=failure.short_traceback,
                attempts=failure.attempts,
                payload={
                    "scope": SCOPE,
                    "item": failure.item,
                    # The periodic run takes the source again once requeued; the stream's
                    # advance is sent so that something runs at once.
                    "resend": {"task": None, "kwarg": None, "kwargs": {"source_id": failure.item}},
                },
            )
            for failure in failures
        ],
    )


class _Run(RunWrites):
    """One run of the stage (inside its transaction, holding its lock). With ``jump``
    (the default), runs of empty buckets are crossed in one move each (``_jump``);
    without, every bucket is stepped (the reference the jumps are tested against).
    ``steps`` and ``jumps`` count the moves (bucket steps per source, jumps)."""

    def __init__(
        self,
        limit: int,
        *,
        jump: bool = True,
        exclude: Collection[int] = (),
        only: Collection[int] | None = None,
    ) -> None:
        self.now = timezone.now()
        self.jump = jump
        self.steps = self.jumps = 0
        self._busy_cache: dict[int, tuple[tuple[int, int, int], npt.NDArray[np.int64]]] = {}
        self._totals: dict[int, tuple[int, dict[int, ingest_selectors.BucketTotals]]] = {}
        self.bucket = timedelta(seconds=BUCKET_S)
        self.groups = {COUNTS: Group(params_for(COUNTS)), SHARES: Group(params_for(SHARES))}
        self.slots: list[Slot] = []
        self.base: dict[int, tuple[Slot, Slot]] = {}
        self.points: list[tuple[Any, ...]] = []
        self.opens: dict[int, Open] = {}  # by id(): the anomalies this run touched
        self.updated_ids: list[int] = []  # stored anomalies that grew or closed
        self.open_series: dict[int, Open] = {}
        self.exclude, self.only = exclude, only
        self.plans = self._plan(limit)
        if self.plans:
            self._load()

    def _plan(self, limit: int) -> list[Plan]:
        """The sources with complete buckets to step, and their volume/share series
        (created on a source's first run). Each source steps at most ``limit`` buckets,
        and at most ``ANOMALY_MAX_STEPS`` divided among the sources due (at least one),
        a jump counting as ``ANOMALY_JUMP_COST`` per series (``_extent``)."""
        cursors = {
            source_id: (first, last)
            for source_id, first, last in Series.objects.filter(
                kind=Series.Kind.VOLUME
            ).values_list("source_id", "first_bucket", "last_bucket")
        }
        due: list[tuple[int, datetime, datetime, int]] = []
        clocks = StreamClock.objects.filter(watermark__isnull=False).exclude(
            source_id__in=self.exclude
        )
        if self.only is not None:
            clocks = clocks.filter(source_id__in=self.only)
        for source_id, watermark in clocks.values_list("source_id", "watermark"):
            if watermark is None:
                continue
            if source_id in cursors:
                first, last = cursors[source_id]
                start = last + self.bucket
            else:
                earliest = ingest_selectors.first_event_time(source_id, before=watermark)
                if earliest is None:
                    continue
                first = start = _floor(earliest)
            complete = int((watermark - start).total_seconds()) // BUCKET_S
            if complete > 0:
                due.append((source_id, first, start, complete))
        # The run's buckets are shared out so that many sources catching up at once do
        # not make one run (one transaction) outlast the task's time limit.
        if due:
            limit = max(1, min(limit, settings.ANOMALY_MAX_STEPS // len(due)))
        # A jump's cost is per series (``_extent``); no source can jump in the beat.
        jumping = [d[0] for d in due if self.jump and d[3] >= JUMP_MIN]
        series = dict(
            Series.objects.filter(source_id__in=jumping, active=True)
            .values("source_id")
            .annotate(n=Count("id"))
            .values_list("source_id", "n")
            if jumping
            else []
        )
        plans = []
        for source_id, first, start, complete in due:
            if source_id not in cursors:
                for kind in (Series.Kind.VOLUME, Series.Kind.NEGATIVE_SHARE):
                    Series.objects.create(
                        source_id=source_id,
                        kind=kind,
                        bucket_s=BUCKET_S,
                        first_bucket=start,
                        last_bucket=start - self.bucket,
                        created_at=self.now,
                    )
            n = self._extent(source_id, start, complete, limit, series.get(source_id, 2))
            # The points of buckets before ``cutoff`` are pruned at the end of the run.
            cutoff = (n - 1) * BUCKET_S - settings.ANOMALY_RETENTION_S
            kept = max(0, -(-cutoff // BUCKET_S))
            plans.append(Plan(source_id, first, start, n, more=complete > n, kept=kept))
        return sorted(plans, key=lambda p: p.source_id)

    def _extent(
        self, source_id: int, start: datetime, complete: int, budget: int, series: int
    ) -> int:
        """How many of the ``complete`` buckets from ``start`` the run takes for a source
        with ``series`` active series: ``budget`` of them, or (``jump``) as many as fit in
        ``budget`` when a bucket stepped one at a time counts 1 and a jump (a run of at
        least ``JUMP_MIN`` empty buckets, cut where the terms may change: ``_jump``)
        ``ANOMALY_JUMP_COST`` per series, and at least one move. The points of the
        jumped buckets the run keeps (its last ``ANOMALY_RETENTION_S``: every series'
        point of every bucket) count apart, against ``ANOMALY_MAX_POINTS`` (in the
        share of it that ``budget`` is of ``ANOMALY_MAX_BUCKETS``): a source with many
        series jumps less far per run rather than write two weeks of all of them.

        Reads the source's buckets with events in the first ``budget + 1`` buckets (the
        run's own totals query, kept for ``_load``, when the run ends inside them: so a
        source with an event in every bucket pays nothing more), then, while budget is
        left, beyond them page by page (``ingest.selectors.event_buckets``: 32 buckets
        with events, then twice as many each time), and the trends of each page with an
        empty run. An estimate: the run itself cuts its jumps where its own counts say
        (``_empty_run``)."""
        if not self.jump or complete < JUMP_MIN:
            return min(complete, budget)
        series = max(series, 2)
        price = settings.ANOMALY_JUMP_COST * series
        kept = settings.ANOMALY_RETENTION_S // BUCKET_S + 1
        cap = settings.ANOMALY_MAX_POINTS * budget // settings.ANOMALY_MAX_BUCKETS
        cost, at, jumped = 0, 0, 0

        def walk(busy: set[int], end: int) -> int | None:
            """Spend the budget on the buckets ``at..end-1`` (``busy``: those with events);
            the run's extent if it runs out there."""
            nonlocal cost, at, jumped
            marks = set(busy)
            bounds = itertools.pairwise([at - 1, *sorted(busy), end])
            if any(b - a - 1 >= JUMP_MIN for a, b in bounds):  # a jump: trends may cut it
                trends = Trend.objects.filter(
                    source_id=source_id,
                    evidence_created_at__lt=start + end * self.bucket,
                    bucket_start__gte=start + at * self.bucket - timedelta(seconds=ACTIVE_TERM_S),
                ).values_list("bucket_start", "evidence_created_at")
                marks |= {c for c in _term_changes(trends, start, end).tolist() if c >= at}
            for mark in [*sorted(marks), end]:
                if mark > at:  # the empty buckets before the mark: a jump, or steps
                    gap = mark - at
                    if gap >= JUMP_MIN:
                        points = series * min(jumped + gap, kept)
                        if cost and (cost + price > budget or points > cap):
                            return at
                        cost, at, jumped = cost + price, mark, jumped + gap
                    else:
                        if cost and cost + gap > budget:
                            return at + budget - cost
                        cost, at = cost + gap, mark
                if mark in busy:
                    if cost + 1 > budget:
                        return at
                    cost, at = cost + 1, mark + 1
            return None

        base = int(start.timestamp())
        window = min(complete, budget + 1)
        totals = ingest_selectors.bucket_totals(
            source_id, since=start, until=start + window * self.bucket, bucket_s=BUCKET_S
        )
        self._totals[source_id] = (window, totals)
        extent = walk({(b - base) // BUCKET_S for b in totals}, window)
        limit = 32
        while extent is None and at < complete:
            found = ingest_selectors.event_buckets(
                source_id,
                since=start + at * self.bucket,
                until=start + complete * self.bucket,
                bucket_s=BUCKET_S,
                limit=limit,
            )
            busy = {(b - base) // BUCKET_S for b in found}
            extent = walk(busy, max(busy) + 1 if len(found) == limit else complete)
            limit = min(2 * limit, budget + 1)
        return at if extent is None else extent

    def _load(self) -> None:
        """Each planned source's counts, trends, watches, active series and open
        anomalies; the watch series retired, started or restarted (``_update_watches``)."""
        source_ids = [p.source_id for p in self.plans]
        for opened in Anomaly.objects.filter(source_id__in=source_ids, closed=False):
            self.open_series[opened.series_id] = Open(
                series_id=opened.series_id,
                source_id=opened.source_id,
                window_start=opened.window_start,
                window_end=opened.window_end,
                peak_at=opened.peak_at,
                score=opened.score,
                value=opened.value,
                expected=opened.expected,
                low=opened.low,
                high=opened.high,
                evidence_created_at=opened.evidence_created_at,
                evidence_received_at=opened.evidence_received_at,
                id=opened.id,
            )
        active = list(Series.objects.filter(source_id__in=source_ids, active=True).order_by("id"))
        by_group: dict[str, list[tuple[Series, State | None]]] = {COUNTS: [], SHARES: []}
        for series in active:
            group = SHARES if series.kind == Series.Kind.NEGATIVE_SHARE else COUNTS
            by_group[group].append(
                (series, load_state(series.state) if series.state is not None else None)
            )
        for group, items in by_group.items():
            rows = self.groups[group].add([state for _, state in items])
            for (series, _), row in zip(items, rows, strict=True):
                slot = self._adopt(
                    series.id, series.source_id, series.kind, series.term, group, row
                )
                slot.watch_id, slot.watch_terms = series.watch_id, tuple(series.watch_terms)
        plans = {p.source_id: p for p in self.plans}
        for slot in list(self.slots):
            if slot.kind == Series.Kind.TERM:
                plans[slot.source_id].terms[slot.term] = slot
            elif slot.kind == Series.Kind.WATCH:
                watches = plans[slot.source_id].watches
                if slot.watch_id is None or slot.watch_id in watches:
                    self._retire(slot)  # not a series any watch has (an old duplicate)
                else:
                    watches[slot.watch_id] = slot
        wanted = self._wanted_watches(source_ids)
        volume = {s.source_id: s for s in self.slots if s.kind == Series.Kind.VOLUME}
        share = {s.source_id: s for s in self.slots if s.kind == Series.Kind.NEGATIVE_SHARE}
        for plan in self.plans:
            self.base[plan.source_id] = (volume[plan.source_id], share[plan.source_id])
            end = plan.start + plan.n * self.bucket
            window, totals = self._totals.get(plan.source_id, (0, {}))
            if plan.n <= window:  # read by ``_extent``
                last = int(end.timestamp())
                plan.totals = {b: t for b, t in totals.items() if b < last}
            else:
                plan.totals = ingest_selectors.bucket_totals(
                    plan.source_id, since=plan.start, until=end, bucket_s=BUCKET_S
                )
            plan.trends = list(
                Trend.objects.filter(
                    source_id=plan.source_id,
                    evidence_created_at__lt=end,
                    bucket_start__gte=plan.start + self.bucket - timedelta(seconds=ACTIVE_TERM_S),
                )
                .order_by("evidence_created_at", "term")
                .values_list("term", "bucket_start", "evidence_created_at")
            )
            plan.changes = _term_changes(
                ((bucket_start, evidence) for _, bucket_start, evidence in plan.trends),
                plan.start,
                plan.n,
            )
            terms = sorted({t[0] for t in plan.trends} | set(plan.terms))
            plan.term_counts = ingest_selectors.term_bucket_counts(
                plan.source_id, terms, since=plan.start, until=end, bucket_s=BUCKET_S
            )
            self._update_watches(plan, wanted.get(plan.source_id, {}))
            plan.watch_counts = ingest_selectors.watch_bucket_counts(
                plan.source_id,
                {w: slot.watch_terms for w, slot in plan.watches.items()},
                since=plan.start,
                until=end,
                bucket_s=BUCKET_S,
            )

    def _wanted_watches(self, source_ids: list[int]) -> dict[int, dict[int, tuple[str, ...]]]:
        """``{source id: {watch id: sorted terms}}``: the enabled watches covering each
        planned source (those of its team for every source, and its own)."""
        teams = dict(Source.objects.filter(id__in=source_ids).values_list("id", "team_id"))
        rows = (
            Watch.objects.filter(enabled=True, team_id__in=set(teams.values()))
            .filter(Q(source__isnull=True) | Q(source_id__in=source_ids))
            .values_list("id", "team_id", "source_id", "terms")
        )
        wanted: dict[int, dict[int, tuple[str, ...]]] = {}
        for watch_id, team_id, source_id, terms in rows:
            if not terms:
                continue
            for covered in [source_id] if source_id is not None else source_ids:
                if teams.get(covered) == team_id:
                    wanted.setdefault(covered, {})[watch_id] = tuple(sorted(set(terms)))
        return wanted

    def _retire(self, slot: Slot) -> None:
        """Stop stepping ``slot``'s series; close its open anomaly."""
        slot.active = False
        if slot.open is not None and not slot.open.closed:
            slot.open.closed = slot.open.changed = True
            self.opens[id(slot.open)] = slot.open

    def _warmed_rows(
        self,
        plan: Plan,
        start: datetime,
        keys: Sequence[K],
        counts_since: Callable[[datetime], Mapping[tuple[int, K], int]],
    ) -> list[int]:
        """Rows of the counts group for new series of ``keys`` (terms, watch ids), each
        warmed up on its counts of the two days before ``start``
        (``backfill_buckets``, not before the source's first bucket): ``counts_since(since)``
        gives ``{(bucket start in epoch s, key): events}`` from ``since`` to ``start``.
        With ``jump``, a run of ``JUMP_MIN`` or more buckets where every key counts 0 is
        held in one move (``Detector.hold``: the same state as stepping it)."""
        params = self.groups[COUNTS].params
        since = max(plan.first_bucket, start - backfill_buckets(params) * self.bucket)
        history = int((start - since).total_seconds()) // BUCKET_S
        warm = Detector(len(keys), params)
        counts = counts_since(since)
        base = int(since.timestamp())
        busy = sorted({(epoch - base) // BUCKET_S for epoch, _ in counts} | {history})
        i = 0
        while i < history:
            following = busy[bisect.bisect_left(busy, i)]
            if self.jump and following - i >= JUMP_MIN:
                warm.hold(np.arange(len(keys)), np.zeros(len(keys)), following - i)
                i = following
                continue
            epoch = base + i * BUCKET_S
            warm.update(np.array([counts.get((epoch, k), 0) for k in keys], dtype=np.float64))
            i += 1
        state = warm.state()
        return self.groups[COUNTS].add(
            [{k: state[k][j : j + 1] for k in STATE_KEYS} for j in range(len(keys))]
        )

    def _update_watches(self, plan: Plan, wanted: dict[int, tuple[str, ...]]) -> None:
        """At the run's first bucket: retire the watch series of ``plan``'s source whose
        watch is gone, disabled, elsewhere or counts other terms now; start (warmed up
        on the two days before, as new term series) those of the watches ``wanted``
        (``{watch id: sorted terms}``) that have none, reactivating a retired series
        of the same watch and terms."""
        for watch_id, slot in list(plan.watches.items()):
            if wanted.get(watch_id) != slot.watch_terms:
                del plan.watches[watch_id]
                self._retire(slot)
        new = {w: terms for w, terms in sorted(wanted.items()) if w not in plan.watches}
        if not new:
            return
        start = plan.start
        rows = self._warmed_rows(
            plan,
            start,
            list(new),
            lambda since: ingest_selectors.watch_bucket_counts(
                plan.source_id, new, since=since, until=start, bucket_s=BUCKET_S
            ),
        )
        existing = {
            (watch_id, tuple(terms)): series_id
            for series_id, watch_id, terms in Series.objects.filter(
                source_id=plan.source_id, kind=Series.Kind.WATCH, watch_id__in=list(new)
            ).values_list("id", "watch_id", "watch_terms")
        }
        for (watch_id, terms), row in zip(new.items(), rows, strict=True):
            series_id = existing.get((watch_id, terms))
            if series_id is None:
                series_id = Series.objects.create(
                    source_id=plan.source_id,
                    kind=Series.Kind.WATCH,
                    watch_id=watch_id,
                    watch_terms=list(terms),
                    bucket_s=BUCKET_S,
                    first_bucket=start,
                    last_bucket=start - self.bucket,
                    created_at=self.now,
                ).id
            slot = self._adopt(series_id, plan.source_id, Series.Kind.WATCH, "", COUNTS, row)
            slot.open = None  # a reactivated series starts afresh
            slot.watch_id, slot.watch_terms = watch_id, terms
            plan.watches[watch_id] = slot

    def _adopt(
        self, series_id: int, source_id: int, kind: str, term: str, group: str, row: int
    ) -> Slot:
        slot = Slot(series_id, source_id, kind, term, group, row)
        slot.open = self.open_series.get(series_id)
        self.slots.append(slot)
        return slot

    def _candidates(self, plan: Plan, end: datetime) -> list[str]:
        """The terms to watch at the bucket ending ``end``, latest trend first, capped."""
        since = end - timedelta(seconds=ACTIVE_TERM_S)
        latest: dict[str, datetime] = {}
        for term, bucket_start, evidence in plan.trends:
            if evidence >= end:
                break
            if bucket_start >= since:
                latest[term] = evidence
        ranked = sorted(latest, key=lambda t: (-latest[t].timestamp(), t))
        cap = settings.ANOMALY_MAX_TERMS
        kept = [t for t in ranked if t in plan.terms][:cap]
        return kept + [t for t in ranked if t not in plan.terms][: cap - len(kept)]

    def _update_terms(self, plan: Plan, start: datetime) -> None:
        """Retire the term series no longer watched at ``start``'s bucket; add (and warm
        up) the new ones."""
        wanted = self._candidates(plan, start + self.bucket)
        for term in [t for t in plan.terms if t not in wanted]:
            self._retire(plan.terms.pop(term))
        new = [t for t in wanted if t not in plan.terms]
        if not new:
            return
        rows = self._warmed_rows(
            plan,
            start,
            new,
            lambda since: ingest_selectors.term_bucket_counts(
                plan.source_id, new, since=since, until=start, bucket_s=BUCKET_S
            ),
        )
        existing = dict(
            Series.objects.filter(
                source_id=plan.source_id, kind=Series.Kind.TERM, term__in=new
            ).values_list("term", "id")
        )
        for term, row in zip(new, rows, strict=True):
            series_id = existing.get(term)
            if series_id is None:
                series_id = Series.objects.create(
                    source_id=plan.source_id,
                    kind=Series.Kind.TERM,
                    term=term,
                    bucket_s=BUCKET_S,
                    first_bucket=start,
                    last_bucket=start - self.bucket,
                    created_at=self.now,
                ).id
            slot = self._adopt(series_id, plan.source_id, Series.Kind.TERM, term, COUNTS, row)
            slot.open = None  # a reactivated series starts afresh
            plan.terms[term] = slot
        # The new terms' counts for the rest of the run.
        plan.term_counts.update(
            ingest_selectors.term_bucket_counts(
                plan.source_id,
                new,
                since=start,
                until=plan.start + plan.n * self.bucket,
                bucket_s=BUCKET_S,
            )
        )

    def step_all(self) -> None:
        """Step every planned source's buckets: one bucket step at a time for all the
        sources together, or (``jump``) each source's empty runs in one move each."""
        if self.jump:
            self._step_jumping()
            return
        for i in range(max(p.n for p in self.plans)):
            stepping = [(p, i) for p in self.plans if i < p.n]
            for plan, at in stepping:
                self._update_terms(plan, plan.start + at * self.bucket)
            self._step_once(stepping)
            self.steps += len(stepping)

    def _step_jumping(self) -> None:
        """Move every planned source through its buckets, all sources a move at a time:
        a bucket holding an event (or a short empty run) is one bucket step, shared by
        the sources stepping in that move; a run of at least ``JUMP_MIN`` empty buckets
        is one jump (``_jump``). Terms are updated at the start of every move, as at
        every bucket when stepping one at a time: they change only at ``plan.changes``,
        where a run of empty buckets is cut."""
        at = {p.source_id: 0 for p in self.plans}
        while moving := [p for p in self.plans if at[p.source_id] < p.n]:
            single: list[tuple[Plan, int]] = []
            jumps: list[tuple[Plan, int, int]] = []
            for plan in moving:
                i = at[plan.source_id]
                self._update_terms(plan, plan.start + i * self.bucket)
                k = self._empty_run(plan, i)
                if k >= JUMP_MIN:
                    jumps.append((plan, i, k))
                    at[plan.source_id] += k
                else:
                    single.append((plan, i))
                    at[plan.source_id] += 1
            if single:
                self._step_once(single)
            for plan, i, k in jumps:
                self._jump(plan, i, k)
            self.steps += len(single)
            self.jumps += len(jumps)

    def _empty_run(self, plan: Plan, i: int) -> int:
        """The empty buckets from ``plan``'s bucket ``i`` on (0 if it holds an event),
        up to the next bucket with an event, the next change of terms or the plan's
        end. Empty: every series of the source is fed 0 (counts) or NaN (the share)."""
        busy = self._busy(plan)
        following = busy[np.searchsorted(busy, i) :]
        if len(following) and following[0] == i:
            return 0
        end = min(plan.n, int(following[0]) if len(following) else plan.n)
        changes = plan.changes[plan.changes > i]
        if len(changes):
            end = min(end, int(changes[0]))
        return end - i

    def _busy(self, plan: Plan) -> npt.NDArray[np.int64]:
        """The sorted indices of ``plan``'s buckets in which some series of the source
        has a count (its totals, terms or watches: the terms' grow as terms are added)."""
        key = (len(plan.totals), len(plan.term_counts), len(plan.watch_counts))
        cached = self._busy_cache.get(plan.source_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        base = int(plan.start.timestamp())
        epochs = set(plan.totals)
        epochs.update(epoch for epoch, _ in plan.term_counts)
        epochs.update(epoch for epoch, _ in plan.watch_counts)
        busy = np.array(sorted((e - base) // BUCKET_S for e in epochs), dtype=np.int64)
        self._busy_cache[plan.source_id] = (key, busy)
        return busy

    def _fed(self, plan: Plan, epoch: int) -> dict[str, dict[int, float]]:
        """What the series of ``plan``'s source are fed for the bucket starting at
        ``epoch``: ``{group: {row: value}}``; an active series of the source left out is
        fed NaN (missing)."""
        fed: dict[str, dict[int, float]] = {COUNTS: {}, SHARES: {}}
        totals = plan.totals.get(epoch)
        volume, share = self.base[plan.source_id]
        fed[COUNTS][volume.row] = totals.events if totals else 0
        if totals and totals.labelled:
            fed[SHARES][share.row] = totals.negative / totals.labelled
        for term, slot in plan.terms.items():
            fed[COUNTS][slot.row] = plan.term_counts.get((epoch, term), 0)
        for watch_id, slot in plan.watches.items():
            fed[COUNTS][slot.row] = plan.watch_counts.get((epoch, watch_id), 0)
        return fed

    def _step_once(self, stepping: list[tuple[Plan, int]]) -> None:
        """One detector step for the given sources, each at its own bucket index."""
        values = {g: np.full(group.size, np.nan) for g, group in self.groups.items()}
        at: dict[int, tuple[datetime, int, Plan, int]] = {}
        for plan, i in stepping:
            start = plan.start + i * self.bucket
            epoch = int(start.timestamp())
            at[plan.source_id] = (start, epoch, plan, i)
            for group, fed in self._fed(plan, epoch).items():
                for row, value in fed.items():
                    values[group][row] = value
        steps = {g: group.step(values[g]) for g, group in self.groups.items()}
        for slot in self.slots:
            if not slot.active or slot.source_id not in at:
                continue
            step = steps[slot.group]
            assert step is not None
            start, epoch, plan, i = at[slot.source_id]
            r = slot.row
            self._record(
                slot,
                float(values[slot.group][r]),
                float(step.score[r]),
                bool(step.anomaly[r]),
                (float(step.expected[r]), float(step.low[r]), float(step.high[r])),
                start,
                plan.totals.get(epoch),
                point=not self.jump or i >= plan.kept,
            )

    def _jump(self, plan: Plan, i: int, k: int) -> None:
        """Cross ``k`` empty buckets of ``plan`` from index ``i`` in one move: each group's
        detector holds the source's series at their value (``Detector.hold``: the same
        state and Steps as ``k`` bucket steps, bit for bit). Writes the points of the
        buckets the run keeps (``plan.kept`` on: the others are pruned in this run's
        transaction, so nobody can read them) in bulk, and replays ``_record`` at the
        buckets where an anomaly opens, grows or closes: in bucket order, and within a
        bucket in the order of ``self.slots``, as stepping would (elsewhere ``_record``
        only writes the point)."""
        start = plan.start + i * self.bucket
        fed = self._fed(plan, int(start.timestamp()))
        slots = [s for s in self.slots if s.active and s.source_id == plan.source_id]
        for slot in slots:
            fed[slot.group].setdefault(slot.row, np.nan)
        held: dict[str, tuple[Held, dict[int, int]]] = {}
        for group, values in fed.items():
            detector = self.groups[group].detector
            if values and detector is not None:
                rows = sorted(values)
                run = detector.hold(rows, [values[r] for r in rows], k)
                held[group] = (run, {r: c for c, r in enumerate(rows)})
        keep = max(0, plan.kept - i)
        if keep < k:
            starts = [start + t * self.bucket for t in range(keep, k)]
            kept = {g: run.between(keep, k) for g, (run, _) in held.items()}
            for slot in slots:
                steps, col = kept[slot.group], held[slot.group][1][slot.row]
                value = _num(fed[slot.group][slot.row])
                self.points.extend(
                    zip(
                        itertools.repeat(slot.series_id, len(starts)),
                        starts,
                        itertools.repeat(value, len(starts)),
                        _nums(steps.expected[:, col]),
                        _nums(steps.low[:, col]),
                        _nums(steps.high[:, col]),
                        _nums(steps.score[:, col]),
                        steps.anomaly[:, col].tolist(),
                        strict=True,
                    )
                )
        queue: list[tuple[int, int]] = []
        position = {id(s): n for n, s in enumerate(self.slots)}

        def after(slot: Slot, t: int) -> None:
            """Queue ``slot``'s next bucket from ``t`` where ``_record`` does more than
            write the point: every bucket while its anomaly is open, else the next
            flagged one (``hold``'s tail flags nothing)."""
            run, cols = held[slot.group]
            if slot.open is not None and not slot.open.closed:
                found: int | None = t if t < k else None
            else:
                flags = np.flatnonzero(run.head.anomaly[t:, cols[slot.row]])
                found = t + int(flags[0]) if len(flags) else None
            if found is not None:
                heapq.heappush(queue, (found, position[id(slot)]))

        for slot in slots:
            after(slot, 0)
        while queue:
            t, order = heapq.heappop(queue)
            slot = self.slots[order]
            run, cols = held[slot.group]
            step, c = run.between(t, t + 1), cols[slot.row]
            self._record(
                slot,
                fed[slot.group][slot.row],
                float(step.score[0, c]),
                bool(step.anomaly[0, c]),
                (float(step.expected[0, c]), float(step.low[0, c]), float(step.high[0, c])),
                start + t * self.bucket,
                None,
                point=False,
            )
            after(slot, t + 1)
        for slot in slots:
            slot.last_bucket = start + (k - 1) * self.bucket

    def _record(
        self,
        slot: Slot,
        value: float,
        score: float,
        flagged: bool,
        band: tuple[float, float, float],
        start: datetime,
        totals: ingest_selectors.BucketTotals | None,
        *,
        point: bool = True,
    ) -> None:
        """The point of ``slot`` at ``start`` (unless ``point`` is False), and its
        anomaly opened, grown or closed. ``value``, ``score``, ``flagged`` and ``band``
        (expected, low, high) are the detector's for that bucket; ``totals`` the
        bucket's (None when empty). An anomaly opens at a flagged bucket whose value
        lies above its band, grows while the score stays at or above the threshold, and
        its peak (score, value, band) moves only to a bucket of higher score whose value
        lies above that bucket's band: the figures an alert shows always agree."""
        expected, low, high = (_num(x) for x in band)
        slot.last_bucket = start
        if point:
            self.points.append(
                (slot.series_id, start, _num(value), expected, low, high, _num(score), flagged)
            )
        end = start + self.bucket
        opened = slot.open
        threshold = self.groups[slot.group].params.threshold
        # The detector flags a bucket only when its value lies above the band; the check
        # here keeps every anomaly's figures saying so (value > high) to the last bit.
        above = high is not None and math.isfinite(value) and value > high
        flagged = flagged and above
        if flagged:
            if opened is not None and not opened.closed:
                opened.closed = opened.changed = True
            slot.open = Open(
                series_id=slot.series_id,
                source_id=slot.source_id,
                window_start=start,
                window_end=end,
                peak_at=start,
                score=score,
                value=float(value),
                expected=expected,
                low=low,
                high=high,
                evidence_created_at=end,
                evidence_received_at=totals.last_received_at if totals else self.now,
                changed=True,
            )
        elif opened is not None and not opened.closed:
            opened.changed = True
            if np.isfinite(score) and score >= threshold:
                opened.window_end = end
                if score > opened.score and above:
                    opened.peak_at, opened.score, opened.value = start, score, float(value)
                    opened.expected, opened.low, opened.high = expected, low, high
            else:
                opened.closed = True
        for touched in (opened, slot.open):
            if touched is not None and touched.changed:
                self.opens[id(touched)] = touched


def _nums(a: npt.NDArray[np.float64]) -> list[float | None]:
    """``_num`` of each element (None where not finite)."""
    return [x if math.isfinite(x) else None for x in a.tolist()]


def _term_changes(
    trends: Iterable[tuple[datetime, datetime]], start: datetime, n: int
) -> npt.NDArray[np.int64]:
    """The bucket indices in ``1..n-1`` (from ``start``) at which the terms watched may
    change, given the trends' ``(bucket start, evidence time)``: a trend counts for the
    bucket ending at ``end`` while ``evidence < end`` and ``bucket start >= end - 24 h``
    (``_candidates``), i.e. for indices ``i`` with ``(evidence - start) // bucket <= i
    < (bucket start + 24 h - start) // bucket``; the watched terms are a function of
    those trends alone, so they change only where one enters or leaves."""
    bucket = timedelta(seconds=BUCKET_S)
    active = timedelta(seconds=ACTIVE_TERM_S)
    marks = set()
    for bucket_start, evidence in trends:
        marks.add((evidence - start) // bucket)
        marks.add((bucket_start + active - start) // bucket)
    return np.array(sorted(m for m in marks if 0 < m < n), dtype=np.int64)
