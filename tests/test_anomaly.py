"""The streaming anomaly detector (mlengine.anomalies.detector) on generated series with
known anomalies, and ``evaluate anomaly`` on a slice of NAB's public realTweets data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from mlengine.anomalies.detector import Detector, Params, detect_series

DAY = 288  # 5-minute buckets
BURST_AT = DAY * 8 + 100


def counts(rate: float, seed: int, burst_factor: float = 1.0, days: int = 10) -> np.ndarray:
    """Poisson counts with a daily cycle; a 2-hour burst of ``burst_factor`` at BURST_AT."""
    rng = np.random.default_rng(seed)
    t = np.arange(DAY * days)
    lam = rate * (1 + 0.8 * np.sin(2 * np.pi * t / DAY))
    lam[BURST_AT : BURST_AT + 24] *= burst_factor
    return rng.poisson(lam).astype(float)


def bursty_counts(seed: int, final_factor: float, days: int = 15) -> tuple[np.ndarray, int]:
    """Rate 20 with a daily cycle and four one-hour 4x bursts a day at random times on
    days 1 to ``days - 3``; then quiet, and a one-hour burst of ``final_factor`` on the
    last day. Returns the counts and the final burst's first bucket."""
    rng = np.random.default_rng(seed)
    t = np.arange(DAY * days)
    lam = 20.0 * (1 + 0.8 * np.sin(2 * np.pi * t / DAY))
    quarter = DAY // 4
    for start in range(DAY, DAY * (days - 2), quarter):
        at = start + int(rng.integers(0, quarter - 12))
        lam[at : at + 12] *= 4.0
    final = DAY * (days - 1) + 100
    lam[final : final + 12] *= final_factor
    return rng.poisson(lam).astype(float), final


@pytest.mark.parametrize(("rate", "factor"), [(20.0, 4.0), (0.3, 15.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_it_flags_a_burst_once_within_minutes(rate: float, factor: float, seed: int) -> None:
    result = detect_series(counts(rate, seed, factor))
    hits = np.flatnonzero(result.anomaly)
    assert len(hits) == 1
    assert BURST_AT <= hits[0] <= BURST_AT + 6  # within 30 minutes of the onset


@pytest.mark.parametrize("rate", [20.0, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_seasonal_series_without_anomalies_raises_nothing(rate: float, seed: int) -> None:
    result = detect_series(counts(rate, seed))
    assert not result.anomaly.any()
    assert np.nanmax(result.score) < Params().threshold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_series_that_bursts_often_needs_a_larger_burst(seed: int) -> None:
    x, final = bursty_counts(seed, final_factor=15.0)
    gated = detect_series(x).anomaly
    # epsilon 0.5: any score above the series' mean counts as unusual (robust z alone)
    robust_only = detect_series(x, Params(likelihood_epsilon=0.5)).anomaly
    assert gated[:final].sum() <= 0.6 * robust_only[:final].sum()
    assert final <= np.flatnonzero(gated)[-1] <= final + 6  # a 15x burst: within 30 min


def test_the_band_follows_the_daily_cycle() -> None:
    result = detect_series(counts(100.0, 0))
    day9 = slice(DAY * 9, DAY * 10)
    peak, trough = DAY * 9 + DAY // 4, DAY * 9 + 3 * DAY // 4  # sin = +1 and -1
    assert result.expected[peak] == pytest.approx(180, rel=0.1)
    assert result.expected[trough] == pytest.approx(20, rel=0.25)
    assert np.all(result.low[day9] <= result.expected[day9])
    assert np.all(result.expected[day9] <= result.high[day9])


def test_a_burst_longer_than_a_day_raises_one_alert_per_refractory_period() -> None:
    x = counts(20.0, 0)
    x[BURST_AT:] *= 5
    hits = np.flatnonzero(detect_series(x).anomaly)
    assert hits[0] >= BURST_AT
    assert np.all(np.diff(hits) > Params().refractory)


def test_nothing_is_flagged_during_warmup() -> None:
    x = counts(20.0, 0)
    x[50:60] = 5000
    result = detect_series(x)
    assert not result.anomaly[: Params().warmup].any()
    assert np.isnan(result.score[: Params().warmup]).all()


def test_series_run_together_match_series_run_alone() -> None:
    bursty, _ = bursty_counts(0, final_factor=15.0, days=10)
    xs = np.stack([counts(20.0, 0, 4.0), counts(0.3, 1, 15.0), counts(5.0, 2), bursty])
    det = Detector(4)
    steps = [det.update(xs[:, i]) for i in range(xs.shape[1])]
    together = np.stack([s.score for s in steps], axis=1)
    flagged = np.stack([s.anomaly for s in steps], axis=1)
    for row in range(4):
        alone = detect_series(xs[row])
        np.testing.assert_allclose(together[row], alone.score, equal_nan=True)
        np.testing.assert_array_equal(flagged[row], alone.anomaly)


def test_a_detector_resumed_from_its_state_continues_exactly() -> None:
    x = counts(20.0, 0, 4.0)
    straight = detect_series(x)
    det = Detector(1)
    for v in x[: BURST_AT - 50]:
        det.update([v])
    resumed = Detector.from_state({k: np.copy(a) for k, a in det.state().items()})
    rest = [resumed.update([v]) for v in x[BURST_AT - 50 :]]
    np.testing.assert_allclose(
        [s.score[0] for s in rest], straight.score[BURST_AT - 50 :], equal_nan=True
    )
    assert [bool(s.anomaly[0]) for s in rest] == straight.anomaly[BURST_AT - 50 :].tolist()


def test_a_missing_bucket_is_neither_scored_nor_learnt() -> None:
    det = Detector(2)
    x = counts(20.0, 0)
    for v in x[: DAY * 2]:
        det.update([v, v])
    before = det.state()
    step = det.update([np.nan, x[DAY * 2]])
    after = det.state()
    assert np.isnan(step.score[0]) and not step.anomaly[0]
    assert after["count"].tolist() == [DAY * 2, DAY * 2 + 1]
    np.testing.assert_array_equal(after["values"][0], before["values"][0])


def test_it_rejects_a_wrongly_shaped_bucket() -> None:
    with pytest.raises(ValueError, match="expected 2 values"):
        Detector(2).update([1.0, 2.0, 3.0])


def test_it_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError, match="threshold"):
        Params(threshold=0)
    with pytest.raises(ValueError, match="likelihood_epsilon"):
        Params(likelihood_epsilon=1.0)
    with pytest.raises(ValueError, match="likelihood_every must divide"):
        Params(likelihood_every=100)


# ---- evaluate anomaly on NAB data -------------------------------------------------------

SLICE_ROWS = 6000
SLICE_FILES = ("Twitter_volume_AAPL.csv", "Twitter_volume_FB.csv")
EXPECTED_SLICE_STANDARD = 89.52  # measured with nab_harness.CHOSEN; 4/4 windows, 4 FP


@pytest.fixture
def nab_slice(shared_data: Path, tmp_path: Path) -> Path:
    """The first 6,000 rows (about 21 days) of two public realTweets files, with the
    windows that end inside them (AAPL 3, FB 1)."""
    source = shared_data / "nab"
    out = tmp_path / "nab"
    (out / "realTweets").mkdir(parents=True)
    (out / "labels").mkdir()
    (out / "config").mkdir()
    shutil.copy(source / "config" / "profiles.json", out / "config" / "profiles.json")
    windows = json.loads((source / "labels" / "combined_windows.json").read_text())
    kept = {}
    for name in SLICE_FILES:
        lines = (source / "realTweets" / name).read_text().splitlines()[: SLICE_ROWS + 1]
        (out / "realTweets" / name).write_text("\n".join(lines) + "\n")
        last = lines[-1].split(",")[0]
        kept[f"realTweets/{name}"] = [w for w in windows[f"realTweets/{name}"] if w[1] <= last]
    (out / "labels" / "combined_windows.json").write_text(json.dumps(kept))
    return out


def test_evaluate_anomaly_scores_a_slice_of_nab_realtweets(nab_slice: Path, tmp_path: Path) -> None:
    report, detections = tmp_path / "nab.json", tmp_path / "detections"
    call_command(
        "evaluate",
        "anomaly",
        "--nab",
        str(nab_slice),
        "--detections",
        str(detections),
        "--json",
        str(report),
    )
    result = json.loads(report.read_text())
    assert result["standard"] == pytest.approx(EXPECTED_SLICE_STANDARD, abs=0.01)
    assert set(result["per_file"]) == {f"realTweets/{name}" for name in SLICE_FILES}
    assert set(result["per_category"]) == {"realTweets"}
    assert result["per_category"]["realTweets"]["standard"] == result["standard"]
    assert result["reward_low_FP_rate"] <= result["standard"] <= result["reward_low_FN_rate"]
    with (detections / "realTweets" / f"twiscopeSeasonalMad_{SLICE_FILES[0]}").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["timestamp", "value", "anomaly_score", "label"]
    assert len(rows) == SLICE_ROWS
    assert {r["label"] for r in rows} == {"0", "1"}


def test_evaluate_anomaly_names_a_folder_without_nab_series(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match=r"no category folder with \.csv files"):
        call_command("evaluate", "anomaly", "--nab", str(tmp_path))


def test_evaluate_anomaly_needs_a_nab_folder() -> None:
    with pytest.raises(CommandError, match="--nab"):
        call_command("evaluate", "anomaly")


# ---- many buckets of one value at once (Detector.hold) ----------------------------------

SMALL = Params(
    period=24,
    days=2,
    slot_spread=1,
    smooth=3,
    scale_days=2,
    scale_every=4,
    refractory=6,
    warmup=24,
    likelihood_days=3,
    likelihood_every=6,
)
"""Short horizons: a run of a few thousand buckets crosses every ring many times."""


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def stepped(det: Detector, rows: list[int], values: list[float], k: int) -> list[np.ndarray]:
    """``k`` updates feeding ``values`` to ``rows`` (NaN elsewhere): the Steps' arrays
    for those rows, each of shape (k, len(rows)), in ``Step`` field order."""
    x = np.full(det.n, np.nan)
    x[rows] = values
    steps = [det.update(x) for _ in range(k)]
    fields = ("score", "anomaly", "expected", "low", "high")
    return [np.stack([getattr(s, f)[rows] for s in steps]) for f in fields]


def sparse_counts(n: int, seed: int) -> np.ndarray:
    """Mostly empty buckets, a few with posts, and one 3-bucket burst."""
    rng = np.random.default_rng(seed)
    x = np.where(rng.random(n) < 0.05, rng.poisson(3.0, n), 0).astype(float)
    x[n // 2 : n // 2 + 3] += 30
    return x


HOLD_CASES = {
    # name: (params, history per row (rows, buckets), held rows, held values, k)
    "zero after a bursty week and a half: reaches the steady state": (
        Params(),
        np.stack([bursty_counts(0, 15.0, days=9)[0], counts(5.0, 1, days=9)]),
        [0],
        [0.0],
        4200,
    ),
    "a burst held after a sparse day: flags": (
        Params(),
        np.stack([sparse_counts(DAY * 2, 2), sparse_counts(DAY * 2, 3)]),
        [1, 0],
        [40.0, 0.0],
        400,
    ),
    "a fresh series: lags not yet seen, no scale": (Params(), np.zeros((2, 0)), [0], [0.0], 700),
    "missing shares and a zero, short horizons, many rings over": (
        SMALL,
        np.stack([sparse_counts(300, 4), sparse_counts(300, 5), sparse_counts(300, 6)]),
        [2, 0, 1],
        [np.nan, 0.0, 0.0],
        3000,
    ),
    "refractory 0: zeros after a burst are flagged": (
        Params(refractory=0),
        np.stack([sparse_counts(DAY * 2, 7)[: DAY * 2 - 30]]),
        [0],
        [0.0],
        200,
    ),
}


@pytest.mark.parametrize("case", HOLD_CASES)
def test_holding_a_value_gives_the_steps_and_state_of_stepping_it_bit_for_bit(case: str) -> None:
    params, history, rows, values, k = HOLD_CASES[case]
    det = Detector(len(history), params)
    for i in range(history.shape[1]):
        det.update(history[:, i])
    twin = Detector.from_state(det.state())

    held = twin.hold(rows, values, k)
    reference = stepped(det, rows, values, k)

    got = held.between(0, k)
    for field, want in zip(("score", "anomaly", "expected", "low", "high"), reference, strict=True):
        assert bits(getattr(got, field)) == bits(want), field
    for key in Detector.STATE_KEYS:
        assert bits(getattr(twin, key)) == bits(getattr(det, key)), key
    assert held.m <= k


def test_a_hold_flags_where_stepping_flags() -> None:
    _, history, rows, values, k = HOLD_CASES["a burst held after a sparse day: flags"]
    det = Detector(2)
    for i in range(history.shape[1]):
        det.update(history[:, i])
    assert det.hold(rows, values, k).between(0, k).anomaly.any()


def test_a_long_empty_run_costs_its_transient_not_its_length() -> None:
    x = bursty_counts(1, 15.0, days=9)[0]
    year = DAY * 365
    det, twin = Detector(1), Detector(1)
    for v in x:
        det.update([v])
        twin.update([v])

    held = det.hold([0], [0.0], year)
    split = twin.hold([0], [0.0], 5000)
    rest = twin.hold([0], [0.0], year - 5000)

    p = Params()
    assert held.m <= p.history + p.smooth + p.scale_window + p.scale_every
    for key in Detector.STATE_KEYS:
        assert bits(getattr(twin, key)) == bits(getattr(det, key)), key
    tail = held.between(year - 3, year)
    assert bits(tail.score) == bits(rest.between(year - 5003, year - 5000).score)
    assert int(det.count[0]) == len(x) + year
    assert split.m < 5000 and rest.m == 0  # steady within the first run, so all the second


def test_it_rejects_a_bad_hold() -> None:
    det = Detector(2)
    with pytest.raises(ValueError, match="distinct"):
        det.hold([0, 0], [0.0, 0.0], 3)
    with pytest.raises(ValueError, match="distinct"):
        det.hold([2], [0.0], 3)
    with pytest.raises(ValueError, match="finite"):
        det.hold([0], [np.inf], 3)
    with pytest.raises(ValueError, match="alike"):
        det.hold([0, 1], [0.0], 3)
    with pytest.raises(ValueError, match="outside"):
        det.hold([0], [0.0], 3).between(2, 4)
