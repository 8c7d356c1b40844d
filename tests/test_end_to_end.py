"""The whole path through real Celery workers, PostgreSQL, Redis and the channel layer.

A replayed batch of events becomes stored events, a trend, an alert row and a
WebSocket message received by a connected client.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from django.core.management import call_command

from alerts.models import Alert
from ingest import persistence
from ingest.models import DeadLetter, Event, Source
from mlengine.models import StreamClock, Trend
from tests.factories import (
    api_key,
    burst,
    make_personas,
    make_rule,
    make_source,
    quiet_history,
    token_socket,
)

SAMPLES = Path(__file__).resolve().parent / "samples"

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _setup():
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team, name="new trends")
    return personas, source, api_key(personas.member)


def _enqueue(source, envelopes) -> None:
    """As a replay does: batches in event-time order, each declaring its last event time
    as the source's watermark, then the end of the stream."""
    for i in range(0, len(envelopes), 50):
        batch = envelopes[i : i + 50]
        persistence.enqueue_envelopes(
            source=source, envelopes=batch, watermark=batch[-1].created_at
        )
    persistence.end_of_stream(source=source, event_time=envelopes[-1].created_at)


def _wait_until_counted(source, count: int, timeout_s: float = 30) -> None:
    """Wait until ``count`` events of ``source`` are counted by the trend stage."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        clock = StreamClock.objects.filter(source=source).first()
        if clock is not None and clock.counted_events >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} events counted after {timeout_s} s")


async def test_a_replayed_burst_reaches_a_connected_dashboard(celery_worker) -> None:
    personas, source, token = await database_sync_to_async(_setup)()
    client = token_socket(token)
    connected, _ = await client.connect()
    assert connected
    assert (await client.receive_json_from())["type"] == "hello"
    envelopes = quiet_history(6) + burst("#blizzard", count=12, minutes=91)

    await database_sync_to_async(_enqueue)(source, envelopes)
    message = await client.receive_json_from(timeout=30)
    messages = [message]
    while not await client.receive_nothing(timeout=1):
        messages.append(await client.receive_json_from())

    blizzard = [m for m in messages if m["alert"]["evidence"]["term"] == "#blizzard"]
    assert len(blizzard) == 1
    assert blizzard[0]["type"] == "alert.created" and blizzard[0]["team"] == personas.team.id
    assert blizzard[0]["alert"]["latency_ms"] is not None
    assert await database_sync_to_async(Event.objects.filter(source=source).count)() == 72
    trend = await database_sync_to_async(Trend.objects.get)(term="#blizzard")
    assert trend.events == 12
    alert = await database_sync_to_async(Alert.objects.get)(id=blizzard[0]["alert"]["id"])
    assert alert.trend_id == trend.id and alert.pushed_at is not None
    await client.disconnect()


def test_a_redelivered_replay_stores_each_event_once(celery_worker) -> None:
    _personas, source, _ = _setup()
    envelopes = quiet_history(4)

    _enqueue(source, envelopes)
    _enqueue(source, envelopes)
    persistence.wait_for_capacity(source=source, max_in_flight=1, timeout_s=30)
    _wait_until_counted(source, 40)

    assert Event.objects.filter(source=source).count() == 40
    assert StreamClock.objects.get(source=source).counted_events == 40


def test_a_broken_archive_loses_none_of_its_good_rows(celery_worker, tmp_path) -> None:
    personas, _, _ = _setup()
    good = (SAMPLES / "telegram.json").read_text(encoding="utf-8")
    items = json.loads(good)
    broken = tmp_path / "channel.json"
    # Every good message, then a message with a bad date, one with invalid UTF-8, and a
    # truncated last object.
    body = json.dumps(items, ensure_ascii=False)[:-1]
    broken.write_bytes(
        body.encode()
        + b', {"message_id": 900, "sender_id": -5, "text": "x", "date": "yesterday"}'
        + b', {"message_id": 901, "sender_id": -5, "text": "caf\xff",'
        + b' "date": "2024-12-04T09:00:28+00:00"}'
        + b', {"message_id": 902, "sender_id": -5, "te'
    )
    out = io.StringIO()

    call_command(
        "replay",
        str(broken),
        "--team",
        personas.team.slug,
        "--wait-workers",
        "0",
        stdout=out,
        stderr=io.StringIO(),
    )
    source = Source.objects.get(name="channel")
    persistence.wait_for_capacity(source=source, max_in_flight=1, timeout_s=30)

    stored = set(Event.objects.filter(source=source).values_list("external_id", flat=True))
    assert {f"{m['sender_id']}/{m['message_id']}" for m in items} <= stored
    assert "-5/901" in stored  # one bad byte costs the byte, not the message
    assert DeadLetter.objects.filter(source=source, stage="replay").count() == 2
    assert "skipped 2" in out.getvalue()
    _wait_until_counted(source, len(stored))
