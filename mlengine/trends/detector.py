"""Trend detection on event-time buckets: a term's count against its baseline.

The detector is a Poisson significance test in the spirit of SigniTrend (Schubert,
Weiler & Kriegel, "SigniTrend: scalable detection of emerging topics in textual
streams by hashed significance thresholds", KDD 2014), on exact counts:

- A source's stream is cut into tumbling event-time buckets of ``bucket_s`` seconds.
- The baseline of a term is its share of all events over the previous
  ``baseline_buckets`` buckets, with a half-event prior so unseen terms get a small,
  non-zero rate: ``rate = (hist_events + 0.5) / (hist_total + 1)``.
- Its expected count in the current bucket is ``rate × max(bucket_total,
  mean_bucket_total)``: the share times the bucket's volume, so a busy hour does not
  make every common word a trend, and a bucket still filling is judged against a
  whole bucket's volume (a decision taken early is never undone by more events).
- Posts are weighed by distinct authors: a term's ``events`` count as
  ``authors × (1 + ln(events / authors))`` (each author's posts sublinearly, as
  sublinear tf scaling does in retrieval: Manning, Raghavan & Schütze, "Introduction to
  Information Retrieval", 2008, §6.4.1). 1,000 posts by 1,000 accounts count 1,000;
  by 10 accounts, 56. Where authors are not all known (``AUTHORS_CAP`` reached) or the
  stream has fewer than ``min_authors`` authors in any bucket (one channel, one
  person's feed), posts count as they are.
- ``score = (weighted events − expected) / sqrt(expected + 1)``: the deviation in
  Poisson standard deviations, with a unit floor on the variance so that a handful of
  events of a new term does not score in the hundreds.
- A term trends when ``score ≥ min_score``, ``events ≥ min_events``, the source has at
  least ``min_history_buckets`` of history, and at least ``min(min_authors,
  source_authors)`` distinct authors used it, where ``source_authors`` is the most
  distinct authors any bucket of the window had: one account repeating a hashtag in
  a many-author stream does not make a trend, while a single-account source (one
  channel, one person's feed) can still trend on its own.

Every input is an exact count, so replaying an archive at any speed in event-time
order scores every bucket the same way.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import numpy as np
import numpy.typing as npt

from mlengine.trends.forecast import project_bucket_count

BUCKET_LADDER_S = (60, 300, 900, 3600, 6 * 3600, 24 * 3600, 7 * 24 * 3600)
AUTHORS_CAP = 200
"""Distinct authors kept per term and bucket, as ``mlengine.models.BucketCount`` keeps:
enough to decide ``min_authors``; at the cap, posts are not weighed by authors."""


@dataclass(frozen=True, slots=True)
class TrendParams:
    """Detector thresholds. Units: seconds, buckets, events, authors, score in σ."""

    bucket_s: int = 900
    baseline_buckets: int = 24
    min_history_buckets: int = 3
    min_score: float = 4.0
    min_events: int = 5
    min_authors: int = 3
    emerging_sigmas: float = 1.0
    """The emerging test projects a bucket from its count less this many Poisson σ
    (``mlengine.trends.forecast.project_bucket_count``)."""


@dataclass(frozen=True, slots=True)
class TermWindow:
    """Counts of one term in one bucket and over its baseline.

    ``hist_buckets`` is how many baseline buckets of the source hold any event;
    ``mean_bucket_total`` is the mean events per such bucket; ``source_authors`` is the
    most distinct authors any bucket of the window (baseline or current) had.
    """

    term: str
    events: int
    authors: int
    bucket_total: int
    source_authors: int
    hist_events: int
    hist_total: int
    hist_buckets: int
    mean_bucket_total: float
    prev_events: int


@dataclass(frozen=True, slots=True)
class TrendScore:
    """The detector's verdict: expected count, score (σ), velocity (events/min change)."""

    expected: float
    score: float
    velocity: float
    is_trend: bool


def bucket_start(moment: datetime, bucket_s: int) -> datetime:
    """Start of the tumbling bucket of ``bucket_s`` seconds holding ``moment`` (UTC)."""
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % bucket_s, tz=UTC)


def baseline_range(start: datetime, params: TrendParams) -> tuple[datetime, datetime]:
    """``[from, to)`` event-time range of the baseline before the bucket at ``start``."""
    return start - timedelta(seconds=params.bucket_s * params.baseline_buckets), start


FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class TrendScores:
    """``score_terms``'s verdicts, one entry per scored window (arrays of shape ``(n,)``):
    ``expected`` events, ``score`` in Poisson σ, ``velocity`` in events per minute of
    change from the previous bucket, ``is_trend``. Unrounded."""

    expected: FloatArray
    score: FloatArray
    velocity: FloatArray
    is_trend: BoolArray


def score_terms(
    params: TrendParams,
    *,
    events: npt.ArrayLike,
    authors: npt.ArrayLike,
    bucket_total: npt.ArrayLike,
    source_authors: npt.ArrayLike,
    hist_events: npt.ArrayLike,
    hist_total: npt.ArrayLike,
    hist_buckets: npt.ArrayLike,
    mean_bucket_total: npt.ArrayLike,
    prev_events: npt.ArrayLike,
    weigh_authors: npt.ArrayLike | None = None,
    bucket_s: npt.ArrayLike | None = None,
) -> TrendScores:
    """Score many term windows at once: the vectorised form of ``score_term`` and the one
    place the detector's formula lives (see the module docstring).

    ``weigh_authors`` (default: ``authors``) is the author count that weighs the posts;
    a projection of a bucket still filling passes its authors projected with its posts,
    while ``min_authors`` is still judged on the authors seen.

    ``bucket_s`` (default: ``params.bucket_s``) is each window's bucket length in
    seconds; it only scales ``velocity``, so windows of streams whose parameters differ
    in ``bucket_s`` alone are scored in one call.

    Every argument is an array of shape ``(n,)`` (or a scalar, broadcast) holding the
    ``TermWindow`` field of the same name for each of ``n`` windows, which may come from
    any number of terms, buckets and streams sharing ``params``. Costs a few numpy passes
    over ``n`` (about 0.1 µs a window). Pure; raises nothing for well-shaped input
    (numpy's broadcasting errors otherwise).
    """
    n_events = np.asarray(events, dtype=np.float64)
    n_authors = np.asarray(authors if weigh_authors is None else weigh_authors, dtype=np.float64)
    many_authors = np.asarray(source_authors, dtype=np.float64) >= params.min_authors
    weigh = many_authors & (n_authors > 0) & (n_authors < AUTHORS_CAP) & (n_events > n_authors)
    ratio = np.where(weigh, n_events / np.maximum(n_authors, 1.0), 1.0)
    weighted = np.where(weigh, n_authors * (1.0 + np.log(ratio)), n_events)
    rate = (np.asarray(hist_events, dtype=np.float64) + 0.5) / (
        np.asarray(hist_total, dtype=np.float64) + 1.0
    )
    volume = np.maximum(
        np.asarray(bucket_total, dtype=np.float64),
        np.asarray(mean_bucket_total, dtype=np.float64),
    )
    expected = rate * volume
    score = (weighted - expected) / np.sqrt(expected + 1.0)
    minutes = np.asarray(params.bucket_s if bucket_s is None else bucket_s, dtype=np.float64) / 60
    velocity = (n_events - np.asarray(prev_events, dtype=np.float64)) / minutes
    required_authors = np.maximum(
        1, np.minimum(params.min_authors, np.asarray(source_authors, dtype=np.int64))
    )
    is_trend = (
        (np.asarray(hist_buckets) >= params.min_history_buckets)
        & (n_events >= params.min_events)
        & (np.asarray(authors) >= required_authors)
        & (score >= params.min_score)
    )
    return TrendScores(
        expected=np.broadcast_to(expected, is_trend.shape),
        score=np.broadcast_to(score, is_trend.shape),
        velocity=np.broadcast_to(velocity, is_trend.shape),
        is_trend=is_trend,
    )


def score_term(window: TermWindow, params: TrendParams) -> TrendScore:
    """Score one term's bucket against its baseline (see the module docstring):
    ``score_terms`` on one window, rounded to 4 decimals for storage."""
    scores = score_terms(
        params,
        events=[window.events],
        authors=[window.authors],
        bucket_total=[window.bucket_total],
        source_authors=[window.source_authors],
        hist_events=[window.hist_events],
        hist_total=[window.hist_total],
        hist_buckets=[window.hist_buckets],
        mean_bucket_total=[window.mean_bucket_total],
        prev_events=[window.prev_events],
    )
    return TrendScore(
        expected=round(float(scores.expected[0]), 4),
        score=round(float(scores.score[0]), 4),
        velocity=round(float(scores.velocity[0]), 4),
        is_trend=bool(scores.is_trend[0]),
    )


def suggest_bucket_s(events_per_active_day: float, *, min_events: int) -> int:
    """The smallest bucket on the ladder that holds ``2 × min_events`` events on average.

    ``events_per_active_day`` is the stream's mean daily volume over the days that have
    any event (the mean, not the median, so that a sample built around one burst gets
    buckets fine enough to see it). A trend needs ``min_events`` posts of one term in a
    bucket, so a bucket should hold at least twice that many posts in all. A stream of
    1,800 posts a day gets 15-minute buckets, one of 80 (a crisis sample) 6 hours, one of
    7 (one channel) a week. Returns seconds.
    """
    target = 2 * min_events
    for size in BUCKET_LADDER_S:
        if events_per_active_day * size / 86400 >= target:
            return size
    return BUCKET_LADDER_S[-1]


class StreamPost(Protocol):
    """What the streaming detector reads of one post (``ingest.selectors.TrendInput`` is
    one): ``id``, event time ``created_at`` (aware UTC), the distinct-author key
    ``author`` and its distinct ``terms``."""

    @property
    def id(self) -> int: ...

    @property
    def created_at(self) -> datetime: ...

    @property
    def author(self) -> str: ...

    @property
    def terms(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class TermTrend:
    """One term-level detection: ``term`` crossed every threshold in the bucket at
    ``bucket_start`` at the post ``evidence_id`` (event time ``evidence_created_at``,
    ``seq``: its 0-based position in the stream). ``events`` and ``authors`` are the
    bucket-so-far counts at that post; ``score`` (σ), ``expected`` (events) and
    ``velocity`` (events/min) are ``score_terms``'s, rounded to 4 decimals.
    ``predicted``: an "emerging" detection (``TermStream(emerging=True)``): the bucket's
    projected count passes, the count so far not yet; ``score`` and ``expected`` are then
    the projection's."""

    term: str
    bucket_start: datetime
    events: int
    authors: int
    expected: float
    score: float
    velocity: float
    evidence_id: int
    evidence_created_at: datetime
    seq: int
    predicted: bool = False


@dataclass(slots=True)
class _PastBucket:
    start: int
    total: int
    authors: int
    terms: dict[str, int]


class TermStream:
    """The trend detector over one stream, in memory, in event time: the same verdicts as
    ``mlengine.trends.stage.advance_stream`` (``tests/test_stories.py`` checks it on the
    database path), from the same ``TrendParams`` and the same ``score_terms``.

    Feed it posts in event-time order (ties in any fixed order, e.g. by external id):
    each post adds one to its bucket's total and to each of its terms; a term trends in a
    bucket at the first of its posts at which the bucket-so-far passes ``score_terms``
    against the baseline (the ``baseline_buckets`` buckets before it). Within a bucket
    the candidate (term, post) windows of a ``step`` are scored in one vectorised call.
    A verdict depends on the posts alone, not on how they are cut into steps.

    State (plain Python, picklable, persistable per stream): the watermark (event time of
    the last post counted), the current bucket's counts with up to ``AUTHORS_CAP``
    authors a term, and the completed buckets of the baseline window (term counts only).
    Memory: the distinct terms of ``baseline_buckets + 1`` buckets.
    """

    def __init__(self, params: TrendParams, *, emerging: bool = False) -> None:
        self.params = params
        self.emerging = emerging
        self.cur_emerged: set[str] = set()
        self.watermark: datetime | None = None
        self.seq = 0
        self.late_events = 0
        self.history: deque[_PastBucket] = deque()
        self._hist_terms: dict[str, int] = defaultdict(int)
        self._hist_total = 0
        self.cur_start: int | None = None
        self.cur_total = 0
        self.cur_authors: set[str] = set()
        self.cur_terms: dict[str, int] = defaultdict(int)
        self.cur_term_authors: dict[str, set[str]] = defaultdict(set)
        self.cur_trended: set[str] = set()

    def bucket_of(self, moment: datetime) -> int:
        """Epoch seconds of the start of the bucket holding ``moment``."""
        epoch = int(moment.timestamp())
        return epoch - epoch % self.params.bucket_s

    def accepts(self, post: StreamPost) -> bool:
        """Whether ``post`` is on time (not before the watermark)."""
        return self.watermark is None or post.created_at >= self.watermark

    def step(self, posts: Sequence[StreamPost]) -> list[TermTrend]:
        """Count ``posts`` (event-time order) and return the term trends they complete,
        in order of their evidence. A post before the watermark is late: counted in
        ``late_events`` and left out, as production does.

        Side effects: advances the state and the watermark.
        """
        trends: list[TermTrend] = []
        segment: list[StreamPost] = []
        for post in posts:
            if not self.accepts(post):
                self.late_events += 1
                continue
            start = self.bucket_of(post.created_at)
            if start != self.cur_start:
                if segment:
                    trends += self._count_segment(segment)
                    segment = []
                self._open_bucket(start)
            self.watermark = post.created_at
            segment.append(post)
        if segment:
            trends += self._count_segment(segment)
        return trends

    def _open_bucket(self, start: int) -> None:
        """Close the current bucket into the baseline history and open the one at
        ``start``, dropping history older than the baseline window."""
        if self.cur_start is not None and self.cur_total:
            past = _PastBucket(
                start=self.cur_start,
                total=self.cur_total,
                authors=len(self.cur_authors),
                terms=dict(self.cur_terms),
            )
            self.history.append(past)
            self._hist_total += past.total
            for term, count in past.terms.items():
                self._hist_terms[term] += count
        since = start - self.params.bucket_s * self.params.baseline_buckets
        while self.history and self.history[0].start < since:
            old = self.history.popleft()
            self._hist_total -= old.total
            for term, count in old.terms.items():
                left = self._hist_terms[term] - count
                if left:
                    self._hist_terms[term] = left
                else:
                    del self._hist_terms[term]
        self.cur_start = start
        self.cur_total = 0
        self.cur_authors = set()
        self.cur_terms = defaultdict(int)
        self.cur_term_authors = defaultdict(set)
        self.cur_trended = set()
        self.cur_emerged = set()

    def _past_terms(self, start: int) -> dict[str, int]:
        """Term counts of the completed bucket at ``start`` ({} when it had no post or
        has left the baseline window)."""
        for past in reversed(self.history):
            if past.start == start:
                return past.terms
            if past.start < start:
                break
        return {}

    def _count_segment(self, posts: list[StreamPost]) -> list[TermTrend]:
        """Count posts of the current bucket; score every candidate window at once."""
        params = self.params
        assert self.cur_start is not None
        prev_start = self.cur_start - params.bucket_s
        prev = self._past_terms(prev_start)
        before = self._past_terms(prev_start - params.bucket_s)
        max_hist_authors = max((b.authors for b in self.history), default=0)
        terms: list[str] = []
        posts_at: list[StreamPost] = []
        seqs: list[int] = []
        cols: dict[str, list[int]] = {
            "events": [],
            "authors": [],
            "bucket_total": [],
            "source_authors": [],
            "hist_events": [],
            "prev_events": [],
            "before_events": [],
        }
        for post in posts:
            self.cur_total += 1
            if len(self.cur_authors) < AUTHORS_CAP:
                self.cur_authors.add(post.author)
            source_authors = max(len(self.cur_authors), max_hist_authors)
            for term in post.terms:
                self.cur_terms[term] += 1
                count = self.cur_terms[term]
                authors = self.cur_term_authors[term]
                if len(authors) < AUTHORS_CAP:
                    authors.add(post.author)
                if count < params.min_events or term in self.cur_trended:
                    continue
                terms.append(term)
                posts_at.append(post)
                seqs.append(self.seq)
                cols["events"].append(count)
                cols["authors"].append(len(authors))
                cols["bucket_total"].append(self.cur_total)
                cols["source_authors"].append(source_authors)
                cols["hist_events"].append(self._hist_terms.get(term, 0))
                cols["prev_events"].append(prev.get(term, 0))
                cols["before_events"].append(before.get(term, 0))
            self.seq += 1
        if not terms:
            return []
        hist_buckets = len(self.history)
        baseline: dict[str, npt.ArrayLike] = {
            "hist_total": self._hist_total,
            "hist_buckets": hist_buckets,
            "mean_bucket_total": self._hist_total / max(hist_buckets, 1),
            "authors": np.asarray(cols["authors"]),
            "bucket_total": np.asarray(cols["bucket_total"]),
            "source_authors": np.asarray(cols["source_authors"]),
            "hist_events": np.asarray(cols["hist_events"]),
            "prev_events": np.asarray(cols["prev_events"]),
        }
        scores = score_terms(params, events=np.asarray(cols["events"]), **baseline)
        firing = scores.is_trend
        projected: TrendScores | None = None
        if self.emerging:
            elapsed = [(p.created_at.timestamp() - self.cur_start) for p in posts_at]
            counts = project_bucket_count(
                cols["events"], elapsed, params.bucket_s, sigmas=params.emerging_sigmas
            )
            # Authors are projected with the posts, so weighing by author judges the
            # projection at the ratio of posts to authors seen so far.
            scale = counts / np.maximum(np.asarray(cols["events"], dtype=np.float64), 1.0)
            projected = score_terms(
                params,
                events=counts,
                weigh_authors=np.asarray(baseline["authors"]) * scale,
                **baseline,
            )
            prev_events = np.asarray(cols["prev_events"], dtype=np.float64)
            growth = counts - prev_events
            accelerating = (growth > 0) & (growth > prev_events - np.asarray(cols["before_events"]))
            firing = firing | (projected.is_trend & accelerating)
        trends = []
        bucket = datetime.fromtimestamp(self.cur_start, tz=UTC)
        for i in np.flatnonzero(firing):
            term = terms[i]
            if term in self.cur_trended:
                continue
            predicted = not bool(scores.is_trend[i])
            if predicted:
                if term in self.cur_emerged:
                    continue
                self.cur_emerged.add(term)
            else:
                self.cur_trended.add(term)
            verdict = projected if predicted and projected is not None else scores
            trends.append(
                TermTrend(
                    term=term,
                    bucket_start=bucket,
                    events=cols["events"][i],
                    authors=cols["authors"][i],
                    expected=round(float(verdict.expected[i]), 4),
                    score=round(float(verdict.score[i]), 4),
                    velocity=round(float(verdict.velocity[i]), 4),
                    evidence_id=posts_at[i].id,
                    evidence_created_at=posts_at[i].created_at,
                    seq=seqs[i],
                    predicted=predicted,
                )
            )
        return trends
