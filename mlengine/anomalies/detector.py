"""Streaming anomaly detector for event-time volume series (and shares), vectorised over series.

Method: a robust seasonal baseline with a median/MAD score, in the family of Twitter's
Seasonal Hybrid ESD (Hochenbaum, Vallis & Kejariwal, "Automatic Anomaly Detection in the
Cloud Via Statistical Learning", arXiv:1704.07706, 2017: seasonal median baseline and
median absolute deviation instead of mean and standard deviation) run causally, one bucket
at a time, gated by Numenta's anomaly likelihood (Ahmad, Lavin, Purdy & Agha,
"Unsupervised real-time anomaly detection for streaming data", Neurocomputing 262, 2017),
with a refractory period after each detection. For each series and bucket:

1. Variance-stabilise counts with Anscombe's transform ``y = 2 sqrt(x + 3/8)`` (Anscombe,
   Biometrika 1948): Poisson noise then has a standard deviation of about 1 at any level,
   so one threshold serves a ticker with 2 tweets per bucket and one with 2,000.
2. Expected value: the median of ``y`` at the same time of day on each of the last
   ``days`` days, taking ``slot_spread`` neighbouring buckets either side (daily
   seasonality, robust to past bursts).
3. Residual ``r = y - expected``, averaged over the last ``smooth`` buckets (a burst lasts
   several buckets; isolated one-bucket blips are noise).
4. Scale: ``1.4826 * MAD`` of that smoothed residual over the last ``scale_days`` days,
   re-estimated every ``scale_every`` buckets, and never below the noise floor
   ``noise_sd / sqrt(smooth)`` (Poisson noise after the transform, so that a near-constant
   series does not get a scale of zero).
5. Score ``z = smoothed residual / scale`` (signed; only rises are flagged, or rises and
   falls with ``direction="both"``: ``Params.magnitude``).
6. Anomaly likelihood: the paper's raw score is here ``s = max(z, 0)`` (``|z|`` with
   ``direction="both"``; already averaged
   over ``smooth`` buckets, the paper's short window). A Gaussian is fitted to the scores
   ``s`` of the last ``likelihood_days`` days (the paper's window ``W``; mean and sample
   standard deviation, re-fitted every ``likelihood_every`` buckets from block sums, once
   a day of scores exists), and the likelihood is ``L = 1 - Q((s - mean) / sd)``. A score
   is unusual when ``L >= 1 - likelihood_epsilon``, i.e. ``s >= mean + q * sd`` with
   ``q`` the normal quantile of ``1 - likelihood_epsilon`` (4.26). A series whose score
   often runs high (a bursty ticker) thus needs a larger burst; a quiet one keeps the
   robust threshold alone. Before a fit exists every score counts as unusual.
7. A bucket is flagged when ``z >= threshold``, the bucket's own value lies outside its
   band (below: its residual, not smoothed, exceeds ``threshold * scale``: ``Step.level``),
   the score is unusual (step 6), the series has more than ``warmup`` buckets of history
   (36 hours: a day for the seasonal median, half a day of residuals for the scale), and
   no detection happened in the last ``refractory`` buckets (one burst, one alert).

The expected band for a bucket is the value range whose sustained level stays below the
robust threshold: the inverse transform of ``expected -/+ threshold * scale``, in the
series' units (a value above it may still be held back by the likelihood or the
smoothed score). A flagged bucket's value always lies outside it, so an alert's value and
band never contradict each other; a rise whose buckets each stay inside the band (a
sustained trickle) is not flagged.

Parameters (fixed once for every series): 5-minute buckets (``period=288`` buckets a
day), ``days=7``, ``slot_spread=2`` buckets (±10 min), ``smooth=9`` buckets (45 min),
``scale_days=7``, ``scale_every=12`` buckets (1 h), ``noise_sd=1.0`` (transformed units),
``threshold=5.5`` (robust z units), ``refractory=288`` buckets (1 day), ``warmup=432``
buckets (36 h); likelihood ``likelihood_days=30`` (8,640 buckets, NuPIC's historic
window), ``likelihood_every=96`` buckets (8 h, about NuPIC's re-estimation period of 100
records), ``likelihood_epsilon=1e-5`` (the paper's threshold). The likelihood parameters
are the paper's and NuPIC's defaults, not tuned here.

Measured on the 5 public NAB realTweets files with ``mlengine.evaluation.nab`` (standard
profile, each detector's own 0/1 decisions, refractory 1 day unless said):

- log1p + seasonal median/MAD, no Poisson floor, best of thresholds 4..8: 60 to 65
- Anscombe + seasonal median, scale = std of smoothed residual: 70 to 81, unstable in
  the threshold; scale = 99th percentile of |residual|: 68 to 80, likewise
- Anscombe + seasonal median/MAD + Poisson floor, no likelihood, threshold 4.5 / 5.0 /
  5.5 / 6.0 / 6.5 with smooth 9: 74.4 / 76.8 / 78.9 / 74.2 / 64.8; leave-one-file-out
  (threshold and smoothing 6 / 9 / 12 picked on 4 files, scored on the 5th, pooled) 73.7
- the same with the likelihood gate (this detector): 80.1 / 80.6 / **82.0** / 76.6 /
  66.9; smooth 6 or 12 at 5.5: 80.6 / 76.6; epsilon 1e-4 / 1e-6: 81.4 / 82.7; window
  14 days: 82.0. Leave-one-file-out as above: **80.6** (AMZN held out picks smooth 12,
  threshold 4.5: 57.5, where the ungated detector's folds picked 6.0: 42.6)
- thresholding the likelihood alone (no robust threshold), window 3 / 7 / 14 / 21 days,
  best quantile: 66.0 / 72.5 / 82.0 / 76.6, and 4 to 13 points lower one quantile step
  (0.5 to 1) away; leave-one-out 65 to 81
- a short-term EWMA baseline (half-life 1 to 12 h) combined with the seasonal one (min,
  geometric mean or max of the two scores): 48 to 80, leave-one-out 60 to 76
- refractory 0.5 / 0.75 / 1.5 / 2 days: 77.6 / 77.6 / 78.1 / 66.2 at 5.5 (no likelihood);
  re-arming only after the score falls back (hysteresis): 66 to 78 at 5.5
- Result: 82.0 standard, 75.5 reward_low_FP_rate, 86.0 reward_low_FN_rate; per file
  AAPL 91.0, AMZN 63.4, CRM 91.5, CVS 80.9, FB 89.1. Leave-one-file-out per profile:
  80.6 / 72.6 / 85.0. Yardsticks on these files: ARTime 83.8, CAD OSE 76.0, HTM 66.1,
  Twitter ADVec 66.0.
- Requiring a flagged bucket's own value to lie outside its band, and 36 hours of
  warm-up: 83.7 / 79.3 / 87.1 on the same five files. On five realTweets files held
  back, the parameters chosen on the public five scored 67.3: the evaluation harness now
  chooses its operating point on NAB's whole public corpus of 53 series
  (``mlengine.evaluation.nab_harness``; docs/detectors.md), where these defaults score
  33.6 and the chosen point (threshold 1.5, smoothing 12, epsilon 1e-4, 6 hours,
  rises and falls) 53.9, with 83.6 on the public realTweets.

The state is a small dict of numpy arrays (``Detector.state()``), one row per series, so a
caller can persist it per series and resume with ``Detector.from_state``. A run of buckets
in which series hold one value each (a zero count, a missing share) can be stepped at once
with ``Detector.hold``: the same Steps and state as stepping it, bit for bit, at the cost
of its first two weeks at most. Pure numpy: no I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

MAD_TO_SD = 1.4826
"""Consistency constant: ``1.4826 * MAD`` estimates the standard deviation of a normal."""


@dataclass(frozen=True)
class Params:
    """Detector parameters; units in the field comments. Defaults are the fixed choice."""

    period: int = 288  # buckets per day (5-minute buckets)
    days: int = 7  # days of same-time-of-day history in the baseline median
    slot_spread: int = 2  # neighbouring buckets either side of the same time of day
    smooth: int = 9  # buckets averaged into the residual
    scale_days: int = 7  # days of smoothed residuals behind the MAD scale
    scale_every: int = 12  # buckets between two scale estimates
    noise_sd: float = 1.0  # per-bucket noise floor, transformed units
    threshold: float = 5.5  # robust z-score that flags a bucket
    refractory: int = 288  # buckets after a detection in which no other is raised
    warmup: int = 432  # buckets of history before any detection (36 h)
    transform: Literal["anscombe", "identity"] = "anscombe"  # counts vs shares
    likelihood_days: int = 30  # days of past scores behind the anomaly likelihood
    likelihood_every: int = 96  # buckets between two likelihood estimates (8 h)
    likelihood_epsilon: float = 1e-5  # tail probability below which a score is unusual
    direction: Literal["up", "both"] = "up"  # flag rises only, or rises and falls

    def __post_init__(self) -> None:
        positive = (
            "period",
            "days",
            "smooth",
            "scale_days",
            "scale_every",
            "likelihood_days",
            "likelihood_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.slot_spread < 0 or self.refractory < 0 or self.warmup < 0:
            raise ValueError("slot_spread, refractory and warmup must be >= 0")
        if self.noise_sd <= 0 or self.threshold <= 0:
            raise ValueError("noise_sd and threshold must be > 0")
        if self.transform not in ("anscombe", "identity"):
            raise ValueError(f"unknown transform {self.transform!r}")
        if self.direction not in ("up", "both"):
            raise ValueError(f"unknown direction {self.direction!r}")
        if not 0 < self.likelihood_epsilon < 1:
            raise ValueError("likelihood_epsilon must be in (0, 1)")
        if (self.period * self.likelihood_days) % self.likelihood_every:
            raise ValueError("likelihood_every must divide period * likelihood_days")

    @property
    def lags(self) -> npt.NDArray[np.int64]:
        """Lags (buckets back) whose values form the seasonal median."""
        return np.array(
            [
                self.period * d + s
                for d in range(1, self.days + 1)
                for s in range(-self.slot_spread, self.slot_spread + 1)
            ],
            dtype=np.int64,
        )

    @property
    def history(self) -> int:
        """Buckets of transformed values kept per series (the largest lag)."""
        return self.period * self.days + self.slot_spread

    @property
    def scale_window(self) -> int:
        """Buckets of smoothed residuals kept for the MAD scale."""
        return self.period * self.scale_days

    @property
    def likelihood_blocks(self) -> int:
        """Blocks of ``likelihood_every`` scores that make the likelihood's window."""
        return self.period * self.likelihood_days // self.likelihood_every

    def magnitude(self, score: FloatArray) -> FloatArray:
        """The part of a signed score that counts (shape kept): ``max(score, 0)`` for
        ``direction="up"``, ``|score|`` for ``"both"``; NaN stays NaN. The detector flags
        a bucket when it reaches ``threshold`` and records it in the likelihood."""
        if self.direction == "both":
            return np.abs(score)
        return np.maximum(score, 0.0)

    @property
    def likelihood_z(self) -> float:
        """The standard normal quantile of ``1 - likelihood_epsilon`` (4.26 for 1e-5)."""
        return NormalDist().inv_cdf(1.0 - self.likelihood_epsilon)


@dataclass(frozen=True)
class Step:
    """What the detector says about one bucket of N series; every array has shape (N,).

    ``score``: signed robust z (NaN while warming up or for a missing value);
    ``anomaly``: the 0/1 decision; ``expected``/``low``/``high``: the baseline and the
    band, in the series' own units (NaN until a baseline exists); ``level``: the bucket's
    own residual (not smoothed) in units of the scale, signed (NaN without a baseline or
    a value): the value lies above the band when ``level > threshold``, below it when
    ``level < -threshold``.
    """

    score: FloatArray
    anomaly: BoolArray
    expected: FloatArray
    low: FloatArray
    high: FloatArray
    level: FloatArray


@dataclass(frozen=True)
class Held:
    """What the detector says about ``k`` consecutive buckets in each of which R series
    hold the same value (``Detector.hold``): the Steps of the first ``m`` buckets
    (``head``: arrays of shape (m, R)) and the Step that every later bucket repeats
    (``tail``: arrays of shape (R,); unused when ``m == k``)."""

    k: int
    head: Step
    tail: Step

    @property
    def m(self) -> int:
        """Buckets in ``head``; every bucket from ``m`` to ``k - 1`` is ``tail``."""
        return len(self.head.score)

    def between(self, start: int, stop: int) -> Step:
        """The Steps of buckets ``start`` to ``stop - 1`` (``0 <= start <= stop <= k``):
        arrays of shape (stop - start, R). Raises ValueError outside that range."""
        if not 0 <= start <= stop <= self.k:
            raise ValueError(f"buckets {start}..{stop} outside 0..{self.k}")
        a, b = min(start, self.m), min(stop, self.m)
        fields = {}
        for name in _FIELDS:
            head, tail = getattr(self.head, name), getattr(self.tail, name)
            rest = np.broadcast_to(tail, (stop - start - (b - a), len(tail)))
            fields[name] = np.concatenate([head[a:b], rest])
        return Step(**fields)


def _nanmedian(a: FloatArray) -> FloatArray:
    """Median over the last axis ignoring NaN; NaN where a row holds no number. Avoids
    ``np.nanmedian``'s all-NaN warnings and is as fast for small rows."""
    s = np.sort(a, axis=-1)  # NaN sorts last
    n = np.sum(~np.isnan(a), axis=-1)
    lo = np.clip((n - 1) // 2, 0, None)[..., None]
    hi = np.clip(n // 2, 0, a.shape[-1] - 1)[..., None]
    med = 0.5 * (np.take_along_axis(s, lo, -1) + np.take_along_axis(s, hi, -1))[..., 0]
    return np.where(n > 0, med, np.nan)


def _scale_of(window: FloatArray, p: Params) -> FloatArray:
    """The MAD scale of each row of ``window`` (D, scale_window) of smoothed residuals:
    ``1.4826 * MAD``, NaN where fewer than half a day of them exist. Shape (D,)."""
    enough = np.sum(~np.isnan(window), axis=1) >= p.period // 2
    centre = _nanmedian(window)
    mad = MAD_TO_SD * _nanmedian(np.abs(window - centre[:, None]))
    return np.asarray(np.where(enough, mad, np.nan))


def _fit(blocks: FloatArray, p: Params) -> FloatArray:
    """The likelihood's Gaussian fit (mean, sample sd) of each row of ``blocks`` (D,
    likelihood_blocks, 3: count, sum, sum of squares per block), NaN until a day of
    scores. Shape (D, 2)."""
    n, total, squares = blocks.sum(axis=1).T
    mean = total / n
    sd = np.sqrt(np.maximum(squares / n - mean**2, 0.0) * n / np.maximum(n - 1, 1))
    fit = np.stack([mean, sd], axis=1)
    return np.asarray(np.where((n >= p.period)[:, None], fit, np.nan))


class Detector:
    """Streaming seasonal median/MAD detector over N series (see the module docstring).

    Feed one bucket at a time with ``update(values)``, ``values`` of shape (N,) in event
    time order, NaN for a series with no value in that bucket (its state is left as is
    and nothing is flagged), or ``k`` buckets of one value per series with
    ``hold(rows, values, k)``. Raises ValueError on a wrongly shaped input.
    """

    STATE_KEYS = (
        "values",
        "residuals",
        "smoothed",
        "scale",
        "count",
        "since_alert",
        "lik_blocks",
        "lik_fit",
        "lik_count",
    )
    """The arrays of ``state()``, each with one row per series."""

    def __init__(self, n_series: int, params: Params | None = None) -> None:
        if n_series < 1:
            raise ValueError("n_series must be >= 1")
        self.params = params or Params()
        p = self.params
        self.n = n_series
        self.values = np.full((n_series, p.history), np.nan)  # ring, by count % history
        self.residuals = np.full((n_series, p.smooth), np.nan)  # ring, by count % smooth
        self.smoothed = np.full((n_series, p.scale_window), np.nan)  # ring, by count % window
        self.scale = np.full(n_series, np.nan)
        self.count = np.zeros(n_series, dtype=np.int64)  # buckets seen per series
        self.since_alert = np.full(n_series, np.iinfo(np.int64).max // 2, dtype=np.int64)
        # Anomaly likelihood: per block of ``likelihood_every`` scores, their count, sum
        # and sum of squares (ring, by lik_count // likelihood_every % blocks); the fitted
        # mean and standard deviation (NaN until a day of scores); scores recorded.
        self.lik_blocks = np.zeros((n_series, p.likelihood_blocks, 3))
        self.lik_fit = np.full((n_series, 2), np.nan)
        self.lik_count = np.zeros(n_series, dtype=np.int64)

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        """A copy of the state: ``{name: array with N rows}``, plus ``params`` as a 0-d
        object array holding the parameter dict. Slice rows to store one series."""
        out: dict[str, npt.NDArray[np.generic]] = {
            k: getattr(self, k).copy() for k in self.STATE_KEYS
        }
        out["params"] = np.array(asdict(self.params), dtype=object)
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, npt.NDArray[np.generic]]) -> Detector:
        """Rebuild a detector from ``state()`` (rows may be stacked from several series
        saved apart, all with the same parameters). Raises ValueError on mismatched shapes."""
        params = Params(**state["params"].item())
        n = int(np.asarray(state["count"]).shape[0])
        det = cls(n, params)
        for k in cls.STATE_KEYS:
            arr = np.asarray(state[k])
            if arr.shape != getattr(det, k).shape:
                raise ValueError(
                    f"state[{k!r}] has shape {arr.shape}, expected {getattr(det, k).shape}"
                )
            setattr(det, k, arr.astype(getattr(det, k).dtype, copy=True))
        return det

    def _forward(self, x: FloatArray) -> FloatArray:
        if self.params.transform == "anscombe":
            return np.asarray(2.0 * np.sqrt(np.maximum(x, 0.0) + 0.375))
        return x

    def _inverse(self, y: FloatArray) -> FloatArray:
        if self.params.transform == "anscombe":
            return np.asarray(np.maximum((np.maximum(y, 0.0) / 2.0) ** 2 - 0.375, 0.0))
        return y

    def _usual(self, score: FloatArray, scored: BoolArray) -> BoolArray:
        """The anomaly-likelihood test (Ahmad et al. 2017) for this bucket's scores, then
        the score recorded into the likelihood's window (rows in ``scored`` only).

        True where the score is not unusual for the series: ``max(score, 0)`` lies
        below ``mean + likelihood_z * sd`` of the recorded scores, i.e. its Gaussian tail
        probability exceeds ``likelihood_epsilon``. False while no fit exists."""
        p = self.params
        s = p.magnitude(score)
        with np.errstate(invalid="ignore"):
            usual = s < self.lik_fit[:, 0] + p.likelihood_z * self.lik_fit[:, 1]
        rows = np.flatnonzero(scored)
        if len(rows) == 0:
            return usual
        block = (self.lik_count[rows] // p.likelihood_every) % p.likelihood_blocks
        starts = self.lik_count[rows] % p.likelihood_every == 0
        self.lik_blocks[rows[starts], block[starts]] = 0.0
        x = s[rows]
        self.lik_blocks[rows, block] += np.stack([np.ones_like(x), x, x * x], axis=1)
        self.lik_count[rows] += 1
        due = rows[self.lik_count[rows] % p.likelihood_every == 0]
        if len(due):
            self.lik_fit[due] = _fit(self.lik_blocks[due], p)
        return usual

    def update(self, values: npt.ArrayLike) -> Step:
        """Take one bucket per series (shape (N,), the series' units, NaN = missing) and
        return the Step for that bucket. Side effect: advances the state of the series
        that had a value."""
        x = np.asarray(values, dtype=np.float64)
        if x.shape != (self.n,):
            raise ValueError(f"expected {self.n} values, got shape {x.shape}")
        p = self.params
        live = ~np.isnan(x)
        rows = np.arange(self.n)
        y = self._forward(x)

        lag_pos = (self.count[:, None] - p.lags[None, :]) % p.history
        past = np.take_along_axis(self.values, lag_pos, axis=1)
        past[self.count[:, None] < p.lags[None, :]] = np.nan  # not yet seen
        expected_y = _nanmedian(past)
        resid = y - expected_y

        self.values[rows[live], (self.count % p.history)[live]] = y[live]
        self.residuals[rows[live], (self.count % p.smooth)[live]] = resid[live]
        with np.errstate(invalid="ignore"):
            n_res = np.sum(~np.isnan(self.residuals), axis=1)
            smoothed = np.where(
                n_res > 0, np.nansum(self.residuals, axis=1) / np.maximum(n_res, 1), np.nan
            )
        has_smooth = live & ~np.isnan(smoothed)
        self.smoothed[rows[has_smooth], (self.count % p.scale_window)[has_smooth]] = smoothed[
            has_smooth
        ]

        due = live & ((self.count % p.scale_every == 0) | np.isnan(self.scale))
        if due.any():
            self.scale[due] = _scale_of(self.smoothed[due], p)
        scale = np.maximum(self.scale, p.noise_sd / np.sqrt(p.smooth))

        score = np.where(live, smoothed / scale, np.nan)
        level = resid / scale
        self.count[live] += 1
        self.since_alert[live] += 1
        warm = self.count > p.warmup
        usual = self._usual(score, live & warm & ~np.isnan(score))
        with np.errstate(invalid="ignore"):
            anomaly = (
                live
                & warm
                & (p.magnitude(score) >= p.threshold)
                & (p.magnitude(level) > p.threshold)
                & ~usual
                & (self.since_alert > p.refractory)
            )
        self.since_alert[anomaly] = 0
        band = p.threshold * scale
        return Step(
            score=np.where(warm, score, np.nan),
            anomaly=anomaly,
            expected=self._inverse(expected_y),
            low=self._inverse(expected_y - band),
            high=self._inverse(expected_y + band),
            level=level,
        )

    # ---- many buckets of one value at once ------------------------------------------------

    CHUNK_CELLS = 24_000
    """Buckets times series computed at once by ``hold`` (bounds its memory: ~15 MB)."""

    def hold(self, rows: npt.ArrayLike, values: npt.ArrayLike, k: int) -> Held:
        """Step ``k`` buckets in which each series of ``rows`` (shape (R,), distinct row
        indices) holds the value of ``values`` (shape (R,), NaN = missing, else finite),
        other series missing; return what ``k`` calls of ``update`` would have returned for
        those rows, and leave the state exactly as they would have (the same float64 bits).
        Cost: O(min(k, transient)) vectorised, not O(k) calls. Raises ValueError on bad
        shapes, repeated or out-of-range rows, an infinite value or ``k < 0``.

        Why it is exact. ``update`` is a fixed recurrence; with a constant input every
        quantity of a bucket is known in closed form from the state before the run:

        - a missing value changes no state and gives the same Step every bucket;
        - a live value ``v`` (``y = forward(v)``) writes ``y`` at ring position
          ``count % history``, so the lagged values of bucket ``t`` of the run are ``y``
          where the lag is at most ``t`` and the old ring's entry otherwise; the residual
          ring, the smoothed ring and the scale (re-estimated every ``scale_every``
          buckets, or every bucket while undefined) are likewise the old rings with the
          run's positions overwritten. These are computed for a chunk of buckets at once
          with the very numpy operations ``update`` uses, on arrays whose rows are the
          rings ``update`` would hold (row-wise reductions do not depend on the other
          rows: sums over the same row in the same order, medians by the same sort).
          The likelihood's block sums are the same sequential additions (``cumsum``),
          its fit the same function (``_fit``) at the same block ends; the refractory
          period is replayed over the few buckets that pass every other test;
        - a MAD scale whose window holds more zeros than half its numbers is exactly
          ``+0.0`` (both middle order statistics of the window, and of its absolute
          deviations, are zeros), so such windows are not sorted;
        - once the value ring holds only ``y``, the residual and smoothed rings only the
          values a ring of ``y`` gives, and the scale the value those give (checked bit
          for bit, ``_steady``), a bucket leaves rings and scale as they are and gives the
          same Step; if that Step's score is below the threshold, no bucket of the rest
          is flagged, so the rest only advances the counters and records the same score
          ``k`` more times in the likelihood's blocks (whose ring is rewritten whole after
          ``likelihood_blocks`` blocks, so at most that many are replayed: ``_lik_record``).

        A zero count after a burst reaches that steady state within ``history + smooth +
        scale_window`` buckets (about 14 days); a long empty run costs that, not its
        length. Checked bucket for bucket against ``update`` in tests/test_anomaly.py.
        """
        r = np.asarray(rows, dtype=np.int64)
        x = np.asarray(values, dtype=np.float64)
        if r.ndim != 1 or x.shape != r.shape:
            raise ValueError(f"rows {r.shape} and values {x.shape} must be alike and 1-D")
        if len(np.unique(r)) != len(r) or ((r < 0) | (r >= self.n)).any():
            raise ValueError("rows must be distinct row indices of this detector")
        if np.isinf(x).any() or k < 0:
            raise ValueError("values must be finite or NaN, and k >= 0")
        n_rows = len(r)
        tail = Step(
            score=np.full(n_rows, np.nan),
            anomaly=np.zeros(n_rows, dtype=bool),
            expected=np.full(n_rows, np.nan),
            low=np.full(n_rows, np.nan),
            high=np.full(n_rows, np.nan),
            level=np.full(n_rows, np.nan),
        )
        lengths = np.zeros(n_rows, dtype=np.int64)
        missing = np.flatnonzero(np.isnan(x))
        if len(missing):
            _put(tail, missing, self._missing(r[missing]))
        y = self._forward(x)
        cols = np.flatnonzero(~np.isnan(x))
        pieces: list[tuple[int, npt.NDArray[np.int64], Step]] = []
        done = 0
        while len(cols) and done < k:
            steady = self._steady(r[cols], y[cols])
            if steady.any():
                still = cols[steady]
                repeat = self._chunk(r[still], y[still], 1, commit=False)
                _put(tail, still, Step(**{f: getattr(repeat, f)[0] for f in _FIELDS}))
                self._skip(r[still], repeat.score[0], k - done)
                lengths[still] = done
                cols = cols[~steady]
                if not len(cols):
                    break
            c = min(k - done, self.params.scale_window, max(1, self.CHUNK_CELLS // len(cols)))
            pieces.append((done, cols, self._chunk(r[cols], y[cols], c)))
            done += c
        lengths[cols] = done
        m = int(lengths.max()) if n_rows else 0
        head = {f: np.repeat(getattr(tail, f)[None, :], m, axis=0) for f in _FIELDS}
        for start, at, step in pieces:
            for f in _FIELDS:
                head[f][start : start + len(step.score), at] = getattr(step, f)
        return Held(k=k, head=Step(**head), tail=tail)

    def _missing(self, rows: npt.NDArray[np.int64]) -> Step:
        """The Step ``update`` gives ``rows`` for a missing value (no state changes)."""
        p = self.params
        count = self.count[rows]
        lag_pos = (count[:, None] - p.lags[None, :]) % p.history
        past = np.take_along_axis(self.values[rows], lag_pos, axis=1)
        past[count[:, None] < p.lags[None, :]] = np.nan
        expected_y = _nanmedian(past)
        band = p.threshold * np.maximum(self.scale[rows], p.noise_sd / np.sqrt(p.smooth))
        return Step(
            score=np.full(len(rows), np.nan),
            anomaly=np.zeros(len(rows), dtype=bool),
            expected=self._inverse(expected_y),
            low=self._inverse(expected_y - band),
            high=self._inverse(expected_y + band),
            level=np.full(len(rows), np.nan),
        )

    def _steady(self, rows: npt.NDArray[np.int64], y: FloatArray) -> BoolArray:
        """Which ``rows`` are in the steady state of a constant transformed value ``y``
        (shape (R,)): value ring all ``y``, residual and smoothed rings all what a ring of
        ``y`` gives, the scale what a window of those gives (bit for bit), warmed up,
        and a finite score below the threshold (so the Step repeats and flags nothing)."""
        p = self.params
        n_rows = len(rows)
        resid, smoothed, scale, score = (
            np.array([_steady_rings(p, bits) for bits in y.view(np.int64).tolist()])
            .reshape(n_rows, 4)
            .T
        )

        def same(a: FloatArray, b: FloatArray) -> BoolArray:
            return np.asarray(a.view(np.int64) == b.reshape(n_rows, -1).view(np.int64))

        with np.errstate(invalid="ignore"):
            return np.asarray(
                same(self.values[rows], y).all(axis=1)
                & same(self.residuals[rows], resid).all(axis=1)
                & same(self.smoothed[rows], smoothed).all(axis=1)
                & same(self.scale[rows][:, None], scale)[:, 0]
                & ~np.isnan(smoothed)
                & (self.count[rows] > p.warmup)
                & np.isfinite(score)
                & (p.magnitude(score) < p.threshold)
            )

    def _skip(self, rows: npt.NDArray[np.int64], score: FloatArray, k: int) -> None:
        """Advance steady ``rows`` (``_steady``) by ``k`` buckets whose score is ``score``
        (shape (R,)): counters, and ``k`` records of the score in the likelihood."""
        p = self.params
        self.count[rows] += k
        self.since_alert[rows] += k
        recorded = p.magnitude(score)
        for i, row in enumerate(rows):
            s = recorded[i]
            count, blocks, fit, _ = _lik_record(
                p,
                int(self.lik_count[row]),
                self.lik_blocks[row].copy(),
                self.lik_fit[row].copy(),
                float(s),
                k,
                want_fits=False,
            )
            self.lik_count[row], self.lik_blocks[row], self.lik_fit[row] = count, blocks, fit

    def _chunk(
        self, rows: npt.NDArray[np.int64], y: FloatArray, c: int, *, commit: bool = True
    ) -> Step:
        """``c`` buckets (at most ``scale_window``) of the live transformed value ``y``
        (shape (R,)) for ``rows``, computed at once: the Steps (arrays of shape (c, R))
        ``update`` would give, and (``commit``) the state it would leave."""
        p = self.params
        n_rows = len(rows)
        at = np.arange(n_rows)
        t = np.arange(c)
        count0 = self.count[rows]
        count = count0[None, :] + t[:, None]  # (c, R): ``count`` before each bucket

        expected_y = self._expected(rows, y, c)
        resid = y[None, :] - expected_y

        # The residual ring after each bucket: position j holds the run's latest residual
        # written there (buckets t' = j - count0 mod smooth), else the old entry.
        j = np.arange(p.smooth)
        back = (t[:, None, None] - (j[None, None, :] - count0[None, :, None])) % p.smooth
        last = t[:, None, None] - back
        ring = np.where(
            last >= 0,
            resid[np.maximum(last, 0), at[None, :, None]],
            self.residuals[rows][None, :, :],
        )
        with np.errstate(invalid="ignore"):
            n_res = np.sum(~np.isnan(ring), axis=-1)
            smoothed = np.where(n_res > 0, np.nansum(ring, axis=-1) / np.maximum(n_res, 1), np.nan)

        # The smoothed ring (c <= scale_window: no position is written twice) and scale.
        written = ~np.isnan(smoothed)
        wpos = count % p.scale_window
        windows = self.smoothed[rows]
        scale_t = np.empty((c, n_rows))
        for i in range(n_rows):
            scale_t[:, i] = self._scales(
                windows[i],
                self.scale[rows[i]],
                smoothed[:, i],
                written[:, i],
                wpos[:, i],
                count[:, i],
            )
            windows[i, wpos[written[:, i], i]] = smoothed[written[:, i], i]
        scale = np.maximum(scale_t, p.noise_sd / np.sqrt(p.smooth))
        score = smoothed / scale
        level = resid / scale
        warm = count + 1 > p.warmup

        # The likelihood: the fit in force at each bucket, and the blocks after the run.
        recorded = warm & ~np.isnan(score)
        s = p.magnitude(score)
        fit_t = np.empty((c, n_rows, 2))
        lik = []
        for i, row in enumerate(rows):
            scored = np.flatnonzero(recorded[:, i])
            count_i, blocks, fit, fits = _lik_record(
                p,
                int(self.lik_count[row]),
                self.lik_blocks[row].copy(),
                self.lik_fit[row].copy(),
                s[scored, i],
                len(scored),
                want_fits=True,
            )
            assert fits is not None
            before = np.concatenate([fits, fit[None, :]])
            fit_t[:, i] = before[np.searchsorted(scored, t)]
            lik.append((count_i, blocks, fit))
        with np.errstate(invalid="ignore"):
            usual = s < fit_t[..., 0] + p.likelihood_z * fit_t[..., 1]
            candidate = warm & (s >= p.threshold) & (p.magnitude(level) > p.threshold) & ~usual

        # The refractory period, over the few candidates.
        anomaly = np.zeros((c, n_rows), dtype=bool)
        since = self.since_alert[rows].copy()
        for i in range(n_rows):
            alerted: int | None = None
            for b in np.flatnonzero(candidate[:, i]):
                gap = int(since[i]) + int(b) + 1 if alerted is None else int(b) - alerted
                if gap > p.refractory:
                    anomaly[b, i] = True
                    alerted = int(b)
            since[i] = int(since[i]) + c if alerted is None else c - 1 - alerted

        if commit:
            self.values[rows[None, :], count % p.history] = y[None, :]
            self.residuals[rows] = ring[-1]
            self.smoothed[rows] = windows
            self.scale[rows] = scale_t[-1]
            self.count[rows] += c
            self.since_alert[rows] = since
            for row, (count_i, blocks, fit) in zip(rows, lik, strict=True):
                self.lik_count[row], self.lik_blocks[row], self.lik_fit[row] = count_i, blocks, fit
        band = p.threshold * scale
        return Step(
            score=np.where(warm, score, np.nan),
            anomaly=anomaly,
            expected=self._inverse(expected_y),
            low=self._inverse(expected_y - band),
            high=self._inverse(expected_y + band),
            level=level,
        )

    def _expected(self, rows: npt.NDArray[np.int64], y: FloatArray, c: int) -> FloatArray:
        """The transformed expected value of each of ``c`` buckets of the live value ``y``
        (shape (R,)) for ``rows``: shape (c, R). As ``update``: the median of the lagged
        values, which are ``y`` where the lag falls in the run, else the ring's.

        A bucket all of whose lagged values are ``y`` (bit for bit) has the median of a
        row of ``y``; only the buckets that read a ring position not holding ``y`` (at
        most one bucket per position and lag: lag ``l`` reads position ``b`` at bucket
        ``(b + l - count) % history``, if that is below ``l``) or a lag not yet seen
        (``count + t < history``) are gathered and sorted."""
        p = self.params
        lags = p.lags
        out = np.empty((c, len(rows)))
        out[:] = _nanmedian(np.repeat(y[:, None], len(lags), axis=1))[None, :]
        for i, row in enumerate(rows):
            count = int(self.count[row])
            ring = self.values[row]
            odd = np.flatnonzero(ring.view(np.int64) != y[i : i + 1].view(np.int64))
            reads = (odd[:, None] + lags[None, :] - count) % p.history
            seen = reads[reads < np.minimum(lags, c)[None, :]]
            at = np.union1d(seen, np.arange(min(c, max(0, p.history - count))))
            if not len(at):
                continue
            now = count + at
            past = ring[(now[:, None] - lags[None, :]) % p.history]
            past = np.where(lags[None, :] <= at[:, None], y[i], past)
            past[now[:, None] < lags[None, :]] = np.nan
            out[at, i] = _nanmedian(past)
        return out

    def _scales(
        self,
        window: FloatArray,
        scale0: float,
        smoothed: FloatArray,
        written: BoolArray,
        wpos: npt.NDArray[np.int64],
        count: npt.NDArray[np.int64],
    ) -> FloatArray:
        """One series' scale after each bucket of a chunk (shape (c,)): re-estimated
        where ``update`` would (every ``scale_every`` buckets, every bucket while it is
        NaN) from the smoothed ring as it stands then: ``window`` (before the chunk)
        with ``smoothed`` written at ``wpos`` where ``written``."""
        p = self.params
        c = len(smoothed)
        t = np.arange(c)
        old = window[wpos]
        numbers = np.count_nonzero(~np.isnan(window)) + np.cumsum(written & np.isnan(old))
        zeros = np.count_nonzero(window == 0) + np.cumsum(
            written.astype(np.int64) * ((smoothed == 0).astype(np.int64) - (old == 0))
        )
        enough = numbers >= p.period // 2
        periodic = count % p.scale_every == 0

        def estimate(at: npt.NDArray[np.int64]) -> FloatArray:
            out = np.full(len(at), np.nan)
            flat = enough[at] & (zeros[at] > numbers[at] // 2)
            out[flat] = 0.0  # more zeros than half the numbers: median and MAD are +0.0
            sort = enough[at] & ~flat
            if sort.any():
                upto = at[sort]
                wins = np.repeat(window[None, :], len(upto), axis=0)
                newer = written[None, :] & (t[None, :] <= upto[:, None])
                wins[:, wpos] = np.where(newer, smoothed[None, :], window[wpos][None, :])
                out[sort] = _scale_of(wins, p)
            return out

        due_at: list[npt.NDArray[np.int64]] = []
        due_val: list[FloatArray] = []
        current, start = float(scale0), 0
        while start < c:
            if np.isnan(current):  # due every bucket; NaN until enough numbers
                ready = np.flatnonzero(enough[start:])
                at = ready[:1] + start
            else:
                at = np.flatnonzero(periodic[start:]) + start
            if not len(at):
                break
            val = estimate(at)
            undefined = np.flatnonzero(np.isnan(val))
            if len(undefined) and not np.isnan(current):
                at, val = at[: undefined[0] + 1], val[: undefined[0] + 1]
            due_at.append(at)
            due_val.append(val)
            current, start = float(val[-1]), int(at[-1]) + 1
        if not due_at:
            return np.full(c, scale0)
        at, val = np.concatenate(due_at), np.concatenate(due_val)
        latest = np.searchsorted(at, t, side="right") - 1
        return np.where(latest >= 0, val[np.maximum(latest, 0)], scale0)


_FIELDS = ("score", "anomaly", "expected", "low", "high", "level")


def _put(step: Step, cols: npt.NDArray[np.int64], values: Step) -> None:
    """Write ``values`` (arrays of shape (len(cols),)) into ``step``'s arrays at ``cols``."""
    for f in _FIELDS:
        getattr(step, f)[cols] = getattr(values, f)


@functools.lru_cache(maxsize=64)
def _steady_rings(p: Params, y_bits: int) -> tuple[float, float, float, float]:
    """The steady state of a live value whose transform has the float64 bits ``y_bits``
    (``Detector._steady``): the residual, smoothed residual and scale rings full of one
    value, and the score, computed as ``update`` computes them (on rows of one value)."""
    y = np.array([y_bits], dtype=np.int64).view(np.float64)
    expected_y = _nanmedian(np.repeat(y[:, None], len(p.lags), axis=1))
    resid = y - expected_y
    ring = np.repeat(resid[:, None], p.smooth, axis=1)
    with np.errstate(invalid="ignore"):
        n_res = np.sum(~np.isnan(ring), axis=1)
        smoothed = np.where(n_res > 0, np.nansum(ring, axis=1) / np.maximum(n_res, 1), np.nan)
    scale = _scale_of(np.repeat(smoothed[:, None], p.scale_window, axis=1), p)
    score = smoothed / np.maximum(scale, p.noise_sd / np.sqrt(p.smooth))
    return float(resid[0]), float(smoothed[0]), float(scale[0]), float(score[0])


def _lik_record(
    p: Params,
    count: int,
    blocks: FloatArray,
    fit: FloatArray,
    scores: FloatArray | float,
    n: int,
    *,
    want_fits: bool,
) -> tuple[int, FloatArray, FloatArray, FloatArray | None]:
    """Record ``n`` scores (``scores``: shape (n,), or one score ``n`` times) into one
    series' likelihood window as ``Detector._usual`` does one at a time: ``count``
    scores recorded so far, ``blocks`` (likelihood_blocks, 3), ``fit`` (2,). Returns
    the new count, blocks and fit, and (``want_fits``) the fit in force before each
    record, shape (n, 2).

    The records fall in segments, one per block: the current block's rest, then whole
    blocks. A block's sums are the same sequential float additions (``cumsum`` along
    the segment, from the block's sums or from 0.0 at a block's first score: the reset),
    the fit the same ``_fit`` at each block end. Without ``want_fits``, whole blocks that
    ``likelihood_blocks`` later whole blocks overwrite (every block is reset at its first
    score) are skipped: the final blocks and fit do not depend on them."""
    every, nblocks = p.likelihood_every, p.likelihood_blocks
    first = min(-count % every, n)
    skip = 0 if want_fits else max(0, (n - first) // every - nblocks) * every
    starts = np.array(([0] if first else []) + list(range(first + skip, n, every)), np.int64)
    if not len(starts):
        return count + n, blocks, fit, np.empty((0, 2)) if want_fits else None
    ends = np.append(starts[1:], n)
    ends[0] = first if first else ends[0]
    lengths = ends - starts
    index = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)])
    x = scores[index] if isinstance(scores, np.ndarray) else np.full(len(index), scores)
    segment = np.repeat(np.arange(len(starts)), lengths)
    place = index - np.repeat(starts, lengths) + 1
    acc = np.zeros((len(starts), every + 1, 3))
    at = (count + starts) // every % nblocks
    resumed = (count + starts) % every != 0
    acc[resumed, 0] = blocks[at[resumed]]
    acc[segment, place, 0], acc[segment, place, 1], acc[segment, place, 2] = 1.0, x, x * x
    sums = np.cumsum(acc, axis=1)[np.arange(len(starts)), lengths]
    closed = (count + ends) % every == 0
    states = []
    for s, b in enumerate(at):
        blocks[b] = sums[s]
        if closed[s]:
            states.append(blocks.copy())
    fits_after = _fit(np.stack(states), p) if states else np.empty((0, 2))
    before = np.concatenate([fit[None, :], fits_after])  # segments but the last close
    fits = np.repeat(before[: len(starts)], lengths, axis=0) if want_fits else None
    return count + n, blocks, before[-1].copy(), fits


@dataclass(frozen=True)
class SeriesResult:
    """A whole series run through the detector; arrays of shape (n,) like ``Step``."""

    score: FloatArray
    anomaly: BoolArray
    expected: FloatArray
    low: FloatArray
    high: FloatArray

    def anomaly_score(self, threshold: float) -> FloatArray:
        """The score mapped to [0, 1] for NAB result files: ``clip(z / (2 threshold))``,
        so 0.5 is the detector's threshold; 0 where the score is undefined."""
        return np.clip(np.nan_to_num(self.score, nan=0.0) / (2.0 * threshold), 0.0, 1.0)


def detect_series(values: npt.ArrayLike, params: Params | None = None) -> SeriesResult:
    """Run a fresh detector over one regularly bucketed series, shape (n,), oldest first
    (NaN for an empty bucket; a gap must be a NaN, not a missing row, for the daily
    seasonality to line up). Returns per-bucket scores, decisions and bands."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D series, got shape {x.shape}")
    det = Detector(1, params)
    steps = [det.update(x[i : i + 1]) for i in range(len(x))]

    def col(name: str) -> FloatArray:
        if not steps:
            return np.zeros(0)
        return np.concatenate([getattr(s, name) for s in steps])

    return SeriesResult(
        score=col("score"),
        anomaly=col("anomaly").astype(bool),
        expected=col("expected"),
        low=col("low"),
        high=col("high"),
    )
