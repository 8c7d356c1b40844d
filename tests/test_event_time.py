"""Same trends at any speed: a trend verdict is a function of the events alone.

A real CrisisLexT26 archive is replayed through real Celery workers (PostgreSQL, Redis)
at full speed with enrich concurrency 1 and 4 and batches of 50 and 250, and a slice of
it paced; the final trends (term, bucket) and the event time of each first detection
must be the same in every run. Plain-call tests check the same property for arrival
orders a replay never produces.
"""

from __future__ import annotations

import io
import random
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import override_settings

from ingest import counters, persistence
from ingest.models import Event, Source
from ingest.sources.replay.formats import read_archive
from ingest.sources.replay.rows import RowError
from mlengine.models import StreamClock, Trend
from tests.conftest import worker_processes
from tests.factories import (
    burst,
    commits_without_broker,
    make_personas,
    make_source,
    quiet_history,
)
from twiscope.redis import get_redis

ARCHIVE = "crisislex_t26/2012_Costa_Rica_earthquake/2012_Costa_Rica_earthquake-tweets_labeled.csv"

Verdicts = set[tuple[str, str, str]]


def verdicts(source: Source) -> Verdicts:
    """``(term, bucket start, event time of first detection)`` of every trend."""
    return {
        (t.term, t.bucket_start.isoformat(), t.evidence_created_at.isoformat())
        for t in Trend.objects.filter(source=source)
    }


def worker_pools(enrich_concurrency: int):  # type: ignore[no-untyped-def]
    """The pipeline's pools as real processes: ingest, ml and alerts with one worker
    each, enrich with ``enrich_concurrency`` (prefork)."""
    return worker_processes(
        (["ingest"], 1), (["enrich"], enrich_concurrency), (["detect"], 1), (["alerts"], 1)
    )


def replay(path: Path, name: str, *args: str) -> Source:
    """Replay ``path`` into a new source ``name`` and wait until its stream is counted."""
    call_command(
        "replay",
        str(path),
        "--source",
        name,
        "--team",
        "newsroom",
        "--wait-workers",
        "0",
        *args,
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    source = Source.objects.get(name=name)
    deadline = time.monotonic() + 120
    while True:
        stored = Event.objects.filter(source=source).count()
        clock = StreamClock.objects.filter(source=source).first()
        if clock is not None and stored and clock.counted_events == stored:
            return source
        assert time.monotonic() < deadline, f"{name}: {stored} stored, clock {clock}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_archive_gives_the_same_trends_at_any_speed_batch_size_and_concurrency(
    shared_data: Path,
) -> None:
    get_redis().flushdb()
    make_personas()
    path = shared_data / ARCHIVE
    runs: dict[str, Verdicts] = {}
    with worker_pools(enrich_concurrency=1):
        for batch_size in (250, 50):
            with override_settings(INGEST_BATCH_SIZE=batch_size):
                runs[f"max-c1-b{batch_size}"] = verdicts(replay(path, f"c1-b{batch_size}"))
    with worker_pools(enrich_concurrency=4):
        for batch_size in (250, 50):
            with override_settings(INGEST_BATCH_SIZE=batch_size):
                runs[f"max-c4-b{batch_size}"] = verdicts(replay(path, f"c4-b{batch_size}"))
        # A slice, paced at a high speed, against the same slice at full speed.
        sliced_max = verdicts(replay(path, "slice-max", "--limit", "400"))
        sliced_paced = verdicts(replay(path, "slice-paced", "--limit", "400", "--speed", "20000"))

    reference = runs["max-c1-b250"]
    assert len(reference) >= 3, "the archive should produce trends"
    assert all(result == reference for result in runs.values()), {
        name: sorted(result ^ reference) for name, result in runs.items()
    }
    assert sliced_max and sliced_paced == sliced_max


def _envelopes_of(path: Path) -> list:
    return sorted(
        (item for item in read_archive(path, None) if not isinstance(item, RowError)),
        key=lambda e: e.created_at,
    )


@pytest.mark.django_db
@pytest.mark.usefixtures("clean_redis")
def test_batches_persisted_out_of_order_give_the_same_trends() -> None:
    """Batches overtaking each other between the stages (as with 4 enrich workers)
    change nothing: the watermark waits for the earliest batch still in flight."""
    from mlengine.enrichment import stage as enrichment
    from mlengine.trends import stage as trend_stage

    personas = make_personas()
    events = quiet_history(8) + burst("#blizzard", count=12, minutes=121) + quiet_history(2)
    events.sort(key=lambda e: e.created_at)

    def run(name: str, batch_size: int, shuffle: bool) -> Verdicts:
        source = make_source(personas.team, name=name)
        keys = []
        for i in range(0, len(events), batch_size):
            batch = events[i : i + batch_size]
            keys.append(
                persistence.stage_batch(
                    source_id=source.id, envelopes=batch, watermark=batch[-1].created_at
                )
            )
        keys.append(
            persistence.stage_batch(
                source_id=source.id,
                envelopes=[],
                watermark=events[-1].created_at + timedelta(seconds=1),
            )
        )
        order = list(keys)
        if shuffle:
            random.Random(7).shuffle(order)
        for key in order:  # each stage after the previous one's commit, as the pipeline
            with commits_without_broker():
                ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids
            with commits_without_broker():
                enrichment.enrich_events(event_ids=ids, source_id=source.id)
            with commits_without_broker():
                trend_stage.advance_stream(source_id=source.id)
        assert counters.staged_batches(source.id) == 0
        return verdicts(source)

    in_order = run("in-order", 40, shuffle=False)

    assert in_order
    assert run("shuffled", 40, shuffle=True) == in_order
    assert run("small-shuffled", 7, shuffle=True) == in_order
