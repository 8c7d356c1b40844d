"""The Celery application: queues by kind of work, routes, delivery semantics.

Queues (DESIGN.md): one per kind of work, defined once in ``twiscope.queues``; a task
runs on the queue its name starts with (``detect.advance_stream`` on ``detect``).
Pool sizes live in devtools/supervisord.conf and docker-compose.yml, not here.

Delivery: ``acks_late`` + ``reject_on_worker_lost`` give at-least-once delivery; every
task is idempotent at the database, so a redelivery changes nothing.

Retries: every task of the app (``Task``, the app's base class) retries the errors that
may pass by themselves (``TRANSIENT_ERRORS``: a database or broker connection lost, a
timeout) with exponential backoff and full jitter, up to ``Task.max_retries`` times;
any other error fails the task at once. Each stage's sweeper stays the last resort for
work whose retries ran out or whose retry could not be sent.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import amqp.exceptions
from celery import Celery
from celery import Task as CeleryTask
from celery.signals import task_postrun, task_prerun
from kombu import Queue

from twiscope.outage import DEPENDENCY_ERRORS
from twiscope.queues import NAMES, STAGES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *DEPENDENCY_ERRORS,  # PostgreSQL, Redis, the broker through kombu (twiscope.outage)
    amqp.exceptions.RecoverableConnectionError,  # RabbitMQ
)
"""Errors a task retries: the database or the broker was unreachable or timed out.
Programming and data errors (``ProgrammingError``, ``IntegrityError``, ``DataError``,
``ValueError`` …) are not among them: they would fail again."""


class Task(CeleryTask):
    """The base class of every task of the app: retries ``TRANSIENT_ERRORS``.

    Celery reads these attributes when it builds each task (``autoretry_for`` wraps
    ``run``; celery.app.autoretry): a transient error re-queues the task after a
    countdown drawn uniformly from [0, min(``retry_backoff_max``, ``retry_backoff`` ×
    2^retries)] seconds ("full jitter", AWS Architecture Blog, "Exponential Backoff and
    Jitter", 2015): at most 1, 2, 4, … 32 s, about a minute in all; after
    ``max_retries`` retries the error is raised and the task fails. A task's own
    decorator options override them. Tasks are idempotent (see the module docstring),
    so running one again is safe.
    """

    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = 1
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = 6


app = Celery("twiscope", task_cls=Task)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(
    task_queues=[Queue(name) for name in NAMES],
    task_default_queue=NAMES[0],
    task_routes={f"{name}.*": {"queue": name} for name in NAMES},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_soft_time_limit=60,
    task_time_limit=120,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # A worker, beat or producer waits out a broker (Redis) restart, however long,
    # instead of exiting after 100 tries (twiscope/outage.py; docs/operations.md).
    broker_connection_retry=True,
    broker_connection_max_retries=None,
    broker_channel_error_retry=True,
    # A task not acknowledged within this many seconds is redelivered (Redis transport).
    broker_transport_options={"visibility_timeout": 3600},
    timezone="UTC",
    enable_utc=True,
)
# Celery's Django fix-up closes the database connection before and after every task
# unless CELERY_DB_REUSE_MAX is set, so each task paid a new PostgreSQL connection (a
# server process forked, its catalogue caches cold). Connections are kept instead and
# recycled the way Django does between requests (``_recycle_db_connections``).
app.conf.update({"CELERY_DB_REUSE_MAX": 1_000_000})
app.autodiscover_tasks()
# Every worker refreshes the dispatch records of the messages it holds, so the sweepers
# can tell held work from lost work within seconds (twiscope.pipeline's docstring).
app.steps["consumer"].add("twiscope.pipeline:HeldWorkHeartbeat")


@task_prerun.connect
@task_postrun.connect
def _recycle_db_connections(**_: Any) -> None:
    """Close a connection that is broken or older than ``CONN_MAX_AGE`` (Django's
    ``close_old_connections``, as at each request's start and end); keep the others,
    health-checked on their next use (``CONN_HEALTH_CHECKS``)."""
    from django.db import close_old_connections

    close_old_connections()


class _AllConsumed(Exception):
    """Raised from a reply callback to stop collecting replies early."""


def missing_consumers(queues: tuple[str, ...] = STAGES, timeout_s: float = 0.3) -> set[str]:
    """The ``queues`` no running worker consumes.

    Asks every worker (``inspect().active_queues()``) and returns as soon as the replies
    cover every queue; otherwise waits until no reply came for ``timeout_s`` (a worker's
    main process answers within milliseconds even while its pool is busy).
    """
    wanted = set(queues)
    consumed: set[str] = set()

    def on_reply(reply: dict[str, Any]) -> None:
        for worker_queues in reply.values():
            consumed.update(queue["name"] for queue in worker_queues or ())
        if wanted <= consumed:
            raise _AllConsumed

    with contextlib.suppress(_AllConsumed):
        app.control.inspect(timeout=timeout_s, callback=on_reply).active_queues()
    return wanted - consumed


def configure_beat() -> None:
    """Install the periodic schedule from ``twiscope.schedules`` (imported lazily)."""
    from twiscope.schedules import BEAT_SCHEDULE

    app.conf.beat_schedule = BEAT_SCHEDULE


configure_beat()
