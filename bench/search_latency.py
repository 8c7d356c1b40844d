"""Latency of ``GET /api/events/?q=…`` on a database of the airline archive looped.

Usage (``DATABASE_URL``, ``REDIS_URL`` and ``SECRET_KEY`` set; a database of its own)::

    python bench/search_latency.py build [--data ../shared/data] [--events 200000]
    python bench/search_latency.py measure --label after [--queries 300]
    # before this change: the same measure with the code of another tree (its q, ILIKE),
    # run from inside that tree (its directory must come first on the import path)
    cd <that tree> && python <this repo>/bench/search_latency.py measure --label before --code .

``build`` stores ``airline_tweets/Tweets.csv`` (14,640 tweets, 8 days of February 2015)
as one replay source's events, then copies it with fresh external ids, each copy moved
later by the archive's span, up to ``--events`` rows (200,000: about 14 copies, 4 months
of event time). The events are marked enriched as English (``lang`` "en": the archive is
an English airline archive; the language model is not what is measured), and given
their search vectors through ``ingest.services.backfill_search_vectors`` (where that
column exists), then the table is analysed.

``measure`` asks the events endpoint, in process (Django's test client with a member's
token; no network, no server), ``--queries`` searches of the archive's own words (drawn
with a fixed seed from its texts, weighted by how often they occur, so common words come
up as often as they do in the archive), then as many two-word phrases from its texts
(quoted), the plain list without ``q`` (the floor: auth, one page serialised) and,
with the new code, the same words with ``ordering=rank``. Each request is
timed from call to parsed response; it prints and writes p50, p95, p99 and the mean in
milliseconds, and the mean result count, to ``bench/results/search_latency_<label>.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORD = re.compile(r"(?<![@#\w/])[A-Za-z][a-z]{2,}(?![\w/])")


def _setup(code: Path) -> None:
    sys.path.insert(0, str(code))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")
    import django

    django.setup()


def archive(data: Path) -> list[tuple[str, datetime, str, str]]:
    """``(tweet_id, created_at UTC, author, text)`` of the airline archive's rows (the
    first of each tweet id: a few rows repeat one)."""
    rows = {}
    with (data / "airline_tweets" / "Tweets.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            created = datetime.strptime(row["tweet_created"], "%Y-%m-%d %H:%M:%S %z")
            entry = (row["tweet_id"], created.astimezone(UTC), row["name"], row["text"])
            rows.setdefault(row["tweet_id"], entry)
    return list(rows.values())


def build(data: Path, events: int) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.utils import timezone

    from ingest.models import Event, Source
    from teams.models import Membership, Team

    team, _ = Team.objects.get_or_create(slug="bench-search", defaults={"name": "Bench search"})
    user, _ = get_user_model().objects.get_or_create(username="bench-search")
    Membership.objects.get_or_create(user=user, team=team, defaults={"role": "member"})
    source, created = Source.objects.get_or_create(
        team=team, kind=Source.Kind.REPLAY, name="airline-looped"
    )
    if not created and Event.objects.filter(source=source).exists():
        print("already built:", Event.objects.filter(source=source).count(), "events")
        return
    rows = archive(data)
    now = timezone.now()
    start = min(r[1] for r in rows)
    span = max(r[1] for r in rows) - start + timedelta(minutes=1)
    copies = -(-events // len(rows))
    with transaction.atomic():
        Event.objects.bulk_create(
            [
                Event(
                    source=source,
                    external_id=tweet_id,
                    created_at=created_at,
                    received_at=now,
                    author_id=author,
                    author_handle=author,
                    text=text,
                    lang="en",
                    enriched_at=now,
                )
                for tweet_id, created_at, author, text in rows
            ],
            batch_size=2000,
        )
    columns = [
        f.column
        for f in Event._meta.concrete_fields
        if f.column not in ("id", "external_id", "created_at")
    ]
    listed = ", ".join(columns)
    with connection.cursor() as cursor:
        for k in range(1, copies):
            limit = min(len(rows), events - k * len(rows))
            cursor.execute(
                f"INSERT INTO ingest_event (external_id, created_at, {listed}) "
                f"SELECT external_id || '-' || %s, created_at + %s, {listed} "
                "FROM ingest_event WHERE source_id = %s AND external_id NOT LIKE '%%-%%' "
                "ORDER BY id LIMIT %s",
                [k, span * k, source.id, limit],
            )
    if any(f.name == "search_vector" for f in Event._meta.concrete_fields):
        from ingest import services

        first = Event.objects.filter(source=source).order_by("id").values_list("id", flat=True)[0]
        last = Event.objects.filter(source=source).order_by("-id").values_list("id", flat=True)[0]
        for lo in range(first, last + 1, 10000):
            with transaction.atomic():
                services.backfill_search_vectors(first_id=lo, end_id=lo + 10000)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE ingest_event")
    print("built:", Event.objects.filter(source=source).count(), "events over", copies, "copies")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(times: list[float], counts: list[int]) -> dict[str, float]:
    return {
        "n": len(times),
        "p50_ms": round(percentile(times, 50), 2),
        "p95_ms": round(percentile(times, 95), 2),
        "p99_ms": round(percentile(times, 99), 2),
        "mean_ms": round(statistics.fmean(times), 2),
        "mean_results": round(statistics.fmean(counts), 1),
    }


def measure(data: Path, label: str, queries: int) -> dict[str, Any]:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from rest_framework.test import APIClient

    from ingest.models import Event

    rng = random.Random(19)
    texts = [r[3] for r in archive(data)]
    tokens = [w.lower() for t in texts for w in WORD.findall(t)]
    words = [rng.choice(tokens) for _ in range(queries)]
    phrases = []
    while len(phrases) < queries:
        pair = WORD.findall(rng.choice(texts))
        if len(pair) >= 2:
            i = rng.randrange(len(pair) - 1)
            phrases.append(f'"{pair[i]} {pair[i + 1]}"')
    client = APIClient()
    settings.ALLOWED_HOSTS = ["*"]
    client.force_authenticate(get_user_model().objects.get(username="bench-search"))
    # Measures search, not the rate limit: its counter's round trip is still in each request.
    settings.API_RATE_SEARCH = settings.API_RATE_READ = "1000000/min"
    new_code = any(f.name == "search_vector" for f in Event._meta.concrete_fields)

    def run(params: list[dict[str, str]]) -> dict[str, float]:
        times, counts = [], []
        for p in params[:5]:  # warm the caches and the connection
            client.get("/api/events/", p)
        for p in params:
            started = time.perf_counter()
            response = client.get("/api/events/", p)
            body = response.json()
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (p, body)
            counts.append(len(body["results"]))
        return summary(times, counts)

    result: dict[str, Any] = {
        "label": label,
        "events": Event.objects.count(),
        "postgres": connection.cursor().connection.server_version,
        "list_no_q": run([{} for _ in words]),
        "words": run([{"q": w} for w in words]),
        "phrases": run([{"q": p} for p in phrases]),
    }
    if new_code:
        result["words_by_rank"] = run([{"q": w, "ordering": "rank"} for w in words])
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"search_latency_{label}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["build", "measure"])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--label", default="after")
    parser.add_argument("--code", type=Path, default=ROOT, help="the tree whose code runs")
    options = parser.parse_args()
    _setup(options.code.resolve())
    if options.step == "build":
        build(options.data, options.events)
    else:
        measure(options.data, options.label, options.queries)


if __name__ == "__main__":
    main()
