"""The periodic jobs: work stuck between a commit and its dispatch is sent again."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from alerts.models import Alert
from ingest import services, tasks
from ingest.models import Event, Source
from mlengine import services as ml_services
from tests.factories import (
    ORIGIN,
    envelope,
    fire_blizzard_alerts,
    make_personas,
    make_source,
    quiet_history,
    run_through,
)
from twiscope.redis import get_redis

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]


def queued(queue: str) -> int:
    """Messages waiting in a queue of the real broker (Redis lists named as queues)."""
    return int(get_redis().llen(queue))


def test_events_never_enriched_or_counted_are_sent_again() -> None:
    source = make_source(make_personas().team)
    key = services.stage_batch(source_id=source.id, envelopes=[envelope("a"), envelope("b")])
    ids = services.persist_batch(batch_key=key, source_id=source.id).inserted_ids
    services.enrich_events(event_ids=ids[:1])
    Event.objects.update(received_at=timezone.now() - timedelta(minutes=10))
    Event.objects.filter(id=ids[0]).update(enriched_at=timezone.now() - timedelta(minutes=10))

    swept = tasks.sweep_stuck_events()

    assert swept["enrich"] == 1 and swept["trends"] == 1
    assert queued("enrich") == 1 and queued("ml") == 1


def test_fresh_work_is_left_alone() -> None:
    source = make_source(make_personas().team)
    key = services.stage_batch(source_id=source.id, envelopes=[envelope("a")])
    services.persist_batch(batch_key=key, source_id=source.id)

    swept = tasks.sweep_stuck_events()

    assert swept == {"batches": 0, "enrich": 0, "trends": 0, "alerts_pushed": 0}
    assert queued("enrich") == 0


def test_a_staged_batch_whose_task_was_lost_is_persisted_later(monkeypatch) -> None:
    source = make_source(make_personas().team)
    key = services.stage_batch(source_id=source.id, envelopes=[envelope("a")])
    get_redis().zadd(services.PENDING_BATCHES_KEY, {key: 0})  # staged long ago

    swept = tasks.sweep_stuck_events()

    assert swept["batches"] == 1 and queued("ingest") == 1


def test_an_alert_whose_push_was_lost_is_pushed() -> None:
    fire_blizzard_alerts(make_personas().team)
    Alert.objects.update(created_at=timezone.now() - timedelta(minutes=10))

    swept = tasks.sweep_stuck_events()

    assert swept["alerts_pushed"] == Alert.objects.count() > 0
    assert not Alert.objects.filter(pushed_at__isnull=True).exists()


def test_a_closed_stream_moves_its_watermark_past_its_last_bucket(
    django_capture_on_commit_callbacks,
) -> None:
    source = make_source(make_personas().team, bucket_s=900)
    key = services.stage_batch(source_id=source.id, envelopes=[envelope("a", minutes=5)])
    staged_only = ml_services.close_stream(source_id=source.id, event_time=ORIGIN)
    with django_capture_on_commit_callbacks(execute=True):
        ids = services.persist_batch(batch_key=key, source_id=source.id).inserted_ids
    last = Event.objects.get(id=ids[0]).created_at

    waiting = ml_services.close_stream(source_id=source.id, event_time=last)
    ml_services.update_trends(event_ids=services.enrich_events(event_ids=ids))
    closed = ml_services.close_stream(source_id=source.id, event_time=last)

    assert staged_only is False and waiting is False and closed is True
    assert Source.objects.get(id=source.id).watermark == last.replace(minute=15)


def test_a_quiet_live_source_has_its_watermark_advanced_but_a_replay_not() -> None:
    personas = make_personas()
    replay = make_source(personas.team, name="archive")
    live = Source.objects.create(team=personas.team, kind=Source.Kind.RSS, name="feed")
    long_ago = timezone.now() - timedelta(hours=1)
    Source.objects.update(last_received_at=long_ago)

    moved = ml_services.advance_idle_watermarks()

    assert moved == 1
    assert Source.objects.get(id=live.id).watermark > long_ago
    assert Source.objects.get(id=replay.id).watermark is None


@pytest.mark.django_db(transaction=True)
def test_tables_the_pipeline_filled_get_fresh_planner_statistics() -> None:
    source = make_source(make_personas().team)
    run_through(source, quiet_history(3))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")

    first = services.analyze_growing_tables(min_rows=10, fraction=0.0)
    again = services.analyze_growing_tables(min_rows=10, fraction=0.0)

    assert "ingest_event" in first and "mlengine_termcount" in first
    assert again == []
