"""Celery entry points of the ``enrich`` and ``ml`` queues: thin shells.

Each re-reads its rows and quietly does nothing if they are gone or already done (see
``mlengine.enrichment.stage`` and ``mlengine.trends.stage``), so ``acks_late`` redelivery
is safe.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import cast

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
from twiscope.redis import get_redis

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


YIELDING_KEY = "anomalies:yielding-since"
"""Redis key: the time (epoch s) since when anomaly runs have yielded to the pipeline."""


def _yields_to_pipeline() -> bool:
    """Whether this anomaly run should wait for the pipeline (``ANOMALY_YIELD``): events
    are stored faster than ``SCORING_PAUSE_ABOVE_EPS`` (``scoring.in_burst``) or the
    pipeline has a batch in hand (``pipeline.is_busy``), and runs have not yielded for
    ``ANOMALY_YIELD_MAX_S`` in a row already. Side effect: records since when runs yield
    (``YIELDING_KEY``), and forgets it when the pipeline is free or the wait is over."""
    redis = get_redis()
    busy = settings.ANOMALY_YIELD and (
        scoring.in_burst() or pipeline.is_busy(events=settings.INGEST_BATCH_SIZE)
    )
    if not busy:
        redis.delete(YIELDING_KEY)
        return False
    now = time.time()
    redis.set(YIELDING_KEY, now, nx=True, ex=max(1, int(settings.ANOMALY_YIELD_MAX_S * 4)))
    since = float(cast("bytes", redis.get(YIELDING_KEY) or now))
    if now - since >= settings.ANOMALY_YIELD_MAX_S:
        redis.delete(YIELDING_KEY)
        return False
    return True


@shared_task(bind=True, name="anomalies.advance", soft_time_limit=90, time_limit=120)
def advance_anomalies(self: Task) -> int:
    """Periodic: step every source's complete 5-minute buckets through the anomaly
    detector (``mlengine.anomalies.stage``); queues itself again while buckets remain,
    one follow-up at a time (``pipeline.claim_pending``). Returns how many new anomalies.

    Anomaly work yields to the pipeline (``_yields_to_pipeline``): during a burst of
    ingest the run steps nothing and queues a follow-up ``ANOMALY_YIELD_POLL_S`` later,
    so a catch-up of months of buckets neither takes the CPU nor the database from the
    stages an alert waits on; after ``ANOMALY_YIELD_MAX_S`` of yielding it runs anyway."""
    pipeline.release_pending(ANOMALIES, "advance", str(self.request.id))
    yielding = _yields_to_pipeline()
    result = None if yielding else anomaly_stage.advance_anomalies()
    # One waiting follow-up at most: every beat tick that finds work left would
    # otherwise start a chain of its own, and the chains would pile up in the queue.
    follow_up = str(uuid.uuid4())
    if (yielding or (result is not None and result.more)) and pipeline.claim_pending(
        ANOMALIES, "advance", follow_up, expiry_s=120
    ):
        advance_anomalies.apply_async(
            expires=120,
            task_id=follow_up,
            countdown=settings.ANOMALY_YIELD_POLL_S if yielding else None,
        )
    if result is None:
        log.info("detect.anomalies_yielded")
        return 0
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
