"""Numenta Anomaly Benchmark (NAB) scoring, reimplemented in plain Python and numpy.

Source: Lavin & Ahmad, "Evaluating Real-time Anomaly Detection Algorithms: the Numenta
Anomaly Benchmark", IEEE ICMLA 2015 (arXiv:1510.03336), and NAB v1.1's scorer
(``nab/sweeper.py``: ``Sweeper.calcSweepScore`` / ``calcScoreByThreshold``;
``nab/runner.py``: ``Runner.normalize``). The rules, per data file of ``n`` rows:

- The probationary period is the first ``min(floor(0.15 * n), 0.15 * 5000)`` rows; rows in
  it are not scored at all (neither detections nor windows that lie wholly inside it).
- Scaled sigmoid: ``sigma(y) = 2 / (1 + exp(5 y)) - 1``, and ``-1`` for ``y >= 3``.
- Inside a window of ``w`` rows ending at row ``r``, only the first detection counts, worth
  ``A_tp * sigma(-(r - i + 1) / w) / sigma(-1)``: exactly ``A_tp`` at the window's first
  row, falling towards 0 at its last. A window with no detection costs ``-A_fn``.
- A detection outside every window is a false positive worth ``A_fp * sigma(y)``, where
  ``y = |r_prev - i| / (w_prev - 1)`` is its distance past the end of the preceding window
  (so a detection just after a window costs little), and ``-A_fp`` when no window
  precedes it in the file.
- A file's raw score is the sum. Scores are normalised as
  ``100 * (S - S_null) / (S_perfect - S_null)``, where the null detector flags nothing
  (``S_null = -A_fn * windows``) and the perfect detector hits every window at its first
  row (``S_perfect = A_tp * windows``). A corpus is normalised on the sums of its files.

Nothing here touches the database; everything is a pure function of its arguments.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

PROBATION_PERCENT = 0.15
"""NAB's probationary fraction of each file (``Runner(probationaryPercent=0.15)``)."""

Window = tuple[datetime, datetime]


class NabDataError(ValueError):
    """A NAB file (series, windows, profiles) is missing or malformed."""


@dataclass(frozen=True)
class Profile:
    """One NAB application profile: the weights of its cost matrix."""

    name: str
    tp_weight: float
    fp_weight: float
    fn_weight: float


@dataclass(frozen=True)
class FileScore:
    """The NAB score of one data file under one profile.

    ``score`` is the raw sum; ``null`` and ``perfect`` are the raw scores of the null and
    the perfect detector on the same file; ``tp``/``fp`` count scored detections inside
    and outside windows; ``windows`` the scored windows, ``detected`` how many of them
    hold a detection.
    """

    score: float
    null: float
    perfect: float
    tp: int
    fp: int
    windows: int
    detected: int

    @property
    def normalized(self) -> float:
        """``100 * (score - null) / (perfect - null)``; 0.0 for a file without windows."""
        return normalize(self.score, self.null, self.perfect)


def normalize(score: float, null: float, perfect: float) -> float:
    """NAB's normalisation (``Runner.normalize``): 0 for the null detector, 100 for the
    perfect one. Returns 0.0 when ``perfect == null`` (no windows to score)."""
    if perfect == null:
        return 0.0
    return 100.0 * (score - null) / (perfect - null)


def scaled_sigmoid(position: float) -> float:
    """NAB's scaled sigmoid ``2 / (1 + exp(5 y)) - 1``, clamped to -1 for ``y >= 3``.

    ``y = -1`` is a window's first row (0.98661), ``y = 0`` its end (0.0), ``y = 1`` one
    window-length past its end (-0.98661).
    """
    if position >= 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


def probationary_length(n_rows: int, percent: float = PROBATION_PERCENT) -> int:
    """Rows at the start of a file that NAB does not score:
    ``min(floor(percent * n_rows), percent * 5000)`` (``Sweeper._getProbationaryLength``)."""
    return int(min(math.floor(percent * n_rows), percent * 5000))


def window_bounds(
    timestamps: Sequence[datetime], windows: Sequence[Window]
) -> list[tuple[int, int]]:
    """Row indices ``(first, last)`` of each window: the rows with ``start <= t <= end``.

    Windows are returned in time order. Raises NabDataError for a window with no row.
    """
    ts = np.array([t.timestamp() for t in timestamps])
    bounds = []
    for start, end in sorted(windows):
        first = int(np.searchsorted(ts, start.timestamp(), side="left"))
        last = int(np.searchsorted(ts, end.timestamp(), side="right")) - 1
        if last < first:
            raise NabDataError(f"window {start} .. {end} holds no row of the series")
        bounds.append((first, last))
    return bounds


def score_file(
    timestamps: Sequence[datetime],
    detections: npt.ArrayLike,
    windows: Sequence[Window],
    profile: Profile,
    probation_percent: float = PROBATION_PERCENT,
) -> FileScore:
    """Score one file's 0/1 detections the way NAB's ``Sweeper`` does at a fixed threshold.

    ``timestamps``: ``n`` increasing datetimes; ``detections``: shape ``(n,)``, truthy where
    the detector flags an anomaly; ``windows``: the file's labelled ``(start, end)`` windows
    (inclusive). Raises NabDataError when the lengths differ or a window holds no row.
    """
    flags = np.asarray(detections).astype(bool)
    n = len(timestamps)
    if flags.shape != (n,):
        raise NabDataError(f"{flags.shape[0] if flags.ndim else 0} detections for {n} rows")
    return score_rows(flags, window_bounds(timestamps, windows), profile, probation_percent)


def score_rows(
    flags: npt.NDArray[np.bool_],
    bounds: Sequence[tuple[int, int]],
    profile: Profile,
    probation_percent: float = PROBATION_PERCENT,
) -> FileScore:
    """``score_file`` on row indices: ``flags`` of shape ``(n,)`` and the windows' row
    bounds ``(first, last)`` in time order (``window_bounds``). For scoring many
    detections of one file without converting its timestamps each time."""
    n = len(flags)
    probation = probationary_length(n, probation_percent)
    max_tp = scaled_sigmoid(-1.0)

    score = 0.0
    tp = fp = scored_windows = detected = 0
    covered = np.zeros(n, dtype=bool)
    for first, last in bounds:
        covered[first : last + 1] = True
        if last < probation:
            continue  # wholly probationary: NAB never scores it
        scored_windows += 1
        width = last - first + 1
        hits = np.flatnonzero(flags[max(first, probation) : last + 1]) + max(first, probation)
        tp += len(hits)
        if len(hits) == 0:
            score -= profile.fn_weight
            continue
        detected += 1
        position = -(last - int(hits[0]) + 1) / width
        score += scaled_sigmoid(position) * profile.tp_weight / max_tp

    ends = np.array([last for _, last in bounds], dtype=int)
    widths = np.array([last - first + 1 for first, last in bounds], dtype=int)
    for i in np.flatnonzero(flags & ~covered):
        if i < probation:
            continue
        fp += 1
        preceding = np.flatnonzero(ends < i)
        if len(preceding) == 0:
            score -= profile.fp_weight
            continue
        j = int(preceding[-1])
        # A one-row window has width - 1 == 0: NAB divides by zero there (inf -> -1).
        span = widths[j] - 1
        position = abs(int(ends[j]) - int(i)) / span if span > 0 else math.inf
        score += scaled_sigmoid(position) * profile.fp_weight

    return FileScore(
        score=score,
        null=-profile.fn_weight * scored_windows,
        perfect=profile.tp_weight * scored_windows,
        tp=tp,
        fp=fp,
        windows=scored_windows,
        detected=detected,
    )


@dataclass(frozen=True)
class CorpusScore:
    """NAB scores of a set of files under one profile: the normalised total and each file."""

    profile: str
    score: float
    null: float
    perfect: float
    files: Mapping[str, FileScore]

    @property
    def normalized(self) -> float:
        """The corpus figure NAB reports: ``normalize`` applied to the summed raw scores."""
        return normalize(self.score, self.null, self.perfect)


def score_corpus(
    files: Mapping[str, tuple[Sequence[datetime], npt.ArrayLike]],
    windows: Mapping[str, Sequence[Window]],
    profile: Profile,
    probation_percent: float = PROBATION_PERCENT,
) -> CorpusScore:
    """Score every file (``name -> (timestamps, detections)``) against ``windows[name]``.

    Raises NabDataError when a file has no entry in ``windows``.
    """
    scores: dict[str, FileScore] = {}
    for name, (timestamps, detections) in files.items():
        if name not in windows:
            raise NabDataError(f"no labelled windows for {name}")
        scores[name] = score_file(timestamps, detections, windows[name], profile, probation_percent)
    return CorpusScore(
        profile=profile.name,
        score=sum(s.score for s in scores.values()),
        null=sum(s.null for s in scores.values()),
        perfect=sum(s.perfect for s in scores.values()),
        files=scores,
    )


def _parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise NabDataError(f"bad timestamp {text!r}") from exc


def load_profiles(path: Path) -> dict[str, Profile]:
    """Read NAB's ``config/profiles.json`` (``{name: {"CostMatrix": {...Weight}}}``).

    Raises NabDataError when the file is missing or a weight is absent.
    """
    try:
        raw = json.loads(Path(path).read_text())
        return {
            name: Profile(
                name=name,
                tp_weight=float(body["CostMatrix"]["tpWeight"]),
                fp_weight=float(body["CostMatrix"]["fpWeight"]),
                fn_weight=float(body["CostMatrix"]["fnWeight"]),
            )
            for name, body in raw.items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NabDataError(f"cannot read NAB profiles from {path}: {exc}") from exc


def load_windows(path: Path) -> dict[str, list[Window]]:
    """Read NAB's ``labels/combined_windows.json``: ``"realTweets/<file>.csv" -> [[start,
    end], ...]`` with timestamps like ``2015-03-03 04:37:53.000000`` (naive, UTC).

    Raises NabDataError when the file is missing or malformed.
    """
    try:
        raw = json.loads(Path(path).read_text())
        return {
            name: [(_parse_time(a), _parse_time(b)) for a, b in limits]
            for name, limits in raw.items()
        }
    except (OSError, ValueError, TypeError) as exc:
        raise NabDataError(f"cannot read NAB windows from {path}: {exc}") from exc


def load_series(path: Path) -> tuple[list[datetime], npt.NDArray[np.float64]]:
    """Read a NAB data file (``timestamp,value`` with a header row).

    Returns the timestamps and the values, shape ``(n,)``. Raises NabDataError when the
    file is missing, empty or malformed.
    """
    try:
        with Path(path).open(newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise NabDataError(f"cannot read {path}: {exc}") from exc
    if len(rows) < 2 or [c.strip() for c in rows[0][:2]] != ["timestamp", "value"]:
        raise NabDataError(f"{path}: expected a 'timestamp,value' header and rows")
    try:
        timestamps = [_parse_time(r[0]) for r in rows[1:]]
        values = np.array([float(r[1]) for r in rows[1:]], dtype=np.float64)
    except (IndexError, ValueError) as exc:
        raise NabDataError(f"{path}: malformed row: {exc}") from exc
    return timestamps, values
