"""The API load benchmark (``make bench-api``): 50 clients over the events list, search,
trends, alerts and stats of a 1,000,000-event database, served as production serves it.

Usage (``DATABASE_URL`` naming the database ``bench/api_data.py build`` made, ``REDIS_URL``
a Redis database of its own, ``SECRET_KEY``)::

    python bench/api_load.py run --label after [--code .] [--duration 60] [--users 50]
    python bench/api_load.py report

``run`` starts daphne (as ``devtools/supervisord.conf`` does) from the tree ``--code``
on loopback, waits until it answers, then runs locust headless (``bench/api_locustfile.py``)
for ``--duration`` seconds with ``--users`` clients, all started at once, and stops the
server. Each endpoint's request count, failures, requests/s and p50/p95/p99 (ms, as locust
reports them: rounded to two significant figures above 100 ms) are appended as one line
to ``bench/results/api_load_runs.jsonl``. To compare with another tree (the code before a
change), run it with ``--code <that tree>`` against the same database, alternating runs.

``report`` takes the median of each figure over the runs of each label and writes
``bench/results/api_load.json`` and ``bench/results/api_load.png`` (p95 per endpoint and
label, the goals drawn), and prints a table.

The search words are ten common words of the two archives (``WORDS``). The Redis database
is flushed before each run (the server's hot cache starts cold for both trees).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "api_load_runs.jsonl"
ENDPOINTS = ("events", "search", "trends", "alerts", "stats")
GOAL_MS = {"events": 50, "search": 50, "trends": 25, "alerts": 25, "stats": 25}
"""The p95 goals (issue 19): 25 ms for the cached endpoints, 50 ms for the list and search."""
WORDS = "flight,delayed,cancelled,service,thanks,customer,great,america,people,obama"


def _token() -> str:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model

    from teams.models import ApiToken
    from teams.services import create_token

    # Tokens are hashed at rest: each run revokes the last run's and makes its own.
    user = get_user_model().objects.get(username="bench-api")  # bench/api_data.py USER
    ApiToken.objects.filter(user_id=user.pk, name="bench-api load").delete()
    _token_row, secret = create_token(user=user, name="bench-api load")
    return secret


def _wait_until_up(url: str, token: str, timeout_s: float = 90.0) -> None:
    """Return once ``url`` answers 200 with ``token``; RuntimeError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"Authorization": f"Token {token}"})
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {url} within {timeout_s} s")


def run(label: str, code: Path, duration: int, users: int, port: int) -> dict[str, Any]:
    """One run (see the module docstring); returns the line appended to ``RUNS``.

    Raises:
        RuntimeError: the server did not come up, or locust wrote no statistics.
    """
    token = _token()
    import redis

    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "twiscope.settings", "DJANGO_DEBUG": "false"}
    # The load is one token's: the bench measures latency, not the rate limits.
    for scope in ("READ", "WRITE", "SEARCH", "EXPORT"):
        env.setdefault(f"API_RATE_{scope}", "1000000/min")
    server = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
         "twiscope.asgi:application"],
        cwd=code,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    host = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(f"{host}/api/stats/", token)
        with tempfile.TemporaryDirectory() as tmp:
            prefix = str(Path(tmp) / "load")
            subprocess.run(
                [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "api_locustfile.py"),
                 "--headless", "-u", str(users), "-r", str(users), "-t", f"{duration}s",
                 "--host", host, "--csv", prefix, "--only-summary", "--stop-timeout", "5",
                 "-L", "WARNING"],
                env={**env, "BENCH_API_TOKEN": token, "BENCH_API_WORDS": WORDS},
                check=False,
            )  # fmt: skip
            stats_csv = Path(f"{prefix}_stats.csv")
            if not stats_csv.exists():
                raise RuntimeError("locust wrote no statistics")
            with stats_csv.open(newline="") as f:
                rows = {row["Name"]: row for row in csv.DictReader(f)}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    endpoints = {
        name: {
            "requests": int(rows[name]["Request Count"]),
            "failures": int(rows[name]["Failure Count"]),
            "rps": round(float(rows[name]["Requests/s"]), 2),
            "p50_ms": float(rows[name]["50%"]),
            "p95_ms": float(rows[name]["95%"]),
            "p99_ms": float(rows[name]["99%"]),
        }
        for name in ENDPOINTS
        if name in rows
    }
    line = {
        "label": label,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": duration,
        "users": users,
        "endpoints": endpoints,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with RUNS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line, indent=1))
    return line


def report() -> dict[str, Any]:
    """Medians over the runs of each label (see the module docstring); returns them."""
    runs = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    labels = sorted({r["label"] for r in runs}, key=lambda label: (label != "before", label))
    medians: dict[str, Any] = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        medians[label] = {"runs": len(mine), "endpoints": {}}
        for name in ENDPOINTS:
            seen = [r["endpoints"][name] for r in mine if name in r["endpoints"]]
            medians[label]["endpoints"][name] = {
                key: statistics.median(s[key] for s in seen)
                for key in ("rps", "p50_ms", "p95_ms", "p99_ms", "failures")
            }
    result = {"goal_p95_ms": GOAL_MS, "labels": medians}
    (RESULTS / "api_load.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'endpoint':8} {'label':7} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7}  goal")
    for name in ENDPOINTS:
        for label in labels:
            e = medians[label]["endpoints"][name]
            print(
                f"{name:8} {label:7} {e['rps']:7.1f} {e['p50_ms']:7.0f} {e['p95_ms']:7.0f} "
                f"{e['p99_ms']:7.0f}  p95 < {GOAL_MS[name]} ms"
            )
    _plot(medians, labels)
    return result


def _plot(medians: dict[str, Any], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        values = [medians[label]["endpoints"][name]["p95_ms"] for name in ENDPOINTS]
        xs = [j + i * width for j in range(len(ENDPOINTS))]
        ax.bar(xs, values, width=width, label=f"p95 {label}")
    for j, name in enumerate(ENDPOINTS):
        ax.hlines(GOAL_MS[name], j - 0.1, j + 0.9, colors="black", linestyles="dashed")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ENDPOINTS))], list(ENDPOINTS))
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale); dashed: the goal")
    ax.set_title("API p95 under 50 clients, 1,000,000 events (medians of runs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "api_load.png", dpi=120)


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--label", default="after")
    r.add_argument("--code", type=Path, default=ROOT)
    r.add_argument("--duration", type=int, default=60)
    r.add_argument("--users", type=int, default=50)
    r.add_argument("--port", type=int, default=8771)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run(args.label, args.code.resolve(), args.duration, args.users, args.port)
    else:
        report()


if __name__ == "__main__":
    main()
