"""Celery entry points of the ``ml`` queue: thin shells around ``mlengine.services``."""

from __future__ import annotations

from datetime import datetime

from celery import shared_task

from mlengine import services

CLOSE_STREAM_MAX_WAIT_S = 3600


@shared_task(name="ml.update_trends", soft_time_limit=60, time_limit=90)
def update_trends(*, event_ids: list[int]) -> int:
    """Count events into trend buckets and detect trends; returns new trend count."""
    return len(services.update_trends(event_ids=event_ids))


@shared_task(
    name="ml.close_stream",
    bind=True,
    max_retries=CLOSE_STREAM_MAX_WAIT_S,
    soft_time_limit=30,
    time_limit=60,
)
def close_stream(self, *, source_id: int, event_time: str) -> None:  # type: ignore[no-untyped-def]
    """Close a finished stream's buckets once its events are counted (polls each 1 s)."""
    if not services.close_stream(
        source_id=source_id, event_time=datetime.fromisoformat(event_time)
    ):
        raise self.retry(countdown=1)


@shared_task(name="ml.advance_idle_watermarks", soft_time_limit=30, time_limit=60)
def advance_idle_watermarks() -> int:
    """Periodic: close the last buckets of quiet live sources."""
    return services.advance_idle_watermarks()
