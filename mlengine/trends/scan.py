"""The trend stage's count (``mlengine.trends.stage``): each stream's events lived through
in event-time order, bucket after bucket, the streams in lockstep rounds whose candidate
windows are scored in one ``score_terms`` call; a term's first window that passes is its
detection (``Stream``, ``count_streams``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
from django.conf import settings
from django.utils import timezone

from ingest.selectors import TrendInput
from mlengine.models import TOTAL_TERM, BucketCount
from mlengine.trends.counts import Cell, Cells, History, Key, save_trends
from mlengine.trends.detector import (
    BoolArray,
    FloatArray,
    TrendParams,
    TrendScores,
    bucket_start,
    score_terms,
)
from mlengine.trends.forecast import project_bucket_count
from mlengine.trends.params import params_for

SAMPLE_EVENTS = 10


@dataclass
class Stream:
    """One stream's share of an advance: its clock's ``bucket_s`` (seconds), the
    ``target`` watermark, the ``events`` to count (event-time order) and whether ``more``
    wait beyond them; filled by ``count_streams``: the ids of its ``new_trends`` and of
    its predicted trends ``confirmed``, and of those ``withdrawn`` (``_close``)."""

    source_id: int
    bucket_s: int
    target: datetime
    events: list[TrendInput]
    more: bool
    new_trends: list[int] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)
    withdrawn: list[int] = field(default_factory=list)


def count_streams(streams: Sequence[Stream]) -> None:
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
        stream.new_trends, stream.confirmed = save_trends(
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
        self.cells = Cells.load(source_id, self.starts, terms)
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
        self.history = History.load(
            source_id,
            since=self.starts[0] - bucket * params.long_buckets,
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
        rows: list[tuple[str, int, int, int, int, int, int, int, int, float, int, int]] = []
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
                    (
                        term,
                        index,
                        *window,
                        hist_events,
                        prev_events,
                        before_events,
                        elapsed,
                        baseline.long.get(term, 0),
                        baseline.present.get(term, 0),
                    )
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
            "long_events": np.asarray(columns[10]),
            "long_total": np.full(n, baseline.long_total),
            "long_history": np.full(n, baseline.long_buckets),
            "long_present": np.asarray(columns[11]),
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
        so far (``mlengine.trends.forecast.project_bucket_count``), passes the test while the
        term's count grows and accelerates against the two buckets before is an emerging
        detection: the trend is stored as ``predicted`` and confirmed (``confirmed_at``)
        at the first later window that passes as it is. The same rule as
        ``mlengine.trends.detector.TermStream``. Side effects: the cells' trends and samples.
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
            predicted = not bool(scores.is_trend[i])
            cell.trend = {
                "new": True,
                "predicted": predicted,
                "projected": (
                    round(float(windows.projected[i]), 4)
                    if predicted and windows.projected is not None
                    else None
                ),
                "always_on": bool(scores.always_on[i]),
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
        # A prediction needs a baseline: a stream's first bucket is judged as it is.
        emerging = (
            projected.is_trend & accelerating & ~scores.is_trend & (common["hist_buckets"] > 0)
        )
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
        always_on=scores.always_on[part],
    )


def _grow(cell: Cell, event: TrendInput) -> None:
    """A detected trend's bucket keeps filling: keep a few more sample posts."""
    assert cell.trend is not None
    samples = cell.trend["sample_event_ids"]
    if len(samples) < SAMPLE_EVENTS and event.id not in samples:
        samples.append(event.id)
    cell.trend["grown"] = True
