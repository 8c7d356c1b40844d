"""CPU time of each pipeline stage per event, as plain calls in one process.

Usage (needs DATABASE_URL and REDIS_URL of a scratch database: it creates a team and a
source there)::

    python bench/stage_profile.py [ARCHIVE] [--runs 3] [--json OUT]

Replays ARCHIVE (default: the airline archive in ../shared/data) in batches of 250,
through persist, enrich, the trend stage and the alert stage, timing each stage's
process CPU (``time.process_time``, so waits on PostgreSQL and Redis are not counted)
and wall time; prints ms per event for each stage, the median over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")

import django  # noqa: E402

django.setup()

from alerts import evaluation  # noqa: E402
from alerts import services as alert_services  # noqa: E402
from ingest import persistence, services  # noqa: E402
from ingest.envelope import Envelope  # noqa: E402
from ingest.sources.replay.formats import read_archive  # noqa: E402
from mlengine.enrichment import stage as enrichment  # noqa: E402
from mlengine.enrichment.text import warm_up  # noqa: E402
from mlengine.trends import stage as trend_stage  # noqa: E402
from teams.models import Team  # noqa: E402

DEFAULT = ROOT.parent / "shared" / "data" / "airline_tweets" / "Tweets.csv"
STAGES = ("persist", "enrich", "trends", "alerts")


def one_run(envelopes: list[Envelope], team: Team) -> dict[str, dict[str, float]]:
    source = services.get_or_create_source(
        team=team, kind="replay", name=f"profile-{uuid.uuid4().hex[:8]}", config={}
    )
    services.describe_stream(source=source, event_times=[e.created_at for e in envelopes])
    cpu = dict.fromkeys(STAGES, 0.0)
    wall = dict.fromkeys(STAGES, 0.0)

    def timed(stage: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        c, w = time.process_time(), time.perf_counter()
        result = fn(*args, **kwargs)
        cpu[stage] += time.process_time() - c
        wall[stage] += time.perf_counter() - w
        return result

    batches = [envelopes[i : i + 250] for i in range(0, len(envelopes), 250)]
    with mock.patch("twiscope.pipeline.app.send_task"):
        for n, batch in enumerate(batches):
            end = timedelta(microseconds=1) if n == len(batches) - 1 else timedelta()
            key = persistence.stage_batch(
                source_id=source.id, envelopes=batch, watermark=batch[-1].created_at + end
            )
            ids = timed("persist", persistence.persist_batch, batch_key=key, source_id=source.id)
            timed(
                "enrich",
                enrichment.enrich_events,
                event_ids=ids.inserted_ids,
                source_id=source.id,
            )
            trends = timed("trends", trend_stage.advance_stream, source_id=source.id)
            timed("alerts", evaluation.evaluate_trends, trend_ids=trends)
    n = len(envelopes)
    return {
        "cpu_ms_per_event": {s: round(cpu[s] * 1000 / n, 4) for s in STAGES},
        "wall_ms_per_event": {s: round(wall[s] * 1000 / n, 4) for s in STAGES},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    envelopes = sorted(
        (i for i in read_archive(options.archive) if isinstance(i, Envelope)),
        key=lambda e: e.created_at,
    )
    team, _ = Team.objects.get_or_create(slug="profile", defaults={"name": "Profile"})
    alert_services.ensure_default_rule(team)
    warm_up()
    runs = [one_run(envelopes, team) for _ in range(options.runs)]
    result = {
        "archive": options.archive.name,
        "events": len(envelopes),
        "runs": options.runs,
        **{
            kind: {s: round(statistics.median(r[kind][s] for r in runs), 4) for s in STAGES}
            for kind in ("cpu_ms_per_event", "wall_ms_per_event")
        },
    }
    result["cpu_ms_per_event"]["total"] = round(sum(result["cpu_ms_per_event"].values()), 4)
    print(json.dumps(result, indent=2))
    if options.json:
        options.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
