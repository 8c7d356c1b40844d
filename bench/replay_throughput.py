"""Benchmark: a real archive replayed at full speed through the whole platform.

Starts the processes of ``devtools/supervisord.conf`` (web, one Celery worker per
queue, the sources, beat: what ``make run`` starts, with ``python -m devtools.run
--skip-bootstrap``) against the PostgreSQL and Redis that ``make bench`` provides,
connects a WebSocket client to ``/ws/alerts/``, and replays the archive with
``manage.py replay --speed max`` several times, each run into a new source. It
measures, per run:

- drain time and end-to-end throughput: from the replay's start until every event of
  the source has been through the trend stage (events/s = distinct events / drain s);
- alert latency, ``pushed_at − event_received_at`` of the run's alerts (p50/p95/p99,
  from the database) and as the WebSocket client saw it (receive time − event
  received time, same clock);
- memory: the summed RSS of the platform's processes at rest and its peak during the
  replay, and of the PostgreSQL/Redis processes ``make bench`` started;
- where the time goes: CPU seconds of each process during the run, and the queue
  depths sampled every 0.25 s (the queue that backs up is the bottleneck).

The baseline, measured in the same session so that ratios survive a noisy machine:
the same stages called as plain functions in this one process (persist, enrich,
trends, no broker and no workers) on the same archive.

Last, the read endpoints' latency over the loaded database: 200 sequential requests
each (``/api/events/``, with and without a text filter, ``/api/trends/?current=true``,
``/api/alerts/``, ``/api/stats/``), p50/p95.

Then, with ``--coverage``, each other real archive the replay reads is replayed once
and checked: stored events, trends, alerts, alerts received on the WebSocket.

The transformer heads (``mlengine.inference.scoring``, the ``inference`` worker): with
``--heads``, each task without an active head is first trained with ``manage.py
train``'s defaults on ``../shared/data/tweeteval/<task>`` (once: the bench database and
models folder keep them). Each run then also reports the share of its events the heads
labelled (the rest kept VADER's label past ``SCORING_LAG_S``), the wait from
``received_at`` to ``scored_at``, and the inference worker's texts/s and RSS. With
``--rates 25,50``, the first ``--rate-seconds`` of the archive are also replayed at each
steady rate (``manage.py replay --rate``), to find the rate the pool keeps up with.

With ``--aged``, the same measurement twice in one invocation, each in a database
created for it on the same server (``<name>_fresh``, ``<name>_aged``, dropped and
created again each time) and its own Redis database: first on a fresh platform, then
on an aged one, which before its timed runs is given old sources through the product's
own paths (``bench/aged_platform.py``: archives of 2009–2016, 2012 and 2013 replayed
with ``manage.py replay``, and feeds with items of 2014–2018 served on loopback and
added through ``POST /api/sources/``), waits until they have drained through the
pipeline and the anomaly stage has started stepping their years of buckets, and then
runs. The result holds both and the ratio aged ÷ fresh of the median events/s (within
10% is the target) and of the alert latency percentiles.

Results: ``bench/results/replay_throughput.json`` and ``replay_throughput.png`` (with
``--aged`` also ``replay_throughput-fresh/-aged.json`` and ``.png``, each mode's own).
Usage: ``make bench`` (``BENCH_ARGS="--runs 5 --coverage"``, ``BENCH_ARGS="--aged"``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")
os.environ.setdefault("TWISCOPE_ENV", "development")

import django  # noqa: E402

django.setup()

import websockets  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db.models import Count, Max, Min  # noqa: E402

from alerts import evaluation  # noqa: E402
from alerts.models import Alert, AlertRule  # noqa: E402
from bench import aged_platform  # noqa: E402
from ingest import persistence, services  # noqa: E402
from ingest.envelope import Envelope  # noqa: E402
from ingest.models import Event, Source  # noqa: E402
from ingest.sources.replay.formats import read_archive  # noqa: E402
from mlengine.enrichment import stage as enrichment  # noqa: E402
from mlengine.inference.heads import TASKS  # noqa: E402
from mlengine.models import (  # noqa: E402
    ModelVersion,
    Series,
    StreamClock,
    Trend,
)
from mlengine.trends import stage as trend_stage  # noqa: E402
from teams.models import Team  # noqa: E402
from twiscope.queues import NAMES as QUEUES  # noqa: E402
from twiscope.queues import STAGES as PIPELINE_QUEUES  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PHASES = ("fresh", "aged")
"""The modes of ``--aged``, in the order they run."""


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by linear interpolation, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (pos - low), 1)


def latency_summary(values_ms: list[float]) -> dict[str, Any]:
    return {
        "n": len(values_ms),
        "p50": percentile(values_ms, 0.5),
        "p95": percentile(values_ms, 0.95),
        "p99": percentile(values_ms, 0.99),
        "max": round(max(values_ms), 1) if values_ms else None,
    }


class WsListener:
    """A WebSocket client on ``/ws/alerts/`` in a thread, recording each message; it
    sends its API token in the handshake's ``Authorization`` header (never the URL)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self.connected.wait(30):
            raise RuntimeError("WebSocket client could not connect within 30 s")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    async def _run(self) -> None:
        async with websockets.connect(
            self.url, max_size=2**22, additional_headers={"Authorization": f"Token {self.token}"}
        ) as ws:
            self.connected.set()
            while not self._stop.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout=0.2)
                except TimeoutError:
                    continue
                self.messages.append((time.time(), json.loads(raw)))


class Platform:
    """``make run``'s processes under supervisord (``python -m devtools.run``, the demo
    login left to this script), in their own session (stopped as one)."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, token: str) -> None:
        env = dict(os.environ, PORT=str(self.port))
        # The bench measures latency, not the rate limits: its sequential API requests
        # would pass the default read budget of one token (teams/api/throttling.py).
        for scope in ("READ", "WRITE", "SEARCH", "EXPORT"):
            env.setdefault(f"API_RATE_{scope}", "1000000/min")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.run", "--skip-bootstrap"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                self.api("/api/stats/", token)
                if len(self.processes()) >= 6:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"platform did not come up in 90 s; see {self.log_path}")

    def api(self, path: str, token: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Token {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def post(self, path: str, token: str, body: dict[str, Any]) -> Any:
        """POST ``body`` as JSON to ``path`` with ``token``; the decoded answer."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def processes(self) -> list[psutil.Process]:
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


def process_label(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    for queue in QUEUES:
        if f"-Q {queue}" in cmd:
            return f"worker-{queue}"
    if "daphne" in cmd:
        return "web"
    if " beat" in cmd:
        return "beat"
    if "supervisord" in cmd:
        return "supervisord"
    if "devtools.run" in cmd:
        return "runner (log relay)"
    if "replay" in cmd:
        return "replay"
    return proc.name()


def rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return round(total / 2**20, 1)


def service_processes() -> list[psutil.Process]:
    """PostgreSQL and Redis processes (those ``make bench`` started, or the local ones)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        name = proc.info["name"] or ""
        if name.startswith(("postgres", "redis-server")):
            found.append(proc)
    return found


def cpu_seconds(procs: list[psutil.Process]) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        totals[process_label(proc)] += times.user + times.system
    return totals


def replay_once(
    platform: Platform,
    token: str,
    path: Path,
    source_name: str,
    expected: int,
    timeout_s: float,
    pace: tuple[str, ...] = ("--speed", "max"),
) -> dict[str, Any]:
    """One replay into a new source (``pace``: the replay's pacing options); returns the
    run's measurements."""
    listener = WsListener(f"ws://127.0.0.1:{platform.port}/ws/alerts/", token)
    listener.start()
    procs = platform.processes() + service_processes()
    cpu_before = cpu_seconds(procs)
    started = time.time()
    replay = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "replay",
            str(path),
            *pace,
            "--source",
            source_name,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    samples: list[dict[str, Any]] = []
    peak_rss = 0.0
    peak_inference_rss = 0.0
    counted = 0
    while time.time() - started < timeout_s:
        time.sleep(0.25)
        source = Source.objects.filter(name=source_name).first()
        clock = StreamClock.objects.filter(source=source).first() if source else None
        counted = clock.counted_events if clock else 0
        live = platform.processes()
        peak_rss = max(peak_rss, rss_mb(live))
        peak_inference_rss = max(
            peak_inference_rss,
            rss_mb([p for p in live if process_label(p) == "worker-inference"]),
        )
        try:
            lag = platform.api("/api/stats/", token)["queue_lag"]
        except OSError:
            lag = {}
        samples.append({"t": round(time.time() - started, 2), "counted": counted, "queues": lag})
        if counted >= expected and replay.poll() is not None:
            break
    drained = time.time() - started
    first = next((s["t"] for s in samples if s["counted"] > 0), drained)
    summary_line = (replay.communicate(timeout=30)[0] or b"").decode().strip().splitlines()
    # Let the last alerts be pushed, and the scoring backlog drain or fall back.
    time.sleep(max(2.0, settings.SCORING_LAG_S + 2) if scoring_on() else 2.0)
    listener.stop()
    cpu_after = cpu_seconds(platform.processes() + service_processes())
    source = Source.objects.get(name=source_name)
    alerts = list(
        Alert.objects.filter(trend__source=source, pushed_at__isnull=False).values_list(
            "id", "pushed_at", "event_received_at"
        )
    )
    # The alert stage's rate while it was busy: alerts over the span from the first
    # alert's evidence arriving to the last push.
    span_s = (
        (max(a[1] for a in alerts) - min(a[2] for a in alerts)).total_seconds() if alerts else 0
    )
    db_latency = [(p - r).total_seconds() * 1000 for _, p, r in alerts]
    alert_ids = {a[0] for a in alerts}
    ws_latency = []
    for received, message in listener.messages:
        alert = message.get("alert") or {}
        if message.get("type") == "alert.created" and alert.get("id") in alert_ids:
            event_received = datetime.fromisoformat(alert["event_received_at"])
            ws_latency.append((received - event_received.timestamp()) * 1000)
    cpu = {k: round(cpu_after.get(k, 0) - cpu_before.get(k, 0), 2) for k in cpu_after}
    stored = Event.objects.filter(source=source).count()
    return {
        "source": source_name,
        "replay_summary": summary_line[-1] if summary_line else "",
        "expected_events": expected,
        "stored_events": stored,
        "counted_events": counted,
        "drain_s": round(drained, 2),
        "events_per_s": round(stored / drained, 1),
        "first_event_counted_s": first,
        "steady_events_per_s": round(stored / max(drained - first, 1e-9), 1),
        "trends": Trend.objects.filter(source=source).count(),
        "alerts": len(alerts),
        "alerts_per_s": round(len(alerts) / span_s, 1) if span_s else None,
        "ws_alerts_received": len(ws_latency),
        "alert_latency_ms": latency_summary(db_latency),
        "ws_alert_latency_ms": latency_summary(ws_latency),
        "peak_rss_mb": peak_rss,
        "scoring": scoring_summary(source, peak_inference_rss) if scoring_on() else None,
        "cpu_s": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
        "samples": samples,
    }


def scoring_on() -> bool:
    """Whether any transformer head is active (the inference worker labels events)."""
    return ModelVersion.objects.filter(active=True).exists()


def scoring_summary(source: Source, peak_rss_mb: float) -> dict[str, Any]:
    """How the transformer heads kept up with ``source``'s events: the share they
    labelled, the wait from ``received_at`` to ``scored_at`` (ms), and the inference
    worker's texts/s over the span from its first to its last label of the run."""
    events = Event.objects.filter(source=source)
    total = events.count()
    scored = list(
        events.filter(scored_at__isnull=False).values_list("received_at", "scored_at", "text")
    )
    waits = [(done - received).total_seconds() * 1000 for received, done, _ in scored]
    span = (
        (max(d for _, d, _ in scored) - min(d for _, d, _ in scored)).total_seconds()
        if len(scored) > 1
        else 0
    )
    return {
        "events": total,
        "labelled_by_heads": len(scored),
        "share": round(len(scored) / total, 4) if total else None,
        "wait_ms": latency_summary(waits),
        "events_per_s": round(len(scored) / span, 1) if span else None,
        "distinct_texts_per_s": round(len({t for _, _, t in scored}) / span, 1) if span else None,
        "peak_inference_rss_mb": peak_rss_mb,
        "heads": sorted(
            f"{v.task}: {v.name} v{v.version}" for v in ModelVersion.objects.filter(active=True)
        ),
    }


def train_missing_heads() -> list[str]:
    """Train, with ``manage.py train``'s defaults, each task that has no active head, on
    ``../shared/data/tweeteval/<task>``; returns the tasks trained."""
    trained = []
    for task in TASKS:
        if ModelVersion.objects.filter(task=task, active=True).exists():
            continue
        print(f"training the {task} head (manage.py train {task}; once per bench database)")
        call_command("train", task, "--data", str(DATA / "tweeteval" / task))
        trained.append(task)
    return trained


API_PATHS = (
    "/api/events/?page_size=50",
    "/api/events/?q=flight&page_size=50",
    "/api/trends/?current=true&ordering=-score",
    "/api/alerts/",
    "/api/stats/",
)


def api_latency(platform: Platform, token: str, requests: int) -> dict[str, Any]:
    """Sequential GETs of each read endpoint against the loaded database: p50/p95 ms."""
    result: dict[str, Any] = {}
    for path in API_PATHS:
        timings = []
        for _ in range(requests):
            start = time.perf_counter()
            platform.api(path, token)
            timings.append((time.perf_counter() - start) * 1000)
        result[path] = latency_summary(timings[5:])  # the first few warm caches up
    return result


def baseline(path: Path, team: Team, name: str) -> dict[str, Any]:
    """The same stages as plain function calls in this process (no broker, no workers)."""
    envelopes = sorted(
        (item for item in read_archive(path) if isinstance(item, Envelope)),
        key=lambda e: e.created_at,
    )
    source = services.get_or_create_source(team=team, kind="replay", name=name, config={})
    services.describe_stream(source=source, event_times=[e.created_at for e in envelopes])
    started = time.time()
    size = settings.INGEST_BATCH_SIZE
    batches = [envelopes[i : i + size] for i in range(0, len(envelopes), size)]
    for n, batch in enumerate(batches):
        last = n == len(batches) - 1
        watermark = batch[-1].created_at + (timedelta(microseconds=1) if last else timedelta())
        key = persistence.stage_batch(source_id=source.id, envelopes=batch, watermark=watermark)
        # The stages' on-commit hand-offs are not sent: this process runs each stage.
        with mock.patch("twiscope.pipeline.app.send_task"):
            ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids
            enrichment.enrich_events(event_ids=ids, source_id=source.id)
            trend_ids = trend_stage.advance_stream(source_id=source.id)
            evaluation.evaluate_trends(trend_ids=trend_ids)
    elapsed = time.time() - started
    stored = Event.objects.filter(source=source).count()
    return {
        "stored_events": stored,
        "seconds": round(elapsed, 2),
        "events_per_s": round(stored / elapsed, 1),
    }


def distinct_events(path: Path) -> int:
    return len({i.external_id for i in read_archive(path) if isinstance(i, Envelope)})


def coverage_files() -> list[Path]:
    files = [DATA / "trump_tweets" / "trump_tweets_2009_2016.csv"]
    files += sorted((DATA / "crisislex_t26").glob("*/*-tweets_labeled.csv"))
    files += sorted((DATA / "telegram_news").glob("*_messages.json"))
    return files


def old_sources_state(source_ids: list[int]) -> list[dict[str, Any]]:
    """Each old source of the aged platform as it stands: its events (stored, counted by
    the trend stage), event-time span, watermark, and the anomaly stage's progress on it
    (buckets stepped, and complete buckets left to step)."""
    state = []
    for source in Source.objects.filter(id__in=source_ids).order_by("id"):
        events = Event.objects.filter(source=source).aggregate(
            n=Count("id"), first=Min("created_at"), last=Max("created_at")
        )
        clock = StreamClock.objects.filter(source=source).first()
        volume = Series.objects.filter(source=source, kind=Series.Kind.VOLUME).first()
        stepped = 0
        if volume is not None and volume.last_bucket >= volume.first_bucket:
            stepped = int((volume.last_bucket - volume.first_bucket).total_seconds()) // 300 + 1
        behind = None
        if clock is not None and clock.watermark is not None and events["first"] is not None:
            behind = aged_platform.buckets_behind(
                volume.last_bucket.timestamp() if volume is not None and stepped else None,
                clock.watermark.timestamp(),
                events["first"].timestamp(),
            )
        state.append(
            {
                "name": source.name,
                "kind": source.kind,
                "events": events["n"],
                "counted": clock.counted_events if clock else 0,
                "first_event": events["first"],
                "last_event": events["last"],
                "watermark": clock.watermark if clock else None,
                "last_error": source.last_error,
                "anomaly_buckets_stepped": stepped,
                "anomaly_buckets_behind": behind,
            }
        )
    return state


def age_platform(
    platform: Platform, token: str, stamp: str, timeout_s: float
) -> tuple[list[int], aged_platform.FeedServer, dict[str, Any]]:
    """Give the running platform its old sources (``bench/aged_platform.py``) as a user
    would: each feed served on loopback and added with ``POST /api/sources/`` (the
    ``sources`` process polls it), each archive replayed with ``manage.py replay
    --speed max --wait``. Returns once every old source's events are stored and counted
    and the anomaly stage has stepped at least one bucket of each: the old sources' ids,
    the feed server (left serving: the feeds are polled again each minute), and what the
    setup did. Raises ``RuntimeError`` when a replay fails or the wait passes
    ``timeout_s``."""
    started = time.time()
    server = aged_platform.FeedServer(DATA / "rss_feeds")
    server.start()
    ids = []
    for name in aged_platform.OLD_FEEDS:
        created = platform.post(
            "/api/sources/",
            token,
            {
                "kind": "rss",
                "name": f"aged-{stamp}-{Path(name).stem}",
                "config": {"url": server.url(name), "poll_interval_s": 60},
            },
        )
        ids.append(int(created["id"]))
    replays = []
    for relative in aged_platform.OLD_ARCHIVES:
        path = DATA / relative
        name = f"aged-{stamp}-{path.stem}"[:100]
        done = subprocess.run(
            [
                *(sys.executable, "manage.py", "replay", str(path), "--speed", "max"),
                *("--source", name, "--wait", str(int(timeout_s))),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=timeout_s + 120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"replay of {path.name} failed: {done.stderr[-2000:]}")
        summary = done.stdout.strip().splitlines()
        replays.append({"archive": path.name, "summary": summary[-1] if summary else ""})
        print(f"aged: replayed {path.name}: {replays[-1]['summary']}")
        ids.append(Source.objects.get(name=name).id)
    deadline = time.time() + timeout_s
    while True:
        state = old_sources_state(ids)
        failing = [s for s in state if s["last_error"]]
        if failing:
            raise RuntimeError(f"aged: a feed failed: {failing}")
        if all(
            s["events"] and s["counted"] >= s["events"] and s["anomaly_buckets_stepped"]
            for s in state
        ):
            break
        if time.time() > deadline:
            raise RuntimeError(f"aged: old sources not drained in {timeout_s:g} s: {state}")
        time.sleep(2)
    setup = {
        "setup_s": round(time.time() - started, 1),
        "feeds": list(aged_platform.OLD_FEEDS),
        "replays": replays,
    }
    behind = sum(s["anomaly_buckets_behind"] or 0 for s in state)
    print(
        f"aged: {len(ids)} old sources, {sum(s['events'] for s in state)} events, drained "
        f"in {setup['setup_s']} s; anomaly stage {behind} buckets behind"
    )
    return ids, server, setup


def cpu_description() -> dict[str, Any]:
    """This machine's CPU model and AVX-512 flags (``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return aged_platform.cpu_description(text)


def run_phases(args: argparse.Namespace, argv: list[str]) -> int:
    """``--aged``: run this script once per mode of ``PHASES`` (``--phase``), each in a
    database created for it on the server of ``DATABASE_URL`` (``<name>_<mode>``,
    dropped first) and a Redis database of its own (``--phase-redis-dbs``); then write
    both results, their comparison (``aged_platform.compare``) and a plot."""
    import psycopg2
    from psycopg2 import sql

    base_url = os.environ["DATABASE_URL"]
    base_name = urllib.parse.urlsplit(base_url).path.lstrip("/") or "twiscope"
    redis_dbs = [int(d) for d in args.phase_redis_dbs.split(",")]
    passthrough = [a for a in argv if a != "--aged"]
    results: dict[str, Any] = {}
    for phase, redis_db in zip(PHASES, redis_dbs, strict=True):
        name = f"{base_name}_{phase}"
        conn = psycopg2.connect(aged_platform.database_url_for(base_url, "postgres"))
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        conn.close()
        env = dict(
            os.environ,
            DATABASE_URL=aged_platform.database_url_for(base_url, name),
            REDIS_URL=aged_platform.redis_url_for(os.environ["REDIS_URL"], redis_db),
        )
        import redis

        redis.Redis.from_url(env["REDIS_URL"]).flushdb()
        print(f"== {phase} platform (database {name}, Redis db {redis_db})", flush=True)
        code = subprocess.call(
            [sys.executable, str(Path(__file__).resolve()), *passthrough, "--phase", phase],
            env=env,
        )
        if code != 0:
            print(f"the {phase} run failed (exit {code})", file=sys.stderr)
            return code
        results[phase] = json.loads((args.out / f"replay_throughput-{phase}.json").read_text())
    comparison = aged_platform.compare(results["fresh"]["median"], results["aged"]["median"])
    combined = {
        "mode": "fresh then aged",
        "archive": results["fresh"]["archive"],
        "runs_per_mode": args.runs,
        "measured_at": datetime.now(UTC).isoformat(),
        "machine": results["aged"]["machine"],
        "aged_vs_fresh": comparison,
        "fresh": results["fresh"],
        "aged": results["aged"],
    }
    (args.out / "replay_throughput.json").write_text(json.dumps(combined, indent=2, default=str))
    plot_comparison(combined, args.out / "replay_throughput.png")
    print(json.dumps(comparison, indent=2))
    print(f"results: {args.out / 'replay_throughput.json'} and replay_throughput.png")
    return 0


def plot_comparison(combined: dict[str, Any], out: Path) -> None:
    """Fresh against aged: events/s of each run, the median alert latency percentiles,
    and the aged platform's anomaly backlog before and after its runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for offset, phase in ((-0.2, "fresh"), (0.2, "aged")):
        rates = [r["events_per_s"] for r in combined[phase]["runs"]]
        axes[0].bar([i + offset for i in range(len(rates))], rates, width=0.4, label=phase)
        median = combined[phase]["median"]
        keys = ("alert_latency_p50_ms", "alert_latency_p95_ms", "alert_latency_p99_ms")
        axes[1].bar(
            [i + offset for i in range(3)], [median[k] or 0 for k in keys], width=0.4, label=phase
        )
    axes[0].set(title="Events/s end to end, per run", xlabel="run", ylabel="events/s")
    axes[1].set(title="Alert latency, median of the runs", ylabel="ms")
    axes[1].set_xticks(range(3), ["p50", "p95", "p99"])
    for ax in axes:
        ax.legend(fontsize=8)
    comparison = combined["aged_vs_fresh"]
    fig.suptitle(
        f"{combined['archive']}: aged ÷ fresh events/s = {comparison['events_per_s_ratio']} "
        f"({comparison['events_per_s']['aged']} / {comparison['events_per_s']['fresh']}); "
        f"within {comparison['tolerance']:.0%}: {comparison['within_tolerance']}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in runs:
        t = [s["t"] for s in run["samples"]]
        axes[0].plot(t, [s["counted"] for s in run["samples"]], label=run["source"][-6:])
    axes[0].set(
        title="Events through the trend stage", xlabel="s since replay start", ylabel="events"
    )
    axes[0].legend(fontsize=7)
    run = runs[len(runs) // 2]
    t = [s["t"] for s in run["samples"]]
    for queue in PIPELINE_QUEUES:
        axes[1].plot(t, [s["queues"].get(queue, 0) for s in run["samples"]], label=queue)
    axes[1].set(title="Queue depth (median run)", xlabel="s", ylabel="messages")
    axes[1].legend(fontsize=7)
    cpu = run["cpu_s"]
    names = list(cpu)[:10]
    axes[2].barh(names[::-1], [cpu[n] for n in names][::-1])
    axes[2].set(title="CPU seconds during the run (median run)", xlabel="s")
    fig.suptitle(
        f"Replay of {result['archive']} at --speed max ({result['mode']}): median "
        f"{result['median']['events_per_s']} events/s, alert p95 "
        f"{result['median']['alert_latency_p95_ms']} ms"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=DATA / "airline_tweets" / "Tweets.csv")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument(
        "--api-requests",
        type=int,
        default=200,
        help="sequential requests per read endpoint for the API latency",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="REPLAY_MAX_IN_FLIGHT for the replays (default: settings)",
    )
    parser.add_argument(
        "--coverage",
        action="store_true",
        help="also replay every other real archive once and check it",
    )
    parser.add_argument(
        "--heads",
        action="store_true",
        help="train the transformer heads first where none is active (see the docstring)",
    )
    parser.add_argument(
        "--rates",
        default="",
        help="comma-separated steady replay rates (events/s) to measure the scoring pool at",
    )
    parser.add_argument(
        "--rate-seconds", type=float, default=60, help="length of each steady-rate run, s"
    )
    parser.add_argument(
        "--aged",
        action="store_true",
        help="measure a fresh platform, then one holding old sources (see the docstring)",
    )
    parser.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--phase-redis-dbs",
        default="1,2",
        help="with --aged: the Redis databases of the fresh and the aged run (flushed first)",
    )
    parser.add_argument(
        "--aged-timeout",
        type=float,
        default=900,
        help="with --aged: the longest wait for the old sources to drain, s",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.aged and args.phase is None:
        args.out.mkdir(parents=True, exist_ok=True)
        return run_phases(args, sys.argv[1:])
    if args.max_in_flight:
        os.environ["REPLAY_MAX_IN_FLIGHT"] = str(args.max_in_flight)
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = ROOT / ".run" / "bench"
    run_dir.mkdir(parents=True, exist_ok=True)

    call_command("migrate", "--noinput", verbosity=0)
    with open(os.devnull, "w") as devnull:
        call_command("bootstrap_demo", "--run-dir", str(run_dir), stdout=devnull)
    token = (run_dir / "api-token").read_text().strip()
    team = Team.objects.get(slug="demo")
    # Beside the default rule (one alert per term a day), a rule that alerts on every
    # trend, so the latency percentiles rest on more than a handful of alerts.
    AlertRule.objects.get_or_create(
        team=team, name="Every trend (bench)", defaults={"cooldown_s": 0}
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    expected = distinct_events(args.archive)

    if args.heads:
        train_missing_heads()
    base = baseline(args.archive, team, f"bench-{stamp}-baseline")
    print(f"baseline (plain functions, one process): {base['events_per_s']} events/s")

    platform = Platform(args.port, run_dir / "platform.log")
    platform.start(token)
    runs: list[dict[str, Any]] = []
    coverage: list[dict[str, Any]] = []
    steady: list[dict[str, Any]] = []
    old_ids: list[int] = []
    feed_server: aged_platform.FeedServer | None = None
    aged: dict[str, Any] | None = None
    try:
        if args.phase == "aged":
            old_ids, feed_server, aged = age_platform(platform, token, stamp, args.aged_timeout)
            aged["before_runs"] = old_sources_state(old_ids)
        time.sleep(10)
        rest_rss = rss_mb(platform.processes())
        services_rss = rss_mb(service_processes())
        per_process = {process_label(p): rss_mb([p]) for p in platform.processes()}
        for i in range(args.runs):
            run = replay_once(
                platform, token, args.archive, f"bench-{stamp}-{i}", expected, args.timeout
            )
            runs.append(run)
            print(
                f"run {i}: {run['stored_events']} events in {run['drain_s']} s = "
                f"{run['events_per_s']} events/s; alerts {run['alerts']} "
                f"(ws {run['ws_alerts_received']}); latency ms {run['alert_latency_ms']}; "
                f"peak RSS {run['peak_rss_mb']} MB"
            )
            if run["scoring"]:
                print(f"  scoring: {run['scoring']}")
        for rate in [float(r) for r in args.rates.split(",") if r]:
            limit = max(1, int(rate * args.rate_seconds))
            run = replay_once(
                platform,
                token,
                args.archive,
                f"bench-{stamp}-rate{rate:g}",
                min(limit, expected),
                args.timeout + args.rate_seconds,
                pace=("--rate", f"{rate:g}", "--limit", str(limit)),
            )
            run.pop("samples")
            steady.append({"rate": rate, **run})
            print(f"steady {rate:g} events/s: scoring {run['scoring']}")
        if args.coverage:
            for path in coverage_files():
                run = replay_once(
                    platform,
                    token,
                    path,
                    f"cov-{stamp}-{path.stem}"[:100],
                    distinct_events(path),
                    args.timeout,
                )
                run.pop("samples")
                coverage.append({"archive": path.name, **run})
                print(
                    f"{path.name}: stored {run['stored_events']}/{run['expected_events']}, "
                    f"trends {run['trends']}, alerts {run['alerts']}, "
                    f"ws {run['ws_alerts_received']}"
                )
        if aged is not None:
            aged["after_runs"] = old_sources_state(old_ids)
            for when in ("before_runs", "after_runs"):
                aged[f"anomaly_buckets_behind_{when}"] = sum(
                    s["anomaly_buckets_behind"] or 0 for s in aged[when]
                )
        stats = platform.api("/api/stats/", token)
        api = api_latency(platform, token, args.api_requests)
        for path, summary in api.items():
            print(f"GET {path}: p50 {summary['p50']} ms, p95 {summary['p95']} ms")
    finally:
        platform.stop()
        if feed_server is not None:
            feed_server.stop()

    def med(key: str, sub: str | None = None) -> Any:
        values = [r[key][sub] if sub else r[key] for r in runs]
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 1) if values else None

    result = {
        "mode": args.phase or "bench database",
        "archive": args.archive.name,
        "max_in_flight": int(os.environ.get("REPLAY_MAX_IN_FLIGHT", "750")),
        "measured_at": datetime.now(UTC).isoformat(),
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30),
            "cpu": cpu_description(),
        },
        "baseline": base,
        "median": {
            "events_per_s": med("events_per_s"),
            "drain_s": med("drain_s"),
            "steady_events_per_s": med("steady_events_per_s"),
            "alert_latency_p50_ms": med("alert_latency_ms", "p50"),
            "alert_latency_p95_ms": med("alert_latency_ms", "p95"),
            "alert_latency_p99_ms": med("alert_latency_ms", "p99"),
            "ws_alert_latency_p95_ms": med("ws_alert_latency_ms", "p95"),
            "alerts": med("alerts"),
            "alerts_per_s": med("alerts_per_s"),
            "peak_rss_mb": med("peak_rss_mb"),
            "ratio_to_baseline": round(med("events_per_s") / base["events_per_s"], 2),
            "share_labelled_by_heads": (
                statistics.median(r["scoring"]["share"] for r in runs)
                if runs and all(r["scoring"] and r["scoring"]["share"] is not None for r in runs)
                else None
            ),
        },
        "rss_at_rest_mb": {
            "platform": rest_rss,
            "postgres_and_redis": services_rss,
            "per_process": per_process,
        },
        "stats_endpoint": stats,
        "api_latency_ms": api,
        "runs": runs,
        "steady_rates": steady,
        "coverage": coverage,
        "aged_platform": aged,
    }
    suffix = f"-{args.max_in_flight}" if args.max_in_flight else ""
    if args.phase:
        suffix = f"-{args.phase}"
    (args.out / f"replay_throughput{suffix}.json").write_text(
        json.dumps(result, indent=2, default=str)
    )
    plot(result, args.out / f"replay_throughput{suffix}.png")
    print(json.dumps(result["median"], indent=2))
    print(f"results: {args.out / f'replay_throughput{suffix}.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
