"""Shared fixtures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""The real public data sets, beside the repo (``../shared/data``); never copied into it."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The path of ``../shared/data``.

    Skips the test when the folder is absent, except under CI (``CI=true``), where the
    data is always provided and its absence fails the test.
    """
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    if os.environ.get("CI") == "true":
        pytest.fail(f"real data sets missing at {SHARED_DATA} (required when CI=true)")
    pytest.skip(f"real data sets not found at {SHARED_DATA}; run beside ../shared/data")


@pytest.fixture
def celery_worker() -> Iterator[None]:
    """A real Celery worker (solo pool, in a thread of this process) consuming every
    pipeline queue, on an empty test Redis."""
    from celery.contrib.testing.worker import start_worker

    from twiscope.celery import app
    from twiscope.queues import NAMES
    from twiscope.redis import get_redis

    get_redis().flushdb()
    with start_worker(
        app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        queues=list(NAMES),
        loglevel="WARNING",
        shutdown_timeout=30,
    ):
        yield


@pytest.fixture
def clean_redis() -> None:
    """An empty test Redis database (broker queues, staged batches, counters)."""
    from twiscope.redis import get_redis

    get_redis().flushdb()


@contextmanager
def worker_processes(*pools: tuple[list[str], int]) -> Iterator[None]:
    """Real Celery workers as separate processes (prefork, as ``make run`` starts them),
    on the test database and Redis: one per ``(queues, concurrency)``. Waits until each
    queue has a consumer; stops them (SIGTERM, then SIGKILL) on exit.

    Use inside a ``django_db(transaction=True)`` test: the workers see committed rows.
    """
    from django.db import connection

    from twiscope.celery import missing_consumers

    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "twiscope.settings_test",
        "DATABASE_URL": (
            f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST'] or '127.0.0.1'}:"
            f"{db['PORT'] or 5432}/{db['NAME']}"
        ),
        "PYTHONUNBUFFERED": "1",
    }
    celery = str(Path(sys.executable).parent / "celery")
    processes = [
        subprocess.Popen(
            [
                celery,
                "-A",
                "twiscope",
                "worker",
                "-Q",
                ",".join(queues),
                "-n",
                f"test-{'-'.join(queues)}-{os.getpid()}@%h",
                "--pool=prefork",
                f"--concurrency={concurrency}",
                "--loglevel=WARNING",
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            start_new_session=True,
        )
        for queues, concurrency in pools
    ]
    try:
        wanted = tuple(q for queues, _ in pools for q in queues)
        deadline = time.monotonic() + 60
        while missing_consumers(wanted):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers for {wanted} did not start within 60 s")
            if any(p.poll() is not None for p in processes):
                raise RuntimeError("a worker process exited at start")
        yield
    finally:
        for process in processes:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
