"""The database of the API load benchmark (``make bench-api``): 1,000,000 events built
from the real archives, with trends and alerts.

Usage (``DATABASE_URL`` naming a database of its own, migrated; ``REDIS_URL``;
``SECRET_KEY``)::

    python bench/api_data.py build [--data ../shared/data] [--events 1000000] [--base 30000]

``build`` (once; a second run reports what is there and stops):

1. A team ``bench-api`` with a member ``bench-api`` and their token (the persona the
   load uses), two replay sources: ``airline`` (``airline_tweets/Tweets.csv``) and
   ``trump`` (``trump_tweets/trump_tweets_2009_2016.csv``), up to ``--base`` rows in all.
2. Those rows enriched by the enrich stage itself (``mlengine.enrichment.stage
   .enrich_events``: language, entities, VADER, the full-text search vector), in
   batches of 500, as the pipeline would.
3. Each source's enriched rows copied with ``INSERT … SELECT`` (every column, the search
   vector included) under fresh external ids (``<id>-<copy>``), each copy moved later by
   the source's span, until the sources hold ``--events`` in all.
4. Trends: for each source, hour bucket and hashtag used at least 5 times in it, one
   trend row (events, distinct authors, a score of events over the bucket's mean per
   tag); alerts: one per trend of the top 2,000 by score, under the team's rule, with
   consecutive ``seq`` and ``pushed_at`` set. Then ``ANALYZE``.

Nothing of the archives is written anywhere but that database.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from search_latency import archive as airline  # the one reader of the airline archive

ROOT = Path(__file__).resolve().parent.parent
TEAM = "bench-api"
USER = "bench-api"
ALERTS = 2000


def _setup() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")
    import django

    django.setup()


def trump(data: Path) -> list[tuple[str, datetime, str, str]]:
    """``(id_str, created_at UTC, "realDonaldTrump", text)`` of the Trump archive."""
    rows: dict[str, tuple[str, datetime, str, str]] = {}
    path = data / "trump_tweets" / "trump_tweets_2009_2016.csv"
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            created = datetime.strptime(row["created_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            rows.setdefault(row["id_str"], (row["id_str"], created, "realDonaldTrump", row["text"]))
    return list(rows.values())


def build(data: Path, events: int, base: int) -> None:
    """Build the database (see the module docstring); prints each step's time."""
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.utils import timezone

    from alerts.models import AlertRule
    from ingest.models import Event, Source
    from mlengine.enrichment.stage import enrich_events
    from teams.models import Membership, Team

    team, _ = Team.objects.get_or_create(slug=TEAM, defaults={"name": "Bench API"})
    user, _ = get_user_model().objects.get_or_create(username=USER)
    Membership.objects.get_or_create(user=user, team=team, defaults={"role": "member"})
    if Event.objects.filter(source__team=team).exists():
        print("already built:", Event.objects.filter(source__team=team).count(), "events")
        return
    archives = {"airline": airline(data), "trump": trump(data)}
    archives["trump"] = archives["trump"][: max(0, base - len(archives["airline"]))]
    total_base = sum(len(rows) for rows in archives.values())
    now = timezone.now()
    t0 = time.monotonic()
    sources = {}
    for name, rows in archives.items():
        source = Source.objects.create(team=team, kind=Source.Kind.REPLAY, name=name)
        sources[name] = source
        fields = ("external_id", "created_at", "author_id", "text")
        Event.objects.bulk_create(
            (
                Event(
                    source=source,
                    received_at=now,
                    author_handle=row[2],
                    **dict(zip(fields, row, strict=True)),
                )
                for row in rows
            ),
            batch_size=2000,
        )
        ids = list(Event.objects.filter(source=source).order_by("id").values_list("id", flat=True))
        for i in range(0, len(ids), 500):
            enrich_events(event_ids=ids[i : i + 500], source_id=source.id)
    print(f"base: {total_base} events stored and enriched in {time.monotonic() - t0:.0f} s")

    t0 = time.monotonic()
    skip = {"id", "external_id", "created_at"}
    listed = ", ".join(str(f.column) for f in Event._meta.concrete_fields if f.column not in skip)
    for name, rows in archives.items():
        source = sources[name]
        share = events * len(rows) // total_base
        span = max(r[1] for r in rows) - min(r[1] for r in rows) + timedelta(minutes=1)
        copies = -(-share // len(rows))
        with connection.cursor() as cursor:
            for k in range(1, copies):
                cursor.execute(
                    f"INSERT INTO ingest_event (external_id, created_at, {listed}) "
                    f"SELECT external_id || '-' || %s, created_at + %s, {listed} "
                    "FROM ingest_event WHERE source_id = %s AND external_id NOT LIKE '%%-%%' "
                    "ORDER BY id LIMIT %s",
                    [k, span * k, source.id, min(len(rows), share - k * len(rows))],  # type: ignore[list-item]
                )
        stored = Event.objects.filter(source=source).count()
        Source.objects.filter(id=source.id).update(events_total=stored, last_received_at=now)
        print(f"{name}: {stored} events ({copies} copies)")
    print(f"copies in {time.monotonic() - t0:.0f} s")

    t0 = time.monotonic()
    rule, _ = AlertRule.objects.get_or_create(
        team=team, name="bench trends", defaults={"kind": AlertRule.Kind.NEW_TREND}
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO mlengine_trend (source_id, term, bucket_start, bucket_s, events, expected,
                score, authors_count, velocity, detected_at, updated_at, evidence_received_at,
                evidence_created_at, sample_event_ids, forecast, predicted, always_on)
            SELECT source_id, tag, b, 3600, n, avg(n) OVER w, n / avg(n) OVER w, authors,
                   n / 60.0, now(), now(), received, created, samples, '{}', false, false
            FROM (
                SELECT source_id, lower(tag) AS tag,
                       date_bin('1 hour', created_at, 'epoch'::timestamptz) AS b,
                       count(*) AS n, count(DISTINCT author_id) AS authors,
                       max(received_at) AS received, max(created_at) AS created,
                       (array_agg(id ORDER BY id))[1:5] AS samples
                FROM ingest_event, unnest(hashtags) AS tag
                WHERE source_id = ANY(%s)
                GROUP BY 1, 2, 3 HAVING count(*) >= 5
            ) counted
            WINDOW w AS (PARTITION BY source_id, b)
            """,
            [[s.id for s in sources.values()]],
        )
        trends = cursor.rowcount
        cursor.execute(
            """
            INSERT INTO alerts_alert (team_id, rule_id, seq, title, severity, evidence,
                event_received_at, event_created_at, created_at, pushed_at)
            SELECT %s, %s, row_number() OVER (ORDER BY bucket_start, id),
                   'Trending: ' || term, 'info', jsonb_build_object('trend', id),
                   evidence_received_at, evidence_created_at, now(),
                   now() + make_interval(secs => 0.05 + random() * 0.5)
            FROM (SELECT * FROM mlengine_trend WHERE source_id = ANY(%s)
                  ORDER BY score DESC LIMIT %s) top
            """,
            [team.id, rule.id, [s.id for s in sources.values()], ALERTS],
        )
        alerts = cursor.rowcount
        cursor.execute(
            "INSERT INTO alerts_alertsequence (team_id, last_seq) VALUES (%s, %s) "
            "ON CONFLICT (team_id) DO UPDATE SET last_seq = EXCLUDED.last_seq",
            [team.id, alerts],
        )
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    print(f"{trends} trends, {alerts} alerts, analysed in {time.monotonic() - t0:.0f} s")


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    b.add_argument("--events", type=int, default=1_000_000)
    b.add_argument("--base", type=int, default=30_000)
    args = parser.parse_args()
    _setup()
    build(args.data, args.events, args.base)


if __name__ == "__main__":
    main()
