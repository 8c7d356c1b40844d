"""Always-on terms (issue "Alerts that are right", items 3 and 4): a stream's everyday
terms, learned from its history, neither start nor link stories by themselves; no trend
fires at or below its expected count. On the real airline archive (the README's demo)
through production's in-memory detector, and on the database path with the real trend
and alerts stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from alerts import evaluation
from alerts.models import Alert
from ingest.envelope import Envelope
from mlengine.evaluation.alertbench import load_background
from mlengine.evaluation.crisislex import event_dirs, load_event, production_params
from mlengine.models import Trend
from mlengine.trends.detector import TermTrend
from mlengine.trends.params import story_params
from mlengine.trends.stories import StoryDetector, StoryEvent
from tests.factories import envelope, make_personas, make_rule, make_source, run_through

AIRLINE_HANDLES = {
    "@united",
    "@usairways",
    "@americanair",
    "@southwestair",
    "@jetblue",
    "@virginamerica",
}


def airline_stories(data: Path) -> tuple[list[StoryEvent], StoryDetector]:
    posts = load_background(data / "airline_tweets" / "Tweets.csv")
    detector = StoryDetector(production_params(posts), story_params())
    return detector.step(posts), detector


def by_story(events: list[StoryEvent]) -> dict[int, list[StoryEvent]]:
    stories: dict[int, list[StoryEvent]] = {}
    for event in events:
        stories.setdefault(event.story_id, []).append(event)
    return stories


def test_on_the_airline_archive_no_story_is_made_of_the_streams_handles(shared_data: Path) -> None:
    events, _ = airline_stories(shared_data)
    stories = by_story(events)

    # Before: 30 stories over the 8 days, 20 of them made of airline handles alone.
    assert 0 < len(stories) <= 8
    for story_events in stories.values():
        terms = set(story_events[-1].terms)
        assert not terms <= AIRLINE_HANDLES, terms
        first = story_events[0].trend
        # A story starts on a term that is not always on: a handle's busy hour is no story.
        assert not first.always_on, first
    # The handles are learned as the stream's always-on terms: they trend, but alone.
    always_on = {e.trend.term for e in events if e.trend.always_on}
    assert always_on <= AIRLINE_HANDLES | {"flight", "cancelled", "service"}


def test_on_the_airline_archive_no_handle_is_the_sole_link_of_a_story(shared_data: Path) -> None:
    events, _ = airline_stories(shared_data)
    linked: dict[int, set[str]] = {}
    for event in events:
        # Every term a story took in after its first joined through posts of the story's
        # members that are not always on (StoryDetector compares only those).
        linked.setdefault(event.story_id, set())
        if not event.trend.always_on:
            linked[event.story_id].add(event.term)
    for story_id, members in by_story(events).items():
        assert linked[story_id], f"story {story_id} holds only always-on terms"
        assert set(members[-1].terms) - AIRLINE_HANDLES, members[-1].terms


def assert_above_expectation(trend: TermTrend) -> None:
    if trend.predicted:
        assert trend.projected is not None and trend.projected > trend.expected, trend
    else:
        assert trend.events > trend.expected, trend
    assert trend.score > 0


def test_no_trend_fires_at_or_below_its_expected_count_on_real_streams(shared_data: Path) -> None:
    events, _ = airline_stories(shared_data)
    trends = [e.trend for e in events]
    for folder in event_dirs(shared_data / "crisislex_t26")[:6]:
        posts = list(load_event(folder).posts)
        detector = StoryDetector(production_params(posts), story_params())
        trends += [e.trend for e in detector.step(posts)]

    assert len(trends) > 50
    assert any(t.predicted for t in trends)
    for trend in trends:
        assert_above_expectation(trend)


def brand_stream() -> list[Envelope]:
    """Six hours of a brand-complaints stream: @acme in every post, by many authors;
    then a busy quarter hour of @acme complaints (three times the volume), then two
    unrelated bursts (#outage, #recall) whose posts share nothing but @acme."""
    history = [
        envelope(f"@acme my order number {b}-{i} is late", minutes=b * 15 + i, author=f"h{b}-{i}")
        for b in range(28)
        for i in range(10)
    ]
    busy = [
        envelope(f"@acme my order number x{i} is late", minutes=28 * 15 + i * 0.5, author=f"b{i}")
        for i in range(30)
    ]
    outage = [
        envelope(f"@acme #outage app down again {i}", minutes=30 * 15 + i * 0.2, author=f"o{i}")
        for i in range(12)
    ]
    recall = [
        envelope(f"@acme #recall of the kettles {i}", minutes=30 * 15 + 1 + i * 0.2, author=f"r{i}")
        for i in range(12)
    ]
    return sorted(history + busy + outage + recall, key=lambda e: e.created_at)


@pytest.mark.django_db
@pytest.mark.usefixtures("clean_redis")
def test_a_handle_in_every_post_neither_alerts_alone_nor_merges_stories_in_production() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team)
    named = make_rule(personas.team, terms=["@acme"])

    created = evaluation.evaluate_trends(trend_ids=run_through(source, brand_stream()))

    acme = Trend.objects.filter(term="@acme")
    # @acme trends (a quarter hour of its posts, projected) but starts no story: it may
    # only join one whose other members hold enough of its posts.
    assert acme.exists() and all(t.always_on and t.story_id != t.id for t in acme)
    stories = {t.term: t.story_id for t in Trend.objects.filter(term__in=["#outage", "#recall"])}
    assert set(stories) == {"#outage", "#recall"}
    assert stories["#outage"] != stories["#recall"]  # @acme is not the link between them
    alerts = Alert.objects.filter(id__in=created)
    general = [a.evidence["story"]["terms"][0] for a in alerts if a.rule_id != named.id]
    assert sorted(general) == ["#outage", "#recall"]
    # A rule that names the handle is still told of its busy quarter hour.
    assert [a.evidence["term"] for a in alerts if a.rule_id == named.id] == ["@acme"]
    for trend in Trend.objects.filter(source=source):
        if trend.predicted:
            assert trend.projected is not None and trend.projected > trend.expected
        else:
            assert trend.events > trend.expected
