"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright

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


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
"""The Chromium the browser tests drive: Debian's package ``chromium``, or the executable
named by ``CHROMIUM``. Playwright never downloads a browser of its own here."""


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the whole session, driven by Playwright.

    Playwright's async API on pytest-asyncio's session event loop, not its sync API: the
    sync API marks its own event loop as running in the test's thread from its first call
    until it stops, so while a session-wide browser lived, Django would refuse every ORM
    call (``SynchronousOnlyOperation``) and every later ``async def`` test would fail
    (``Runner.run() cannot be called from a running event loop``). A test that uses this
    fixture or ``page`` is ``async def`` and marked
    ``@pytest.mark.asyncio(loop_scope="session")``, and reaches the database through
    ``database_sync_to_async``.

    Skips the test when :data:`CHROMIUM` is not an executable (``apt-get install
    chromium``), except under CI (``CI=true``), where its absence fails the test.
    """
    executable = shutil.which(CHROMIUM)
    if executable is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Chromium missing at {CHROMIUM} (required when CI=true)")
        pytest.skip(f"Chromium not found at {CHROMIUM}: apt-get install chromium, or set CHROMIUM")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox"]
        )
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A tab of :func:`browser` in a fresh context (no cookies, storage or cache shared
    with other tests); the context is closed after the test.

    Fails the test at once, naming the fix, unless it runs on the session event loop
    (Playwright would fail later with a "Future attached to a different loop").
    """
    marker = request.node.get_closest_marker("asyncio")
    if marker is None or marker.kwargs.get("loop_scope") != "session":
        pytest.fail('a test that uses `page` needs @pytest.mark.asyncio(loop_scope="session")')
    context = await browser.new_context()
    yield await context.new_page()
    await context.close()


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
def worker_processes(*pools: tuple[list[str], int]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Real Celery workers as separate processes (prefork, as ``make run`` starts them),
    on the test database and Redis: one per ``(queues, concurrency)``, each the leader of
    its own process group (its master's pid). Waits until each queue has a consumer;
    yields the masters' processes; stops them (SIGTERM, then SIGKILL) on exit.

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
        yield processes
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
