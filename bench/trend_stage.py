"""The trend stage alone on a real archive: its seconds, and a fingerprint of its trends.

Usage (needs DATABASE_URL and REDIS_URL of a scratch database: it creates a team and
sources there)::

    python bench/trend_stage.py ARCHIVE [--batch 500] [--bucket-s SECONDS]
        [--streams 1,10,50] [--stream-posts 1000] [--runs 3] [--json OUT]

Replays ARCHIVE (sorted by event time) through persist, enrich and the trend stage as
plain calls in one process, in batches of ``--batch``, and prints the wall seconds spent
in the trend stage (``mlengine.trends.stage.advance_stream``), the number of trends, and a
SHA-1 of every trend's (term, bucket, evidence event time, events, authors, score,
expected, its story's first trend, forecast): two versions of the code that print the
same fingerprint detected the same trends, grouped them in the same stories and
forecast the same. ``--bucket-s`` forces the trend bucket (e.g. 604800: one bucket a week, as a busy
live stream fills its buckets).

Then, for each N of ``--streams``, one advance over N streams, each holding the
archive's first ``--stream-posts`` posts (stored and enriched beforehand, untimed):
one ``advance_stream`` call that takes all N (``batched``), against N calls of one
stream each (``alone``, ``MAX_STREAMS_PER_ADVANCE = 0``), each the median wall time of
``--runs`` runs (the streams are rewound between runs). Reported per mode: µs per
scored window (candidate windows ``score_terms`` judged, the emerging projection not
counted again) and per stream, ``score_terms`` calls and the µs per window spent inside
them; and whether both modes stored the same trends. ``--json OUT`` writes every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")

import django  # noqa: E402

django.setup()

from ingest import persistence, services  # noqa: E402
from ingest.envelope import Envelope  # noqa: E402
from ingest.models import Source  # noqa: E402
from ingest.sources.replay.formats import read_archive  # noqa: E402
from mlengine.enrichment import stage as enrichment  # noqa: E402
from mlengine.models import BucketCount, StreamClock, Trend  # noqa: E402
from mlengine.trends import scan  # noqa: E402
from mlengine.trends import stage as trend_stage  # noqa: E402
from mlengine.trends.detector import score_terms  # noqa: E402
from teams.models import Team  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--bucket-s", type=int, default=None)
    parser.add_argument("--streams", default="1,10,50", help="stream counts, comma-separated")
    parser.add_argument("--stream-posts", type=int, default=1000, help="posts in each stream")
    parser.add_argument("--runs", type=int, default=3, help="runs per setting (median)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    options = parser.parse_args()
    envelopes = sorted(
        (item for item in read_archive(options.archive) if isinstance(item, Envelope)),
        key=lambda e: e.created_at,
    )
    team, _ = Team.objects.get_or_create(slug="bench-trends", defaults={"name": "Bench"})
    source = new_source(team, envelopes, options.bucket_s)
    batches = [envelopes[i : i + options.batch] for i in range(0, len(envelopes), options.batch)]
    trend_s = 0.0
    with mock.patch("twiscope.pipeline.app.send_task"):
        for n, batch in enumerate(batches):
            end = timedelta(microseconds=1) if n == len(batches) - 1 else timedelta()
            key = persistence.stage_batch(
                source_id=source.id, envelopes=batch, watermark=batch[-1].created_at + end
            )
            stored = persistence.persist_batch(batch_key=key, source_id=source.id)
            enrichment.enrich_events(event_ids=stored.inserted_ids, source_id=source.id)
            started = time.perf_counter()
            trend_stage.advance_stream(source_id=source.id)
            trend_s += time.perf_counter() - started
    trends, print_ = fingerprint([source])
    result: dict[str, Any] = {
        "archive": options.archive.name,
        "posts": len(envelopes),
        "trend_stage_s": round(trend_s, 3),
        "trends": trends,
        "fingerprint": print_,
    }
    print(
        f"{options.archive.name}: {len(envelopes)} posts, trend stage {trend_s:.2f} s, "
        f"{trends} trends, fingerprint {print_}"
    )
    counts = [int(n) for n in options.streams.split(",") if n.strip()]
    if counts:
        result["streams"] = measure_streams(
            team,
            envelopes[: options.stream_posts],
            counts=counts,
            bucket_s=options.bucket_s,
            runs=max(1, options.runs),
        )
    if options.json:
        options.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {options.json}")
    return 0


def new_source(team: Team, envelopes: Sequence[Envelope], bucket_s: int | None) -> Source:
    """A new replay source sized for ``envelopes`` (``describe_stream``)."""
    source = services.get_or_create_source(
        team=team, kind="replay", name=f"trends-{uuid.uuid4().hex[:8]}", config={}
    )
    services.describe_stream(
        source=source, event_times=[e.created_at for e in envelopes], trend_bucket_s=bucket_s
    )
    return source


def fingerprint(sources: Sequence[Source]) -> tuple[int, str]:
    """How many trends ``sources`` hold, and a SHA-1 of every trend's (stream's position
    in ``sources``, term, bucket, evidence event time, events, authors, score, expected,
    velocity, predicted, its story's first trend (term and bucket), forecast JSON)."""
    position = {source.id: i for i, source in enumerate(sources)}
    trends = Trend.objects.filter(source__in=list(sources))
    story_key = {
        trend_id: f"{term}@{start.isoformat()}"
        for trend_id, term, start in trends.values_list("id", "term", "bucket_start")
    }
    rows = sorted(
        (
            position[row[0]],
            *row[1:-2],
            story_key.get(row[-2]),
            json.dumps(row[-1], sort_keys=True),
        )
        for row in trends.values_list(
            "source_id",
            "term",
            "bucket_start",
            "evidence_created_at",
            "events",
            "authors_count",
            "score",
            "expected",
            "velocity",
            "predicted",
            "story_id",
            "forecast",
        )
    )
    digest = hashlib.sha1(json.dumps([[str(value) for value in row] for row in rows]).encode())
    return len(rows), digest.hexdigest()


def rewind(sources: Sequence[Source]) -> None:
    """Forget what the trend stage counted of ``sources``: their posts wait again."""
    ids = [source.id for source in sources]
    Trend.objects.filter(source_id__in=ids).delete()
    BucketCount.objects.filter(source_id__in=ids).delete()
    StreamClock.objects.filter(source_id__in=ids).update(
        watermark=None, counted_events=0, advanced_at=None
    )


def measure_streams(
    team: Team,
    envelopes: Sequence[Envelope],
    *,
    counts: Sequence[int],
    bucket_s: int | None,
    runs: int,
) -> dict[str, Any]:
    """One advance over N streams of ``envelopes`` each, for N in ``counts``: batched (one
    ``advance_stream`` call takes them all) and alone (one call a stream), median wall
    time of ``runs``; see the module docstring. Prints a line per N and mode."""
    sources = [new_source(team, envelopes, bucket_s) for _ in range(max(counts))]
    with mock.patch("twiscope.pipeline.app.send_task"):
        for source in sources:
            trend_stage.advance_stream(source_id=source.id)  # its clock, before any post
        for source in sources:
            key = persistence.stage_batch(
                source_id=source.id,
                envelopes=envelopes,
                watermark=envelopes[-1].created_at + timedelta(microseconds=1),
            )
            stored = persistence.persist_batch(batch_key=key, source_id=source.id)
            enrichment.enrich_events(event_ids=stored.inserted_ids, source_id=source.id)
        with mock.patch.object(trend_stage, "MAX_STREAMS_PER_ADVANCE", 0):
            for source in sources:
                trend_stage.advance_stream(source_id=source.id)  # all counted: none waits
    out: dict[str, Any] = {"posts_per_stream": len(envelopes), "runs": runs, "by_streams": {}}
    for n in counts:
        group = sources[:n]
        row: dict[str, Any] = {}
        prints = set()
        for mode, others in (("batched", n - 1), ("alone", 0)):
            walls, inside = [], []
            calls = windows = 0
            for _ in range(runs):
                rewind(group)
                calls, windows, scoring = 0, 0, 0.0

                def counted(*args: Any, **kwargs: Any) -> Any:
                    nonlocal calls, windows, scoring
                    started = time.perf_counter()
                    scores = score_terms(*args, **kwargs)
                    scoring += time.perf_counter() - started
                    calls += 1
                    windows += len(scores.is_trend) if kwargs.get("weigh_authors") is None else 0
                    return scores

                with (
                    mock.patch("twiscope.pipeline.app.send_task"),
                    mock.patch.object(trend_stage, "MAX_STREAMS_PER_ADVANCE", others),
                    mock.patch.object(scan, "score_terms", side_effect=counted),
                ):
                    started = time.perf_counter()
                    for source in group[: 1 if others else n]:
                        trend_stage.advance_stream(source_id=source.id)
                    walls.append(time.perf_counter() - started)
                inside.append(scoring)
            prints.add(fingerprint(group))
            wall = statistics.median(walls)
            row[mode] = {
                "wall_s": round(wall, 4),
                "us_per_window": round(wall / max(windows, 1) * 1e6, 2),
                "us_per_stream": round(wall / n * 1e6, 1),
                "score_calls": calls,
                "windows": windows,
                "score_us_per_window": round(statistics.median(inside) / max(windows, 1) * 1e6, 4),
            }
            print(
                f"{n:>3} streams {mode:>7}: {row[mode]['wall_s']} s, "
                f"{row[mode]['us_per_window']} µs a window, {row[mode]['us_per_stream']} µs a "
                f"stream, {calls} score_terms calls over {windows} windows "
                f"({row[mode]['score_us_per_window']} µs a window inside them)"
            )
        row["speedup"] = round(row["alone"]["wall_s"] / row["batched"]["wall_s"], 2)
        row["same_trends"] = len(prints) == 1
        row["fingerprint"] = sorted(f"{count} trends {digest}" for count, digest in prints)
        print(f"{n:>3} streams fingerprint: {', '.join(row['fingerprint'])}")
        out["by_streams"][str(n)] = row
    return out


if __name__ == "__main__":
    sys.exit(main())
