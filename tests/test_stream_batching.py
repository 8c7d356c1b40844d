"""One trend task advances several streams, scoring their windows together.

``mlengine.trends.stage.advance_stream`` takes, besides its own stream, other streams with
work pending whose clocks it can lock at once, steps them bucket by bucket in lockstep
and scores each round's windows of all of them in one ``score_terms`` call. Every
stream must end exactly as advancing it alone leaves it: counts, trends, stories,
clock, progress and hand-offs. Each case is checked against a copy of the same posts in
other sources, each advanced alone (``MAX_STREAMS_PER_ADVANCE = 0``).
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.db import connection, transaction

from ingest import persistence, selectors
from ingest.envelope import Envelope
from ingest.models import Event, Source
from mlengine.enrichment import stage as enrichment
from mlengine.models import BucketCount, StreamClock, Trend
from mlengine.trends import counts, scan
from mlengine.trends import params as trend_params
from mlengine.trends import stage as trend_stage
from mlengine.trends.detector import TermStream, score_terms
from teams.models import Team
from tests.factories import (
    ORIGIN,
    burst,
    commits_without_broker,
    envelope,
    make_personas,
    make_source,
    quiet_history,
)
from twiscope import guard, pipeline
from twiscope.redis import get_redis

pytestmark = pytest.mark.usefixtures("clean_redis")


def feeds() -> dict[str, tuple[int, list[Envelope]]]:
    """Three streams' posts, by name: ``(bucket_s, posts in event-time order)``. Their
    buckets differ in number and length (velocity depends on it), and their bursts make
    trends, emerging ones and a story of two terms."""
    mixed = [
        envelope(text, minutes=6 * 15 + 1 + i * 0.05, author=f"m{i}")
        for i, text in enumerate(["#blizzard hits", "#snowstorm and #blizzard", "#snowstorm"] * 6)
    ]
    streams = {
        "alpha": (900, quiet_history(8) + mixed + burst("#flood", count=12, minutes=8 * 15 + 1)),
        "beta": (
            900,
            quiet_history(12)
            + burst("#storm", count=12, minutes=6 * 15 + 1)
            + burst("#snowday", count=9, minutes=6 * 15 + 5, authors=3)
            + burst("#buynow", count=30, minutes=8 * 15 + 2, authors=1)
            + burst("#storm", count=40, minutes=10 * 15 + 3),
        ),
        "gamma": (
            1800,
            quiet_history(14, per_bucket=12) + burst("#quake", count=15, minutes=14 * 15 + 3),
        ),
    }
    return {
        name: (bucket_s, sorted(posts, key=lambda e: e.created_at))
        for name, (bucket_s, posts) in streams.items()
    }


def stored_sources(
    team: Team, feeds: dict[str, tuple[int, list[Envelope]]], suffix: str = ""
) -> list[Source]:
    """A source for each of ``feeds`` (named after it, plus ``suffix``), whose clock
    exists (its first task ran before any post came) and whose posts are then stored
    and enriched, the watermark past the last: all of it waits for the trend stage."""
    sources = []
    for name, (bucket_s, _) in feeds.items():
        source = make_source(team, name=name + suffix, bucket_s=bucket_s)
        trend_stage.advance_stream(source_id=source.id)
        sources.append(source)
    for source, (_, posts) in zip(sources, feeds.values(), strict=True):
        with commits_without_broker():
            key = persistence.stage_batch(
                source_id=source.id,
                envelopes=posts,
                watermark=posts[-1].created_at + timedelta(microseconds=1),
            )
            ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids
            enrichment.enrich_events(event_ids=ids, source_id=source.id)
    return sources


def outcome(source: Source) -> dict[str, Any]:
    """Everything the trend stage wrote about ``source``, free of row ids: its trends
    (samples by external id, story by its first trend's term), bucket counts, clock and
    progress count."""
    external = dict(Event.objects.filter(source=source).values_list("id", "external_id"))
    trends = list(Trend.objects.filter(source=source))
    story_term = {t.id: t.term for t in trends}
    return {
        "trends": sorted(
            (
                t.term,
                t.bucket_start,
                t.bucket_s,
                t.events,
                t.authors_count,
                t.expected,
                t.score,
                t.velocity,
                t.evidence_created_at,
                [external[i] for i in t.sample_event_ids],
                t.predicted,
                t.confirmed_at,
                story_term.get(t.story_id or 0),
                t.forecast,
            )
            for t in trends
        ),
        "buckets": sorted(
            BucketCount.objects.filter(source=source).values_list(
                "bucket_start", "events", "authors", "terms"
            )
        ),
        "clock": StreamClock.objects.filter(source=source)
        .values_list("watermark", "counted_events", "late_events")
        .get(),
        "progress": get_redis().get(
            pipeline.PROGRESS_KEY.format(stage="detect", source_id=source.id)
        ),
    }


def stored_detections(source: Source) -> set[tuple[Any, ...]]:
    """Each stored trend's first detection: term, bucket, evidence time, whether it was
    a prediction, and the verdict's expected count and velocity."""
    return set(
        Trend.objects.filter(source=source).values_list(
            "term", "bucket_start", "evidence_created_at", "predicted", "expected", "velocity"
        )
    )


def streamed_detections(source: Source, bucket_s: int, emerging: bool) -> set[tuple[Any, ...]]:
    """The same, from the in-memory detector (``TermStream``) on ``source``'s posts: an
    independent reference, one stream at a time."""
    posts = selectors.events_for_trends(
        source.id, since=None, until=ORIGIN + timedelta(days=30), limit=10_000
    )
    first: dict[tuple[Any, ...], Any] = {}
    for t in TermStream(trend_params.params_for(bucket_s), emerging=emerging).step(posts):
        first.setdefault((t.term, t.bucket_start), t)
    return {
        (*key, t.evidence_created_at, t.predicted, t.expected, t.velocity)
        for key, t in first.items()
    }


def handoffs(send_task: mock.MagicMock) -> dict[str, list[tuple[str, list[str]]]]:
    """What ``send_task`` was asked to queue, by stream name (a source's name up to its
    first "-"): each task's name, and the terms of the trends or the stream it names."""
    by_stream: dict[str, list[tuple[str, list[str]]]] = {}
    for call in send_task.call_args_list:
        name, kwargs = call.args[0], call.kwargs["kwargs"]
        trends = Trend.objects.filter(id__in=kwargs.get("trend_ids", []))
        sources = Source.objects.filter(id__in=[kwargs.get("source_id", 0)])
        stream = {t.source.name for t in trends} | {s.name for s in sources}
        by_stream.setdefault(stream.pop().split("-")[0], []).append(
            (name, sorted(t.term for t in trends))
        )
    return by_stream


def count_all(sources: list[Source]) -> None:
    """Call ``advance_stream`` for ``sources[0]`` until every stream is counted."""
    stored = Event.objects.filter(source__in=sources).count()
    for _ in range(100):
        trend_stage.advance_stream(source_id=sources[0].id)
        counted = StreamClock.objects.filter(source__in=sources).values_list(
            "counted_events", flat=True
        )
        if sum(counted) == stored:
            return
    raise AssertionError("the streams were not counted in 100 advances")


@pytest.mark.django_db
@pytest.mark.parametrize(("max_events", "emerging"), [(5000, True), (5000, False), (90, True)])
def test_one_advance_leaves_each_stream_as_advancing_it_alone(
    max_events: int, emerging: bool, settings: Any
) -> None:
    settings.TRENDS_EMERGING = emerging
    team = make_personas().team
    data = feeds()
    together = stored_sources(team, data)
    with (
        mock.patch.object(trend_stage, "MAX_EVENTS_PER_ADVANCE", max_events),
        commits_without_broker() as sent_together,
    ):
        count_all(together)
    alone = stored_sources(team, data, suffix="-alone")
    with (
        mock.patch.object(trend_stage, "MAX_EVENTS_PER_ADVANCE", max_events),
        mock.patch.object(trend_stage, "MAX_STREAMS_PER_ADVANCE", 0),
        commits_without_broker() as sent_alone,
    ):
        for source in alone:
            count_all([source])

    assert [outcome(s) for s in together] == [outcome(s) for s in alone]
    assert [stored_detections(s) for s in together] == [
        streamed_detections(s, bucket_s, emerging)
        for s, (bucket_s, _) in zip(together, data.values(), strict=True)
    ]
    assert all(outcome(s)["trends"] for s in together)
    assert any(row[3] for s in together for row in stored_detections(s)) == emerging
    assert handoffs(sent_together) == handoffs(sent_alone)


@pytest.mark.django_db
def test_a_round_scores_the_windows_of_every_stream_in_one_call() -> None:
    team = make_personas().team
    data = feeds()
    together = stored_sources(team, data)
    with mock.patch.object(scan, "score_terms", wraps=score_terms) as batched:
        trend_ids = trend_stage.advance_stream(source_id=together[1].id)
    alone_calls = []
    for name, feed in data.items():
        (source,) = stored_sources(team, {name: feed}, suffix="-alone")
        with (
            mock.patch.object(trend_stage, "MAX_STREAMS_PER_ADVANCE", 0),
            mock.patch.object(scan, "score_terms", wraps=score_terms) as scored,
        ):
            trend_stage.advance_stream(source_id=source.id)
        alone_calls.append(scored.call_count)

    # Every bucket of every stream has candidate windows: one call (two with the
    # emerging projection) per round, as many rounds as the longest stream has buckets.
    assert batched.call_count == max(alone_calls) < sum(alone_calls)
    assert all(StreamClock.objects.get(source=s).counted_events for s in together)
    # The task returns its own stream's new trends only.
    assert set(Trend.objects.filter(id__in=trend_ids).values_list("source", flat=True)) == {
        together[1].id
    }


@pytest.mark.django_db
def test_an_advance_takes_no_more_streams_once_it_holds_its_budget_of_events() -> None:
    team = make_personas().team
    alpha, beta, gamma = stored_sources(team, feeds())
    budget = Event.objects.filter(source__in=[alpha, beta]).count()

    with (
        mock.patch.object(trend_stage, "MAX_EVENTS_PER_BATCH", budget),
        commits_without_broker(),
    ):
        trend_stage.advance_stream(source_id=alpha.id)

    counted = [StreamClock.objects.get(source=s).counted_events for s in (alpha, beta, gamma)]
    stored = [Event.objects.filter(source=s).count() for s in (alpha, beta)]
    assert counted == [*stored, 0]


@pytest.mark.django_db
def test_a_stream_that_cannot_be_counted_does_not_stall_the_others() -> None:
    team = make_personas().team
    alpha, beta, gamma = stored_sources(team, feeds())
    load = counts.History.load

    def broken(source_id: int, **kwargs: Any) -> Any:
        if source_id == beta.id:
            raise RuntimeError("beta cannot be counted")
        return load(source_id, **kwargs)

    with (
        mock.patch.object(counts.History, "load", side_effect=broken),
        commits_without_broker(),
    ):
        trend_stage.advance_stream(source_id=alpha.id)  # with beta: rolled back, alone
        counted_alone = [StreamClock.objects.get(source=s).counted_events for s in (beta, gamma)]
        trend_stage.advance_stream(source_id=gamma.id)
        beta_alone = trend_stage.advance_stream(source_id=beta.id)

    assert counted_alone == [0, 0]
    # Beta's own failure counts one attempt toward its dead letter (tests/test_dead_letters.py).
    assert beta_alone == []
    assert guard.attempts("detect", "stream", f"{beta.id}@start") == 1
    assert (
        StreamClock.objects.get(source=alpha).counted_events
        == Event.objects.filter(source=alpha).count()
    )
    assert (
        StreamClock.objects.get(source=gamma).counted_events
        == Event.objects.filter(source=gamma).count()
    )
    assert StreamClock.objects.get(source=beta).counted_events == 0


@pytest.mark.django_db(transaction=True)
def test_a_stream_another_worker_holds_is_left_to_its_own_task() -> None:
    team = make_personas().team
    alpha, beta, gamma = stored_sources(team, feeds())
    held, release = threading.Event(), threading.Event()

    def other_worker() -> None:
        with transaction.atomic():
            StreamClock.objects.select_for_update().get(source=beta)
            held.set()
            release.wait(30)
        connection.close()

    worker = threading.Thread(target=other_worker)
    worker.start()
    try:
        assert held.wait(10)
        with commits_without_broker():
            trend_stage.advance_stream(source_id=alpha.id)
        beta_while_held = StreamClock.objects.get(source=beta).watermark
    finally:
        release.set()
        worker.join()
    with commits_without_broker():
        trend_stage.advance_stream(source_id=beta.id)

    assert beta_while_held is None
    for source in (alpha, beta, gamma):
        clock = StreamClock.objects.get(source=source)
        assert clock.counted_events == Event.objects.filter(source=source).count()
