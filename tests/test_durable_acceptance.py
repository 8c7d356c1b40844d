"""Accepted means durable: an event a webhook answered 202 for survives a Redis crash.

The platform's own processes, as ``make run`` starts them, on a private Redis
(``devtools.redis.EmbeddedRedis``, never the machine's) and the test database: daphne
serves the webhook, a prefork Celery worker persists. Redis is SIGKILLed right after
the 202, while the persist task is still queued in it; the platform comes back on a
new, empty Redis, and the ingest sweeper sends the task again from the staged batches
in PostgreSQL (``ingest.models.StagedBatch``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from django.db import connection
from django.utils import timezone

from devtools.redis import EmbeddedRedis
from ingest import credentials, webhooks
from ingest.models import Event, Source, StagedBatch
from tests.factories import make_personas

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def platform_env(redis_url: str) -> dict[str, str]:
    """The environment of a platform process on the test database and ``redis_url``."""
    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "twiscope.settings_test",
        "DATABASE_URL": (
            f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST'] or '127.0.0.1'}:"
            f"{db['PORT'] or 5432}/{db['NAME']}"
        ),
        "REDIS_URL": redis_url,
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("CELERY_BROKER_URL", None)  # the broker is REDIS_URL
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def embedded_redis(data_dir: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(data_dir, durable=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def process(command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` in its own session; SIGTERM (then SIGKILL) its group on exit."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, "the server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port} after {timeout_s} s"
            time.sleep(0.1)


def post_signed(port: int, source_id: int, secret: str, items: list[dict]) -> tuple[int, dict]:
    body = json.dumps(items).encode()
    sent = int(time.time())
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/ingest/webhooks/{source_id}/",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            webhooks.TIMESTAMP_HEADER: str(sent),
            webhooks.SIGNATURE_HEADER: webhooks.sign(secret, sent, body),
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def item(n: int) -> dict:
    return {
        "external_id": f"durable-{n}",
        "created_at": f"2026-11-30T10:{n % 60:02d}:00+00:00",
        "text": f"accepted post number {n} #durable",
        "author": {"id": f"a{n % 7}", "handle": f"sender{n % 7}"},
    }


def wait_for_events(source: Source, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while Event.objects.filter(source=source).count() < count:
        assert time.monotonic() < deadline, f"fewer than {count} events after {timeout_s} s"
        time.sleep(0.2)


def test_every_event_accepted_before_redis_is_sigkilled_is_stored_once(tmp_path: Path) -> None:
    secret = credentials.new_secret()
    source = Source.objects.create(
        team=make_personas().team,
        kind=Source.Kind.WEBHOOK,
        name="partner",
        credentials=credentials.seal({"secret": secret}),
    )
    requests = [[item(n) for n in range(start, start + 40)] for start in (0, 40, 80)]

    with embedded_redis(tmp_path / "redis-first") as first:
        port = free_port()
        daphne = [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port)]
        with process([*daphne, "twiscope.asgi:application"], platform_env(first.url)) as web:
            wait_for_port(port, web)
            answers = [post_signed(port, source.id, secret, items) for items in requests]
            queued = redis.Redis.from_url(first.url).llen("ingest")
            pid = first.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # right after the 202s, the tasks unread

    assert [status for status, _ in answers] == [202, 202, 202]
    assert [body["accepted"] for _, body in answers] == [40, 40, 40]
    assert queued == 3  # the persist tasks were only in the Redis that died
    assert StagedBatch.objects.count() == 3 and not Event.objects.exists()

    # The platform comes back on a new, empty Redis (nothing of the first one survives).
    with embedded_redis(tmp_path / "redis-second") as second:
        env = platform_env(second.url)
        worker = [str(BIN / "celery"), "-A", "twiscope", "worker", "-Q", "ingest"]
        worker += ["-n", f"durable-{os.getpid()}@%h", "--pool=prefork", "--concurrency=2"]
        worker += ["--loglevel=WARNING", "--without-gossip", "--without-mingle"]
        with process(worker, env):
            # Past the sweeper's PIPELINE_STUCK_AFTER_S, as minutes later; then its periodic
            # task runs (as beat sends it), twice.
            StagedBatch.objects.update(received_at=timezone.now() - timedelta(minutes=10))
            for _ in range(2):
                subprocess.run(
                    [str(BIN / "celery"), "-A", "twiscope", "call", "ingest.sweep"],
                    cwd=REPO,
                    env=env,
                    check=True,
                    capture_output=True,
                )
            wait_for_events(source, 120)

    stored = list(Event.objects.filter(source=source).values_list("external_id", flat=True))
    assert sorted(stored) == sorted(i["external_id"] for items in requests for i in items)
    assert not StagedBatch.objects.exists()
