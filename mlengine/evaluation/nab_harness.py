"""``evaluate anomaly --nab DIR``: run the anomaly detector over NAB's realTweets files and
score its own 0/1 decisions with NAB's scorer (``mlengine.evaluation.nab``).

Reads ``DIR/realTweets/*.csv``, ``DIR/labels/combined_windows.json`` and
``DIR/config/profiles.json``. Optionally writes NAB-format result files
``OUTDIR/realTweets/<detector>_<file>.csv`` (``timestamp,value,anomaly_score,label``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlengine.anomalies import detector
from mlengine.evaluation import nab

DETECTOR_NAME = "twiscopeSeasonalMad"
"""The detector's name in result file names (NAB names must not contain ``_``)."""

PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")


@dataclass(frozen=True)
class NabRun:
    """Where the NAB files are, as checked by ``locate``."""

    series: list[Path]
    windows: Path
    profiles: Path


def locate(nab_dir: Path) -> NabRun:
    """Check a NAB folder's layout. Raises NabDataError naming what is missing."""
    folder = Path(nab_dir) / "realTweets"
    if not folder.is_dir():
        raise nab.NabDataError(f"no realTweets folder in {nab_dir}")
    series = sorted(folder.glob("*.csv"))
    if not series:
        raise nab.NabDataError(f"no .csv files in {folder}")
    windows = Path(nab_dir) / "labels" / "combined_windows.json"
    profiles = Path(nab_dir) / "config" / "profiles.json"
    for path in (windows, profiles):
        if not path.is_file():
            raise nab.NabDataError(f"missing {path}")
    return NabRun(series=series, windows=windows, profiles=profiles)


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


def run(
    nab_dir: Path, detections_dir: Path | None = None, params: detector.Params | None = None
) -> dict[str, Any]:
    """Detect on every ``realTweets/*.csv`` in ``nab_dir`` and score with NAB's profiles.

    Returns ``{"detector", "files", "standard", "reward_low_FP_rate", "reward_low_FN_rate",
    "per_file": {"<file>.csv": {profile: normalised score, "raw": {...}, "detected",
    "windows", "false_positives"}}}``; corpus figures are normalised on the summed raw
    scores, as NAB does. Raises NabDataError for a missing or malformed input, or a file
    without labelled windows. Side effect: writes result files when ``detections_dir``.
    """
    where = locate(nab_dir)
    params = params or detector.Params()
    windows = nab.load_windows(where.windows)
    profiles = nab.load_profiles(where.profiles)
    missing = [p for p in PROFILES if p not in profiles]
    if missing:
        raise nab.NabDataError(f"profiles missing from {where.profiles}: {missing}")

    files: dict[str, tuple[list[Any], np.ndarray]] = {}
    for path in where.series:
        key = f"realTweets/{path.name}"
        if key not in windows:
            raise nab.NabDataError(f"no labelled windows for {key} in {where.windows}")
        timestamps, values = nab.load_series(path)
        result = detector.detect_series(values, params)
        files[key] = (timestamps, result.anomaly)
        if detections_dir is not None:
            out = Path(detections_dir) / "realTweets" / f"{DETECTOR_NAME}_{path.name}"
            write_results(out, timestamps, values, result, params.threshold)

    corpus = {name: nab.score_corpus(files, windows, profiles[name]) for name in PROFILES}
    per_file: dict[str, dict[str, Any]] = {}
    for key in files:
        std = corpus["standard"].files[key]
        entry: dict[str, Any] = {
            name: round(corpus[name].files[key].normalized, 2) for name in PROFILES
        }
        entry["raw"] = {name: round(corpus[name].files[key].score, 4) for name in PROFILES}
        entry.update(detected=std.detected, windows=std.windows, false_positives=std.fp)
        per_file[key.removeprefix("realTweets/")] = entry
    return {
        "detector": DETECTOR_NAME,
        "files": len(files),
        **{name: round(corpus[name].normalized, 2) for name in PROFILES},
        "per_file": per_file,
    }
