"""Celery entry points of the ``enrich`` and ``ml`` queues: thin shells.

Each re-reads its rows and quietly does nothing if they are gone or already done (see
``mlengine.enrichment.stage`` and ``mlengine.trends.stage``), so ``acks_late`` redelivery
is safe.
"""

from __future__ import annotations

import contextlib
import uuid

import structlog
from celery import Task, current_app, shared_task
from celery.signals import worker_process_init
from django.conf import settings

from mlengine.anomalies import stage as anomaly_stage
from mlengine.enrichment import stage as enrich_stage
from mlengine.enrichment.text import warm_up
from mlengine.inference import scoring, training, virality_model
from mlengine.inference.heads import TASKS
from mlengine.trends import stage as trend_stage
from twiscope import pipeline
from twiscope.queues import ANOMALIES, DETECT

log = structlog.get_logger(__name__)

ACTIVE_WITHIN_S = 3600


@worker_process_init.connect
def _warm_up_enrichment(**_: object) -> None:
    """Load the enrichment models when a worker process of the enrich queue starts.

    Without it the first batch after a start pays seconds of model loading.
    """
    if "enrich" in current_app.amqp.queues.consume_from:
        warm_up()
        log.info("enrich.models_loaded")


@worker_process_init.connect
def _warm_up_heads(**_: object) -> None:
    """Load the active heads and their encoders (and the active virality model) when a
    worker process of the inference queue starts, so the first batch does not pay for
    it (a task with no head yet is loaded on first use); first, with
    ``INFERENCE_IDLE_ONLY``, leave the CPU to the pipeline (``scoring.yield_cpu``)."""
    if "inference" not in current_app.amqp.queues.consume_from:
        return
    policy = scoring.yield_cpu() if settings.INFERENCE_IDLE_ONLY else "normal"
    loaded = []
    for name in TASKS:
        try:
            version, _served = training.active_model(name)
        except training.NoTrainedModel:
            continue
        loaded.append(f"{version.name} v{version.version}")
    with contextlib.suppress(training.NoTrainedModel):
        loaded.append(virality_model.active_model().version)
    log.info("inference.models_loaded", heads=loaded, cpu_policy=policy)


@shared_task(name="enrich.enrich_events", soft_time_limit=60, time_limit=90)
def enrich_events(*, event_ids: list[int], source_id: int | None = None) -> int:
    """Enrich events (language, entities, sentiment); returns how many it enriched."""
    return len(enrich_stage.enrich_events(event_ids=event_ids, source_id=source_id))


@shared_task(name="enrich.sweep", soft_time_limit=25, time_limit=30)
def sweep_enrich() -> int:
    """Periodic: re-send unenriched events that are really stuck; returns how many."""
    return enrich_stage.sweep_unenriched(older_than_s=settings.PIPELINE_STUCK_AFTER_S)


@shared_task(name="detect.advance_stream", soft_time_limit=60, time_limit=90)
def advance_stream(*, source_id: int) -> int:
    """Count a stream's events up to its low watermark, with other streams' pending work
    (``mlengine.trends.stage.advance_stream``); returns how many new trends of this stream."""
    pipeline.started(DETECT, f"source:{source_id}")
    return len(trend_stage.advance_stream(source_id=source_id))


@shared_task(bind=True, name="anomalies.advance", soft_time_limit=90, time_limit=120)
def advance_anomalies(self: Task) -> int:
    """Periodic: step every source's complete 5-minute buckets through the anomaly
    detector (``mlengine.anomalies.stage``); queues itself again while buckets remain,
    one follow-up at a time (``pipeline.claim_pending``). Returns how many new anomalies."""
    pipeline.release_pending(ANOMALIES, "advance", str(self.request.id))
    result = anomaly_stage.advance_anomalies()
    # One waiting follow-up at most: every beat tick that finds work left would
    # otherwise start a chain of its own, and the chains would pile up in the queue.
    follow_up = str(uuid.uuid4())
    if result.more and pipeline.claim_pending(ANOMALIES, "advance", follow_up, expiry_s=120):
        advance_anomalies.apply_async(expires=120, task_id=follow_up)
    return len(result.anomaly_ids)


@shared_task(name="inference.score_backlog", soft_time_limit=90, time_limit=120)
def score_backlog() -> int:
    """Label the newest waiting events with the active heads (``mlengine.inference.scoring``);
    returns how many it labelled."""
    return scoring.score_backlog().scored


@shared_task(name="detect.sweep", soft_time_limit=25, time_limit=30)
def sweep_streams() -> int:
    """Periodic: advance active streams a lost message left behind; recount late events."""
    return trend_stage.sweep_streams(active_within_s=ACTIVE_WITHIN_S)
