"""Each stage's sweeper: work stuck between a commit and its dispatch is sent again, and
work merely waiting behind a backlog is not (``twiscope.pipeline.stuck``).

The broker is the real Redis; a queue is a Redis list named after it.
"""

from __future__ import annotations

import time
from datetime import timedelta
from unittest import mock

import pytest
from celery.contrib.testing.worker import start_worker
from django.test import TestCase
from django.utils import timezone

from alerts import evaluation, sweeps
from alerts.models import Alert
from ingest import counters, persistence, services
from ingest.models import Event, Source, StagedBatch
from mlengine.enrichment import stage as enrichment
from mlengine.enrichment import text
from mlengine.models import StreamClock, Trend
from mlengine.trends import stage as trend_stage
from tests.factories import (
    burst,
    commits_without_broker,
    envelope,
    fire_blizzard_alerts,
    make_personas,
    make_source,
    make_team,
    quiet_history,
    run_through,
)
from twiscope import pipeline
from twiscope.celery import app
from twiscope.redis import get_redis

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]


def queued(queue: str) -> int:
    """Messages waiting in a queue of the real broker."""
    return int(get_redis().llen(queue))


def age_dispatch_records(stage: str, seconds: float) -> None:
    """Make every dispatch record of ``stage`` ``seconds`` older."""
    key = pipeline.DISPATCH_KEY.format(stage=stage)
    redis = get_redis()
    for member, score in redis.zrange(key, 0, -1, withscores=True):
        redis.zadd(key, {member: score - seconds})


def persisted_long_ago(source: Source, count: int, *, dispatched: bool) -> list[int]:
    """``count`` events stored 10 minutes ago; their enrich task queued (for real, on
    the broker) when ``dispatched``, else lost between commit and dispatch."""
    key = persistence.stage_batch(
        source_id=source.id, envelopes=[envelope(f"post {i}") for i in range(count)]
    )
    with TestCase.captureOnCommitCallbacks(execute=dispatched):
        ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids
    Event.objects.filter(id__in=ids).update(received_at=timezone.now() - timedelta(minutes=10))
    age_dispatch_records("enrich", 600)
    return ids


def test_events_whose_enrich_task_was_never_sent_are_sent_again() -> None:
    source = make_source(make_personas().team)
    persisted_long_ago(source, 2, dispatched=False)

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = enrichment.sweep_unenriched(older_than_s=120)

    assert swept == 2
    assert queued("enrich") == 1


def test_events_queued_behind_a_backlog_are_not_sent_again() -> None:
    source = make_source(make_personas().team)
    persisted_long_ago(source, 3, dispatched=True)

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = enrichment.sweep_unenriched(older_than_s=120)

    assert swept == 0
    assert queued("enrich") == 1  # the original message, still waiting


def test_events_whose_message_was_lost_are_sent_again_once_the_queue_is_empty() -> None:
    source = make_source(make_personas().team)
    persisted_long_ago(source, 3, dispatched=True)
    get_redis().delete("enrich")  # the broker lost the message

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = enrichment.sweep_unenriched(older_than_s=120)

    assert swept == 3
    assert queued("enrich") == 1


def test_fresh_work_is_left_alone() -> None:
    source = make_source(make_personas().team)
    key = persistence.stage_batch(source_id=source.id, envelopes=[envelope("a")])
    with TestCase.captureOnCommitCallbacks(execute=False):
        persistence.persist_batch(batch_key=key, source_id=source.id)

    with TestCase.captureOnCommitCallbacks(execute=True):
        assert enrichment.sweep_unenriched(older_than_s=120) == 0
        assert persistence.sweep_staged_batches(older_than_s=120) == 0
    assert queued("enrich") == 0


def stage_long_ago(source: Source, *, seconds: float = 600) -> str:
    """Stage and queue a one-event batch (for real, on the broker), as if ``seconds``
    ago; returns its key."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        key = persistence.enqueue_envelopes(source=source, envelopes=[envelope("a")])
    StagedBatch.objects.filter(key=key).update(
        received_at=timezone.now() - timedelta(seconds=seconds)
    )
    age_dispatch_records("ingest", seconds)
    return key


def test_a_staged_batch_whose_task_was_lost_is_persisted_later() -> None:
    source = make_source(make_personas().team)
    stage_long_ago(source)
    get_redis().delete("ingest")  # lost

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = persistence.sweep_staged_batches(older_than_s=120)

    assert swept == 1
    assert queued("ingest") == 1


def test_a_staged_batch_waiting_behind_a_backlog_is_not_sent_again() -> None:
    source = make_source(make_personas().team)
    stage_long_ago(source)

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = persistence.sweep_staged_batches(older_than_s=120)

    assert swept == 0
    assert queued("ingest") == 1  # the original message, still waiting


def test_staged_batches_survive_a_redis_that_lost_everything() -> None:
    source = make_source(make_personas().team)
    key = stage_long_ago(source)
    get_redis().flushdb()  # the broker's queue and the dispatch records, gone

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = persistence.sweep_staged_batches(older_than_s=120)
    with commits_without_broker():
        stored = persistence.persist_batch(batch_key=key, source_id=source.id)

    assert swept == 1
    assert queued("ingest") == 1
    assert len(stored.inserted_ids) == 1
    assert not StagedBatch.objects.exists()


def test_an_alert_whose_push_was_lost_is_pushed() -> None:
    alert_ids = fire_blizzard_alerts(make_personas().team)
    Alert.objects.update(created_at=timezone.now() - timedelta(minutes=10))

    swept = sweeps.sweep(older_than_s=120)

    assert swept["alerts_pushed"] == len(alert_ids) >= 1
    assert not Alert.objects.filter(pushed_at__isnull=True).exists()


def test_a_trend_never_evaluated_is_sent_to_the_alert_stage_again() -> None:
    source = make_source(make_personas().team)
    run_through(source, quiet_history(6) + burst("#blizzard", count=12, minutes=91))
    Trend.objects.update(detected_at=timezone.now() - timedelta(minutes=10))
    age_dispatch_records("alerts", 600)  # sent ten minutes ago, and the queue is empty

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = sweeps.sweep(older_than_s=120)
    assert swept["trends"] == Trend.objects.count() >= 1
    assert queued("alerts") == 1

    evaluation.evaluate_trends(trend_ids=list(Trend.objects.values_list("id", flat=True)))
    get_redis().delete("alerts")
    with TestCase.captureOnCommitCallbacks(execute=True):
        assert sweeps.sweep(older_than_s=120)["trends"] == 0  # evaluated now


def test_a_stream_left_behind_by_a_lost_message_is_advanced() -> None:
    source = make_source(make_personas().team)
    run_through(source, [envelope("a", minutes=0), envelope("b", minutes=30)], close=False)
    StreamClock.objects.filter(source=source).update(watermark=None)
    Source.objects.filter(id=source.id).update(last_received_at=timezone.now())

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = trend_stage.sweep_streams(active_within_s=3600)

    assert swept == 1
    assert queued("detect") == 1


def test_a_quiet_live_source_declares_progress_but_a_replay_does_not() -> None:
    personas = make_personas()
    replay = make_source(personas.team, name="archive")
    live = Source.objects.create(team=personas.team, kind=Source.Kind.WEBHOOK, name="hook")
    feed = Source.objects.create(
        team=personas.team, kind=Source.Kind.RSS, name="feed", config={"poll_interval_s": 600}
    )

    with TestCase.captureOnCommitCallbacks(execute=True):
        moved = services.declare_live_progress()

    assert moved == 2
    assert Source.objects.get(id=replay.id).input_watermark is None
    declared = Source.objects.get(id=live.id).input_watermark
    assert timezone.now() - timedelta(seconds=5) < declared < timezone.now()
    # A feed's items come a poll late at best: its lateness is its interval + 1 h.
    feed_declared = Source.objects.get(id=feed.id).input_watermark
    expected = timezone.now() - timedelta(seconds=600 + 3600)
    assert abs((feed_declared - expected).total_seconds()) < 5
    assert queued("enrich") == 2  # handed on, so the streams advance


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_backlog_behind_a_stopped_enrich_pool_is_enriched_exactly_once() -> None:
    """20,000 events wait ten minutes behind a stopped enrich pool while the sweeper
    runs; then the pool starts, and the sweeper keeps running while it drains. Every
    text is enriched once: the sweeper re-sent nothing."""
    source = make_source(make_personas().team)
    for start in range(0, 20_000, 250):
        key = persistence.stage_batch(
            source_id=source.id,
            envelopes=[envelope(f"backlog post {i}") for i in range(start, start + 250)],
        )
        persistence.persist_batch(batch_key=key, source_id=source.id)
    assert queued("enrich") == 80
    # The backlog has waited ten minutes: far past the sweeper's 120 s.
    Event.objects.update(received_at=timezone.now() - timedelta(minutes=10))
    age_dispatch_records("enrich", 600)

    swept = [enrichment.sweep_unenriched(older_than_s=120) for _ in range(3)]
    assert swept == [0, 0, 0]
    assert queued("enrich") == 80

    calls = mock.Mock(wraps=text.enrich_text)
    with (
        mock.patch("mlengine.enrichment.stage.enrich_text", calls),
        start_worker(
            app,
            pool="solo",
            concurrency=1,
            perform_ping_check=False,
            queues=["enrich"],
            loglevel="WARNING",
            shutdown_timeout=30,
        ),
    ):
        deadline = time.monotonic() + 240
        while Event.objects.filter(enriched_at__isnull=True).exists():
            assert time.monotonic() < deadline, "the enrich pool did not drain the backlog"
            enrichment.sweep_unenriched(older_than_s=120)  # the sweeper keeps running
            time.sleep(0.5)

    assert calls.call_count == 20_000
    assert Event.objects.filter(enriched_at__isnull=False).count() == 20_000


def test_hand_offs_to_the_trend_stage_are_coalesced_per_stream() -> None:
    """Many enriched batches of one stream while its trend task waits: one task."""
    source = make_source(make_personas().team)
    other = make_source(make_team("desk"), name="other")

    with TestCase.captureOnCommitCallbacks(execute=True):
        for _ in range(5):
            pipeline.hand_off("enrich", source_id=source.id)
        pipeline.hand_off("enrich", source_id=other.id)
    assert queued("detect") == 2

    pipeline.started("detect", f"source:{source.id}")  # the worker took it
    with TestCase.captureOnCommitCallbacks(execute=True):
        pipeline.hand_off("enrich", source_id=source.id)
    assert queued("detect") == 3


def test_the_stream_sweep_corrects_a_skewed_in_flight_count() -> None:

    source = make_source(make_personas().team)
    run_through(source, [envelope("a", minutes=0), envelope("b", minutes=1)])
    Source.objects.filter(id=source.id).update(last_received_at=timezone.now())
    pipeline.add_progress("ingest", source.id, 500)  # as if counts were lost in a crash
    assert counters.in_flight_events(source.id) == 500

    with TestCase.captureOnCommitCallbacks(execute=True):
        trend_stage.sweep_streams(active_within_s=3600)

    assert counters.in_flight_events(source.id) == 0
