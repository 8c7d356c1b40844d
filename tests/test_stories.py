"""The streaming term detector, the story layer and the forecast, on generated series."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pytest
from django.core.management import call_command

from ingest import selectors
from mlengine.models import Trend
from mlengine.trends import params as trend_params
from mlengine.trends.detector import TermStream, TermWindow, TrendParams, score_term, score_terms
from mlengine.trends.forecast import forecast, project_bucket_count, theil_sen_slope
from mlengine.trends.stories import StoryDetector, StoryParams
from tests.factories import (
    ORIGIN,
    burst,
    envelope,
    make_personas,
    make_source,
    quiet_history,
    run_through,
)

PARAMS = TrendParams(
    bucket_s=900, baseline_buckets=24, min_history_buckets=3, min_score=4.0, min_events=5
)


@dataclass(frozen=True)
class Post:
    id: int
    created_at: datetime
    author: str
    terms: tuple[str, ...]


class Feed:
    """Generated posts: each a fresh id, by a distinct author unless told."""

    def __init__(self) -> None:
        self.posts: list[Post] = []

    def add(self, minutes: float, terms: tuple[str, ...], author: str | None = None) -> None:
        n = len(self.posts)
        at = ORIGIN + timedelta(minutes=minutes)
        self.posts.append(Post(n, at, author or f"u{n}", terms))

    def quiet(self, buckets: int, per_bucket: int = 10) -> None:
        """Everyday chatter: the same common words in every bucket."""
        for b in range(buckets):
            for i in range(per_bucket):
                self.add(b * 15 + i, ("airport", "today", f"w{i}"))

    def story(self, minutes: float, terms: tuple[str, ...], count: int, **kw: str) -> None:
        """``count`` posts, each with every term of ``terms``, 0.05 min apart."""
        for i in range(count):
            self.add(minutes + i * 0.05, terms, **kw)

    def sorted(self) -> list[Post]:
        return sorted(self.posts, key=lambda p: (p.created_at, p.id))


def test_the_vectorised_score_is_the_scalar_score_window_by_window() -> None:
    rng = np.random.default_rng(7)
    n = 200
    cols = {
        "events": rng.integers(0, 60, n),
        "authors": rng.integers(0, 60, n),
        "bucket_total": rng.integers(1, 400, n),
        "source_authors": rng.integers(0, 300, n),
        "hist_events": rng.integers(0, 500, n),
        "hist_total": rng.integers(0, 5000, n),
        "hist_buckets": rng.integers(0, 25, n),
        "mean_bucket_total": rng.uniform(0, 300, n),
        "prev_events": rng.integers(0, 60, n),
    }

    scores = score_terms(PARAMS, **cols)
    singles = [
        score_term(TermWindow(term="t", **{k: v[i].item() for k, v in cols.items()}), PARAMS)
        for i in range(n)
    ]

    assert [s.is_trend for s in singles] == scores.is_trend.tolist()
    assert [s.score for s in singles] == np.round(scores.score, 4).tolist()
    assert 0 < int(scores.is_trend.sum()) < n


@pytest.mark.django_db
@pytest.mark.usefixtures("clean_redis")
def test_the_streaming_detector_gives_productions_verdicts() -> None:
    source = make_source(make_personas().team)
    envelopes = sorted(
        quiet_history(12)
        + burst("#blizzard", count=12, minutes=6 * 15 + 1)
        + burst("#snowday", count=9, minutes=6 * 15 + 5, authors=3)
        + burst("#buynow", count=30, minutes=8 * 15 + 2, authors=1)
        + burst("#blizzard", count=40, minutes=10 * 15 + 3),
        key=lambda e: e.created_at,
    )
    run_through(source, envelopes, batch_size=37)
    stored = {
        (t.term, t.bucket_start, t.evidence_created_at, t.predicted, t.confirmed_at)
        for t in Trend.objects.filter(source=source)
    }
    posts = selectors.events_for_trends(
        source.id, since=None, until=ORIGIN + timedelta(days=1), limit=10_000
    )

    streamed = TermStream(TrendParams(bucket_s=900), emerging=True).step(posts)

    # The database keeps one row per term and bucket: its first detection (predicted or
    # not) and, for a prediction, when it came true; the stream reports both moments.
    first: dict[tuple, object] = {}
    confirmed: dict[tuple, object] = {}
    for t in streamed:
        key = (t.term, t.bucket_start)
        first.setdefault(key, t)
        if t.predicted is False and first[key] is not t:
            confirmed[key] = t.evidence_created_at
    replayed = {
        (*key, t.evidence_created_at, t.predicted, confirmed.get(key))  # type: ignore[attr-defined]
        for key, t in first.items()
    }
    assert replayed == stored
    assert {"#blizzard", "#snowday"} <= {t.term for t in streamed}
    assert any(row[3] for row in stored), "no emerging detection to compare"


@pytest.mark.django_db
def test_the_database_path_groups_trends_into_the_detectors_stories() -> None:
    # Production (advance_stream, then assign_stories) and the in-memory detector that
    # `evaluate trends` replays must cut the same stories from the same posts.
    source = make_source(make_personas().team)
    mixed = [
        envelope(text, minutes=6 * 15 + 1 + i * 0.05, author=f"a{i}")
        for i, text in enumerate(["#blizzard hits", "#snowstorm and #blizzard", "#snowstorm"] * 6)
    ]
    later = [
        envelope("#snowstorm over #boston", minutes=7 * 15 + 2 + i * 0.05, author=f"b{i}")
        for i in range(12)
    ]
    run_through(
        source,
        sorted(
            quiet_history(12) + mixed + later + burst("#flood", count=12, minutes=6 * 15 + 8),
            key=lambda e: e.created_at,
        ),
        batch_size=29,
    )
    stored: dict[int, set[str]] = {}
    for story_id, term in Trend.objects.filter(source=source).values_list("story_id", "term"):
        stored.setdefault(story_id, set()).add(term)
    posts = selectors.events_for_trends(
        source.id, since=None, until=ORIGIN + timedelta(days=1), limit=10_000
    )

    events = StoryDetector(TrendParams(bucket_s=900), trend_params.story_params()).step(posts)

    replayed: dict[int, set[str]] = {}
    for event in events:
        replayed.setdefault(event.story_id, set()).add(event.term)
    assert sorted(map(sorted, stored.values())) == sorted(map(sorted, replayed.values()))
    assert any({"#blizzard", "#snowstorm", "#boston"} <= terms for terms in stored.values())
    assert {"#flood"} in list(stored.values())


def test_verdicts_do_not_depend_on_how_the_stream_is_cut_into_steps() -> None:
    feed = Feed()
    feed.quiet(8)
    feed.story(8 * 15 + 1, ("#worldcup", "qatar"), 20)
    posts = feed.sorted()
    whole = TermStream(PARAMS).step(posts)
    one_by_one = TermStream(PARAMS)

    pieces = [t for post in posts for t in one_by_one.step([post])]

    assert pieces == whole and {t.term for t in whole} == {"#worldcup", "qatar"}


def test_terms_that_surge_together_are_one_story_and_alert_once() -> None:
    feed = Feed()
    feed.quiet(8)
    feed.story(8 * 15 + 1, ("#worldcup", "#fifaworldcup", "qatar"), 20)
    feed.story(8 * 15 + 2, ("earthquake", "tsunami"), 15)

    events = StoryDetector(PARAMS, StoryParams(emerging=False)).step(feed.sorted())

    firing = [e for e in events if e.kind == "new"]
    assert len(firing) == 2
    final = {e.story_id: set(e.terms) for e in events}
    assert sorted(final.values(), key=len) == [
        {"earthquake", "tsunami"},
        {"#worldcup", "#fifaworldcup", "qatar"},
    ]
    assert [e.kind for e in events].count("updated") == 3


def test_a_term_trending_alone_in_other_posts_is_its_own_story() -> None:
    feed = Feed()
    feed.quiet(8)
    feed.story(8 * 15 + 1, ("#worldcup", "qatar"), 20)
    feed.story(8 * 15 + 3, ("#worldcup",), 5)
    feed.story(8 * 15 + 4, ("strike",), 12)

    events = StoryDetector(PARAMS, StoryParams(emerging=False)).step(feed.sorted())

    assert [(e.kind, e.term) for e in events] == [
        ("new", "#worldcup"),
        ("updated", "qatar"),
        ("new", "strike"),
    ]


def test_a_story_of_few_accounts_does_not_alert() -> None:
    feed = Feed()
    feed.quiet(8)
    for i in range(100):
        feed.add(8 * 15 + 1 + i * 0.05, ("#buynow", "deal"), author=f"bot{i % 2}")

    assert StoryDetector(PARAMS).step(feed.sorted()) == []


def test_an_accelerating_everyday_term_emerges_before_it_is_confirmed_in_one_story() -> None:
    feed = Feed()
    for b in range(8):
        for i in range(20):
            feed.add(b * 15 + i * 0.5, ("airport", "today") + (("#storm",) if i < 3 else ()))
    for minute in range(15):
        feed.story(8 * 15 + minute, ("#storm",), minute // 2 + 1)

    events = StoryDetector(PARAMS).step(feed.sorted())

    assert [(e.kind, e.state, e.predicted) for e in events] == [
        ("emerging", "emerging", True),
        ("updated", "confirmed", False),
    ]
    assert events[0].trend.evidence_created_at < events[1].trend.evidence_created_at
    assert {e.story_id for e in events} == {1}


def test_a_story_closes_after_its_lifetime_and_a_new_surge_is_a_new_story() -> None:
    params = StoryParams(emerging=False, ttl_buckets=4)
    feed = Feed()
    feed.quiet(40)
    feed.story(8 * 15 + 1, ("#eclipse", "moon"), 20)
    feed.story(35 * 15 + 1, ("#eclipse", "moon"), 20)

    events = StoryDetector(PARAMS, params).step(feed.sorted())

    assert [(e.kind, e.story_id) for e in events if e.kind != "updated"] == [("new", 1), ("new", 2)]


def test_the_forecast_finds_the_peak_of_a_burst_shaped_series() -> None:
    hours = np.arange(0, 5)
    counts = 20_000 * np.exp(-((hours - 6.0) ** 2) / 8.0)

    found = forecast(counts.tolist(), horizon=4)

    assert found.method == "log-quadratic"
    assert found.buckets_to_peak == 2
    assert found.peak_volume == pytest.approx(20_000, rel=0.05)
    assert found.growth > 0 > found.acceleration


def test_the_forecast_of_steady_growth_is_exponential_and_robust_to_one_outlier() -> None:
    counts = [10 * 2.0**i for i in range(5)]
    counts[2] = 1000

    assert theil_sen_slope(np.log(counts)) == pytest.approx(np.log(2), rel=0.05)
    assert forecast([10, 20, 40], horizon=2).next_counts[0] > 40


def test_a_forecast_from_too_few_buckets_says_so_instead_of_extrapolating() -> None:
    # The case: a story of 6 posts forecast 49, 99, 199, 399.
    for counts in ([6], [0, 0, 0, 6], [0, 3, 6]):
        found = forecast(counts, horizon=4)
        assert (found.method, found.next_counts) == ("too_few_buckets", ())
        assert found.peak_volume == 6


def test_a_forecast_grows_no_faster_and_looks_no_further_than_its_data() -> None:
    # Three buckets that double: no step may more than double, and three buckets look
    # three ahead at most.
    found = forecast([5, 10, 20], horizon=8)

    assert len(found.next_counts) == 3
    ratios = np.diff(np.log1p([20, *found.next_counts]))
    assert np.all(ratios <= np.log1p(20) - np.log1p(10) + 1e-9)
    # A steady stream's story stays steady: no peak of thousands from a flat series.
    steady = forecast([3000, 3100, 2950, 3050], horizon=4)
    assert steady.peak_volume < 3200


def test_a_bucket_still_filling_is_projected_at_its_rate_so_far() -> None:
    projected = project_bucket_count([10, 10, 10], [450, 900, 60], 900)

    assert projected.tolist() == [20.0, 10.0, 40.0]


def test_bench_trends_reports_the_scoring_cost_per_window(tmp_path) -> None:
    out = tmp_path / "trends.json"

    call_command("bench", "trends", "--runs", "1", "--json", str(out))

    result = json.loads(out.read_text())
    assert set(result["windows"]) == {"1000", "10000", "100000"}
    for row in result["windows"].values():
        assert row["vectorised_us_per_window"] > 0 and row["scalar_us_per_window"] > 0


@pytest.mark.django_db
@pytest.mark.usefixtures("clean_redis")
def test_a_burst_that_opens_a_stream_trends_at_once_the_same_on_both_paths(settings) -> None:  # type: ignore[no-untyped-def]
    # Production's default: no history required. A stream that starts with its burst
    # trends in its first bucket on the term that dominates it, not on its chatter.
    settings.TRENDS_MIN_HISTORY_BUCKETS = 0
    source = make_source(make_personas().team)
    envelopes = sorted(
        burst("#derailment", count=40, minutes=1)
        + quiet_history(1)
        + quiet_history(6, per_bucket=10)[10:]
        + burst("#rescue", count=12, minutes=5 * 15 + 2),
        key=lambda e: e.created_at,
    )
    run_through(source, envelopes, batch_size=23)
    stored = {
        (t.term, t.bucket_start, t.evidence_created_at) for t in Trend.objects.filter(source=source)
    }
    posts = selectors.events_for_trends(
        source.id, since=None, until=ORIGIN + timedelta(days=1), limit=10_000
    )

    streamed = TermStream(TrendParams(bucket_s=900, min_history_buckets=0), emerging=True).step(
        posts
    )

    first: dict[tuple, object] = {}
    for t in streamed:
        first.setdefault((t.term, t.bucket_start), t)
    replayed = {(*key, t.evidence_created_at) for key, t in first.items()}  # type: ignore[attr-defined]
    assert replayed == stored
    opening = {term for term, start, _ in stored if start == ORIGIN}
    assert opening == {"#derailment"}  # the chatter of that bucket does not dominate it
    assert "#rescue" in {term for term, _, _ in stored}


def test_a_conservative_projection_starts_from_the_count_less_its_poisson_sigmas() -> None:
    # 9 posts in the first quarter of a bucket: 36 at face value, (9 - 3) * 4 = 24 with
    # one sigma off; never below the count itself.
    assert project_bucket_count([9], [225], 900)[0] == 36.0
    assert project_bucket_count([9], [225], 900, sigmas=1.0)[0] == 24.0
    assert project_bucket_count([4], [800], 900, sigmas=1.0)[0] == 4.0
