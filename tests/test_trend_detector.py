"""The trend detector's verdicts on hand-built count windows (no database)."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from ingest.services import events_per_active_day
from mlengine.trends.detector import (
    TermWindow,
    TrendParams,
    bucket_start,
    score_term,
    score_terms,
    suggest_bucket_s,
)


def suggest_trend_bucket_s(times: list[datetime]) -> int:
    return suggest_bucket_s(events_per_active_day(times), min_events=5)


PARAMS = TrendParams(
    bucket_s=900, min_history_buckets=3, min_score=4.0, min_events=5, min_authors=3
)


def window(**fields) -> TermWindow:
    base = {
        "term": "#x",
        "events": 10,
        "authors": 10,
        "bucket_total": 100,
        "source_authors": 80,
        "hist_events": 0,
        "hist_total": 2400,
        "hist_buckets": 24,
        "mean_bucket_total": 100.0,
        "prev_events": 0,
    }
    base.update(fields)
    return TermWindow(**base)


def test_a_new_term_used_by_many_authors_trends() -> None:
    verdict = score_term(window(), PARAMS)

    assert verdict.is_trend and verdict.score > 8 and verdict.expected < 0.1


def test_a_common_word_growing_with_the_whole_stream_does_not_trend() -> None:
    # 20% of all posts in the baseline, 20% of a bucket three times busier.
    verdict = score_term(window(events=60, authors=60, bucket_total=300, hist_events=480), PARAMS)

    assert not verdict.is_trend and abs(verdict.score) < 1


def test_one_author_in_a_many_author_stream_is_not_a_trend() -> None:
    assert not score_term(window(events=50, authors=1), PARAMS).is_trend


def test_a_single_account_stream_can_trend_on_its_own() -> None:
    verdict = score_term(window(events=8, authors=1, source_authors=1), PARAMS)

    assert verdict.is_trend


def test_too_few_events_never_trend_whatever_the_score() -> None:
    assert not score_term(window(events=4, authors=4), PARAMS).is_trend


def test_a_source_without_enough_history_has_no_trends() -> None:
    assert not score_term(window(hist_buckets=2), PARAMS).is_trend


def test_a_bucket_still_filling_is_judged_against_a_whole_buckets_volume() -> None:
    early = score_term(window(events=6, bucket_total=10, hist_events=24), PARAMS)
    full = score_term(window(events=6, bucket_total=100, hist_events=24), PARAMS)

    assert early.expected == full.expected


def test_velocity_is_the_change_in_events_per_minute() -> None:
    assert score_term(window(events=30, prev_events=0), PARAMS).velocity == pytest.approx(2.0)


def test_buckets_are_aligned_tumbling_windows() -> None:
    moment = datetime(2015, 2, 23, 18, 29, 59, tzinfo=UTC)

    assert bucket_start(moment, 900) == datetime(2015, 2, 23, 18, 15, tzinfo=UTC)
    assert bucket_start(moment, 86400) == datetime(2015, 2, 23, tzinfo=UTC)


@pytest.mark.parametrize(
    ("per_day", "bucket_s"),
    [(1800, 900), (400, 3600), (80, 6 * 3600), (36, 86400), (7, 7 * 86400), (1, 7 * 86400)],
)
def test_bucket_size_holds_twice_a_trends_minimum_on_an_average_day(
    per_day: int, bucket_s: int
) -> None:
    times = [datetime(2015, 1, d, 12, tzinfo=UTC) for d in (1, 2, 3) for _ in range(per_day)]

    assert suggest_trend_bucket_s(times) == bucket_s


def test_sizing_buckets_from_no_events_is_an_error() -> None:
    with pytest.raises(ValueError, match="no event times"):
        suggest_trend_bucket_s([])


def test_one_burst_day_makes_the_buckets_finer() -> None:
    quiet = [datetime(2015, 1, d, 12, tzinfo=UTC) for d in range(1, 11) for _ in range(10)]
    burst = [datetime(2015, 1, 11, 12, tzinfo=UTC)] * 700

    assert suggest_trend_bucket_s(quiet) == 86400
    assert suggest_trend_bucket_s(quiet + burst) == 6 * 3600


def test_posts_are_weighed_by_distinct_authors_except_in_a_few_author_stream() -> None:
    params = TrendParams()
    common = {
        "bucket_total": 5000,
        "hist_events": 100,
        "hist_total": 100_000,
        "hist_buckets": 24,
        "mean_bucket_total": 4000.0,
        "prev_events": 0,
    }

    crowd, few, channel = score_terms(
        params,
        events=[1000, 1000, 1000],
        authors=[199, 10, 1],
        source_authors=[199, 199, 1],
        **common,
    ).score

    # 1,000 posts by 10 accounts count as 10 * (1 + ln 100) ≈ 56; by 199 (under the cap)
    # as 199 * (1 + ln 5.03) ≈ 520; a one-account stream's 1,000 posts count 1,000.
    assert few < crowd < channel
    expected = 100.5 / (100_000 + params.prior_posts) * 5000
    weighted = 10 * (1 + math.log(100))
    assert few == pytest.approx((weighted - expected) / math.sqrt(expected + 1), rel=1e-9)


def test_a_sparse_baseline_does_not_expect_an_unseen_term_in_every_other_post() -> None:
    # A keyword-collected stream opens with its event: 2 posts of history, then 22 posts
    # of which 8 carry a new hashtag. Jeffreys' prior (prior_posts 1) expects the unseen
    # hashtag in 0.5 / 3 of the posts, 3.7 of 22: 8 is 2.0 sigma. The Beta(0.5, 4.5) prior
    # expects 0.5 / 7 of them, 1.6: 8 is 4.0 sigma, a trend. Against a baseline of 2,000 posts
    # the two priors agree to 0.2%.
    window = {
        "events": [8],
        "authors": [8],
        "bucket_total": [22],
        "source_authors": [22],
        "hist_events": [0],
        "hist_buckets": [1],
        "mean_bucket_total": [2.0],
        "prev_events": [0],
    }
    production = TrendParams(min_history_buckets=0)  # TRENDS_MIN_HISTORY_BUCKETS
    jeffreys = score_terms(replace(production, prior_posts=1.0), hist_total=2, **window)
    smoothed = score_terms(production, hist_total=2, **window)

    assert smoothed.expected[0] == pytest.approx(0.5 / 7 * 22)
    assert (bool(jeffreys.is_trend[0]), bool(smoothed.is_trend[0])) == (False, True)
    assert smoothed.score[0] == pytest.approx((8 - 22 / 14) / math.sqrt(22 / 14 + 1))
    busy = {**window, "bucket_total": [100], "mean_bucket_total": [80.0]}
    assert score_terms(TrendParams(), hist_total=2000, **busy).expected[0] == pytest.approx(
        score_terms(TrendParams(prior_posts=1.0), hist_total=2000, **busy).expected[0],
        rel=0.002,
    )


def test_with_no_history_required_only_a_term_dominating_a_new_streams_bucket_trends() -> None:
    # No baseline: the half-event prior expects every term in half the posts, so a term
    # must pass that by the test's margin (here 4 Poisson sigmas).
    cold = TrendParams(
        bucket_s=900, min_history_buckets=0, min_score=4.0, min_events=5, min_authors=3
    )
    first_bucket = {"hist_events": 0, "hist_total": 0, "hist_buckets": 0, "mean_bucket_total": 0.0}
    # 100 posts: expected 50, sd sqrt(51); 79 posts pass, 78 (3.9 sigmas) do not.
    dominant = score_term(window(events=79, authors=79, **first_bucket), cold)
    just_short = score_term(window(events=78, authors=78, **first_bucket), cold)
    half = score_term(window(events=50, authors=50, **first_bucket), cold)
    warm = score_term(window(events=79, authors=79, **first_bucket), PARAMS)

    assert dominant.is_trend and dominant.expected == 50.0 and dominant.score >= 4.0
    assert not just_short.is_trend and 3.9 < just_short.score < 4.0
    assert not half.is_trend
    assert not warm.is_trend  # three buckets of history required: the same window waits
