"""Benchmark: what the virality score adds to one ml-pool scoring batch.

Stores the first ``--rows`` posts of a trump_tweets-layout CSV (sorted by event time)
into a fresh replay source as plain stage calls (persist and enrich, no workers), then
times, over batches of ``--batch`` consecutive events whose author has at least 100
predecessors:

- ``history_query``: ``ingest.virality_reads.virality_inputs`` alone (the one query);
- ``score_with_vectors``: ``mlengine.inference.scoring.score_virality`` when a head already
  embedded the batch (the shared encoder's vectors are reused);
- ``score_embedding``: the same when no head did (it embeds the scored texts itself);
- ``embed_only``: the shared encoder on the batch's texts, for scale (what the heads
  pay anyway);
- ``write``: ``ingest.services.save_labels`` of the scores (one statement).

Needs an active virality model (``manage.py train virality``) and the platform's
database (``DATABASE_URL``). Prints one JSON object (milliseconds, median and max).
Usage: ``python bench/virality_cost.py --data CSV [--rows 3000] [--batch 128]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import django

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")
django.setup()

from django.db import transaction  # noqa: E402

from ingest import persistence, selectors, services, virality_reads  # noqa: E402
from ingest.models import Event, Source  # noqa: E402
from ingest.sources.replay.formats import TRUMP_CSV, read_archive  # noqa: E402
from ingest.sources.replay.rows import RowError  # noqa: E402
from mlengine.enrichment import stage as enrichment  # noqa: E402
from mlengine.inference import (  # noqa: E402
    encoder,
    scoring,
    virality_features,
    virality_model,
)
from teams.models import Team  # noqa: E402


def _store(data: Path, rows: int) -> Source:
    team, _ = Team.objects.get_or_create(slug="bench-virality", defaults={"name": "bench"})
    source = Source.objects.create(
        team=team, kind=Source.Kind.REPLAY, name=f"virality-{uuid.uuid4().hex[:8]}"
    )
    envelopes = sorted(
        (e for e in read_archive(data, TRUMP_CSV) if not isinstance(e, RowError)),
        key=lambda e: e.created_at,
    )[:rows]
    for start in range(0, len(envelopes), 500):
        batch = envelopes[start : start + 500]
        with transaction.atomic():
            key = persistence.stage_batch(
                source_id=source.id, envelopes=batch, watermark=batch[-1].created_at
            )
            ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids
            enrichment.enrich_events(event_ids=ids, source_id=source.id)
    return source


def _ms(samples: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(samples) * 1000, 1),
        "max": round(max(samples) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()

    model = virality_model.active_model()
    source = _store(args.data, args.rows)
    ids = list(
        Event.objects.filter(source=source).order_by("created_at").values_list("id", flat=True)
    )[virality_features.HISTORY_MIN :]
    timings: dict[str, list[float]] = {
        k: [] for k in ("history_query", "score_with_vectors", "score_embedding", "embed_only")
    }
    timings["write"] = []
    scored = 0
    shared = encoder.get_encoder()
    shared.embed(["warm up"])
    step = max(args.batch, (len(ids) - args.batch) // args.batches)
    for start in range(0, len(ids) - args.batch + 1, step):
        batch = ids[start : start + args.batch]
        texts = sorted({t for _, t, _ in selectors.texts_for_scoring(batch)})
        t0 = time.perf_counter()
        virality_reads.virality_inputs(batch, window=virality_features.HISTORY_WINDOW)
        timings["history_query"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        vectors = shared.embed(texts)
        timings["embed_only"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        columns = scoring.score_virality(batch, texts, {scoring._SHARED_ENCODER: vectors})
        timings["score_with_vectors"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scoring.score_virality(batch, texts, {})
        timings["score_embedding"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with transaction.atomic():
            services.save_labels([{"id": i, **v} for i, v in columns.items()])
        timings["write"].append(time.perf_counter() - t0)
        scored += len(columns)
    print(
        json.dumps(
            {
                "model": model.version,
                "rows": len(ids) + virality_features.HISTORY_MIN,
                "batch": args.batch,
                "batches": len(timings["write"]),
                "scored": scored,
                "ms": {k: _ms(v) for k, v in timings.items()},
                "encoder_device": getattr(shared, "device", "?"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
