"""Forecasts of a trend's next buckets, and the "emerging" rule that fires before a trend
is confirmed. Pure (numpy), no state.

Nikolov & Shah ("A nonparametric method for early detection of trending topics",
Interdisciplinary Workshop on Information and Decision in Social Networks, MIT 2012)
showed that a topic's early volume trajectory predicts whether it will trend 1.5 to 5
hours before Twitter's own list does. Their classifier needs a labelled reference set of
trajectories, which a fresh stream does not have; what is kept here is their premise, that
the shape of the early counts (growth, and growth of the growth) carries the prediction,
with two parametric fits that need no training data:

- ``forecast``: a least-squares quadratic on ``log(1 + count)`` of the last buckets, a
  Gaussian-shaped burst (rise, peak, decay; the shape of news bursts in Lehmann et al.,
  "Dynamical classes of collective attention in Twitter", WWW 2012). When the curvature
  is negative the peak is its vertex: expected peak volume and time to peak follow. When
  it is not (still accelerating, or too few points), the growth is the Theil–Sen slope
  (Sen, JASA 1968: the median of pairwise slopes, robust to a stray bucket) of the log
  counts, extrapolated as exponential growth over the horizon, whose last bucket is then
  the expected peak (a lower bound on the time to peak).
- ``project_bucket_count``: a bucket still filling, extrapolated to a whole bucket at its
  rate so far. ``mlengine.trends.detector.TermStream`` (with ``emerging=True``) scores that
  projection with the production formula: a term whose projected count passes every
  threshold while the one so far does not, and whose count is growing and accelerating
  against its previous buckets, is "emerging": a prediction, marked as such, that the
  confirmed trend usually follows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FIT_BUCKETS = 6
"""At most this many of the latest buckets are fitted."""
MIN_BUCKETS = 3
"""A forecast needs at least this many buckets since the first with any post; before,
it says so (``method`` "too_few_buckets") instead of extrapolating."""
MIN_FRACTION = 0.25
"""A bucket is projected from at least this share of its length (earlier: this share)."""


@dataclass(frozen=True, slots=True)
class Forecast:
    """Expected counts of the next ``len(next_counts)`` buckets (posts per bucket; none
    for "too_few_buckets"),
    ``peak_volume`` (posts in the peak bucket, the last observed one if the peak has
    passed), ``buckets_to_peak`` (0: the peak is now or past), ``growth`` (per-bucket
    change of ``log(1 + count)`` at the last bucket), ``acceleration`` (per bucket²)
    and ``method`` ("log-quadratic", "exponential", "flat" or "too_few_buckets")."""

    next_counts: tuple[float, ...]
    peak_volume: float
    buckets_to_peak: int
    growth: float
    acceleration: float
    method: str


def theil_sen_slope(y: npt.ArrayLike) -> float:
    """The median of the pairwise slopes of ``y`` against ``0..n-1`` (Sen 1968); 0.0 for
    fewer than two points."""
    values = np.asarray(y, dtype=np.float64)
    n = values.size
    if n < 2:
        return 0.0
    i, j = np.triu_indices(n, k=1)
    return float(np.median((values[j] - values[i]) / (j - i)))


def forecast(counts: Sequence[float], *, horizon: int = 4) -> Forecast:
    """Forecast the ``horizon`` buckets after ``counts`` (posts per bucket, oldest first,
    the last one whole or projected with ``project_bucket_count``); see the module
    docstring for the method.

    Bounded by what the data supports: the buckets before the first with any post are
    not the series' (a story's volume before it began), and with fewer than
    ``MIN_BUCKETS`` left the forecast is ``too_few``; it looks ahead at most as many
    buckets as it has (``len(next_counts)`` may be less than ``horizon``), and no step
    grows faster than the fastest bucket-to-bucket growth seen.

    Raises:
        ValueError: ``counts`` is empty or ``horizon`` < 1.
    """
    if not counts or horizon < 1:
        raise ValueError("forecast needs at least one bucket and a horizon of one or more")
    values = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    began = np.flatnonzero(values > 0)
    values = values[began[0] :] if began.size else values[-1:]
    if values.size < MIN_BUCKETS:
        return too_few(float(values[-1]))
    y = np.log1p(values[-FIT_BUCKETS:])
    n = y.size
    horizon = min(horizon, n)
    last = float(np.expm1(y[-1]))
    steps = np.arange(1, horizon + 1, dtype=np.float64)
    fastest = max(float(np.max(np.diff(y))), 0.0)
    ceiling = y[-1] + fastest * steps  # log counts no path may pass
    if n >= 3:
        x = np.arange(n, dtype=np.float64) - (n - 1)
        c, b, a = np.polyfit(x, y, 2)
        if c < 0:
            vertex = -b / (2 * c)
            path = np.expm1(np.minimum(a + b * steps + c * steps**2, ceiling))
            if vertex <= 0:
                peak, to_peak = last, 0
            else:
                to_peak = min(round(vertex), horizon)
                peak = float(path[to_peak - 1]) if to_peak > 0 else last
            return Forecast(
                next_counts=tuple(float(v) for v in np.maximum(path, 0.0)),
                peak_volume=max(peak, 0.0),
                buckets_to_peak=to_peak,
                growth=float(b),
                acceleration=float(2 * c),
                method="log-quadratic",
            )
    slope = theil_sen_slope(y)
    if slope <= 0:
        return Forecast(
            next_counts=(last,) * horizon,
            peak_volume=last,
            buckets_to_peak=0,
            growth=slope,
            acceleration=0.0,
            method="flat",
        )
    path = np.expm1(np.minimum(y[-1] + slope * steps, ceiling))
    return Forecast(
        next_counts=tuple(float(v) for v in path),
        peak_volume=float(path[-1]),
        buckets_to_peak=horizon,
        growth=slope,
        acceleration=0.0,
        method="exponential",
    )


def too_few(last: float) -> Forecast:
    """The forecast of a series too short to extrapolate: no counts ahead, its last
    bucket as the peak so far, method "too_few_buckets"."""
    return Forecast(
        next_counts=(),
        peak_volume=last,
        buckets_to_peak=0,
        growth=0.0,
        acceleration=0.0,
        method="too_few_buckets",
    )


def project_bucket_count(
    events: npt.ArrayLike, elapsed_s: npt.ArrayLike, bucket_s: int, *, sigmas: float = 0.0
) -> npt.NDArray[np.float64]:
    """Counts of buckets still filling, extrapolated to the whole bucket at their rate so
    far: ``(events − sigmas × √events) × bucket_s / max(elapsed_s, MIN_FRACTION ×
    bucket_s)``, never below ``events``. ``sigmas`` > 0 projects the count that many
    Poisson standard deviations below the one seen (a conservative projection: a handful
    of early posts projects little). Arrays of shape ``(n,)`` (or scalars); seconds."""
    elapsed = np.maximum(np.asarray(elapsed_s, dtype=np.float64), MIN_FRACTION * bucket_s)
    counts = np.asarray(events, dtype=np.float64)
    low = counts - sigmas * np.sqrt(counts)
    return np.maximum(low * bucket_s / elapsed, counts)


def forecast_volume(
    volume: Mapping[int, int],
    *,
    bucket_start: int,
    current: int,
    elapsed_s: float,
    bucket_s: int,
    horizon: int,
) -> Forecast:
    """A story's forecast at a moment ``elapsed_s`` seconds into the bucket starting at
    ``bucket_start`` (epoch s): ``volume`` holds the posts of earlier buckets by bucket
    start (a bucket absent has none; only the ``horizon + 2`` buckets before count), and
    ``current`` the posts of this bucket so far, projected to its end
    (``project_bucket_count``). The one way both story paths build the series."""
    first = max(min([*volume, bucket_start]), bucket_start - bucket_s * (horizon + 2))
    series = [float(volume.get(b, 0)) for b in range(first, bucket_start, bucket_s)]
    series.append(float(project_bucket_count(current, elapsed_s, bucket_s)))
    return forecast(series, horizon=horizon)
