"""``evaluate anomaly --nab DIR``: run the anomaly detector over every category folder of a
NAB corpus and score its own 0/1 decisions with NAB's scorer (``mlengine.evaluation.nab``).

Reads ``DIR/<category>/*.csv`` for every folder that holds ``.csv`` files (``realTweets``,
``realKnownCause``, ``artificialNoAnomaly``, ...), ``DIR/labels/combined_windows.json``
(keys ``<category>/<file>.csv``) and ``DIR/config/profiles.json``. Optionally writes
NAB-format result files ``OUTDIR/<category>/<detector>_<file>.csv``
(``timestamp,value,anomaly_score,label``).

NAB's series are not all 5-minute counts, so the harness fits the detector's units to
each series from the series alone (``series_params``), with the same knobs (``Knobs``:
threshold, smoothing, likelihood epsilon, refractory days, direction) for every file:

- ``period``: buckets per day from the median spacing of the timestamps (288 for 5
  minutes, 48 for 30, 24 for an hour); rows are taken in order, as buckets, even where
  the spacing is irregular (realTraffic);
- ``transform``: Anscombe's where every value is a non-negative integer (counts), none
  otherwise; the noise floor ``noise_sd`` is 1 after Anscombe's (Poisson), and for other
  series ``noise_frac`` times the robust standard deviation of the first differences over
  the probationary rows (NAB's first 15%, which a detector may learn from), so the floor
  is in the series' own units;
- ``slot_spread`` about 10 minutes, ``scale_every`` about an hour, ``warmup`` a day,
  ``refractory`` ``refractory_days`` days, ``likelihood_every`` about 8 hours (a divisor
  of the likelihood's window), all converted to buckets of the series' spacing.

The production stage's count series (5-minute buckets, Anscombe's) get ``Params()``,
the same as ``series_params`` gives a 5-minute count series with the default ``Knobs``.

``search`` chooses the knobs on a corpus: a small grid, each file's detector run once per
structural setting (``smooth``, ``direction``, ``noise_frac``) and recorded (``trace``),
then every decision setting (threshold, epsilon, refractory) applied to the recorded
scores (``decide``: the detector's own rule, bit for bit), scored with NAB's standard
profile on the whole corpus, and again leaving each realTweets file out in turn.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from mlengine.anomalies import detector
from mlengine.evaluation import nab

DETECTOR_NAME = "twiscopeSeasonalMad"
"""The detector's name in result file names (NAB names must not contain ``_``)."""

PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")

TWEETS = "realTweets"
"""The category of Twitter volume series: the one the leave-one-out check holds out."""

SCOREBOARD: dict[str, tuple[float, float, float]] = {
    "ARTime": (74.9, 65.1, 80.4),
    "Numenta HTM": (70.5, 62.6, 75.2),
    "CAD OSE": (69.9, 67.0, 73.2),
    "KNN CAD": (58.0, 43.4, 64.8),
    "Relative Entropy": (54.6, 47.6, 58.8),
    "Random Cut Forest": (51.7, 38.4, 59.7),
    "Twitter ADVec": (47.1, 33.6, 53.5),
    "Windowed Gaussian": (39.6, 20.9, 47.4),
    "Etsy Skyline": (35.7, 27.1, 44.5),
}
"""NAB's published scoreboard over its whole corpus (58 files, 10 of them realTweets),
standard / reward_low_FP_rate / reward_low_FN_rate (NAB README, numenta/NAB). Published
per-category figures are not part of the data folder, so none are printed."""


@dataclass(frozen=True)
class Knobs:
    """The detector's settings for a whole corpus, in units free of a series' spacing.

    ``threshold``: robust z; ``smooth``: buckets averaged; ``likelihood_epsilon``: the
    likelihood's tail probability; ``refractory_days``: days without another detection;
    ``direction``: ``"up"`` (rises only, production) or ``"both"``; ``noise_frac``: the
    noise floor of a non-count series as a fraction of its probationary noise."""

    threshold: float = 5.5
    smooth: int = 9
    likelihood_epsilon: float = 1e-5
    refractory_days: float = 1.0
    direction: Literal["up", "both"] = "up"
    noise_frac: float = 0.5


CHOSEN = Knobs(
    threshold=1.5,
    smooth=12,
    likelihood_epsilon=1e-4,
    refractory_days=0.25,
    direction="both",
    noise_frac=4.0,
)
"""The knobs ``evaluate anomaly`` runs with: chosen by ``search`` on NAB's 53 public series
(the grid setting whose neighbourhood scores best on the whole corpus, standard profile;
each leave-one-out fold over the realTweets files chose the same; docs/detectors.md). A
low robust threshold: NAB's standard profile charges a false positive 0.11 and a missed
window 1, and the likelihood gate does most of the deciding."""


@dataclass(frozen=True)
class NabRun:
    """Where the NAB files are, as checked by ``locate``: ``series`` maps each file's
    key ``<category>/<file>.csv`` to its path, in sorted order."""

    series: dict[str, Path]
    windows: Path
    profiles: Path


def locate(nab_dir: Path) -> NabRun:
    """Check a NAB folder's layout: every sub-folder holding ``.csv`` files is a category.
    Raises NabDataError naming what is missing."""
    root = Path(nab_dir)
    if not root.is_dir():
        raise nab.NabDataError(f"no NAB folder at {nab_dir}")
    series = {
        f"{path.parent.name}/{path.name}": path
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(folder.glob("*.csv"))
    }
    if not series:
        raise nab.NabDataError(f"no category folder with .csv files in {nab_dir}")
    windows = root / "labels" / "combined_windows.json"
    profiles = root / "config" / "profiles.json"
    for path in (windows, profiles):
        if not path.is_file():
            raise nab.NabDataError(f"missing {path}")
    return NabRun(series=series, windows=windows, profiles=profiles)


def _divisor_near(total: int, target: int) -> int:
    """The largest divisor of ``total`` that is at most ``target`` (at least 1)."""
    return max(d for d in range(1, max(1, target) + 1) if total % d == 0)


def series_params(
    timestamps: Sequence[datetime], values: npt.NDArray[np.float64], knobs: Knobs = CHOSEN
) -> detector.Params:
    """The detector's parameters for one NAB series (``timestamps``: n >= 2 increasing
    datetimes; ``values``: shape (n,)), as the module docstring says: period from the
    median spacing, transform and noise floor from the values and the probationary rows.
    Raises NabDataError for fewer than two rows or a non-increasing spacing."""
    if len(timestamps) < 2:
        raise nab.NabDataError("a series needs at least two rows")
    spacing = float(np.median(np.diff([t.timestamp() for t in timestamps])))
    if spacing <= 0:
        raise nab.NabDataError("timestamps must increase")
    period = max(1, round(86_400 / spacing))
    counts = bool(np.all(values >= 0) and np.all(values == np.round(values)))
    if counts:
        transform: Literal["anscombe", "identity"] = "anscombe"
        noise_sd = 1.0
    else:
        transform = "identity"
        head = values[: max(3, nab.probationary_length(len(values)))]
        diffs = np.diff(head)
        mad = detector.MAD_TO_SD * float(np.median(np.abs(diffs - np.median(diffs))))
        spread = float(np.std(head))
        noise = mad / math.sqrt(2.0) if mad > 0 else spread / 10.0
        level = max(1e-9, 1e-6 * float(np.max(np.abs(values))))
        noise_sd = max(knobs.noise_frac * noise, level)
    likelihood_days = 30
    return detector.Params(
        period=period,
        slot_spread=max(0, round(600 / spacing)),
        smooth=knobs.smooth,
        scale_every=max(1, round(3600 / spacing)),
        noise_sd=noise_sd,
        threshold=knobs.threshold,
        refractory=round(knobs.refractory_days * period),
        warmup=round(1.5 * period),
        transform=transform,
        likelihood_days=likelihood_days,
        likelihood_every=_divisor_near(period * likelihood_days, max(1, period // 3)),
        likelihood_epsilon=knobs.likelihood_epsilon,
        direction=knobs.direction,
    )


@dataclass(frozen=True)
class Trace:
    """What a decision needs of one series' run, per row (shape (n,)): the signed score
    (NaN while warming up), the row's own level (``Step.level``), and the likelihood's
    fitted mean and standard deviation in force at that row (NaN before a fit).
    ``params``: the run's parameters."""

    params: detector.Params
    score: npt.NDArray[np.float64]
    level: npt.NDArray[np.float64]
    mean: npt.NDArray[np.float64]
    sd: npt.NDArray[np.float64]


def trace(values: npt.NDArray[np.float64], params: detector.Params) -> Trace:
    """Run a fresh detector over ``values`` (shape (n,)) and record the score and the
    likelihood fit before each row. Neither depends on ``threshold``,
    ``likelihood_epsilon`` or ``refractory``, which ``decide`` applies afterwards."""
    det = detector.Detector(1, params)
    n = len(values)
    score, level, mean, sd = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    for i in range(n):
        mean[i], sd[i] = det.lik_fit[0]
        step = det.update(values[i : i + 1])
        score[i], level[i] = step.score[0], step.level[0]
    return Trace(params=params, score=score, level=level, mean=mean, sd=sd)


def decide(run: Trace, threshold: float, epsilon: float, refractory: int) -> npt.NDArray[np.bool_]:
    """The detector's decisions (shape (n,)) for a recorded run with other decision
    settings: a row is flagged when its score's magnitude (``Params.magnitude``) reaches
    ``threshold`` and lies at or above the likelihood bound ``mean + z(epsilon) * sd``
    (or no fit exists), its own level's magnitude exceeds ``threshold`` (the value lies
    outside the band), and more than ``refractory`` rows passed since the last flag.
    The same rule as ``Detector.update`` (tests/test_nab.py checks it against
    ``detect_series``)."""
    s = run.params.magnitude(run.score)
    outside = run.params.magnitude(run.level) > threshold
    z = NormalDist().inv_cdf(1.0 - epsilon)
    with np.errstate(invalid="ignore"):
        usual = s < run.mean + z * run.sd
        candidates = np.flatnonzero(~np.isnan(s) & (s >= threshold) & outside & ~usual)
    flags = np.zeros(len(s), dtype=bool)
    last = -(10**18)
    for i in candidates.tolist():
        if i - last > refractory:
            flags[i] = True
            last = i
    return flags


@dataclass
class Corpus:
    """A NAB corpus in memory: series (``key -> (timestamps, values)``), windows and the
    three profiles."""

    series: dict[str, tuple[list[datetime], npt.NDArray[np.float64]]]
    windows: dict[str, list[nab.Window]]
    profiles: dict[str, nab.Profile]
    traces: dict[tuple[str, int, str, float], Trace] = field(default_factory=dict)


def load(nab_dir: Path) -> Corpus:
    """Read a NAB folder (``locate``). Raises NabDataError for a missing or malformed
    input, a missing profile, or a file without labelled windows."""
    where = locate(nab_dir)
    windows = nab.load_windows(where.windows)
    profiles = nab.load_profiles(where.profiles)
    missing = [p for p in PROFILES if p not in profiles]
    if missing:
        raise nab.NabDataError(f"profiles missing from {where.profiles}: {missing}")
    series = {}
    for key, path in where.series.items():
        if key not in windows:
            raise nab.NabDataError(f"no labelled windows for {key} in {where.windows}")
        series[key] = nab.load_series(path)
    return Corpus(series=series, windows=windows, profiles=profiles)


def category_of(key: str) -> str:
    """``"realTweets/Twitter_volume_FB.csv"`` -> ``"realTweets"``."""
    return key.split("/", 1)[0]


def score_detections(
    corpus: Corpus, detections: Mapping[str, npt.ArrayLike]
) -> dict[str, nab.CorpusScore]:
    """NAB scores of ``detections`` (``key -> 0/1 of shape (n,)``) under each profile."""
    files = {key: (corpus.series[key][0], flags) for key, flags in detections.items()}
    return {
        name: nab.score_corpus(files, corpus.windows, corpus.profiles[name]) for name in PROFILES
    }


def per_category(scores: Mapping[str, nab.CorpusScore]) -> dict[str, dict[str, Any]]:
    """Per-category figures of corpus scores: each profile's score normalised on the
    category's summed raw scores (as NAB normalises a corpus), with its files and windows.
    A category without windows (artificialNoAnomaly) has no normalised score (None) and
    reports its raw standard score (its false positives' cost) instead."""
    out: dict[str, dict[str, Any]] = {}
    keys = sorted(scores["standard"].files)
    for category in sorted({category_of(k) for k in keys}):
        members = [k for k in keys if category_of(k) == category]
        row: dict[str, Any] = {}
        for name in PROFILES:
            files = [scores[name].files[k] for k in members]
            total = sum(f.score for f in files)
            null, perfect = sum(f.null for f in files), sum(f.perfect for f in files)
            row[name] = round(nab.normalize(total, null, perfect), 2) if perfect != null else None
            row.setdefault("raw", {})[name] = round(total, 4)
        std = [scores["standard"].files[k] for k in members]
        row.update(
            files=len(members),
            windows=sum(f.windows for f in std),
            detected=sum(f.detected for f in std),
            false_positives=sum(f.fp for f in std),
        )
        out[category] = row
    return out


def write_results(
    path: Path,
    timestamps: list[Any],
    values: np.ndarray,
    result: detector.SeriesResult,
    threshold: float,
) -> None:
    """Write one NAB result file. Side effect: creates ``path``'s folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = result.anomaly_score(threshold)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["timestamp", "value", "anomaly_score", "label"])
        for t, v, s, a in zip(timestamps, values, scores, result.anomaly, strict=True):
            out.writerow([t.strftime("%Y-%m-%d %H:%M:%S"), f"{v:g}", f"{s:.6f}", int(a)])


def run(nab_dir: Path, detections_dir: Path | None = None, knobs: Knobs = CHOSEN) -> dict[str, Any]:
    """Detect on every series of every category in ``nab_dir`` and score with NAB's
    profiles.

    Returns ``{"detector", "knobs", "files", "standard", "reward_low_FP_rate",
    "reward_low_FN_rate", "per_category": {category: {profile: score or None, "raw",
    "files", "windows", "detected", "false_positives"}}, "per_file": {"<category>/<file>.csv":
    {profile: normalised score, "raw": {...}, "detected", "windows", "false_positives",
    "period", "transform"}}, "production_realTweets": {profile: score} or None,
    "scoreboard": SCOREBOARD}``; corpus and category figures are
    normalised on the summed raw scores, as NAB does. Raises NabDataError for a missing or
    malformed input, or a file without labelled windows. Side effect: writes result files
    when ``detections_dir``.
    """
    corpus = load(nab_dir)
    detections: dict[str, npt.NDArray[np.bool_]] = {}
    used: dict[str, detector.Params] = {}
    for key, (timestamps, values) in corpus.series.items():
        params = series_params(timestamps, values, knobs)
        result = detector.detect_series(values, params)
        detections[key], used[key] = result.anomaly, params
        if detections_dir is not None:
            category, name = key.split("/", 1)
            out = Path(detections_dir) / category / f"{DETECTOR_NAME}_{name}"
            write_results(out, timestamps, values, result, params.threshold)
    scores = score_detections(corpus, detections)
    production = _production(corpus)
    per_file: dict[str, dict[str, Any]] = {}
    for key in detections:
        std = scores["standard"].files[key]
        entry: dict[str, Any] = {
            name: round(scores[name].files[key].normalized, 2) for name in PROFILES
        }
        entry["raw"] = {name: round(scores[name].files[key].score, 4) for name in PROFILES}
        entry.update(
            detected=std.detected,
            windows=std.windows,
            false_positives=std.fp,
            period=used[key].period,
            transform=used[key].transform,
        )
        per_file[key] = entry
    return {
        "detector": DETECTOR_NAME,
        "knobs": asdict(knobs),
        "files": len(detections),
        **{name: round(scores[name].normalized, 2) for name in PROFILES},
        "per_category": per_category(scores),
        "per_file": per_file,
        "production_realTweets": production,
        "scoreboard": {k: dict(zip(PROFILES, v, strict=True)) for k, v in SCOREBOARD.items()},
    }


def _production(corpus: Corpus) -> dict[str, float] | None:
    """The realTweets files scored with production's count parameters (``Params()``:
    the anomaly stage's operating point, which favours precision over NAB's recall-leaning
    standard profile); None without realTweets files."""
    tweets = {k: v for k, v in corpus.series.items() if category_of(k) == TWEETS}
    if not tweets:
        return None
    flags = {
        k: detector.detect_series(values, detector.Params()).anomaly
        for k, (_, values) in tweets.items()
    }
    scores = score_detections(corpus, flags)
    return {name: round(scores[name].normalized, 2) for name in PROFILES}


# ---- choosing the knobs -------------------------------------------------------------------

GRID_STRUCTURE: dict[str, tuple[Any, ...]] = {
    "smooth": (9, 12, 18),
    "direction": ("up", "both"),
    "noise_frac": (2.0, 4.0),
}
"""Settings that change a run's scores: each file is run once per combination."""
GRID_DECISION: dict[str, tuple[Any, ...]] = {
    "threshold": (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.5),
    "likelihood_epsilon": (1e-2, 1e-3, 1e-4, 1e-5),
    "refractory_days": (0.25, 0.5, 1.0),
}
"""Settings applied to recorded runs (``decide``)."""


def _grid(space: Mapping[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    names = list(space)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*space.values())]


def _traces(corpus: Corpus, knobs: Knobs) -> dict[str, Trace]:
    """Each file's recorded run for ``knobs``' structural settings (cached on ``corpus``;
    a count series ignores ``noise_frac``, so it is run once for all of them)."""
    out = {}
    for key, (timestamps, values) in corpus.series.items():
        params = series_params(timestamps, values, knobs)
        frac = knobs.noise_frac if params.transform == "identity" else 0.0
        cache = (key, knobs.smooth, knobs.direction, frac)
        if cache not in corpus.traces:
            corpus.traces[cache] = trace(values, params)
        out[key] = corpus.traces[cache]
    return out


def search(
    nab_dir: Path,
    structure: Mapping[str, tuple[Any, ...]] = GRID_STRUCTURE,
    decision: Mapping[str, tuple[Any, ...]] = GRID_DECISION,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Choose ``Knobs`` on the NAB corpus in ``nab_dir``: the grid ``structure`` x
    ``decision`` scored with the standard profile (corpus normalised on summed raw
    scores), choosing the setting whose neighbourhood scores best: the mean score of the
    settings one grid step away or less on every decision axis (threshold, epsilon,
    refractory), the setting included, so that a sharp peak loses to a broad plateau (a
    choice that carries to other series should not hang on one grid step).

    Returns ``{"chosen": knobs dict, "corpus": {profile: score}, "per_category",
    "realTweets_in_sample": score, "leave_one_out": {file: {"knobs", "held_out",
    "in_sample", "others"}}, "leave_one_out_mean", "leave_one_out_pooled",
    "chosen_standard_at_neighbours", "top": the 10 best settings by their own score}``.
    Leave-one-out: for each realTweets file, the knobs chosen so on the other files,
    scored on it alone (its in-sample figure: the chosen knobs on it alone). Ties keep the
    first setting of the grid's order. Raises NabDataError as ``load``. Cost: one detector
    run per file and structural setting (about 6 minutes on two cores), then scoring only.
    """
    corpus = load(nab_dir)
    keys = list(corpus.series)
    tweets = [k for k in keys if category_of(k) == TWEETS]
    profile = corpus.profiles["standard"]
    bounds = {k: nab.window_bounds(corpus.series[k][0], corpus.windows[k]) for k in keys}
    # raw standard score of every file under every setting
    settings: list[Knobs] = []
    raw: list[dict[str, nab.FileScore]] = []
    places: list[tuple[int, tuple[int, ...]]] = []  # (structure, decision grid indices)
    steps = list(itertools.product(*(range(len(v)) for v in decision.values())))
    for at, s in enumerate(_grid(structure)):
        base = replace(CHOSEN, **s)
        runs = _traces(corpus, base)
        if progress:
            progress(f"ran {s}")
        for step, d in zip(steps, _grid(decision), strict=True):
            places.append((at, step))
            knobs = replace(base, **d)
            files = {}
            for key in keys:
                run_ = runs[key]
                refractory = round(knobs.refractory_days * run_.params.period)
                flags = decide(run_, knobs.threshold, knobs.likelihood_epsilon, refractory)
                files[key] = nab.score_rows(flags, bounds[key], profile)
            settings.append(knobs)
            raw.append(files)

    def total(i: int, subset: Iterable[str]) -> float:
        chosen = [raw[i][k] for k in subset]
        return nab.normalize(
            sum(f.score for f in chosen),
            sum(f.null for f in chosen),
            sum(f.perfect for f in chosen),
        )

    where = {place: i for i, place in enumerate(places)}
    near = [
        [
            where[(at, tuple(a + b for a, b in zip(step, move, strict=True)))]
            for move in itertools.product((-1, 0, 1), repeat=len(step))
            if (at, tuple(a + b for a, b in zip(step, move, strict=True))) in where
        ]
        for at, step in places
    ]

    def best(subset: list[str]) -> int:
        scores = np.array([total(i, subset) for i in range(len(settings))])
        stable = [float(np.mean(scores[n])) for n in near]
        return int(np.argmax(stable))

    top = sorted(range(len(settings)), key=lambda i: -total(i, keys))[:10]
    chosen = best(keys)
    folds: dict[str, dict[str, Any]] = {}
    picks: dict[str, int] = {}
    for held in tweets:
        others = [k for k in keys if k != held]
        i = best(others)
        picks[held] = i
        folds[held] = {
            "knobs": asdict(settings[i]),
            "held_out": round(total(i, [held]), 2),
            "in_sample": round(total(chosen, [held]), 2),
            "others": round(total(i, others), 2),
        }
    detections = {}
    for key in keys:
        knobs = settings[chosen]
        run_ = _traces(corpus, knobs)[key]
        refractory = round(knobs.refractory_days * run_.params.period)
        detections[key] = decide(run_, knobs.threshold, knobs.likelihood_epsilon, refractory)
    scores = score_detections(corpus, detections)
    return {
        "chosen": asdict(settings[chosen]),
        "corpus": {name: round(scores[name].normalized, 2) for name in PROFILES},
        "per_category": per_category(scores),
        "realTweets_in_sample": round(total(chosen, tweets), 2),
        "leave_one_out": folds,
        "leave_one_out_mean": round(float(np.mean([f["held_out"] for f in folds.values()])), 2),
        "leave_one_out_pooled": round(_pooled([raw[i][held] for held, i in picks.items()]), 2),
        "chosen_standard_at_neighbours": round(
            float(np.mean([total(i, keys) for i in near[chosen]])), 2
        ),
        "top": [{"knobs": asdict(settings[i]), "standard": round(total(i, keys), 2)} for i in top],
    }


def _pooled(files: Sequence[nab.FileScore]) -> float:
    """Files' raw scores summed and normalised together (the held-out realTweets files)."""
    return nab.normalize(
        sum(f.score for f in files), sum(f.null for f in files), sum(f.perfect for f in files)
    )
