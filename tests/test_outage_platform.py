"""The platform rides through an outage of its database and of Redis.

The whole platform runs as ``make run`` starts it (``python -m devtools.localservices
run --run-dir DIR -- python -m devtools.run``), on its own embedded PostgreSQL and
Redis under ``.run/outage-test/``, never the machine's shared servers. A replay of the
first ``ROWS`` rows of a real archive, typed in a second shell, is under way when the
embedded ``redis-server`` is sent SIGKILL, then later the PostgreSQL postmaster. Each
is restarted by ``devtools.localservices`` (a log line says so); while PostgreSQL is
down the API answers JSON 503 with ``Retry-After``, never a 500; the replay finishes by
itself (exit 0); every post of the archive is stored exactly once; the platform is
still running, having stopped nothing; the pipeline stores events again within seconds
of each restart, and alerts are written again after the database's.

Measured on the 2-core development machine: events stored again 5.2 s after Redis's
kill and 4.4 s after PostgreSQL's; 61 of 68 API answers during PostgreSQL's restart
were 503 (the rest 200, none 500); the whole test 118 s.
"""

from __future__ import annotations

import csv
import http.client
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import psycopg2
import pytest

from devtools.base import free_port
from tests.test_run_supervision import (
    PLATFORM_PROGRAMS,
    Platform,
    _distinct_posts,
    _shell_environment,
    _wait_for,
)

BASE_DIR = Path(__file__).resolve().parent.parent
ROWS = 3000
RATE = 60
"""Events per second of the replay (``--rate``): about 50 s for ``ROWS``, so both
kills land while it runs."""
RECOVERY_S = 30.0
"""How soon after a restart the pipeline must store events again (a bound, not a
speed measurement: the machine running the tests is shared)."""


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    run_dir = BASE_DIR / ".run" / "outage-test" / uuid.uuid4().hex[:8]
    run_dir.mkdir(parents=True)
    log_path = run_dir / "make-run.log"
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "devtools.localservices", "run"),
                *("--run-dir", str(run_dir), "--", sys.executable, "-m", "devtools.run"),
            ],
            cwd=BASE_DIR,
            env=_shell_environment(PORT=str(port)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    platform = Platform(process, run_dir, log_path, port)

    def ready() -> bool:
        assert process.poll() is None, platform.log()[-4000:]
        states = platform.states()
        return set(states) == PLATFORM_PROGRAMS and all(
            s["statename"] == "RUNNING" for s in states.values()
        )

    try:
        _wait_for(ready, 150, "every platform process RUNNING", poll_s=0.5)
        yield platform
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        shutil.rmtree(run_dir, ignore_errors=True)


def _listener(port: int) -> int:
    """The pid of the process listening on 127.0.0.1:``port``; 0 when none."""
    for connection in psutil.net_connections(kind="tcp"):
        if (
            connection.status == psutil.CONN_LISTEN
            and connection.laddr
            and connection.laddr.port == port
            and connection.pid
        ):
            return int(connection.pid)
    return 0


def _postgres_answers(url: str) -> bool:
    try:
        psycopg2.connect(url, connect_timeout=1).close()
    except psycopg2.Error:
        return False
    return True


class ApiProbe:
    """Asks ``GET /api/alerts/`` every 50 ms in a thread; keeps ``(status,
    content type, Retry-After)`` of each answer."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.answers: list[tuple[int, str, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ApiProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                connection.request(
                    "GET", "/api/alerts/", headers={"Authorization": f"Token {self.token}"}
                )
                response = connection.getresponse()
                response.read()
                self.answers.append(
                    (
                        response.status,
                        response.getheader("Content-Type", ""),
                        response.getheader("Retry-After"),
                    )
                )
            except (OSError, http.client.HTTPException):
                continue
            finally:
                connection.close()


def _stored_again_after(platform: Platform, source: str, floor: int) -> float:
    """Seconds until more than ``floor`` events of ``source`` are stored."""
    started = time.monotonic()
    _wait_for(
        lambda: (
            _postgres_answers(platform.services()["DATABASE_URL"])
            and platform.stored(source) > floor
        ),
        RECOVERY_S,
        f"events stored again after {floor}",
    )
    return time.monotonic() - started


def _database_now(platform: Platform) -> object:
    conn = psycopg2.connect(platform.services()["DATABASE_URL"], connect_timeout=5)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT now()")
            return cursor.fetchone()[0]
    finally:
        conn.close()


def _alerts_since(platform: Platform, since: object) -> tuple[int, float | None]:
    """Alerts written after ``since`` (a database timestamp), and the seconds from
    ``since`` to the first of them."""
    conn = psycopg2.connect(platform.services()["DATABASE_URL"], connect_timeout=5)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*), extract(epoch FROM min(created_at) - %s) FROM alerts_alert "
                "WHERE created_at > %s",
                [since, since],
            )
            count, first_s = cursor.fetchone()
            return int(count), None if first_s is None else float(first_s)
    finally:
        conn.close()


def _pipeline_state(platform: Platform, source: str, since: object) -> dict[str, int]:
    """How far ``source``'s events went: stored, enriched, counted by the trend stage;
    its trends, those detected after ``since``, and how many of each the alert stage
    evaluated (an ``alerts_trendcheck`` row: its rules ran on the trend)."""
    conn = psycopg2.connect(platform.services()["DATABASE_URL"], connect_timeout=5)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                """
                SELECT
                  (SELECT count(*) FROM ingest_event e WHERE e.source_id = s.id),
                  (SELECT count(enriched_at) FROM ingest_event e WHERE e.source_id = s.id),
                  (SELECT coalesce(max(counted_events), 0) FROM mlengine_streamclock c
                    WHERE c.source_id = s.id),
                  (SELECT count(*) FROM mlengine_trend t WHERE t.source_id = s.id),
                  (SELECT count(*) FROM mlengine_trend t JOIN alerts_trendcheck k
                    ON k.trend_id = t.id WHERE t.source_id = s.id),
                  (SELECT count(*) FROM mlengine_trend t
                    WHERE t.source_id = s.id AND t.detected_at > %s),
                  (SELECT count(*) FROM mlengine_trend t JOIN alerts_trendcheck k
                    ON k.trend_id = t.id WHERE t.source_id = s.id AND t.detected_at > %s)
                FROM ingest_source s WHERE s.name = %s
                """,
                [since, since, source],
            )
            row = cursor.fetchone()
    finally:
        conn.close()
    keys = ("stored", "enriched", "counted", "trends", "evaluated", "new_trends", "new_evaluated")
    return dict(zip(keys, map(int, row), strict=True))


def _through_every_stage(state: dict[str, int]) -> bool:
    return (
        state["stored"] == state["enriched"] == state["counted"]
        and state["trends"] == state["evaluated"]
        and state["new_trends"] == state["new_evaluated"]
    )


@pytest.mark.slow
def test_redis_and_postgres_killed_mid_replay_come_back_and_every_post_is_stored_once(
    platform: Platform, shared_data: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "outage.csv"
    with (
        (shared_data / "airline_tweets" / "Tweets.csv").open(encoding="utf-8", newline="") as full,
        archive.open("w", encoding="utf-8", newline="") as part,
    ):
        rows = csv.reader(full)
        csv.writer(part).writerows(row for _, row in zip(range(ROWS + 1), rows, strict=False))
    name = archive.stem
    expected = _distinct_posts(archive)
    services = platform.services()
    redis_port = urlsplit(services["REDIS_URL"]).port or 0
    token = (platform.run_dir / "api-token").read_text().strip()
    replay = subprocess.Popen(
        [".venv/bin/python", "manage.py", "replay", str(archive), "--rate", str(RATE)],
        cwd=BASE_DIR,
        env=platform.second_shell(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Redis, a third of the way in.
        _wait_for(lambda: platform.stored(name) >= expected // 3, 120, "a third stored")
        redis_server = _listener(redis_port)
        os.kill(redis_server, signal.SIGKILL)
        before_redis = platform.stored(name)
        _wait_for(lambda: _listener(redis_port) not in (0, redis_server), 30, "a new redis")
        redis_recovery_s = _stored_again_after(platform, name, before_redis)

        # PostgreSQL, two thirds of the way in, with the API asked all along.
        _wait_for(lambda: platform.stored(name) >= 2 * expected // 3, 120, "two thirds")
        postmaster_pid = int(
            (platform.run_dir / "pgdata" / "postmaster.pid").read_text().split()[0]
        )
        before_postgres = platform.stored(name)
        with ApiProbe(platform.port, token) as probe:
            time.sleep(0.5)
            os.kill(postmaster_pid, signal.SIGKILL)
            postgres_recovery_s = _stored_again_after(platform, name, before_postgres)
            postgres_back_at = _database_now(platform)
        output, _ = replay.communicate(timeout=240)
        _wait_for(lambda: platform.stored(name) >= expected, 60, f"{expected} stored")
    finally:
        if replay.poll() is None:
            replay.kill()
    # Every stage works again: each post enriched and counted, every trend (those
    # detected after the restart too) evaluated by the alert stage's rules.
    _wait_for(
        lambda: _through_every_stage(_pipeline_state(platform, name, postgres_back_at)),
        120,
        "every post through every stage",
    )
    state = _pipeline_state(platform, name, postgres_back_at)
    alerts_after_restart, first_alert_s = _alerts_since(platform, postgres_back_at)
    log = platform.log()
    statuses = {status for status, _, _ in probe.answers}
    unavailable = [answer for answer in probe.answers if answer[0] == 503]
    print(
        f"redis: events again {redis_recovery_s:.1f} s after the kill; postgres: "
        f"{postgres_recovery_s:.1f} s; API answers while postgres restarted: "
        f"{sorted(statuses)}, {len(unavailable)} of {len(probe.answers)} were 503; "
        f"{alerts_after_restart} alerts since, the first {first_alert_s} s after; {state}"
    )

    assert replay.returncode == 0, output[-4000:]
    assert platform.stored(name) == expected
    assert "services: redis died" in log and "services: redis restarted on port" in log
    assert "services: postgres died" in log and "services: postgres restarted on port" in log
    assert 500 not in statuses
    assert unavailable
    assert {(ctype, retry) for _, ctype, retry in unavailable} == {("application/json", "5")}
    assert "stopping the platform" not in log
    assert platform.process.poll() is None
    assert set(platform.states()) == PLATFORM_PROGRAMS
