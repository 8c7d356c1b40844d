"""The Celery queues, each named for the work that runs on it: the one definition.

The Celery app routes each task to the queue its name starts with (``detect.sweep`` runs
on ``detect``); the chain of stages (``twiscope.pipeline``) is the queues marked
``stage``, in flow order; ``GET /api/stats/`` lists them for the dashboard. The worker
pools of ``make run`` (devtools/supervisord.conf) and of docker compose run one worker
per queue named ``worker-<queue>``; they cannot import Python, so
tests/test_deploy.py and tests/test_run_supervision.py hold them to this list.

This module imports nothing of the project, so every app and the wiring may read it.
"""

from __future__ import annotations

from dataclasses import dataclass

INGEST = "ingest"
ENRICH = "enrich"
DETECT = "detect"
ANOMALIES = "anomalies"
INFERENCE = "inference"
ALERTS = "alerts"
NOTIFY = "notify"


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One queue: its ``name`` (also its task-name prefix and its pool's name,
    ``worker-<name>``), the ``work`` that runs on it (one line, shown to users), and
    whether it is a ``stage`` of the chain (``ingest → enrich → detect → alerts``)
    rather than a branch off it that nothing waits for."""

    name: str
    work: str
    stage: bool


QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec(INGEST, "persist raw batches: every post stored once", stage=True),
    QueueSpec(ENRICH, "language, entities and VADER sentiment of new events", stage=True),
    QueueSpec(DETECT, "trends and stories: counting in SQL and numpy, no models", stage=True),
    QueueSpec(
        ANOMALIES,
        "anomaly series in 5-minute buckets: its catch-up never delays the trend stage",
        stage=False,
    ),
    QueueSpec(
        INFERENCE,
        "transformer heads and virality scores: the pool that may own a GPU",
        stage=False,
    ),
    QueueSpec(ALERTS, "alert rules, claims, persistence and the live push", stage=True),
    QueueSpec(
        NOTIFY,
        "delivery to Slack, email and signed webhooks: slow remote calls, retried for a day",
        stage=False,
    ),
)
"""Every queue, in the order of the flow (the dashboard shows them so). ``notify`` is
a branch off ``alerts``: one task per (alert, channel) delivery, so a slow or failing
receiver never delays the WebSocket push or another channel."""

NAMES: tuple[str, ...] = tuple(queue.name for queue in QUEUES)
"""The queue names, in flow order."""

STAGES: tuple[str, ...] = tuple(queue.name for queue in QUEUES if queue.stage)
"""The chain of stages in flow order; each stage's tasks run on its own queue."""
