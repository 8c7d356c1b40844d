"""Counters of the ingest app: staged batches, events in flight, events stored per
minute and the teams' event rates.

The staged batches are rows (``ingest.models.StagedBatch``); the other counts are Redis
keys, written by ``ingest.persistence`` and read by ``ingest.selectors`` and the
replay's back-pressure, which share the key names defined here.
"""

from __future__ import annotations

import time
from typing import cast

from django.conf import settings

from ingest.models import Event, StagedBatch
from twiscope import pipeline
from twiscope.redis import get_redis


def staged_batches(source_id: int) -> int:
    """How many batches of ``source_id`` are staged and not yet persisted."""
    return StagedBatch.objects.filter(source_id=source_id).count()


def in_flight_events(source_id: int, *, quick: bool = False) -> int:
    """Events of ``source_id`` accepted but not yet through the trend stage (approx.).

    Staged batches count ``INGEST_BATCH_SIZE`` each (an upper bound that costs one
    index-only count); stored events not yet counted by the trend stage come from the
    pipeline's progress counters (``twiscope.pipeline.in_flight``), and are at least
    the stored, unenriched ones not parked (a count of events, skipped with ``quick``: a
    cheaper estimate that may be low when Redis lost its counters).
    """
    staged = staged_batches(source_id) * settings.INGEST_BATCH_SIZE
    stored = pipeline.in_flight(source_id)
    if not quick:
        stored = max(
            stored,
            Event.objects.filter(
                source_id=source_id, enriched_at__isnull=True, parked_at__isnull=True
            ).count(),
        )
    return staged + stored


SOURCE_MINUTE_KEY = "twiscope:source-events:{source_id}:{minute}"
"""Events stored for a source in one minute (unix minute), kept a little over an hour."""


def events_last_hour(source_id: int, *, now: float | None = None) -> int:
    """Events stored for ``source_id`` in the last 60 whole minutes (processing time),
    from the per-minute counts ``count_source_events`` keeps."""
    minute = int((time.time() if now is None else now) // 60)
    keys = [
        SOURCE_MINUTE_KEY.format(source_id=source_id, minute=m)
        for m in range(minute - 59, minute + 1)
    ]
    values = cast("list[bytes | None]", get_redis().mget(keys))
    return sum(int(v) for v in values if v is not None)


def events_rate_name(team_id: int) -> str:
    """The rolling counter of events stored for a team (see ``twiscope.redis``; added to
    by ``ingest.persistence`` as batches persist)."""
    return f"events:team:{team_id}"


EVENTS_RATE_ALL = "events:all"
"""The rolling counter of events stored, all teams together."""


def count_source_events(source_id: int, amount: int, *, now: float | None = None) -> None:
    """Add ``amount`` stored events to ``source_id``'s count for the current minute
    (read by ``ingest.selectors.events_last_hour``)."""
    minute = int((time.time() if now is None else now) // 60)
    key = SOURCE_MINUTE_KEY.format(source_id=source_id, minute=minute)
    pipe = get_redis().pipeline()
    pipe.incrby(key, amount)
    pipe.expire(key, 3700)
    pipe.execute()
