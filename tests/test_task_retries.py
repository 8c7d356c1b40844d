"""Transient errors are retried by the task, with backoff and a cap (``twiscope.celery.Task``,
the base class of every task of the app); other errors fail the task at once, and the
staged batch waits for the sweeper.

A real Celery worker (solo pool, in a thread of this process) runs the real
``ingest.persist_batch`` task; its plain function is wrapped to fail as a test needs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import redis.exceptions
from celery.signals import task_failure
from django.db import OperationalError, ProgrammingError

from ingest import persistence
from ingest.models import Event, Source, StagedBatch
from tests.factories import envelope, make_personas, make_source
from twiscope import pipeline
from twiscope.celery import TRANSIENT_ERRORS, app

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def failures() -> Iterator[list[BaseException]]:
    """The exceptions that failed a task (for good: no retry left) in the worker."""
    seen: list[BaseException] = []

    def record(exception: BaseException | None = None, **_: Any) -> None:
        seen.append(exception or Exception("no exception"))

    task_failure.connect(record, weak=False)
    yield seen
    task_failure.disconnect(record)


def stage_and_send(source: Source, count: int = 3) -> str:
    """Stage ``count`` events of ``source`` and queue their persist task (for real)."""
    return persistence.enqueue_envelopes(
        source=source, envelopes=[envelope(f"post {i}") for i in range(count)]
    )


def wait_for(predicate: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)


def test_every_task_of_the_app_retries_transient_errors() -> None:
    app.loader.import_default_modules()
    ours = [task for name, task in app.tasks.items() if not name.startswith("celery.")]

    assert len(ours) >= 10
    assert all(task.autoretry_for == TRANSIENT_ERRORS for task in ours)
    assert all(task.max_retries == 6 and task.retry_backoff_max == 60 for task in ours)


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("server closed the connection unexpectedly"),
        redis.exceptions.ConnectionError("Connection refused"),
    ],
    ids=["database", "redis"],
)
def test_a_task_that_meets_a_transient_error_is_retried_and_succeeds(
    celery_worker: None, failures: list[BaseException], error: Exception
) -> None:
    source = make_source(make_personas().team)
    flaky = mock.Mock(wraps=persistence.persist_batch, side_effect=[error, mock.DEFAULT])

    with mock.patch.object(persistence, "persist_batch", flaky):
        stage_and_send(source)
        wait_for(lambda: Event.objects.filter(source=source).count() == 3, "the retry")
        # The batch is marked done after its commit (on_commit), a moment after the
        # events are visible here.
        wait_for(lambda: pipeline.dispatched_count("ingest") == 0, "the batch marked done")

    assert flaky.call_count == 2
    assert failures == []
    assert not StagedBatch.objects.exists()


def test_a_programming_error_is_not_retried_and_the_batch_stays_staged(
    celery_worker: None, failures: list[BaseException]
) -> None:
    source = make_source(make_personas().team)
    broken = mock.Mock(side_effect=ProgrammingError('column "oops" does not exist'))

    with mock.patch.object(persistence, "persist_batch", broken):
        stage_and_send(source)
        wait_for(lambda: failures, "the task's failure")

    assert broken.call_count == 1
    assert [type(e) for e in failures] == [ProgrammingError]
    assert StagedBatch.objects.count() == 1  # for the sweeper, once the bug is fixed


def test_retries_stop_at_the_cap_and_the_batch_stays_staged(
    celery_worker: None, failures: list[BaseException]
) -> None:
    source = make_source(make_personas().team)
    down = mock.Mock(side_effect=OperationalError("the database system is shutting down"))
    task = app.tasks["ingest.persist_batch"]

    with (
        mock.patch.object(persistence, "persist_batch", down),
        mock.patch.object(task, "max_retries", 2),  # the real cap's backoff takes a minute
    ):
        stage_and_send(source)
        wait_for(lambda: failures, "giving up")

    assert down.call_count == 3  # the first try and two retries
    assert [type(e) for e in failures] == [OperationalError]
    assert StagedBatch.objects.count() == 1
    assert Event.objects.count() == 0
