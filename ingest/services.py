"""Writes of the ingest app: sources, live sources' progress, dead letters, enrichments
and labels, planner statistics.

The enrich stage writes its results through ``save_enrichments``, the ml pool its
labels through ``save_labels``: the events table is this app's, so every write to it is
here or, for the staged batches that become events, in ``ingest.persistence``.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, QuerySet
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone
from psycopg2.extras import Json, execute_values

from ingest import credentials as credentials_box
from ingest import search
from ingest.envelope import Envelope
from ingest.models import DeadLetter, Event, Source
from ingest.selectors import TERM_MAX_CHARS
from ingest.sources.base import PollingAdapter
from ingest.sources.registry import adapter_for
from teams.models import Team
from twiscope import guard, hotcache, pipeline

log = structlog.get_logger(__name__)


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
        hotcache.bump_on_commit("events", [team.id])
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
        # Trends and alerts show their source's name; stats count sources.
        for kind in hotcache.KINDS:
            hotcache.bump_on_commit(kind, [source.team_id])
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
        if source is not None:
            hotcache.bump_on_commit("events", [source.team_id])
    return len(created)


@dataclass(frozen=True, slots=True)
class ParkedItem:
    """An item a stage gives up on (``twiscope.guard``), for ``park_items``.

    ``key``: ``<stage>:<scope>:<item>`` (unique: parking twice writes one row);
    ``reason``: one line for an operator; ``error``: the exception's summary and last
    frames; ``attempts``: times it failed alone; ``payload``: JSON naming the item, with
    ``scope`` and ``item`` (its attempt counter) and ``resend`` (``task``: None for the
    stage's entry task or a ``twiscope.pipeline.SIDE_TASKS`` key; ``kwarg``: the list
    kwarg the item's id goes in, or None; ``kwargs``: the other kwargs), which is how
    ``requeue_dead_letters`` sends it again; ``event_id``: the event it is, when it is
    one (the event is marked parked, its envelope added to the payload, and its source
    taken when ``source_id`` is None).
    """

    key: str
    source_id: int | None
    reason: str
    error: str
    attempts: int
    payload: dict[str, Any]
    event_id: int | None = None


_ENVELOPE_FIELDS = (
    "id",
    "source_id",
    "external_id",
    "created_at",
    "received_at",
    "author_id",
    "author_handle",
    "text",
    "lang",
    "url",
    "raw",
)


def park_items(*, stage: str, items: Sequence[ParkedItem]) -> int:
    """Write dead letters of ``stage`` for ``items``; mark the events among them parked
    (``Event.parked_at``: the stream's watermark stops waiting for them, the counts leave
    them out). Returns how many dead letters were written or reopened.

    Idempotent on ``key``: an item parked and not requeued is not written again; one
    that was requeued and fails again reopens its row (``requeued_at`` back to null,
    ``requeues`` kept as the trail). One transaction.
    """
    if not items:
        return 0
    event_ids = [item.event_id for item in items if item.event_id is not None]
    envelopes = {
        row["id"]: {k: _jsonable(v) for k, v in row.items()}
        for row in Event.objects.filter(id__in=event_ids).values(*_ENVELOPE_FIELDS)
    }
    now = timezone.now()
    rows = [
        (
            stage,
            item.source_id
            if item.source_id is not None
            else envelopes.get(item.event_id, {}).get("source_id"),
            item.reason[:2000],
            item.error[:8000],
            item.attempts,
            Json(
                {**item.payload, "event": envelopes[item.event_id]}
                if item.event_id in envelopes
                else item.payload
            ),
            item.key,
            now,
        )
        for item in items
    ]
    with transaction.atomic(), connection.cursor() as cursor:
        if event_ids:
            Event.objects.filter(id__in=event_ids, enriched_at__isnull=True).update(parked_at=now)
        written = execute_values(
            cursor.cursor,
            """
            INSERT INTO ingest_deadletter
                (stage, source_id, reason, error, attempts, payload, key, created_at,
                 requeues)
            VALUES %s
            ON CONFLICT (key) DO UPDATE SET
                reason = EXCLUDED.reason, error = EXCLUDED.error,
                attempts = EXCLUDED.attempts, payload = EXCLUDED.payload,
                created_at = EXCLUDED.created_at, requeued_at = NULL
            WHERE ingest_deadletter.requeued_at IS NOT NULL
            RETURNING id
            """,
            rows,
            template="(%s, %s, %s, %s, %s, %s, %s, %s, 0)",
            fetch=True,
        )
    log.warning("ingest.items_parked", stage=stage, count=len(written), keys=[i.key for i in items])
    if written:
        source_ids = {row[1] for row in rows if row[1] is not None}
        hotcache.bump_on_commit(
            "events", Source.objects.filter(id__in=source_ids).values_list("team_id", flat=True)
        )
    return len(written)


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


REQUEUE_STAGES = ("enrich", "detect", "alerts")
"""The stages whose dead letters ``requeue_dead_letters`` can send again (those parked
by ``twiscope.guard``; ingest's and sources' are bad input, not failed work)."""
REQUEUE_CHUNK = 250


def requeue_dead_letters(letters: QuerySet[DeadLetter]) -> list[int]:
    """Send the open dead letters among ``letters`` of ``REQUEUE_STAGES`` back to their
    stage; return their ids.

    Each is marked requeued (``requeued_at``, ``requeues`` + 1; the row stays), its
    event un-parked, its attempt counter forgotten, and its ``payload["resend"]`` task
    sent after commit, items grouped into tasks of at most ``REQUEUE_CHUNK``. An item
    that fails again is parked again, after ``DEAD_LETTER_MAX_ATTEMPTS`` new attempts.
    """
    chosen = list(
        letters.filter(stage__in=REQUEUE_STAGES, requeued_at__isnull=True)
        .exclude(payload__resend__isnull=True)
        .order_by("id")
    )
    if not chosen:
        return []
    groups: dict[tuple[str, str | None, str | None, str], list[Any]] = {}
    for letter in chosen:
        resend = letter.payload["resend"]
        group = (
            letter.stage,
            resend.get("task"),
            resend.get("kwarg"),
            json.dumps(resend.get("kwargs") or {}, sort_keys=True),
        )
        ids = groups.setdefault(group, [])
        if resend.get("kwarg"):
            ids.append(letter.payload["item"])
    event_ids = [
        int(letter.payload["event"]["id"]) for letter in chosen if "event" in letter.payload
    ]
    with transaction.atomic():
        DeadLetter.objects.filter(id__in=[letter.id for letter in chosen]).update(
            requeued_at=timezone.now(), requeues=F("requeues") + 1
        )
        if event_ids:
            Event.objects.filter(id__in=event_ids).update(parked_at=None)
        counters = [
            (letter.stage, letter.payload["scope"], letter.payload["item"]) for letter in chosen
        ]
        transaction.on_commit(lambda: _forget_attempts(counters))
        for (stage, task, kwarg, fixed), ids in groups.items():
            kwargs: dict[str, Any] = json.loads(fixed)
            if kwarg is None:
                pipeline.send(stage, task=task, **kwargs)
                continue
            for i in range(0, len(ids), REQUEUE_CHUNK):
                chunk = ids[i : i + REQUEUE_CHUNK]
                records = chunk if task is None else ()
                pipeline.send(stage, task=task, items=records, **{**kwargs, kwarg: chunk})
    log.info("ingest.dead_letters_requeued", count=len(chosen), events=len(event_ids))
    return [letter.id for letter in chosen]


def _forget_attempts(counters: Sequence[tuple[str, str, Any]]) -> None:
    for stage, scope, item in counters:
        guard.forget_attempts(stage, scope, [item])


def save_enrichments(rows: Sequence[tuple[Any, ...]]) -> list[tuple[int, datetime]]:
    """Write the enrich stage's results; return ``(id, received_at)`` of the events
    written.

    ``rows`` are ``(event_id, lang, hashtags, mentions, cashtags, urls, keywords,
    sentiment, sentiment_label)``: lists of strings (terms cut to ``TERM_MAX_CHARS``,
    their columns' length), a float in [-1, 1] (VADER's compound) and the label it gives
    (``sentiment_model`` becomes "vader"), and ``search_vector`` from the text and
    ``lang`` (``ingest.search.vector_sql``). Only events
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
_ENRICH_SQL = f"""
UPDATE ingest_event AS e SET
    lang = v.lang, hashtags = v.hashtags, mentions = v.mentions, cashtags = v.cashtags,
    urls = v.urls, keywords = v.keywords, sentiment = v.sentiment,
    sentiment_label = v.sentiment_label, sentiment_model = 'vader',
    search_vector = {search.vector_sql("e.text", "v.lang")},
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


def backfill_search_vectors(*, first_id: int, end_id: int, rebuild: bool = False) -> int:
    """Write ``search_vector`` for the enriched events with ``first_id <= id < end_id``
    (``ingest.search.vector_sql``, from their text and ``lang``); return how many.

    Only rows without a vector, unless ``rebuild`` (after ``LANGUAGE_CONFIGS`` changed).
    One statement: the caller keeps each range small (``manage.py backfill_search``), so
    each commit is short and the locks brief. Idempotent.
    """
    missing = "" if rebuild else "AND search_vector IS NULL"
    sql = (
        f"UPDATE ingest_event SET search_vector = {search.vector_sql('text', 'lang')} "
        f"WHERE id >= %s AND id < %s AND enriched_at IS NOT NULL {missing}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [first_id, end_id])
        return cursor.rowcount
