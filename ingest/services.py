"""Writes of the ingest app: sources, staged batches, events, enrichments, dead letters.

The persist stage (``persist_batch``) is the pipeline's edge into PostgreSQL: it turns
a staged raw batch into ``Event`` rows with one conflict-ignore insert, dead-letters
what cannot be stored, and after commit hands the new ids on (``twiscope.pipeline``).
The enrich stage writes its results through ``save_enrichments``: the events table is
this app's, so every write to it is here.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import DataError, connection, transaction
from django.db.models import F
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone
from psycopg2.extras import Json, execute_values

from ingest import credentials as credentials_box
from ingest.envelope import Envelope, EnvelopeError
from ingest.models import DeadLetter, Event, Source
from ingest.selectors import (
    BATCH_KEY_PREFIX,
    EVENTS_RATE_ALL,
    PENDING_BATCHES_KEY,
    SOURCE_MINUTE_KEY,
    STAGED_EVENT_TIME_KEY,
    TERM_MAX_CHARS,
    batch_source_id,
    events_rate_name,
    in_flight_events,
)
from ingest.sources.base import PollingAdapter
from ingest.sources.registry import adapter_for
from teams.models import Team
from twiscope import pipeline
from twiscope.redis import add_to_rate, get_bytes, get_redis, incr_metric

log = structlog.get_logger(__name__)

# Staged batch keys are ``twiscope:batch:<source id>:<uuid>`` (the source is readable
# from the key alone); PENDING_BATCHES_KEY is the sorted set of staged keys by staging
# time (epoch s); STAGED_EVENT_TIME_KEY, per source, the same keys by their batch's
# earliest event time, whose minimum holds the stream's watermark back.


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


def create_source(
    *,
    team: Team,
    kind: str,
    name: str,
    config: dict[str, Any],
    credentials: dict[str, Any] | None = None,
    enabled: bool = True,
) -> tuple[Source, str | None]:
    """Create a source with its credentials sealed (``ingest.credentials``). A webhook
    source gets a new signing secret, returned once as the second value (else None).

    Raises:
        django.db.IntegrityError: the team already has a source of that name.
    """
    secret = credentials_box.new_secret() if kind == Source.Kind.WEBHOOK else None
    values = {"secret": secret} if secret is not None else dict(credentials or {})
    with transaction.atomic():
        source = Source.objects.create(
            team=team,
            kind=kind,
            name=name,
            config=config,
            enabled=enabled,
            credentials=credentials_box.seal(values),
        )
    return source, secret


def update_source(source: Source, changes: dict[str, Any]) -> Source:
    """Apply ``changes`` (``name``, ``config``, ``enabled``, ``credentials``) to
    ``source`` and save. Editing clears the last error, so a source that failed
    permanently runs again; re-enabling clears ``disabled_reason``."""
    for name in ("name", "config", "enabled"):
        if name in changes:
            setattr(source, name, changes[name])
    if "credentials" in changes:
        source.credentials = credentials_box.seal(dict(changes["credentials"]))
    if changes.get("enabled"):
        source.disabled_reason = ""
    source.last_error, source.error_permanent, source.last_error_at = "", False, None
    with transaction.atomic():
        source.save()
    return source


def only_new(source: Source, envelopes: Sequence[Envelope]) -> tuple[list[Envelope], int]:
    """``envelopes`` less those whose ``external_id`` ``source`` already stored or that
    repeat an earlier one of the list; returns them (in order) and how many were
    dropped. An id still in flight in the pipeline is not seen here: the events'
    unique key drops it when its batch is stored."""
    stored = set(
        Event.objects.filter(
            source=source, external_id__in={e.external_id for e in envelopes}
        ).values_list("external_id", flat=True)
    )
    fresh: list[Envelope] = []
    for envelope in envelopes:
        if envelope.external_id not in stored:
            stored.add(envelope.external_id)
            fresh.append(envelope)
    return fresh, len(envelopes) - len(fresh)


def describe_stream(
    *, source: Source, event_times: Sequence[datetime], trend_bucket_s: int | None = None
) -> None:
    """Record in ``source.config`` what the trend stage needs to size its buckets:
    ``events_per_active_day`` (mean events per UTC day over the days with any, from
    ``event_times``) and, when given, an explicit ``trend_bucket_s`` (seconds). The
    trend stage reads them when the stream's clock starts. Updates the instance too."""
    config = dict(source.config) if isinstance(source.config, dict) else {}
    if event_times:
        config["events_per_active_day"] = events_per_active_day(event_times)
    if trend_bucket_s:
        config["trend_bucket_s"] = trend_bucket_s
    Source.objects.filter(id=source.id).update(config=config)
    source.config = config


def events_per_active_day(event_times: Sequence[datetime]) -> float:
    """The mean number of events per UTC day, over the days that have any (the mean,
    not the median, so that a sample built around one burst counts it).

    Raises:
        ValueError: no event times.
    """
    per_day = Counter(moment.date() for moment in event_times)
    if not per_day:
        raise ValueError("no event times to size trend buckets from")
    return round(statistics.fmean(per_day.values()), 3)


def stage_batch(
    *, source_id: int, envelopes: Sequence[Envelope], watermark: datetime | None = None
) -> str:
    """Store a raw batch in Redis (with ``INGEST_BATCH_TTL_S`` expiry); return its key.

    The batch's processing time (``received_at``) is now: the moment Twiscope accepted
    it. ``watermark``, when given, is the source's promise that every later event has an
    event time at or after it (applied when the batch is persisted). Side effects: the
    key joins the pending set the sweeper watches and the source's staged set (scored
    by the batch's earliest event time, which holds the stream's watermark back until
    the batch is stored).
    """
    key = f"{BATCH_KEY_PREFIX}{source_id}:{uuid.uuid4().hex}"
    payload = {
        "source_id": source_id,
        "received_at": timezone.now().isoformat(),
        "watermark": watermark.isoformat() if watermark is not None else None,
        "items": [envelope.to_json() for envelope in envelopes],
    }
    earliest = min((e.created_at.timestamp() for e in envelopes), default=None)
    pipe = get_redis().pipeline()
    pipe.set(key, json.dumps(payload, ensure_ascii=False), ex=settings.INGEST_BATCH_TTL_S)
    pipe.zadd(PENDING_BATCHES_KEY, {key: time.time()})
    if earliest is not None:
        pipe.zadd(STAGED_EVENT_TIME_KEY.format(source_id=source_id), {key: earliest})
    pipe.execute()
    return key


def enqueue_envelopes(
    *, source: Source, envelopes: Sequence[Envelope], watermark: datetime | None = None
) -> str:
    """Stage ``envelopes`` and queue their persist task (after commit); return the key.

    ``watermark``: see ``stage_batch``. A replay, sorted by event time, passes the last
    event time it staged; ``end_of_stream`` passes one past the last event.
    """
    key = stage_batch(source_id=source.id, envelopes=envelopes, watermark=watermark)
    pipeline.send("ingest", items=[key], batch_key=key, source_id=source.id)
    return key


def end_of_stream(*, source: Source, event_time: datetime) -> str:
    """Declare that ``source`` delivered every event up to and including ``event_time``.

    Stages an empty batch whose watermark is just past ``event_time``; once it is
    persisted, the trend stage may finalise every event of the stream. Returns its key.
    """
    return enqueue_envelopes(
        source=source, envelopes=[], watermark=event_time + timedelta(microseconds=1)
    )


def polling_adapter(source: Source) -> type[PollingAdapter]:
    """The adapter class of a polling ``source`` (RSS, X, Telegram).

    Raises:
        AssertionError: ``source``'s kind is not polled (a webhook, a replay).
    """
    adapter = adapter_for(source.kind)
    assert issubclass(adapter, PollingAdapter), f"{source.kind} sources are not polled"
    return adapter


def poll_interval_s(source: Source) -> int:
    """Seconds between two polls of a polling ``source``: its ``poll_interval_s``, else
    its adapter's default."""
    default = polling_adapter(source).default_poll_interval_s
    return int(source.config.get("poll_interval_s") or default)


def live_lateness_s(source: Source) -> float:
    """How late (seconds after its event time) an event of live ``source`` may arrive
    and still be counted: ``TRENDS_LIVE_LATENESS_S`` for a push source (a webhook);
    for a feed, its poll interval plus ``TRENDS_FEED_LATENESS_S``, since a feed's items
    arrive one poll late at best and are often dated before they are published; for
    an X search or a Telegram channel, its poll interval plus 60 s (X's indexing
    delay)."""
    if source.kind == Source.Kind.RSS:
        return float(poll_interval_s(source) + settings.TRENDS_FEED_LATENESS_S)
    if source.kind in (Source.Kind.X, Source.Kind.TELEGRAM):
        return float(poll_interval_s(source) + 60)
    return float(settings.TRENDS_LIVE_LATENESS_S)


def declare_live_progress() -> int:
    """Move the declared watermark of every enabled live source (not a replay) to now
    minus its allowed lateness (``live_lateness_s``), and let the stream advance, so a
    quiet live source's last events are judged without waiting for more. Returns how
    many sources.

    A live source's event time follows processing time: an event arriving later than
    the allowed lateness after its event time is late (stored, not counted in trends).
    """
    now = timezone.now()
    sources = list(Source.objects.filter(enabled=True).exclude(kind=Source.Kind.REPLAY))
    by_lateness: dict[float, list[int]] = {}
    for source in sources:
        by_lateness.setdefault(live_lateness_s(source), []).append(source.id)
    with transaction.atomic():
        for lateness, ids in by_lateness.items():
            moment = now - timedelta(seconds=lateness)
            Source.objects.filter(id__in=ids).update(
                input_watermark=Greatest(Coalesce("input_watermark", moment), moment)
            )
        for source in sources:
            pipeline.hand_off("ingest", event_ids=[], source_id=source.id)
    return len(sources)


def record_dead_letters(
    *,
    stage: str,
    source: Source | None,
    items: Sequence[tuple[str, dict[str, Any]]],
    keys: Sequence[str | None] | None = None,
) -> int:
    """Park ``(reason, payload)`` items in the dead-letter table; return how many are new.

    ``keys`` (one per item, or None) name where each item came from; an item whose key
    is already parked is not parked twice, so a redelivered batch adds nothing.
    """
    if not items:
        return 0
    item_keys = list(keys) if keys is not None else [None] * len(items)
    source_id = source.id if source is not None else None
    with connection.cursor() as cursor:
        created = execute_values(
            cursor.cursor,
            """
            INSERT INTO ingest_deadletter (stage, source_id, reason, payload, key, created_at)
            VALUES %s ON CONFLICT (key) DO NOTHING RETURNING id
            """,
            [
                (stage, source_id, reason[:2000], Json(payload), key, timezone.now())
                for (reason, payload), key in zip(items, item_keys, strict=True)
            ],
            fetch=True,
        )
    if created:
        log.warning("ingest.dead_lettered", stage=stage, count=len(created))
    return len(created)


_INSERT_SQL = """
INSERT INTO ingest_event (
    source_id, external_id, created_at, received_at, author_id, author_handle,
    author_name, author_followers, text, lang, url, reply_to, repost_of, quote_of,
    metrics, raw, hashtags, mentions, cashtags, urls, keywords
)
SELECT %(source_id)s, r.external_id, r.created_at, %(received_at)s, r.author_id,
       r.author_handle, r.author_name, r.author_followers, r.text, r.lang, r.url,
       r.reply_to, r.repost_of, r.quote_of, r.metrics, r.raw, '{}', '{}', '{}', '{}', '{}'
FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(
    external_id text, created_at timestamptz, author_id text, author_handle text,
    author_name text, author_followers int, text text, lang text, url text,
    reply_to text, repost_of text, quote_of text, metrics jsonb, raw jsonb
)
ON CONFLICT (source_id, external_id) DO NOTHING
RETURNING id
"""


def _row(env: Envelope) -> dict[str, Any]:
    """One event's columns, as ``_INSERT_SQL`` reads them from its JSON parameter."""
    return {
        "external_id": env.external_id,
        "created_at": env.created_at.isoformat(),
        "author_id": env.author.id,
        "author_handle": env.author.handle,
        "author_name": env.author.name,
        "author_followers": env.author.followers,
        "text": env.text,
        "lang": env.lang,
        "url": env.url,
        "reply_to": env.reply_to,
        "repost_of": env.repost_of,
        "quote_of": env.quote_of,
        "metrics": env.metrics,
        "raw": env.raw,
    }


def _insert(source_id: int, received_at: datetime, rows: list[dict[str, Any]]) -> list[int]:
    """Insert ``rows`` (``_row``) with one statement whose rows travel as one JSON
    document (PostgreSQL expands it: no per-row quoting in Python); return the new ids.

    Raises:
        DataError: PostgreSQL refused a row (the whole statement is refused).
    """
    with connection.cursor() as cursor:
        cursor.execute(
            _INSERT_SQL,
            {"source_id": source_id, "received_at": received_at, "rows": json.dumps(rows)},
        )
        return [r[0] for r in cursor.fetchall()]


def persist_batch(*, batch_key: str, source_id: int) -> PersistResult:
    """Store a staged raw batch as events, exactly once in effect.

    Re-reads everything: a missing batch key (expired or already persisted) is logged
    and counted; a missing or disabled source drops the batch quietly. Items that fail
    validation, and rows PostgreSQL refuses, become dead letters keyed by the batch key
    and item index (a redelivered batch parks nothing twice); the rest of the batch is
    stored. Inserts are conflict-ignore on ``(source, external_id)``, so a redelivered
    batch stores nothing twice. ``Source.last_received_at`` and ``input_watermark``
    only move forward.

    Side effects after commit: hands the new ids to the enrich stage (also when there
    are none: the batch may carry a watermark the trend stage must see), counts them
    in the team's rate, and forgets the batch key.
    """
    raw = get_bytes(batch_key)
    if raw is None:
        log.warning("ingest.batch_missing", batch_key=batch_key, source_id=source_id)
        incr_metric("batch_missing")
        _forget_batch(batch_key, source_id)
        return PersistResult()
    source = Source.objects.filter(id=source_id, enabled=True).first()
    if source is None:
        log.info("ingest.batch_dropped_source_gone", batch_key=batch_key, source_id=source_id)
        _forget_batch(batch_key, source_id)
        return PersistResult()

    batch = json.loads(raw)
    received_at = datetime.fromisoformat(batch["received_at"])
    watermark = datetime.fromisoformat(batch["watermark"]) if batch.get("watermark") else None
    if watermark is None and source.kind != Source.Kind.REPLAY:
        watermark = received_at - timedelta(seconds=live_lateness_s(source))
    dead: list[tuple[str, dict[str, Any]]] = []
    dead_keys: list[str | None] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, item in enumerate(batch["items"]):
        try:
            env = Envelope.from_json(item)
        except EnvelopeError as exc:
            dead.append(
                (f"invalid envelope: {exc}", item if isinstance(item, dict) else {"item": item})
            )
            dead_keys.append(f"{batch_key}:{index}")
            continue
        if env.external_id in seen:
            continue
        seen.add(env.external_id)
        rows.append(_row(env))

    with transaction.atomic():
        try:
            with transaction.atomic():
                inserted = _insert(source.id, received_at, rows) if rows else []
        except DataError:
            inserted = []
            for row in rows:
                try:
                    with transaction.atomic():
                        inserted.extend(_insert(source.id, received_at, [row]))
                except DataError as exc:
                    external_id = row["external_id"]
                    dead.append(
                        (f"refused by database: {exc}".strip(), {"external_id": external_id})
                    )
                    dead_keys.append(f"{batch_key}:id:{external_id}"[:200])
        new_dead = record_dead_letters(
            stage=DeadLetter.Stage.INGEST, source=source, items=dead, keys=dead_keys
        )
        changes: dict[str, Any] = {}
        if inserted:
            changes["events_total"] = F("events_total") + len(inserted)
            changes["last_received_at"] = Greatest(
                Coalesce("last_received_at", received_at), received_at
            )
        if watermark is not None:
            changes["input_watermark"] = Greatest(Coalesce("input_watermark", watermark), watermark)
        if changes:
            Source.objects.filter(id=source.id).update(**changes)
        pipeline.hand_off("ingest", items=inserted, event_ids=inserted, source_id=source.id)
        team_id = source.team_id
        transaction.on_commit(lambda: _after_persist(batch_key, source_id, inserted, team_id))

    result = PersistResult(
        inserted_ids=inserted, duplicates=len(rows) - len(inserted), dead_letters=new_dead
    )
    log.info(
        "ingest.batch_persisted",
        source_id=source.id,
        inserted=len(inserted),
        duplicates=result.duplicates,
        dead_letters=new_dead,
    )
    return result


def count_source_events(source_id: int, amount: int, *, now: float | None = None) -> None:
    """Add ``amount`` stored events to ``source_id``'s count for the current minute
    (read by ``ingest.selectors.events_last_hour``)."""
    minute = int((time.time() if now is None else now) // 60)
    key = SOURCE_MINUTE_KEY.format(source_id=source_id, minute=minute)
    pipe = get_redis().pipeline()
    pipe.incrby(key, amount)
    pipe.expire(key, 3700)
    pipe.execute()


def _after_persist(batch_key: str, source_id: int, event_ids: list[int], team_id: int) -> None:
    if event_ids:
        count_source_events(source_id, len(event_ids))
        add_to_rate(events_rate_name(team_id), len(event_ids))
        add_to_rate(EVENTS_RATE_ALL, len(event_ids))
        pipeline.add_progress("ingest", source_id, len(event_ids))
    _forget_batch(batch_key, source_id)


def _forget_batch(batch_key: str, source_id: int) -> None:
    pipe = get_redis().pipeline()
    pipe.delete(batch_key)
    pipe.zrem(PENDING_BATCHES_KEY, batch_key)
    pipe.zrem(STAGED_EVENT_TIME_KEY.format(source_id=source_id), batch_key)
    pipe.execute()
    pipeline.mark_done("ingest", [batch_key])


def save_enrichments(rows: Sequence[tuple[Any, ...]]) -> list[tuple[int, datetime]]:
    """Write the enrich stage's results; return ``(id, received_at)`` of the events
    written.

    ``rows`` are ``(event_id, lang, hashtags, mentions, cashtags, urls, keywords,
    sentiment, sentiment_label)``: lists of strings (terms cut to ``TERM_MAX_CHARS``,
    their columns' length), a float in [-1, 1] (VADER's compound) and the label it gives
    (``sentiment_model`` becomes "vader"). Only events
    not enriched yet are written (the claim is in the UPDATE), so a redelivered task
    changes nothing. One statement; the rows travel as one JSON document. Must run
    inside the caller's transaction.
    """
    if not rows:
        return []
    records = [dict(zip(_ENRICH_FIELDS, row, strict=True)) for row in rows]
    for record in records:
        # A term longer than its column (a 300-character hashtag) is cut, as the trend
        # stage cuts it: it must not fail the whole batch.
        for name in _TERM_FIELDS:
            record[name] = [term[:TERM_MAX_CHARS] for term in record[name]]
    document = json.dumps(records)
    with connection.cursor() as cursor:
        cursor.execute(_ENRICH_SQL, [document])
        return [(int(r[0]), r[1]) for r in cursor.fetchall()]


_ENRICH_FIELDS = (
    "id",
    "lang",
    "hashtags",
    "mentions",
    "cashtags",
    "urls",
    "keywords",
    "sentiment",
    "sentiment_label",
)
_TERM_FIELDS = ("hashtags", "mentions", "cashtags", "keywords")
_ENRICH_SQL = """
UPDATE ingest_event AS e SET
    lang = v.lang, hashtags = v.hashtags, mentions = v.mentions, cashtags = v.cashtags,
    urls = v.urls, keywords = v.keywords, sentiment = v.sentiment,
    sentiment_label = v.sentiment_label, sentiment_model = 'vader',
    enriched_at = statement_timestamp()
FROM jsonb_to_recordset(%s::jsonb) AS v(
    id bigint, lang varchar, hashtags varchar[], mentions varchar[], cashtags varchar[],
    urls text[], keywords varchar[], sentiment float8, sentiment_label varchar
)
WHERE e.id = v.id AND e.enriched_at IS NULL
RETURNING e.id, e.received_at
"""


def save_labels(rows: Sequence[dict[str, Any]]) -> int:
    """Write the ml pool's labels (the transformer heads' and the virality score); return
    how many events were written.

    ``rows`` are dicts with ``id`` and, per task scored, ``sentiment_label``,
    ``sentiment_scores`` (label → probability), ``sentiment_model`` ("name vN"), and the
    same three for ``emotion`` and ``offensive`` (``emotion``, ``emotion_scores``,
    ``emotion_model``, …), and ``virality_score`` (P(viral), 0-1) with ``virality_model``
    ("name vN"); a task left out (or given as None) keeps its columns. Sets ``scored_at``.
    Idempotent: a redelivered batch writes the same values again. One statement (one
    JSON document); no indexed column changes, so PostgreSQL may keep each new row
    version on its page (a HOT update).
    """
    if not rows:
        return 0
    document = json.dumps(list(rows))
    with connection.cursor() as cursor:
        cursor.execute(_LABELS_SQL, [document])
        return cursor.rowcount


_LABELS_SQL = """
UPDATE ingest_event AS e SET
    sentiment_label = COALESCE(v.sentiment_label, e.sentiment_label),
    sentiment_scores = COALESCE(v.sentiment_scores, e.sentiment_scores),
    sentiment_model = COALESCE(v.sentiment_model, e.sentiment_model),
    emotion = COALESCE(v.emotion, e.emotion),
    emotion_scores = COALESCE(v.emotion_scores, e.emotion_scores),
    emotion_model = COALESCE(v.emotion_model, e.emotion_model),
    offensive = COALESCE(v.offensive, e.offensive),
    offensive_scores = COALESCE(v.offensive_scores, e.offensive_scores),
    offensive_model = COALESCE(v.offensive_model, e.offensive_model),
    virality_score = COALESCE(v.virality_score, e.virality_score),
    virality_model = COALESCE(v.virality_model, e.virality_model),
    scored_at = statement_timestamp()
FROM jsonb_to_recordset(%s::jsonb) AS v(
    id bigint, sentiment_label varchar, sentiment_scores jsonb, sentiment_model varchar,
    emotion varchar, emotion_scores jsonb, emotion_model varchar,
    offensive varchar, offensive_scores jsonb, offensive_model varchar,
    virality_score float8, virality_model varchar
)
WHERE e.id = v.id
"""


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
    # Poll the Redis counters alone while over the cap; confirm with the full estimate
    # (which also counts unenriched events in PostgreSQL) once they say there is room.
    while (
        in_flight_events(source.id, redis_only=True) >= max_in_flight
        or in_flight_events(source.id) >= max_in_flight
    ):
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise TimeoutError(
                f"{in_flight_events(source.id)} events still in flight after {waited:.0f} s:"
                " are the worker pools running?"
            )
        time.sleep(poll_s)
    return time.monotonic() - start


def sweep_staged_batches(*, older_than_s: float) -> int:
    """Re-send the persist task of staged batches that are really stuck (see
    ``twiscope.pipeline.stuck``); forget keys whose batch expired. Returns how many."""
    redis = get_redis()
    keys = [
        k.decode()
        for k in redis.zrangebyscore(PENDING_BATCHES_KEY, "-inf", time.time() - older_than_s)  # type: ignore[union-attr]
    ]
    alive = []
    for key in keys:
        source_id = batch_source_id(key)
        if source_id is not None and redis.exists(key):
            alive.append(key)
        else:
            _forget_batch(key, source_id or 0)
    resend = pipeline.stuck("ingest", alive, older_than_s=older_than_s)
    for key in resend:
        pipeline.send("ingest", items=[key], batch_key=key, source_id=batch_source_id(key))
    return len(resend)


GROWING_TABLES = ("ingest_event", "mlengine_bucketcount", "mlengine_trend", "alerts_alert")
"""Tables of every app the pipeline fills fast (``ANALYZE`` reads, it writes no row)."""


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
