"""Trend detection on event-time buckets: a term's count against its baseline.

The detector is a Poisson significance test in the spirit of SigniTrend (Schubert,
Weiler & Kriegel, "SigniTrend: scalable detection of emerging topics in textual
streams by hashed significance thresholds", KDD 2014), on exact counts:

- A source's stream is cut into tumbling event-time buckets of ``bucket_s`` seconds.
- The baseline of a term is its share of all events over the previous
  ``baseline_buckets`` buckets, smoothed by a Beta(0.5, ``prior_posts`` − 0.5) prior
  so unseen terms get a small, non-zero rate: ``rate = (hist_events + 0.5) /
  (hist_total + prior_posts)``. The prior says an unseen term holds about one post in
  ``2 × prior_posts`` until the stream shows otherwise; it weighs only while the
  baseline is a handful of posts (a stream that opens with its burst), and vanishes
  against a baseline of hundreds. (With Jeffreys' Beta(0.5, 0.5), ``prior_posts = 1``,
  an unseen term was taken to hold half the posts of a stream that had seen two.) A
  bucket with no baseline at all keeps Jeffreys' prior: in a stream's first bucket a
  term trends only when it dominates it.
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
- A term whose share of the posts of the last ``always_on_buckets`` buckets is at least
  ``always_on_share``, and which is present in at least ``always_on_presence`` of those
  buckets, is *always on* in its stream (``TrendScores.always_on``), once the
  stream has a baseline window of history: a brand handle in a brand-complaints
  stream, the stream's own everyday words. Its trends are scored like any other, but
  the story layer never lets it start or link a story by itself
  (``mlengine.trends.stories``): a busy hour of complaints is no story.
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
from itertools import islice
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
    prior_posts: float = 5.0
    """The baseline's prior weight in posts (see the module docstring; ≥ 0.5)."""
    emerging_sigmas: float = 1.0
    """The emerging test projects a bucket from its count less this many Poisson σ
    (``mlengine.trends.forecast.project_bucket_count``)."""
    always_on_share: float = 0.01
    """A term in at least this share of the posts of the last ``always_on_buckets``
    buckets is always on in its stream (0–1)."""
    always_on_presence: float = 0.1
    """… and present in at least this share of those buckets that hold any post (0–1):
    one earlier burst of a term does not make it an everyday term."""
    always_on_buckets: int = 96
    """Buckets of history behind the always-on share (at least the baseline's): a day of
    15-minute buckets, so that a term a stream uses all day is not taken for a burst at
    dawn, when the baseline's night holds little of it."""

    @property
    def long_buckets(self) -> int:
        """Buckets of history a stream keeps: the baseline's or the always-on window's."""
        return max(self.baseline_buckets, self.always_on_buckets)


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
    ``expected`` events, ``score`` in σ, ``velocity`` in events per minute of change
    from the previous bucket, ``is_trend``, ``always_on`` (the term is an everyday term
    of its stream: the always-on test of the module docstring). Unrounded."""

    expected: FloatArray
    score: FloatArray
    velocity: FloatArray
    is_trend: BoolArray
    always_on: BoolArray


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
    long_events: npt.ArrayLike | None = None,
    long_total: npt.ArrayLike | None = None,
    long_history: npt.ArrayLike | None = None,
    long_present: npt.ArrayLike | None = None,
) -> TrendScores:
    """Score many term windows at once: the vectorised form of ``score_term`` and the one
    place the detector's formula lives (see the module docstring).

    ``weigh_authors`` (default: ``authors``) is the author count that weighs the posts;
    a projection of a bucket still filling passes its authors projected with its posts,
    while ``min_authors`` is still judged on the authors seen.

    ``long_events``, ``long_total``, ``long_history`` and ``long_present`` (default:
    ``hist_events``, ``hist_total``, ``hist_buckets`` and ``hist_buckets``) are the
    term's events, all events, the buckets holding any event and those holding the term,
    over the ``long_buckets`` before the bucket: what the always-on test reads, once the
    stream has ``baseline_buckets`` buckets of history.

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
    n_hist = np.asarray(hist_total, dtype=np.float64)
    rate = (np.asarray(hist_events, dtype=np.float64) + 0.5) / (
        n_hist + np.where(n_hist > 0, params.prior_posts, 1.0)
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
        & (weighted > expected)
    )
    long = np.asarray(hist_events if long_events is None else long_events, dtype=np.float64)
    long_all = np.asarray(hist_total if long_total is None else long_total, dtype=np.float64)
    learned = np.asarray(hist_buckets if long_history is None else long_history)
    present = np.asarray(learned if long_present is None else long_present)
    always_on = (
        (learned >= params.baseline_buckets)
        & (long > 0)
        & (long >= params.always_on_share * long_all)
        & (present >= params.always_on_presence * learned)
    )
    return TrendScores(
        expected=np.broadcast_to(expected, is_trend.shape),
        score=np.broadcast_to(score, is_trend.shape),
        velocity=np.broadcast_to(velocity, is_trend.shape),
        is_trend=is_trend,
        always_on=np.broadcast_to(always_on, is_trend.shape),
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
    projected count (``projected`` events, None for a confirmed detection) passes, the
    count so far not yet; ``score`` and ``expected`` are then the projection's.
    ``always_on``: the term was an everyday term of its stream at detection
    (``TrendScores.always_on``)."""

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
    projected: float | None = None
    always_on: bool = False


@dataclass(slots=True)
class _PastBucket:
    start: int
    total: int
    authors: int
    terms: dict[str, int]


def _forget(sums: dict[str, int], past: _PastBucket, *, presence: bool = False) -> int:
    """Take ``past``'s term counts (``presence``: one per term) out of ``sums``, dropping
    terms that reach 0; returns its total, for the caller to take out of its own."""
    for term, count in past.terms.items():
        left = sums[term] - (1 if presence else count)
        if left:
            sums[term] = left
        else:
            del sums[term]
    return past.total


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
    Memory: the distinct terms of ``long_buckets + 1`` buckets.
    """

    def __init__(self, params: TrendParams, *, emerging: bool = False) -> None:
        self.params = params
        self.emerging = emerging
        self.cur_emerged: set[str] = set()
        self.watermark: datetime | None = None
        self.seq = 0
        self.late_events = 0
        self.history: deque[_PastBucket] = deque()
        self._base_first = 0  # history[_base_first:] is the baseline window
        self._hist_terms: dict[str, int] = defaultdict(int)
        self._hist_total = 0
        self._long_terms: dict[str, int] = defaultdict(int)
        self._long_present: dict[str, int] = defaultdict(int)
        self._long_total = 0
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
            self._long_total += past.total
            for term, count in past.terms.items():
                self._hist_terms[term] += count
                self._long_terms[term] += count
                self._long_present[term] += 1
        since = start - self.params.bucket_s * self.params.baseline_buckets
        while self._base_first < len(self.history) and self.history[self._base_first].start < since:
            self._hist_total -= _forget(self._hist_terms, self.history[self._base_first])
            self._base_first += 1
        since = start - self.params.bucket_s * self.params.long_buckets
        while self.history and self.history[0].start < since:
            old = self.history.popleft()
            self._long_total -= _forget(self._long_terms, old)
            _forget(self._long_present, old, presence=True)
            self._base_first -= 1
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
        baseline_window = islice(self.history, self._base_first, None)
        max_hist_authors = max((b.authors for b in baseline_window), default=0)
        terms: list[str] = []
        posts_at: list[StreamPost] = []
        seqs: list[int] = []
        cols: dict[str, list[int]] = {
            "events": [],
            "authors": [],
            "bucket_total": [],
            "source_authors": [],
            "hist_events": [],
            "long_events": [],
            "long_present": [],
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
                cols["long_events"].append(self._long_terms.get(term, 0))
                cols["long_present"].append(self._long_present.get(term, 0))
                cols["prev_events"].append(prev.get(term, 0))
                cols["before_events"].append(before.get(term, 0))
            self.seq += 1
        if not terms:
            return []
        hist_buckets = len(self.history) - self._base_first
        baseline: dict[str, npt.ArrayLike] = {
            "hist_total": self._hist_total,
            "long_events": np.asarray(cols["long_events"]),
            "long_total": self._long_total,
            "long_history": len(self.history),
            "long_present": np.asarray(cols["long_present"]),
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
        counts: FloatArray = np.zeros(0)
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
            # A prediction needs a baseline: a projection of a stream's first seconds
            # against the prior (every term in half the posts) would fire on whatever
            # word fills a new live source; its first bucket is judged as it is.
            firing = firing | (projected.is_trend & accelerating & (hist_buckets > 0))
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
                    projected=round(float(counts[i]), 4) if predicted else None,
                    always_on=bool(scores.always_on[i]),
                )
            )
        return trends
