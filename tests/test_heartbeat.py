"""Held work is told from lost work within seconds (``twiscope.pipeline``): a worker
refreshes the dispatch records of the messages it holds (``HeldWorkHeartbeat``), and a
sweeper reads the Redis queue, so a record older than the bound that no message in the
queue carries is lost, even while the queue is long.

Real PostgreSQL, Redis (the broker: a queue is a Redis list named after it) and Celery
workers: prefork worker processes, as ``make run`` starts them, and a worker in this
process where a task is slowed down.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

import pytest
from celery.contrib.testing.worker import start_worker
from django.test import TestCase
from django.utils import timezone

from ingest import persistence
from ingest.models import StagedBatch
from tests.conftest import worker_processes
from tests.factories import envelope, make_personas, make_source
from twiscope import pipeline
from twiscope.celery import app
from twiscope.redis import get_redis

pytestmark = pytest.mark.usefixtures("clean_redis")

BOUND_S = 2.0
"""The sweepers' age bound in these tests (``PIPELINE_STUCK_AFTER_S`` is 30 s), with
heartbeats every 0.25 s."""


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.05)


def queued(queue: str) -> int:
    return int(cast(int, get_redis().llen(queue)))


def send_ingest(keys: list[str], *, countdown: float | None = None) -> None:
    """Queue one persist task per key (for real, on the broker), dispatch records too."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        for key in keys:
            pipeline.send("ingest", items=[key], countdown=countdown, batch_key=key, source_id=1)


def age_records(stage: str, seconds: float) -> None:
    """Make every dispatch record of ``stage`` ``seconds`` older."""
    key = pipeline.DISPATCH_KEY.format(stage=stage)
    redis = get_redis()
    for member, score in cast(
        "list[tuple[bytes, float]]", redis.zrange(key, 0, -1, withscores=True)
    ):
        redis.zadd(key, {member: score - seconds})


@pytest.mark.django_db(transaction=True)
def test_messages_a_worker_holds_stay_fresh_and_are_lost_once_it_is_killed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prefork worker holds two messages waiting for their countdown; its records stay
    fresh past the bound though the queue is empty. SIGKILL to its master: the messages
    stay unacknowledged in Redis (an hour's visibility timeout), and a sweep past the
    bound finds them lost, while three other messages wait in the queue."""
    monkeypatch.setenv("PIPELINE_HEARTBEAT_S", "0.25")
    held = ["held-1", "held-2"]
    with worker_processes((["ingest"], 1)) as (master,):
        send_ingest(held, countdown=600)
        wait_for(lambda: queued("ingest") == 0, 30, "the worker to take both messages")
        time.sleep(BOUND_S + 1)

        assert pipeline.stuck("ingest", held, older_than_s=BOUND_S) == []

        os.killpg(master.pid, signal.SIGKILL)
        master.wait()
        waiting = ["waiting-1", "waiting-2", "waiting-3"]
        send_ingest(waiting)
        time.sleep(BOUND_S + 1)

        assert pipeline.stuck("ingest", held + waiting, older_than_s=BOUND_S) == held
        assert queued("ingest") == 3


def pending_key_alive(source_id: int) -> bool:
    key = pipeline.PENDING_KEY.format(stage="detect", key=f"source:{source_id}")
    return bool(get_redis().exists(key))


def hand_off_detect(source_id: int, *, lease_s: float) -> None:
    """A coalesced trend task for ``source_id`` (for real, on the broker), as
    ``pipeline.hand_off`` sends it, held back 600 s (a countdown) so it waits in the
    worker that takes it."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        pipeline.send(
            "detect",
            countdown=600,
            coalesce=f"source:{source_id}",
            coalesce_expiry_s=lease_s,
            source_id=source_id,
        )


@pytest.mark.django_db(transaction=True)
def test_a_coalesced_task_lost_with_its_worker_holds_hand_offs_back_one_lease_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a worker holds a stream's coalesced trend task, the stream's key lives on
    (later hand-offs are folded into that task); once the worker is SIGKILLed, the key
    lapses within one lease and the next hand-off is sent, instead of the stream waiting
    for the broker's visibility timeout."""
    monkeypatch.setenv("PIPELINE_HEARTBEAT_S", "0.25")
    lease_s = pipeline.COALESCE_LEASE_HEARTBEATS * 0.25
    with worker_processes((["detect"], 1)) as (master,):
        hand_off_detect(7, lease_s=lease_s)
        wait_for(lambda: queued("detect") == 0, 30, "the worker to take the task")
        time.sleep(4 * lease_s)

        assert pending_key_alive(7)  # renewed by the heartbeat of the worker holding it
        hand_off_detect(7, lease_s=lease_s)
        assert queued("detect") == 0  # folded into the held task

        os.killpg(master.pid, signal.SIGKILL)
        master.wait()
        wait_for(lambda: not pending_key_alive(7), 10 * lease_s, "the key to lapse")
        hand_off_detect(7, lease_s=lease_s)

        assert queued("detect") == 1


@pytest.mark.django_db(transaction=True)
def test_a_task_running_past_the_bound_and_the_messages_behind_it_are_not_resent(
    settings: Any,
) -> None:
    """A worker (threads pool, one thread, prefetching) runs a persist task slowed past
    the bound, holding two more messages prefetched behind it: none is taken for lost.
    A record written for a message that was never queued is."""
    settings.PIPELINE_HEARTBEAT_S = 0.25
    running = threading.Event()
    release = threading.Event()

    def slow_persist(**_: Any) -> SimpleNamespace:
        running.set()
        release.wait(30)
        return SimpleNamespace(inserted_ids=[])

    keys = ["running", "prefetched-1", "prefetched-2"]
    pipeline.record("ingest", ["lost"])  # recorded, then the process died before the send
    with (
        mock.patch("ingest.tasks.persistence.persist_batch", slow_persist),
        start_worker(
            app,
            pool="threads",
            concurrency=1,
            perform_ping_check=False,
            queues=["ingest"],
            loglevel="WARNING",
            shutdown_timeout=30,
        ),
    ):
        send_ingest(keys)
        wait_for(running.is_set, 30, "the slow task to start")
        wait_for(lambda: queued("ingest") == 0, 30, "the worker to prefetch the others")
        time.sleep(BOUND_S + 1)
        try:
            assert pipeline.stuck("ingest", [*keys, "lost"], older_than_s=BOUND_S) == ["lost"]
        finally:
            release.set()


@pytest.mark.django_db
def test_a_batch_lost_while_the_queue_is_long_is_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty staged batches wait in the ingest queue (read seven messages at a time);
    one more was taken by a worker that was killed (its record is there, its message is
    not). The sweep past the bound re-sends that one only."""
    monkeypatch.setattr(pipeline, "QUEUE_PAGE", 7)
    source = make_source(make_personas().team)
    with TestCase.captureOnCommitCallbacks(execute=True):
        waiting = [
            persistence.enqueue_envelopes(source=source, envelopes=[envelope(f"post {i}")])
            for i in range(20)
        ]
    lost = persistence.stage_batch(source_id=source.id, envelopes=[envelope("lost")])
    pipeline.record("ingest", [lost])
    StagedBatch.objects.update(received_at=timezone.now() - timedelta(minutes=10))
    age_records("ingest", 600)

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = persistence.sweep_staged_batches(older_than_s=30)

    assert swept == 1
    assert queued("ingest") == 21
    assert pipeline.queued_items("ingest") == {*waiting, lost}


@pytest.mark.django_db
def test_batches_waiting_in_a_long_queue_are_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "QUEUE_PAGE", 7)
    source = make_source(make_personas().team)
    with TestCase.captureOnCommitCallbacks(execute=True):
        for i in range(20):
            persistence.enqueue_envelopes(source=source, envelopes=[envelope(f"post {i}")])
    StagedBatch.objects.update(received_at=timezone.now() - timedelta(minutes=10))
    age_records("ingest", 600)

    with TestCase.captureOnCommitCallbacks(execute=True):
        swept = persistence.sweep_staged_batches(older_than_s=30)

    assert swept == 0
    assert queued("ingest") == 20


@pytest.mark.django_db
def test_on_a_broker_whose_queue_cannot_be_read_a_busy_queue_holds_old_records_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fallback (RabbitMQ): lost only once the queue is empty (or past
    ``PIPELINE_LOST_AFTER_S``, see tests/test_sweepers_never_blind.py)."""
    monkeypatch.setattr(pipeline, "queued_items", lambda stage: None)
    send_ingest(["waiting"])
    pipeline.record("ingest", ["lost"])
    age_records("ingest", 600)

    assert pipeline.stuck("ingest", ["waiting", "lost"], older_than_s=30) == []
    get_redis().delete("ingest")
    assert pipeline.stuck("ingest", ["waiting", "lost"], older_than_s=30) == ["waiting", "lost"]
