"""Celery entry points of the ``ingest`` and ``enrich`` queues: thin shells.

Each re-reads its rows and quietly does nothing if they are gone or already done
(see ``ingest.services``), so ``acks_late`` redelivery is safe.
"""

from __future__ import annotations

from datetime import timedelta

import structlog
from celery import current_app, shared_task
from celery.signals import worker_process_init
from django.utils import timezone

from ingest import services
from ingest.models import Event

log = structlog.get_logger(__name__)

SWEEP_AFTER_S = 120
SWEEP_LIMIT = 5000
SWEEP_CHUNK = 250


@worker_process_init.connect
def _warm_up_enrichment(**_: object) -> None:
    """Load the enrichment models when a worker process of the enrich queue starts.

    Without it the first batch after a start pays several seconds of model loading.
    """
    from mlengine import facade

    if "enrich" in current_app.amqp.queues.consume_from:
        facade.warm_up()
        log.info("enrich.models_loaded")


@shared_task(name="ingest.persist_batch", soft_time_limit=60, time_limit=90)
def persist_batch(*, batch_key: str, source_id: int) -> int:
    """Persist a staged raw batch; returns how many new events were stored."""
    return len(services.persist_batch(batch_key=batch_key, source_id=source_id).inserted_ids)


@shared_task(name="enrich.enrich_events", soft_time_limit=60, time_limit=90)
def enrich_events(*, event_ids: list[int]) -> int:
    """Enrich events (language, entities, sentiment); returns how many it enriched."""
    return len(services.enrich_events(event_ids=event_ids))


@shared_task(name="ingest.sweep_stuck_events", soft_time_limit=25, time_limit=30)
def sweep_stuck_events() -> dict[str, int]:
    """Periodic: re-send work stuck between a commit and its dispatch.

    Batches staged but never persisted, events never enriched, enriched events never
    counted for trends, and alerts never pushed, older than ``SWEEP_AFTER_S``, are sent
    again (every stage is idempotent, so work that was merely slow is not done twice;
    a late push may reach a client twice, and clients drop a ``seq`` they have seen).
    """
    from alerts import push
    from alerts.models import Alert
    from mlengine import tasks as ml_tasks

    cutoff = timezone.now() - timedelta(seconds=SWEEP_AFTER_S)
    batches = services.pending_batch_keys(older_than_s=SWEEP_AFTER_S)
    for key in batches:
        source_id = services.batch_source_id(key)
        if source_id is not None:
            persist_batch.apply_async(kwargs={"batch_key": key, "source_id": source_id})
    unenriched = list(
        Event.objects.filter(enriched_at__isnull=True, received_at__lt=cutoff)
        .order_by("received_at")
        .values_list("id", flat=True)[:SWEEP_LIMIT]
    )
    for i in range(0, len(unenriched), SWEEP_CHUNK):
        enrich_events.apply_async(kwargs={"event_ids": unenriched[i : i + SWEEP_CHUNK]})
    uncounted = list(
        Event.objects.filter(
            trends_at__isnull=True, enriched_at__isnull=False, enriched_at__lt=cutoff
        )
        .order_by("received_at")
        .values_list("id", flat=True)[:SWEEP_LIMIT]
    )
    for i in range(0, len(uncounted), SWEEP_CHUNK):
        ml_tasks.update_trends.apply_async(kwargs={"event_ids": uncounted[i : i + SWEEP_CHUNK]})
    unpushed = list(
        Alert.objects.filter(pushed_at__isnull=True, created_at__lt=cutoff).values_list(
            "id", flat=True
        )[:SWEEP_LIMIT]
    )
    if unpushed:
        push.push_alerts(alert_ids=unpushed)
    swept = {
        "batches": len(batches),
        "enrich": len(unenriched),
        "trends": len(uncounted),
        "alerts_pushed": len(unpushed),
    }
    if any(swept.values()):
        log.warning("ingest.swept", **swept)
    return swept


@shared_task(name="ingest.analyze_growing_tables", soft_time_limit=50, time_limit=60)
def analyze_growing_tables() -> list[str]:
    """Periodic: refresh planner statistics of tables the pipeline fills fast."""
    return services.analyze_growing_tables()
