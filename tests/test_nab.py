"""NAB's scoring rules (mlengine.evaluation.nab) on hand-computed cases.

Every file below has 100 rows at 5-minute steps, so NAB's probationary period is
floor(0.15 * 100) = 15 rows, and one labelled window covers rows 40..49 (10 rows).
NAB's scaled sigmoid is sigma(y) = 2 / (1 + exp(5 y)) - 1 = -tanh(2.5 y); a true positive
is worth sigma(y) / sigma(-1) with y = -(49 - i + 1) / 10, and sigma(-1) = tanh(2.5) =
0.986614.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from mlengine.evaluation import nab

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
