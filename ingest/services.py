"""Writes of the ingest app: sources, raw batches, events, dead letters.

The persist stage (``persist_batch``) is the pipeline's edge into PostgreSQL: it turns
a staged raw batch into ``Event`` rows with one conflict-ignore insert, dead-letters
what cannot be stored, and after commit hands the new ids to the enrich stage.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import structlog
from django.conf import settings
from django.db import DataError, connection, transaction
from django.db.models import F
from django.utils import timezone
from psycopg2.extras import Json, execute_values

from dashboard.models import Team
from ingest.envelope import Envelope, EnvelopeError
from ingest.models import DeadLetter, Event, Source
from twiscope.redis import add_to_rate, get_bytes, get_redis, incr_metric

log = structlog.get_logger(__name__)

BATCH_KEY_PREFIX = "twiscope:batch:"
"""Staged batch keys are ``twiscope:batch:<source id>:<uuid>``: the source is readable
from the key alone, without fetching the batch."""
PENDING_BATCHES_KEY = "twiscope:pending-batches"
"""Sorted set of staged batch keys (score: staging time, epoch seconds) not yet persisted."""


@dataclass(frozen=True)
class PersistResult:
    """What one persist call did: new event ids, duplicates ignored, items dead-lettered."""

    inserted_ids: list[int] = field(default_factory=list)
    duplicates: int = 0
    dead_letters: int = 0


def get_or_create_source(*, team: Team, kind: str, name: str, config: dict[str, Any]) -> Source:
    """The team's source of that name, created with ``kind`` and ``config`` if new.

    Raises:
        ValueError: an existing source of that name has another kind.
    """
    source, created = Source.objects.get_or_create(
        team=team, name=name, defaults={"kind": kind, "config": config}
    )
    if not created and source.kind != kind:
        raise ValueError(f"source {name!r} exists with kind {source.kind!r}, not {kind!r}")
    if created:
        log.info("ingest.source_created", source_id=source.id, kind=kind, team_id=team.id)
    return source


def set_trend_bucket(*, source: Source, bucket_s: int) -> None:
    """Set the trend bucket size (seconds) of ``source``; updates the instance too."""
    Source.objects.filter(id=source.id).update(trend_bucket_s=bucket_s)
    source.trend_bucket_s = bucket_s


def stage_batch(*, source_id: int, envelopes: Sequence[Envelope]) -> str:
    """Store a raw batch in Redis (with ``INGEST_BATCH_TTL_S`` expiry); return its key.

    The batch's processing time (``received_at``) is now: the moment Twiscope accepted
    it. Side effect: the key joins the pending set that the sweeper watches.
    """
    key = f"{BATCH_KEY_PREFIX}{source_id}:{uuid.uuid4().hex}"
    payload = {
        "source_id": source_id,
        "received_at": timezone.now().isoformat(),
        "items": [envelope.to_json() for envelope in envelopes],
    }
    pipe = get_redis().pipeline()
    pipe.set(key, json.dumps(payload, ensure_ascii=False), ex=settings.INGEST_BATCH_TTL_S)
    pipe.zadd(PENDING_BATCHES_KEY, {key: time.time()})
    pipe.execute()
    return key


def enqueue_envelopes(*, source: Source, envelopes: Sequence[Envelope]) -> str:
    """Stage ``envelopes`` and queue their persist task (after commit); return the key."""
    from ingest import tasks

    key = stage_batch(source_id=source.id, envelopes=envelopes)
    transaction.on_commit(
        lambda: tasks.persist_batch.apply_async(kwargs={"batch_key": key, "source_id": source.id})
    )
    return key


def record_dead_letters(
    *, stage: str, source: Source | None, items: list[tuple[str, dict[str, Any]]]
) -> None:
    """Park ``(reason, payload)`` items in the dead-letter table."""
    if not items:
        return
    DeadLetter.objects.bulk_create(
        [
            DeadLetter(stage=stage, source=source, reason=reason[:2000], payload=payload)
            for reason, payload in items
        ]
    )
    log.warning("ingest.dead_lettered", stage=stage, count=len(items))


def end_of_stream(*, source: Source, event_time: datetime) -> None:
    """Tell the trend stage that ``source`` delivered everything up to ``event_time``.

    Side effect: queues ``ml.close_stream``, which waits for the source's staged and
    in-flight events to be counted, then advances its watermark past ``event_time`` so
    its last buckets close.
    """
    from mlengine import tasks as ml_tasks

    transaction.on_commit(
        lambda: ml_tasks.close_stream.apply_async(
            kwargs={"source_id": source.id, "event_time": event_time.isoformat()},
            countdown=1,
        )
    )


_INSERT_SQL = """
INSERT INTO ingest_event (
    source_id, external_id, created_at, received_at, author_id, author_handle,
    author_name, author_followers, text, lang, url, reply_to, repost_of, quote_of,
    metrics, raw, hashtags, mentions, cashtags, urls, keywords
) VALUES %s
ON CONFLICT (source_id, external_id) DO NOTHING
RETURNING id
"""
_INSERT_TEMPLATE = (
    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, '{}', '{}', '{}', '{}', '{}')"
)


def _row(source_id: int, received_at: datetime, env: Envelope) -> tuple[Any, ...]:
    return (
        source_id,
        env.external_id,
        env.created_at,
        received_at,
        env.author.id,
        env.author.handle,
        env.author.name,
        env.author.followers,
        env.text,
        env.lang,
        env.url,
        env.reply_to,
        env.repost_of,
        env.quote_of,
        Json(env.metrics),
        Json(env.raw),
    )


def _insert(rows: list[tuple[Any, ...]]) -> list[int]:
    with connection.cursor() as cursor:
        result = execute_values(
            cursor.cursor, _INSERT_SQL, rows, template=_INSERT_TEMPLATE, page_size=1000, fetch=True
        )
    return [r[0] for r in result]


def persist_batch(*, batch_key: str, source_id: int) -> PersistResult:
    """Store a staged raw batch as events, exactly once in effect.

    Re-reads everything: a missing batch key (expired or already persisted) is logged
    and counted; a missing or disabled source drops the batch quietly. Items that fail
    validation, and rows PostgreSQL refuses, become dead letters; the rest of the batch
    is stored. Inserts are conflict-ignore on ``(source, external_id)``, so a
    redelivered batch stores nothing twice.

    Side effects after commit: queues ``enrich.enrich_events`` with the new ids and
    deletes the batch key.
    """
    redis = get_redis()
    raw = get_bytes(batch_key)
    if raw is None:
        log.warning("ingest.batch_missing", batch_key=batch_key, source_id=source_id)
        incr_metric("batch_missing")
        redis.zrem(PENDING_BATCHES_KEY, batch_key)
        return PersistResult()
    source = Source.objects.filter(id=source_id, enabled=True).first()
    if source is None:
        log.info("ingest.batch_dropped_source_gone", batch_key=batch_key, source_id=source_id)
        _forget_batch(batch_key)
        return PersistResult()

    batch = json.loads(raw)
    received_at = datetime.fromisoformat(batch["received_at"])
    dead: list[tuple[str, dict[str, Any]]] = []
    rows: list[tuple[Any, ...]] = []
    seen: set[str] = set()
    for item in batch["items"]:
        try:
            env = Envelope.from_json(item)
        except EnvelopeError as exc:
            dead.append(
                (f"invalid envelope: {exc}", item if isinstance(item, dict) else {"item": item})
            )
            continue
        if env.external_id in seen:
            continue
        seen.add(env.external_id)
        rows.append(_row(source.id, received_at, env))

    with transaction.atomic():
        try:
            with transaction.atomic():
                inserted = _insert(rows)
        except DataError:
            inserted = []
            for row in rows:
                try:
                    with transaction.atomic():
                        inserted.extend(_insert([row]))
                except DataError as exc:
                    dead.append((f"refused by database: {exc}".strip(), {"external_id": row[1]}))
        record_dead_letters(stage=DeadLetter.Stage.INGEST, source=source, items=dead)
        if inserted:
            Source.objects.filter(id=source.id).update(
                events_total=F("events_total") + len(inserted), last_received_at=received_at
            )
        transaction.on_commit(lambda: _after_persist(batch_key, inserted, source.team_id))

    result = PersistResult(
        inserted_ids=inserted, duplicates=len(rows) - len(inserted), dead_letters=len(dead)
    )
    log.info(
        "ingest.batch_persisted",
        source_id=source.id,
        inserted=len(inserted),
        duplicates=result.duplicates,
        dead_letters=len(dead),
    )
    return result


def events_rate_name(team_id: int) -> str:
    """The rolling counter of events stored for a team (see ``twiscope.redis``)."""
    return f"events:team:{team_id}"


def _after_persist(batch_key: str, event_ids: list[int], team_id: int) -> None:
    from ingest import tasks

    if event_ids:
        tasks.enrich_events.apply_async(kwargs={"event_ids": event_ids})
        add_to_rate(events_rate_name(team_id), len(event_ids))
    _forget_batch(batch_key)


def _forget_batch(batch_key: str) -> None:
    pipe = get_redis().pipeline()
    pipe.delete(batch_key)
    pipe.zrem(PENDING_BATCHES_KEY, batch_key)
    pipe.execute()


def in_flight_events(source_id: int) -> int:
    """Events of ``source_id`` accepted but not yet through the trend stage (approx.).

    Staged batches are counted at ``INGEST_BATCH_SIZE`` each, whatever their source
    (an upper bound that costs one Redis call); stored events exactly.
    """
    staged = cast(int, get_redis().zcard(PENDING_BATCHES_KEY)) * settings.INGEST_BATCH_SIZE
    return staged + Event.objects.filter(source_id=source_id, trends_at__isnull=True).count()


def wait_for_capacity(
    *, source: Source, max_in_flight: int, poll_s: float = 0.02, timeout_s: float = 600.0
) -> float:
    """Block until fewer than ``max_in_flight`` events of ``source`` are in flight.

    This is the back-pressure of a replay at full speed: it keeps the queues short so
    that an event's latency is the pipeline's, not the backlog's. Returns the seconds
    waited.

    Raises:
        TimeoutError: the pipeline did not drain within ``timeout_s`` (no workers?).
    """
    start = time.monotonic()
    while in_flight_events(source.id) >= max_in_flight:
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise TimeoutError(
                f"{in_flight_events(source.id)} events still in flight after {waited:.0f} s:"
                " are the worker pools running?"
            )
        time.sleep(poll_s)
    return time.monotonic() - start


def pending_batch_keys(*, older_than_s: float) -> list[str]:
    """Staged batch keys older than ``older_than_s`` seconds that still exist."""
    redis = get_redis()
    keys = [
        k.decode()
        for k in cast(
            "list[bytes]",
            redis.zrangebyscore(PENDING_BATCHES_KEY, "-inf", time.time() - older_than_s),
        )
    ]
    alive = []
    for key in keys:
        if redis.exists(key):
            alive.append(key)
        else:
            redis.zrem(PENDING_BATCHES_KEY, key)
    return alive


def source_has_pending_batches(source_id: int) -> bool:
    """Whether any staged batch of ``source_id`` still waits for its persist task."""
    prefix = f"{BATCH_KEY_PREFIX}{source_id}:".encode()
    redis = get_redis()
    for key in cast("list[bytes]", redis.zrange(PENDING_BATCHES_KEY, 0, -1)):
        if not key.startswith(prefix):
            continue
        if redis.exists(key):
            return True
        redis.zrem(PENDING_BATCHES_KEY, key)
    return False


def enrich_events(*, event_ids: Sequence[int]) -> list[int]:
    """Enrich events not yet enriched: language, entities, keywords, VADER sentiment.

    Claims each row by ``enriched_at IS NULL`` in the UPDATE itself, so a redelivered
    task enriches nothing twice. Returns the ids it enriched. Side effect after commit:
    queues ``ml.update_trends`` with them.
    """
    from mlengine import facade

    rows = list(
        Event.objects.filter(id__in=event_ids, enriched_at__isnull=True).values_list(
            "id", "text", "lang"
        )
    )
    if not rows:
        return []
    results = facade.enrich_texts([text for _, text, _ in rows])
    values = [
        (
            event_id,
            lang or enrichment.lang,
            list(enrichment.hashtags),
            list(enrichment.mentions),
            list(enrichment.cashtags),
            list(enrichment.urls),
            list(enrichment.keywords),
            enrichment.sentiment,
        )
        for (event_id, _, lang), enrichment in zip(rows, results, strict=True)
    ]
    with transaction.atomic(), connection.cursor() as cursor:
        updated = execute_values(
            cursor.cursor,
            _ENRICH_SQL,
            values,
            template="(%s, %s, %s::varchar[], %s::varchar[], %s::varchar[], %s::text[],"
            " %s::varchar[], %s::float8)",
            page_size=1000,
            fetch=True,
        )
        enriched = [r[0] for r in updated]
        transaction.on_commit(lambda: _after_enrich(enriched))
    return enriched


_ENRICH_SQL = """
UPDATE ingest_event AS e SET
    lang = v.lang, hashtags = v.hashtags, mentions = v.mentions, cashtags = v.cashtags,
    urls = v.urls, keywords = v.keywords, sentiment = v.sentiment,
    enriched_at = statement_timestamp()
FROM (VALUES %s) AS v(id, lang, hashtags, mentions, cashtags, urls, keywords, sentiment)
WHERE e.id = v.id AND e.enriched_at IS NULL
RETURNING e.id
"""


def _after_enrich(event_ids: list[int]) -> None:
    from mlengine import tasks as ml_tasks

    if event_ids:
        ml_tasks.update_trends.apply_async(kwargs={"event_ids": event_ids})


def batch_source_id(batch_key: str) -> int | None:
    """The source id in a staged batch's key, or None for a key of another shape."""
    _, _, rest = batch_key.partition(BATCH_KEY_PREFIX)
    source_id, _, _ = rest.partition(":")
    return int(source_id) if source_id.isdigit() else None


GROWING_TABLES = ("ingest_event", "mlengine_termcount", "mlengine_trend", "alerts_alert")


def analyze_growing_tables(*, min_rows: int = 1000, fraction: float = 0.02) -> list[str]:
    """``ANALYZE`` each fast-growing table changed by more than ``max(min_rows,
    fraction × its rows)`` rows since its last analyze; return the tables analyzed.

    The pipeline inserts thousands of rows a second; with stale statistics PostgreSQL
    picked a plan that sorts every event of a team instead of walking the event-time
    index (0.7 s instead of 0.2 ms). Autovacuum does this too when it is on (see
    migration ``ingest.0003``), but it may be off, as on some managed or CI servers.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT relname FROM pg_stat_user_tables
            WHERE relname = ANY(%s)
              AND n_mod_since_analyze > GREATEST(%s, %s * n_live_tup)
            ORDER BY relname
            """,
            [list(GROWING_TABLES), min_rows, fraction],
        )
        tables = [row[0] for row in cursor.fetchall()]
        for table in tables:
            cursor.execute(f"ANALYZE {connection.ops.quote_name(table)}")
    if tables:
        log.info("ingest.tables_analyzed", tables=tables)
    return tables
