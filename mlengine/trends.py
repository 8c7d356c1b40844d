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
- ``score = (events − expected) / sqrt(expected + 1)``: the deviation in Poisson
  standard deviations, with a unit floor on the variance so that a handful of
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

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

BUCKET_LADDER_S = (60, 300, 900, 3600, 6 * 3600, 24 * 3600, 7 * 24 * 3600)


@dataclass(frozen=True, slots=True)
class TrendParams:
    """Detector thresholds. Units: seconds, buckets, events, authors, score in σ."""

    bucket_s: int = 900
    baseline_buckets: int = 24
    min_history_buckets: int = 3
    min_score: float = 4.0
    min_events: int = 5
    min_authors: int = 3


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


def score_term(window: TermWindow, params: TrendParams) -> TrendScore:
    """Score one term's bucket against its baseline (see the module docstring)."""
    rate = (window.hist_events + 0.5) / (window.hist_total + 1)
    volume = max(float(window.bucket_total), window.mean_bucket_total)
    expected = rate * volume
    score = (window.events - expected) / math.sqrt(expected + 1.0)
    velocity = (window.events - window.prev_events) / (params.bucket_s / 60)
    required_authors = max(1, min(params.min_authors, window.source_authors))
    is_trend = (
        window.hist_buckets >= params.min_history_buckets
        and window.events >= params.min_events
        and window.authors >= required_authors
        and score >= params.min_score
    )
    return TrendScore(
        expected=round(expected, 4),
        score=round(score, 4),
        velocity=round(velocity, 4),
        is_trend=is_trend,
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
