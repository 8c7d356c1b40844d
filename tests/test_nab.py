"""NAB's scoring rules (mlengine.evaluation.nab) on hand-computed cases.

Every file below has 100 rows at 5-minute steps, so NAB's probationary period is
floor(0.15 * 100) = 15 rows, and one labelled window covers rows 40..49 (10 rows).
NAB's scaled sigmoid is sigma(y) = 2 / (1 + exp(5 y)) - 1 = -tanh(2.5 y); a true positive
is worth sigma(y) / sigma(-1) with y = -(49 - i + 1) / 10, and sigma(-1) = tanh(2.5) =
0.986614.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from mlengine.anomalies import detector
from mlengine.evaluation import nab, nab_harness

T0 = datetime(2015, 3, 1)
STANDARD = nab.Profile("standard", tp_weight=1.0, fp_weight=0.11, fn_weight=1.0)
LOW_FN = nab.Profile("reward_low_FN_rate", tp_weight=1.0, fp_weight=0.11, fn_weight=2.0)


def times(n: int = 100) -> list[datetime]:
    return [T0 + timedelta(minutes=5 * i) for i in range(n)]


def window(first: int, last: int) -> nab.Window:
    return (T0 + timedelta(minutes=5 * first), T0 + timedelta(minutes=5 * last))


WINDOWS = [window(40, 49)]


def flags(*rows: int, n: int = 100) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[list(rows)] = True
    return out


def score(
    *rows: int, windows: list[nab.Window] = WINDOWS, profile: nab.Profile = STANDARD
) -> nab.FileScore:
    return nab.score_file(times(), flags(*rows), windows, profile)


def test_a_hit_on_the_first_row_of_a_window_earns_the_full_tp_weight() -> None:
    result = score(40)
    assert result.score == pytest.approx(1.0)
    assert result.normalized == pytest.approx(100.0)


def test_a_late_hit_on_the_last_row_earns_little() -> None:
    # y = -1/10: tanh(0.25) / tanh(2.5) = 0.244919 / 0.986614
    assert score(49).score == pytest.approx(0.248242, abs=1e-6)


def test_only_the_first_detection_in_a_window_counts() -> None:
    # row 45: y = -5/10, tanh(1.25) / tanh(2.5) = 0.848284 / 0.986614
    result = score(45, 47, 49)
    assert result.score == pytest.approx(0.859793, abs=1e-6)
    assert (result.tp, result.fp, result.detected) == (3, 0, 1)


def test_a_missed_window_costs_the_fn_weight() -> None:
    assert score().score == pytest.approx(-1.0)
    assert score(profile=LOW_FN).score == pytest.approx(-2.0)


def test_a_false_positive_before_any_window_costs_the_full_fp_weight() -> None:
    result = score(20)
    assert result.score == pytest.approx(-1.0 - 0.11)
    assert result.fp == 1


def test_a_false_positive_just_after_a_window_costs_little() -> None:
    # row 50: y = |49 - 50| / (10 - 1) = 1/9; 0.11 * -tanh(5/18) = 0.11 * -0.270838 = -0.029793
    assert score(40, 50).score == pytest.approx(1.0 - 0.029793, abs=1e-6)


def test_a_false_positive_a_window_length_after_costs_almost_the_full_weight() -> None:
    # row 59: y = 10/9; 0.11 * -tanh(25/9) = 0.11 * -0.992298
    assert score(40, 59).score == pytest.approx(1.0 - 0.109153, abs=1e-6)


def test_a_false_positive_three_window_lengths_after_costs_the_full_weight() -> None:
    # row 90: y = 41/9 >= 3, clamped to -1
    assert score(40, 90).score == pytest.approx(1.0 - 0.11)


def test_detections_in_the_probationary_period_are_not_scored() -> None:
    result = score(3, 14)
    assert result.score == pytest.approx(-1.0)
    assert result.fp == 0
    assert score(15).score == pytest.approx(-1.11)  # row 15 is the first scored row


def test_a_window_inside_the_probationary_period_is_not_scored() -> None:
    result = score(40, windows=[window(2, 8), *WINDOWS])
    assert result.windows == 1
    assert (result.null, result.perfect, result.score) == (-1.0, 1.0, pytest.approx(1.0))


def test_a_false_positive_after_a_probationary_window_is_weighted_by_it() -> None:
    # window rows 2..8 (7 rows), FP at row 20: y = 12 / 6 = 2; 0.11 * -tanh(5) = -0.109990
    result = score(20, 40, windows=[window(2, 8), *WINDOWS])
    assert result.score == pytest.approx(1.0 - 0.109990, abs=1e-6)


@pytest.mark.parametrize(
    ("rows", "expected"), [(100, 15), (5000, 750), (6000, 750), (20000, 750), (10, 1)]
)
def test_the_probationary_period_is_15_percent_capped_at_750_rows(rows: int, expected: int) -> None:
    assert nab.probationary_length(rows) == expected


def test_the_null_detector_scores_0_and_the_perfect_one_100() -> None:
    windows = {"a.csv": [window(20, 29), window(60, 69)], "b.csv": WINDOWS}
    null = nab.score_corpus(
        {"a.csv": (times(), flags()), "b.csv": (times(), flags())}, windows, STANDARD
    )
    perfect = nab.score_corpus(
        {"a.csv": (times(), flags(20, 60)), "b.csv": (times(), flags(40))}, windows, STANDARD
    )
    assert null.normalized == 0.0
    assert perfect.normalized == pytest.approx(100.0)


def test_a_corpus_is_normalised_on_summed_raw_scores() -> None:
    # a.csv: hit at the start (+1); b.csv: missed with two windows (-2).
    # S = -1, null = -3, perfect = 3: 100 * 2 / 6
    windows = {"a.csv": WINDOWS, "b.csv": [window(20, 29), window(60, 69)]}
    corpus = nab.score_corpus(
        {"a.csv": (times(), flags(40)), "b.csv": (times(), flags())}, windows, STANDARD
    )
    assert corpus.normalized == pytest.approx(100 * 2 / 6)
    assert corpus.files["a.csv"].normalized == pytest.approx(100.0)
    assert corpus.files["b.csv"].normalized == 0.0


def test_it_rejects_detections_of_the_wrong_length() -> None:
    with pytest.raises(nab.NabDataError):
        nab.score_file(times(), np.zeros(99), WINDOWS, STANDARD)


def test_it_rejects_a_window_outside_the_series() -> None:
    with pytest.raises(nab.NabDataError, match="holds no row"):
        nab.score_file(times(), flags(), [window(200, 210)], STANDARD)


def test_it_reads_nab_windows_profiles_and_series(tmp_path: Path) -> None:
    (tmp_path / "w.json").write_text(
        json.dumps({"realTweets/x.csv": [["2015-03-01 00:05:00.000000", "2015-03-01 00:10:00"]]})
    )
    (tmp_path / "p.json").write_text(
        json.dumps(
            {
                "standard": {
                    "CostMatrix": {"tpWeight": 1, "fnWeight": 1, "fpWeight": 0.11, "tnWeight": 1}
                }
            }
        )
    )
    (tmp_path / "x.csv").write_text(
        "timestamp,value\n2015-03-01 00:00:00,3\n2015-03-01 00:05:00,4\n"
    )
    assert nab.load_windows(tmp_path / "w.json") == {
        "realTweets/x.csv": [(datetime(2015, 3, 1, 0, 5), datetime(2015, 3, 1, 0, 10))]
    }
    assert nab.load_profiles(tmp_path / "p.json")["standard"].fp_weight == 0.11
    ts, values = nab.load_series(tmp_path / "x.csv")
    assert ts == [datetime(2015, 3, 1), datetime(2015, 3, 1, 0, 5)]
    assert values.tolist() == [3.0, 4.0]


def test_it_names_a_malformed_series_file(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("time,count\n1,2\n")
    with pytest.raises(nab.NabDataError, match="header"):
        nab.load_series(tmp_path / "x.csv")


# ---- per-category figures (mlengine.evaluation.nab_harness) ----------------------------


def corpus_of(files: dict[str, np.ndarray], windows: dict[str, list[nab.Window]]) -> dict:
    """The three profiles' corpus scores of ``files`` (``key -> flags``)."""
    profiles = {
        "standard": STANDARD,
        "reward_low_FP_rate": nab.Profile("reward_low_FP_rate", 1.0, 0.22, 1.0),
        "reward_low_FN_rate": LOW_FN,
    }
    return {
        name: nab.score_corpus({k: (times(), f) for k, f in files.items()}, windows, profile)
        for name, profile in profiles.items()
    }


def test_each_category_is_normalised_on_its_own_summed_raw_scores() -> None:
    windows = {
        "catA/a.csv": WINDOWS,
        "catA/b.csv": [window(20, 29), window(60, 69)],
        "catB/c.csv": WINDOWS,
    }
    # catA: a.csv hit at the window's start (+1), b.csv missed twice (-2): S = -1, null
    # -3, perfect 3, 100 * 2 / 6. catB: c.csv hit at row 45 (+0.859793) and a false
    # positive before any window (-0.11): 100 * (0.749793 + 1) / 2.
    scores = corpus_of(
        {"catA/a.csv": flags(40), "catA/b.csv": flags(), "catB/c.csv": flags(20, 45)}, windows
    )

    rows = nab_harness.per_category(scores)

    assert set(rows) == {"catA", "catB"}
    assert rows["catA"]["standard"] == pytest.approx(100 * 2 / 6, abs=0.01)
    assert rows["catB"]["standard"] == pytest.approx(100 * 1.749793 / 2, abs=0.01)
    # low FN: catA S = 1 - 4 = -3, null -6, perfect 3; low FP: catB 0.859793 - 0.22
    assert rows["catA"]["reward_low_FN_rate"] == pytest.approx(100 * 3 / 9, abs=0.01)
    assert rows["catB"]["reward_low_FP_rate"] == pytest.approx(100 * 1.639793 / 2, abs=0.01)
    assert (rows["catA"]["files"], rows["catA"]["windows"], rows["catA"]["detected"]) == (2, 3, 1)
    assert rows["catB"]["false_positives"] == 1
    assert scores["standard"].normalized == pytest.approx(100 * 3.749793 / 8, abs=1e-4)


def test_a_category_without_windows_reports_the_raw_cost_of_its_false_positives() -> None:
    windows: dict[str, list[nab.Window]] = {"calm/x.csv": [], "catA/a.csv": WINDOWS}
    scores = corpus_of({"calm/x.csv": flags(20, 60), "catA/a.csv": flags(40)}, windows)

    rows = nab_harness.per_category(scores)

    assert rows["calm"]["standard"] is None
    assert rows["calm"]["raw"]["standard"] == pytest.approx(-0.22)
    assert rows["calm"]["raw"]["reward_low_FP_rate"] == pytest.approx(-0.44)
    # its false positives still count in the corpus: (1 - 0.22 + 1) / 2
    assert scores["standard"].normalized == pytest.approx(100 * 1.78 / 2)


def test_the_harness_reads_every_category_folder(tmp_path: Path) -> None:
    for folder, name in (("realTweets", "t.csv"), ("realTraffic", "s.csv")):
        (tmp_path / folder).mkdir()
        rows = [f"{t:%Y-%m-%d %H:%M:%S},{i % 7}" for i, t in enumerate(times(400))]
        (tmp_path / folder / name).write_text("timestamp,value\n" + "\n".join(rows) + "\n")
    (tmp_path / "labels").mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "labels" / "combined_windows.json").write_text(
        json.dumps(
            {
                "realTweets/t.csv": [["2015-03-01 10:00:00", "2015-03-01 12:00:00"]],
                "realTraffic/s.csv": [],
            }
        )
    )
    profile = {"CostMatrix": {"tpWeight": 1, "fnWeight": 1, "fpWeight": 0.11, "tnWeight": 1}}
    (tmp_path / "config" / "profiles.json").write_text(
        json.dumps(dict.fromkeys(nab_harness.PROFILES, profile))
    )

    result = nab_harness.run(tmp_path)

    assert set(result["per_file"]) == {"realTweets/t.csv", "realTraffic/s.csv"}
    assert set(result["per_category"]) == {"realTweets", "realTraffic"}
    assert result["per_category"]["realTraffic"]["windows"] == 0
    assert result["per_file"]["realTweets/t.csv"]["period"] == 288
    assert result["scoreboard"]["ARTime"]["standard"] == 74.9


def test_the_series_parameters_follow_the_spacing_and_the_values() -> None:
    hourly = [T0 + timedelta(hours=i) for i in range(500)]
    counts = nab_harness.series_params(hourly, np.arange(500.0) % 9)
    levels = nab_harness.series_params(hourly, np.sin(np.arange(500.0)) + 5.0)

    assert (counts.period, counts.transform, counts.noise_sd) == (24, "anscombe", 1.0)
    assert (levels.period, levels.transform) == (24, "identity")
    assert counts.refractory == round(nab_harness.CHOSEN.refractory_days * 24)
    five_minutes = nab_harness.series_params(times(400), np.arange(400.0) % 5)
    assert five_minutes.period == 288 and five_minutes.likelihood_every == 96


@pytest.mark.parametrize("direction", ["up", "both"])
def test_decisions_from_a_recorded_run_are_the_detectors_own(direction: str) -> None:
    rng = np.random.default_rng(7)
    n = 24 * 40
    values = rng.poisson(20 + 10 * np.sin(np.arange(n) * 2 * np.pi / 24)).astype(float)
    values[500:506] += 60
    values[700:704] = 0
    params = detector.Params(
        period=24,
        slot_spread=0,
        smooth=3,
        scale_every=1,
        refractory=12,
        warmup=36,
        likelihood_every=8,
        threshold=4.0,
        direction=direction,  # type: ignore[arg-type]
    )
    recorded = nab_harness.trace(values, params)

    for threshold, epsilon, refractory in ((4.0, 1e-5, 12), (3.0, 1e-2, 6), (6.0, 1e-3, 24)):
        own = detector.detect_series(
            values,
            dataclasses.replace(
                params, threshold=threshold, likelihood_epsilon=epsilon, refractory=refractory
            ),
        )
        decided = nab_harness.decide(recorded, threshold, epsilon, refractory)
        assert decided.tolist() == own.anomaly.tolist()
    assert nab_harness.decide(recorded, 4.0, 1e-5, 12)[500:510].any()
