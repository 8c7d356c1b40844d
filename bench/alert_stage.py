"""Throughput of the alert stage: alerts created and pushed per second, in batches.

Usage (needs DATABASE_URL and REDIS_URL of a scratch database; it writes there)::

    python bench/alert_stage.py [--trends 5000] [--teams 4] [--rules 2] [--batch 250]
                                [--runs 3] [--json OUT]

Creates ``--teams`` teams, each with a source and ``--rules`` rules that fire on every
trend (cooldown 0), and ``--trends`` trends spread over them; then runs the alert stage
as the ``alerts`` worker does, batch after batch: ``evaluate_trends`` (claims, cooldowns,
sequence numbers, inserts) and ``push_alerts`` (the channel layer on Redis, and the
``pushed_at`` marks). Reports alerts per second (median of ``--runs``), with the time
split between evaluation and push.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")

import django  # noqa: E402

django.setup()

from alerts import evaluation, push  # noqa: E402
from alerts.models import AlertRule  # noqa: E402
from ingest.models import Source  # noqa: E402
from mlengine.models import Trend  # noqa: E402
from teams.models import Team  # noqa: E402

ORIGIN = datetime(2013, 2, 15, 3, 0, tzinfo=UTC)


def make_trends(n: int, teams: int, rules: int) -> list[int]:
    run = uuid.uuid4().hex[:8]
    sources = []
    for t in range(teams):
        team = Team.objects.create(name=f"bench {run} {t}", slug=f"bench-{run}-{t}")
        for r in range(rules):
            AlertRule.objects.create(team=team, name=f"every trend {r}", cooldown_s=0)
        sources.append(Source.objects.create(team=team, kind="replay", name=f"bench-{run}"))
    trends = [
        Trend(
            source=sources[i % teams],
            term=f"#term{i % 997}",
            bucket_start=ORIGIN + timedelta(hours=i // 997),
            bucket_s=3600,
            events=20,
            expected=1.0,
            score=9.0,
            authors_count=20,
            velocity=1.0,
            detected_at=ORIGIN,
            updated_at=ORIGIN,
            evidence_received_at=datetime.now(UTC),
            evidence_created_at=ORIGIN,
        )
        for i in range(n)
    ]
    return [t.id for t in Trend.objects.bulk_create(trends, batch_size=2000)]


def one_run(trend_ids: list[int], batch: int) -> dict[str, float]:
    evaluate_s = push_s = 0.0
    alerts = 0
    push_alerts = push.push_alerts  # the evaluation's own push is patched out: timed below
    with mock.patch("alerts.push.push_alerts"):
        for i in range(0, len(trend_ids), batch):
            started = time.perf_counter()
            created = evaluation.evaluate_trends(trend_ids=trend_ids[i : i + batch])
            evaluate_s += time.perf_counter() - started
            started = time.perf_counter()
            push_alerts(alert_ids=created)
            push_s += time.perf_counter() - started
            alerts += len(created)
    total = evaluate_s + push_s
    return {
        "alerts": alerts,
        "seconds": round(total, 3),
        "alerts_per_s": round(alerts / total, 1),
        "evaluate_share": round(evaluate_s / total, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trends", type=int, default=5000)
    parser.add_argument("--teams", type=int, default=4)
    parser.add_argument("--rules", type=int, default=2)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    runs = [
        one_run(make_trends(options.trends, options.teams, options.rules), options.batch)
        for _ in range(options.runs)
    ]
    result = {
        "trends": options.trends,
        "teams": options.teams,
        "rules_per_team": options.rules,
        "batch": options.batch,
        "median_alerts_per_s": statistics.median(r["alerts_per_s"] for r in runs),
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    if options.json:
        options.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
