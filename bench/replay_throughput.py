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

Results: ``bench/results/replay_throughput.json`` and ``replay_throughput.png``.
Usage: ``make bench`` (``BENCH_ARGS="--runs 5 --coverage"``).
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

from alerts import evaluation  # noqa: E402
from alerts.models import Alert, AlertRule  # noqa: E402
from ingest import persistence, services  # noqa: E402
from ingest.envelope import Envelope  # noqa: E402
from ingest.models import Event, Source  # noqa: E402
from ingest.sources.replay.formats import read_archive  # noqa: E402
from mlengine.enrichment import stage as enrichment  # noqa: E402
from mlengine.inference.heads import TASKS  # noqa: E402
from mlengine.models import (  # noqa: E402
    ModelVersion,
    StreamClock,
    Trend,
)
from mlengine.trends import stage as trend_stage  # noqa: E402
from teams.models import Team  # noqa: E402
from twiscope.queues import NAMES as QUEUES  # noqa: E402
from twiscope.queues import STAGES as PIPELINE_QUEUES  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


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
    """A WebSocket client on ``/ws/alerts/`` in a thread, recording each message."""

    def __init__(self, url: str) -> None:
        self.url = url
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
        async with websockets.connect(self.url, max_size=2**22) as ws:
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
    listener = WsListener(f"ws://127.0.0.1:{platform.port}/ws/alerts/?token={token}")
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
        f"Replay of {result['archive']} at --speed max: median "
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
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
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
    try:
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
        stats = platform.api("/api/stats/", token)
        api = api_latency(platform, token, args.api_requests)
        for path, summary in api.items():
            print(f"GET {path}: p50 {summary['p50']} ms, p95 {summary['p95']} ms")
    finally:
        platform.stop()

    def med(key: str, sub: str | None = None) -> Any:
        values = [r[key][sub] if sub else r[key] for r in runs]
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 1) if values else None

    result = {
        "archive": args.archive.name,
        "max_in_flight": int(os.environ.get("REPLAY_MAX_IN_FLIGHT", "750")),
        "measured_at": datetime.now(UTC).isoformat(),
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30),
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
    }
    suffix = f"-{args.max_in_flight}" if args.max_in_flight else ""
    (args.out / f"replay_throughput{suffix}.json").write_text(
        json.dumps(result, indent=2, default=str)
    )
    plot(result, args.out / f"replay_throughput{suffix}.png")
    print(json.dumps(result["median"], indent=2))
    print(f"results: {args.out / 'replay_throughput.json'} and replay_throughput.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
