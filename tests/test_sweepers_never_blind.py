"""The sweepers read all their unfinished work, page after page, so a lost hand-off is
found however much finished work the day holds; and a lost message is sent again under
sustained load too: on Redis at once (its queue is read), on another broker once its
dispatch record is past ``PIPELINE_LOST_AFTER_S``.

Real PostgreSQL and Redis (the broker: a queue is a Redis list named after it)."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta
from typing import Any, cast

import pytest
from django.conf import settings
from django.test import TestCase
from django.utils import timezone

from alerts import sweeps
from alerts.models import TrendCheck
from ingest import persistence
from ingest.models import Event, Source
from mlengine.enrichment import stage as enrichment
from mlengine.models import Trend
from tests.factories import ORIGIN, envelope, make_personas, make_source
from twiscope import pipeline
from twiscope.redis import get_redis

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]


def queued_kwargs(queue: str) -> list[dict[str, Any]]:
    """The kwargs of each message waiting in a queue of the real broker."""
    raw = cast("list[bytes]", get_redis().lrange(queue, 0, -1))
    messages = [json.loads(message) for message in raw]
    return [json.loads(base64.b64decode(m["body"]))[1] for m in messages]


def set_dispatched(stage: str, item: int | str, *, seconds_ago: float) -> None:
    """Give ``item`` of ``stage`` a dispatch record written ``seconds_ago``."""
    get_redis().zadd(
        pipeline.DISPATCH_KEY.format(stage=stage), {str(item): time.time() - seconds_ago}
    )


def trends(source: Source, count: int, *, detected_ago_s: float, first: int = 0) -> list[int]:
    """``count`` trends of ``source`` detected ``detected_ago_s`` ago (one insert)."""
    detected = timezone.now() - timedelta(seconds=detected_ago_s)
    rows = Trend.objects.bulk_create(
        Trend(
            source=source,
            term=f"#t{i}",
            bucket_start=ORIGIN,
            bucket_s=900,
            events=20,
            expected=1.0,
            score=9.0,
            authors_count=20,
            velocity=1.0,
            detected_at=detected,
            updated_at=detected,
            evidence_received_at=ORIGIN,
            evidence_created_at=ORIGIN,
        )
        for i in range(first, first + count)
    )
    return [row.id for row in rows]


def test_a_lost_hand_off_behind_6000_evaluated_trends_of_the_day_is_swept() -> None:
    source = make_source(make_personas().team)
    # 6,000 trends detected at one instant (ties across the pages), all evaluated...
    evaluated = trends(source, 6000, detected_ago_s=600)
    now = timezone.now()
    TrendCheck.objects.bulk_create(TrendCheck(trend_id=i, checked_at=now) for i in evaluated)
    # ...and one detected a second later, whose hand-off to the alert stage was lost.
    (lost,) = trends(source, 1, detected_ago_s=599, first=6000)
    set_dispatched("alerts", lost, seconds_ago=599)

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = sweeps.sweep(older_than_s=120)

    assert swept["trends"] == 1
    assert queued_kwargs("alerts") == [{"trend_ids": [lost]}]


def test_a_sweep_pages_through_more_trends_than_a_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweeps, "SWEEP_PAGE", 3)
    source = make_source(make_personas().team)
    ids = trends(source, 10, detected_ago_s=600)
    now = timezone.now()
    TrendCheck.objects.bulk_create(TrendCheck(trend_id=i, checked_at=now) for i in ids[:-1])

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = sweeps.sweep(older_than_s=120)

    assert swept["trends"] == 1
    assert queued_kwargs("alerts") == [{"trend_ids": [ids[-1]]}]


def stored_long_ago(source: Source, texts: list[str], *, dispatched: bool) -> list[int]:
    """Events of ``texts`` received ten minutes ago, their enrich task queued (for real,
    on the broker) when ``dispatched``, else lost between commit and dispatch."""
    key = persistence.stage_batch(source_id=source.id, envelopes=[envelope(t) for t in texts])
    with TestCase.captureOnCommitCallbacks(execute=dispatched):
        ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids
    Event.objects.filter(id__in=ids).update(received_at=timezone.now() - timedelta(minutes=10))
    return ids


def test_a_lost_message_is_sent_again_under_load_once_past_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a broker whose queue cannot be read (RabbitMQ: ``queued_items`` is None); on
    Redis the sweeper reads the queue and finds it lost at once (tests/test_heartbeat.py)."""
    monkeypatch.setattr(pipeline, "queued_items", lambda stage: None)
    source = make_source(make_personas().team)
    stored_long_ago(source, ["waiting 1", "waiting 2"], dispatched=True)  # the load
    (lost,) = stored_long_ago(source, ["lost"], dispatched=False)
    assert len(queued_kwargs("enrich")) == 1  # the queue is never empty under load

    # Dispatched ten minutes ago: lost, or waiting behind the backlog? Not yet known.
    set_dispatched("enrich", lost, seconds_ago=600)
    with TestCase.captureOnCommitCallbacks(execute=True):
        assert enrichment.sweep_unenriched(older_than_s=120) == 0

    # No worker took it within the bound: no worker holds it, none will get it back.
    set_dispatched("enrich", lost, seconds_ago=settings.PIPELINE_LOST_AFTER_S + 60)
    with TestCase.captureOnCommitCallbacks(execute=True):
        assert enrichment.sweep_unenriched(older_than_s=120) == 1

    waiting = queued_kwargs("enrich")
    assert len(waiting) == 2
    assert {"event_ids": [lost], "source_id": source.id} in waiting


def test_unenriched_events_are_read_page_after_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enrichment, "SWEEP_PAGE", 2)
    source = make_source(make_personas().team)
    ids = stored_long_ago(source, [f"post {i}" for i in range(5)], dispatched=False)

    with TestCase.captureOnCommitCallbacks(execute=True):
        assert enrichment.sweep_unenriched(older_than_s=120) == 5

    assert queued_kwargs("enrich") == [{"event_ids": ids, "source_id": source.id}]


def test_a_worker_taking_an_anomaly_refreshes_its_dispatch_record() -> None:
    set_dispatched("alerts", "anomaly:7", seconds_ago=600)

    class Request:
        name = "alerts.evaluate_anomalies"
        kwargs = {"anomaly_ids": [7, 8]}

    pipeline._touch_on_receipt(request=Request())

    key = pipeline.DISPATCH_KEY.format(stage="alerts")
    assert time.time() - cast(float, get_redis().zscore(key, "anomaly:7")) < 5
    assert get_redis().zscore(key, "anomaly:8") is None  # done: not written again


def dispatched_items(stage: str) -> set[str]:
    key = pipeline.DISPATCH_KEY.format(stage=stage)
    return {m.decode() for m in cast("list[bytes]", get_redis().zrange(key, 0, -1))}


def test_records_a_killed_worker_left_on_finished_events_are_forgotten() -> None:
    # Killed between its commit and the on_commit that marks the events done: enriched
    # events keep their records. So does an event whose transaction rolled back.
    source = make_source(make_personas().team)
    enriched, waiting = stored_long_ago(source, ["done", "not yet"], dispatched=False)
    Event.objects.filter(id=enriched).update(enriched_at=timezone.now())
    never_committed = waiting + 1000
    young_orphan = waiting + 1001
    for item in (enriched, waiting, never_committed):
        set_dispatched("enrich", item, seconds_ago=600)
    set_dispatched("enrich", young_orphan, seconds_ago=125)  # maybe not committed yet

    with TestCase.captureOnCommitCallbacks(execute=True):
        enrichment.sweep_unenriched(older_than_s=120)

    assert dispatched_items("enrich") == {str(waiting), str(young_orphan)}


def test_records_of_evaluated_or_vanished_trends_are_forgotten() -> None:
    source = make_source(make_personas().team)
    evaluated, unevaluated = trends(source, 2, detected_ago_s=600)
    TrendCheck.objects.create(trend_id=evaluated, checked_at=timezone.now())
    for item in (evaluated, unevaluated, unevaluated + 1000, "anomaly:99", "viral:5"):
        set_dispatched("alerts", item, seconds_ago=600)

    with TestCase.captureOnCommitCallbacks(execute=True):
        sweeps.sweep(older_than_s=120)

    left = dispatched_items("alerts")
    assert str(evaluated) not in left and str(unevaluated + 1000) not in left
    assert "anomaly:99" not in left  # no such anomaly
    assert str(unevaluated) in left  # still to evaluate: sent again, record refreshed
