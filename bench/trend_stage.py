"""The trend stage alone on a real archive: its seconds, and a fingerprint of its trends.

Usage (needs DATABASE_URL and REDIS_URL of a scratch database: it creates a team and a
source there)::

    python bench/trend_stage.py ARCHIVE [--batch 500] [--bucket-s SECONDS]

Replays ARCHIVE (sorted by event time) through persist, enrich and the trend stage as
plain calls in one process, in batches of ``--batch``, and prints the wall seconds spent
in the trend stage (``mlengine.services.advance_stream``), the number of trends, and a
SHA-1 of every trend's (term, bucket, evidence event time, events, authors, score,
expected): two versions of the code that print the same fingerprint detected the same
trends. ``--bucket-s`` forces the trend bucket (e.g. 604800: one bucket a week, as a busy
live stream fills its buckets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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

from ingest import services  # noqa: E402
from ingest.envelope import Envelope  # noqa: E402
from ingest.sources.replay.formats import read_archive  # noqa: E402
from mlengine import enrichment  # noqa: E402
from mlengine import services as ml_services  # noqa: E402
from mlengine.models import Trend  # noqa: E402
from teams.models import Team  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--bucket-s", type=int, default=None)
    options = parser.parse_args()
    envelopes = sorted(
        (item for item in read_archive(options.archive) if isinstance(item, Envelope)),
        key=lambda e: e.created_at,
    )
    team, _ = Team.objects.get_or_create(slug="bench-trends", defaults={"name": "Bench"})
    source = services.get_or_create_source(
        team=team, kind="replay", name=f"trends-{uuid.uuid4().hex[:8]}", config={}
    )
    services.describe_stream(
        source=source,
        event_times=[e.created_at for e in envelopes],
        trend_bucket_s=options.bucket_s,
    )
    batches = [envelopes[i : i + options.batch] for i in range(0, len(envelopes), options.batch)]
    trend_s = 0.0
    with mock.patch("twiscope.pipeline.app.send_task"):
        for n, batch in enumerate(batches):
            end = timedelta(microseconds=1) if n == len(batches) - 1 else timedelta()
            key = services.stage_batch(
                source_id=source.id, envelopes=batch, watermark=batch[-1].created_at + end
            )
            stored = services.persist_batch(batch_key=key, source_id=source.id)
            enrichment.enrich_events(event_ids=stored.inserted_ids, source_id=source.id)
            started = time.perf_counter()
            ml_services.advance_stream(source_id=source.id)
            trend_s += time.perf_counter() - started
    rows = sorted(
        Trend.objects.filter(source=source).values_list(
            "term",
            "bucket_start",
            "evidence_created_at",
            "events",
            "authors_count",
            "score",
            "expected",
        )
    )
    fingerprint = hashlib.sha1(
        json.dumps([[str(value) for value in row] for row in rows]).encode()
    ).hexdigest()
    print(
        f"{options.archive.name}: {len(envelopes)} posts, trend stage {trend_s:.2f} s, "
        f"{len(rows)} trends, fingerprint {fingerprint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
