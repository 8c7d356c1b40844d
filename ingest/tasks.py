"""Celery entry points of the ``ingest`` queue: thin shells around
``ingest.persistence`` and ``ingest.services``.

Each re-reads its rows and quietly does nothing if they are gone or already done, so
``acks_late`` redelivery is safe.
"""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from ingest import persistence, services


@shared_task(name="ingest.persist_batch", soft_time_limit=60, time_limit=90)
def persist_batch(*, batch_key: str, source_id: int) -> int:
    """Persist a staged raw batch; returns how many new events were stored."""
    return len(persistence.persist_batch(batch_key=batch_key, source_id=source_id).inserted_ids)


@shared_task(name="ingest.sweep", soft_time_limit=25, time_limit=30)
def sweep() -> int:
    """Periodic: re-send staged batches stuck for ``PIPELINE_STUCK_AFTER_S`` seconds
    (never sent, or lost: see ``twiscope.pipeline.stuck``); returns how many."""
    return persistence.sweep_staged_batches(older_than_s=settings.PIPELINE_STUCK_AFTER_S)


@shared_task(name="ingest.analyze_growing_tables", soft_time_limit=50, time_limit=60)
def analyze_growing_tables() -> list[str]:
    """Periodic: refresh planner statistics of tables the pipeline fills fast."""
    return services.analyze_growing_tables()


@shared_task(name="ingest.declare_live_progress", soft_time_limit=4, time_limit=10)
def declare_live_progress() -> int:
    """Periodic: live sources' declared watermarks follow processing time."""
    return services.declare_live_progress()
