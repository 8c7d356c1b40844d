"""Story assignment reads the events of a whole call at once, with the same results.

``mlengine.trends.story_assignment.assign_stories`` reads, in one query, the events that any term of
its new trends or live stories holds in the range their posts and forecasts need, and
cuts each trend's posts and each story's volume from them in memory. Each case is
checked against the per-trend reads it replaced (``reference_assign_stories``: two
``events_for_term`` and one ``volume_of_terms`` a trend, one ``save`` a trend), replayed
call by call on the same stored trends: every ``story_id`` and ``forecast`` must be equal.

And the stories are a function of the events alone: the same events stored in one call
or in many, with the stored rows updated in another order, give the same stories and
forecasts (``test_the_same_events_give_the_same_stories_whatever_the_calls``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.conf import settings
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from ingest import selectors as ingest_selectors
from ingest.envelope import Envelope
from ingest.models import Source
from ingest.selectors import TrendInput
from mlengine.models import Trend
from mlengine.trends import stage as trend_stage
from mlengine.trends import story_assignment
from mlengine.trends.forecast import forecast_volume
from mlengine.trends.stories import StoryParams, choose_story
from tests.factories import (
    ORIGIN,
    burst,
    envelope,
    make_personas,
    make_source,
    quiet_history,
    run_through,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]


# --- The per-trend implementation this replaced, kept here as the reference. -----------


def reference_assign_stories(source_id: int, trend_ids: Sequence[int]) -> None:
    new = list(
        Trend.objects.filter(id__in=list(trend_ids)).order_by(
            "evidence_created_at", "bucket_start", "term", "id"
        )
    )
    if not new:
        return
    params = story_assignment.story_params()
    bucket_s = new[0].bucket_s
    ttl = timedelta(seconds=settings.TRENDS_BASELINE_BUCKETS * bucket_s)
    live_stories, last_bucket, always_on = story_assignment.live_stories(
        source_id, since=new[0].bucket_start - ttl
    )
    stories: dict[int, set[str]] = defaultdict(set, live_stories)
    for trend in new:
        live = {
            sid: terms
            for sid, terms in stories.items()
            if last_bucket[sid] >= trend.bucket_start - ttl
        }
        joined = next((sid for sid, terms in live.items() if trend.term in terms), None)
        if joined is None:
            linking = {sid: terms - always_on.get(sid, set()) for sid, terms in live.items()}
            joined = _reference_closest_story(source_id, trend, linking, params)
        if joined is None and trend.always_on:
            continue
        story_id = joined if joined is not None else trend.id
        if trend.always_on and trend.term not in stories[story_id]:
            always_on.setdefault(story_id, set()).add(trend.term)
        stories[story_id].add(trend.term)
        last_bucket[story_id] = max(
            trend.bucket_start, last_bucket.get(story_id, trend.bucket_start)
        )
        trend.story_id = story_id
        trend.forecast = _reference_story_forecast(
            source_id, trend, sorted(stories[story_id]), params
        )
        trend.save(update_fields=["story", "forecast"])


def _reference_closest_story(
    source_id: int, trend: Trend, live: dict[int, set[str]], params: StoryParams
) -> int | None:
    if not live:
        return None
    posts: list[TrendInput] = []
    for start in (trend.bucket_start - timedelta(seconds=trend.bucket_s), trend.bucket_start):
        end = min(trend.evidence_created_at, start + timedelta(seconds=trend.bucket_s - 1e-6))
        posts += ingest_selectors.events_for_term(
            source_id, trend.term, since=start, until=end, limit=params.max_postings
        )
    term_posts = {p.id for p in posts}
    candidates = {
        sid: {p.id for p in posts if terms.intersection(p.terms)} for sid, terms in live.items()
    }
    return choose_story(term_posts, candidates, params.min_overlap)


def _reference_story_forecast(
    source_id: int, trend: Trend, terms: list[str], params: StoryParams
) -> dict[str, Any]:
    bucket_s = trend.bucket_s
    now = int(trend.bucket_start.timestamp())
    since = trend.bucket_start - timedelta(seconds=bucket_s * (params.horizon + 2))
    volume = ingest_selectors.volume_of_terms(
        source_id, terms, since=since, until=trend.evidence_created_at, bucket_s=bucket_s
    )
    result = forecast_volume(
        volume,
        bucket_start=now,
        current=volume.get(now, 0),
        elapsed_s=(trend.evidence_created_at - trend.bucket_start).total_seconds(),
        bucket_s=bucket_s,
        horizon=params.horizon,
    )
    return {
        "next_counts": [round(v, 2) for v in result.next_counts],
        "peak_volume": round(result.peak_volume, 2),
        "buckets_to_peak": result.buckets_to_peak,
        "time_to_peak_s": result.buckets_to_peak * bucket_s,
        "growth": round(result.growth, 4),
        "acceleration": round(result.acceleration, 4),
        "method": result.method,
        "bucket_s": bucket_s,
    }


# --- Feeds --------------------------------------------------------------------------------


def mixed(texts: list[str], *, minutes: float, repeat: int, author: str) -> list[Envelope]:
    """``texts`` in turn, ``repeat`` times, 0.05 min apart, by distinct authors."""
    return [
        envelope(text, minutes=minutes + i * 0.05, author=f"{author}{i}")
        for i, text in enumerate(texts * repeat)
    ]


def tied_posts(*, minutes: float) -> list[Envelope]:
    """Six posts at one event time: three of "#smoke" alone, first by external id, then
    three of "#smoke" with "#fire", stored first. The first three by (event time,
    external id) share nothing with "#fire"; the first four, one in four."""
    together = [
        envelope("#smoke and #fire", minutes=minutes, author=f"t{i}", external_id=f"smoke-b{i}")
        for i in range(3)
    ]
    alone = [
        envelope("#smoke rising", minutes=minutes, author=f"a{i}", external_id=f"smoke-a{i}")
        for i in range(3)
    ]
    return together + alone


def feeds() -> dict[str, tuple[int, list[Envelope]]]:
    """Posts of several streams: stories that merge (terms posted together), a story
    growing over consecutive buckets, terms trending alone, many trends in one bucket,
    more posts of a term in a bucket than a small ``max_postings``, the longest hashtag."""
    long_tag = "#" + "x" * 199  # the longest a stored hashtag may be
    streams = {
        "alpha": (
            900,
            quiet_history(8)
            + mixed(
                ["#blizzard hits", "#snowstorm and #blizzard", "#snowstorm"],
                minutes=6 * 15 + 1,
                repeat=6,
                author="m",
            )
            + mixed(["#snowstorm over #boston"], minutes=7 * 15 + 2, repeat=12, author="b")
            + mixed(["#boston and #logan closed"], minutes=8 * 15 + 1, repeat=12, author="l")
            + burst("#flood", count=12, minutes=8 * 15 + 4)
            + burst(long_tag, count=12, minutes=9 * 15 + 1),
        ),
        "beta": (
            900,
            quiet_history(10)
            + [
                post
                for k in range(8)
                for post in burst(f"#topic{k}", count=10 + k, minutes=10 * 15 + 1 + k * 0.3)
            ]
            + mixed(["#topic1 #topic2 #merge"], minutes=11 * 15 + 1, repeat=14, author="t")
            + burst("#storm", count=30, minutes=11 * 15 + 5)
            + burst("#storm", count=60, minutes=12 * 15 + 3),
        ),
        "gamma": (
            600,
            quiet_history(12, per_bucket=12, bucket_min=10)
            + mixed(
                ["#quake felt", "#quake #tsunami warning", "#tsunami #quake #coast"],
                minutes=12 * 10 + 1,
                repeat=8,
                author="q",
            )
            + mixed(["#coast #evacuate now"], minutes=13 * 10 + 1, repeat=15, author="c"),
        ),
        "delta": (
            900,
            quiet_history(8)
            + burst("#fire", count=12, minutes=8 * 15 + 1)
            + tied_posts(minutes=9 * 15 + 1)
            + mixed(["#smoke from the #fire"], minutes=9 * 15 + 2, repeat=10, author="s"),
        ),
    }
    return {
        name: (bucket_s, sorted(posts, key=lambda e: e.created_at))
        for name, (bucket_s, posts) in streams.items()
    }


def run_recording(batch_size: int) -> tuple[list[Source], list[tuple[int, list[int]]]]:
    """Every feed through the pipeline in batches of ``batch_size``; returns the sources
    and each ``assign_stories`` call made, in order."""
    team = make_personas().team
    calls: list[tuple[int, list[int]]] = []
    real = story_assignment.assign_stories

    def record(source_id: int, trend_ids: Sequence[int]) -> None:
        calls.append((source_id, list(trend_ids)))
        real(source_id, trend_ids)

    sources = []
    with mock.patch.object(trend_stage, "assign_stories", side_effect=record):
        for name, (bucket_s, posts) in feeds().items():
            source = make_source(team, name=f"{name}-{batch_size}", bucket_s=bucket_s)
            run_through(source, posts, batch_size=batch_size)
            sources.append(source)
    return sources, calls


def stories_of(sources: Sequence[Source]) -> dict[int, tuple[int | None, Any]]:
    """``{trend id: (story id, forecast)}`` of every trend of ``sources``."""
    rows = Trend.objects.filter(source__in=list(sources)).values_list("id", "story_id", "forecast")
    return {trend_id: (story_id, forecast) for trend_id, story_id, forecast in rows}


def replay(sources: Sequence[Source], calls: list[tuple[int, list[int]]], assign: Any) -> Any:
    """Forget every story and forecast of ``sources``, make ``calls`` with ``assign``."""
    Trend.objects.filter(source__in=list(sources)).update(story=None, forecast={})
    for source_id, trend_ids in calls:
        assign(source_id, trend_ids)
    return stories_of(sources)


@pytest.mark.parametrize("batch_size", [17, 10_000])
@pytest.mark.parametrize(
    "params",
    [
        StoryParams(),
        StoryParams(max_postings=3),
        StoryParams(max_postings=3, min_overlap=0.25),
        StoryParams(max_postings=5, min_overlap=0.2, horizon=2),
    ],
    ids=["default", "postings-3", "postings-3-overlap-0.25", "postings-5-overlap-0.2"],
)
@pytest.mark.parametrize("events_limit", [story_assignment.STORY_EVENTS_LIMIT, 5])
def test_story_ids_and_forecasts_are_those_of_the_per_trend_reads(
    batch_size: int, params: StoryParams, events_limit: int
) -> None:
    with (
        mock.patch.object(story_assignment, "story_params", return_value=params),
        mock.patch.object(story_assignment, "STORY_EVENTS_LIMIT", events_limit),
    ):
        sources, calls = run_recording(batch_size)
        produced = stories_of(sources)
        expected = replay(sources, calls, reference_assign_stories)
        batched = replay(sources, calls, story_assignment.assign_stories)

    assert len(expected) > 20 and len(calls) >= len(sources)
    assert batched == expected
    assert produced == expected
    assert all(story_id is not None and forecast for story_id, forecast in expected.values())
    members: dict[int, int] = defaultdict(int)
    for story_id, _ in expected.values():
        members[story_id] += 1
    assert max(members.values()) >= 3, "a story that merges terms"
    if batch_size > 1000:
        # One call a stream took every trend: stories grew within the call.
        assert max(len(ids) for _, ids in calls) >= 8


def test_a_call_makes_the_same_few_queries_whatever_its_number_of_trends() -> None:
    sources, calls = run_recording(10_000)
    beta = next(source for source in sources if source.name.startswith("beta"))
    trend_ids = [trend_id for source_id, ids in calls if source_id == beta.id for trend_id in ids]
    assert len(trend_ids) >= 10
    counts = []
    for n in (1, 3, len(trend_ids)):
        Trend.objects.filter(source=beta).update(story=None, forecast={})
        with CaptureQueriesContext(connection) as queries:
            story_assignment.assign_stories(beta.id, trend_ids[:n])
        counts.append(len(queries))
    # The new trends, the live stories, the events, one update of them all.
    assert counts == [4, 4, 4]
    # The per-trend reads made about four a trend.
    Trend.objects.filter(source=beta).update(story=None, forecast={})
    with CaptureQueriesContext(connection) as queries:
        reference_assign_stories(beta.id, trend_ids)
    assert len(queries) >= 2 * len(trend_ids)


# --- The same events, other calls -----------------------------------------------------


def founders_feed() -> list[Envelope]:
    """ "#zebra" then "#apple" trend alone in one bucket (two stories, "#zebra" founded
    first, "#apple" first by term and by the id one insert gives it); in the next bucket
    "#storm" trends in posts holding both: an exact tie, which goes to the story
    founded first, as in ``StoryDetector``."""
    return sorted(
        quiet_history(8)
        + burst("#zebra", count=12, minutes=8 * 15 + 1)
        + burst("#apple", count=12, minutes=8 * 15 + 5)
        + mixed(["#storm with #zebra and #apple"], minutes=9 * 15 + 1, repeat=12, author="s"),
        key=lambda e: e.created_at,
    )


def old_member_feed() -> list[Envelope]:
    """ "#fire" trends alone (bucket 8); "#smoke" joins its story in bucket 20, in posts
    two in three of which hold "#fire" (too few for "#fire" to trend again); "#fire"
    trends alone again in bucket 34, its first trend now older than the baseline window
    but its story still live (its last member, bucket 20, is within it): "#fire" is a
    member of a live story and stays in it."""
    smoke = ["#smoke near the #fire", "#smoke near the #fire", "#smoke rising"]
    return sorted(
        quiet_history(36)
        + burst("#fire", count=12, minutes=8 * 15 + 1)
        + mixed(smoke * 2 + ["#smoke rising"] * 2, minutes=20 * 15 + 1, repeat=1, author="k")
        + burst("#fire", count=12, minutes=34 * 15 + 1),
        key=lambda e: e.created_at,
    )


def in_calls(source: Source, posts: list[Envelope], cuts: Sequence[float]) -> None:
    """``posts`` through the pipeline in one batch per span between ``cuts`` (minutes
    after the first bucket of ``quiet_history``), then the stream closed. Before each
    batch after the first, every stored trend of ``source`` is updated in reverse order
    of detection (as later members and confirmations touch their rows), so the rows lie
    in the table in another order than they were inserted."""
    edges = [ORIGIN + timedelta(minutes=m) for m in cuts]
    spans = [
        [e for e in posts if lo <= e.created_at < hi]
        for lo, hi in zip(
            [ORIGIN - timedelta(days=1), *edges],
            [*edges, ORIGIN + timedelta(days=30)],
            strict=True,
        )
    ]
    for n, span in enumerate(spans, start=1):
        for trend in Trend.objects.filter(source=source).order_by("-evidence_created_at"):
            Trend.objects.filter(pk=trend.pk).update(score=F("score"))
        run_through(source, span, batch_size=len(span), close=n == len(spans))


def verdicts_of(source: Source) -> dict[str, tuple[str, bool, Any]]:
    """``{term@bucket: (its story's first trend as term@bucket, predicted, forecast)}``."""
    trends = Trend.objects.filter(source=source)
    key = {
        t: f"{term}@{start:%d %H:%M}"
        for t, term, start in trends.values_list("id", "term", "bucket_start")
    }
    return {
        key[trend_id]: (key[story_id], predicted, forecast)
        for trend_id, story_id, predicted, forecast in trends.values_list(
            "id", "story_id", "predicted", "forecast"
        )
    }


@pytest.mark.parametrize(
    ("feed", "cuts", "joins"),
    [
        (founders_feed, [8 * 15 + 3, 8 * 15 + 10], ("#storm", "#zebra")),
        (old_member_feed, [20 * 15, 34 * 15], ("#fire", "#fire")),
    ],
    ids=["tie-to-the-first-founded", "a-member-older-than-the-window"],
)
def test_the_same_events_give_the_same_stories_whatever_the_calls(
    feed: Any, cuts: list[float], joins: tuple[str, str]
) -> None:
    team = make_personas().team
    posts = feed()
    whole = make_source(team, name="whole")
    run_through(whole, posts, batch_size=len(posts))
    cut = make_source(team, name="cut")
    in_calls(cut, posts, cuts)

    assert verdicts_of(cut) == verdicts_of(whole)
    term, founder = joins
    stories_of_term = {
        story for key, (story, _, _) in verdicts_of(whole).items() if key.startswith(f"{term}@")
    }
    assert len(verdicts_of(whole)) >= 3
    assert [story.split("@")[0] for story in stories_of_term] == [founder]
