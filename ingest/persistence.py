"""Writes of the ingest app's staged batches: stage a raw batch in PostgreSQL, persist
it as events, sweep the stuck, and hold a replay back while too many are in flight.

Accepted means durable: a batch is staged as a ``StagedBatch`` row, committed before a
webhook answers 202 or a source moves its cursor past it, and the transaction that
stores its events deletes it. Redis carries only the persist task (the broker) and
its dispatch record; when Redis loses them, the sweeper sends the task again from the
table (``sweep_staged_batches``).

The persist stage (``persist_batch``) is the pipeline's edge into ``Event``: it turns
a staged raw batch into ``Event`` rows with one conflict-ignore insert, dead-letters
what cannot be stored, and after commit hands the new ids on (``twiscope.pipeline``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.db import DataError, connection, transaction
from django.db.models import F
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from ingest.counters import (
    EVENTS_RATE_ALL,
    count_source_events,
    events_rate_name,
    in_flight_events,
)
from ingest.envelope import Envelope, EnvelopeError
from ingest.models import DeadLetter, Source, StagedBatch
from ingest.services import live_lateness_s, record_dead_letters
from twiscope import hotcache, pipeline
from twiscope.redis import add_to_rate

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PersistResult:
    """What one persist call did: new event ids, duplicates ignored, items dead-lettered."""

    inserted_ids: list[int] = field(default_factory=list)
    duplicates: int = 0
    dead_letters: int = 0


def stage_batch(
    *, source_id: int, envelopes: Sequence[Envelope], watermark: datetime | None = None
) -> str:
    """Stage a raw batch as a ``StagedBatch`` row; return its key (a UUID, as text).

    The batch's processing time (``received_at``) is now: the moment Twiscope accepted
    it. ``watermark``, when given, is the source's promise that every later event has an
    event time at or after it (applied when the batch is persisted). The row commits
    with the caller's transaction (at once outside one): callers answer a sender or move
    a cursor only after that. The row's earliest event time holds the stream's
    watermark back until the batch is stored (``ingest.selectors.input_low_watermark``).
    """
    batch = StagedBatch.objects.create(
        source_id=source_id,
        received_at=timezone.now(),
        watermark=watermark,
        earliest_event_at=min((e.created_at for e in envelopes), default=None),
        items=json.dumps([envelope.to_json() for envelope in envelopes], ensure_ascii=False),
    )
    return str(batch.key)


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

    Takes the ``StagedBatch`` row ``batch_key`` with ``SELECT … FOR UPDATE`` (a second
    delivery of the same task waits for the first, then finds the row gone), stores its
    events and deletes it in one transaction. A missing row means the batch is already
    stored (or its source was deleted with it): logged, nothing done. A disabled source
    drops its staged batch (logged). Items that fail validation, and rows PostgreSQL
    refuses, become dead letters keyed by the batch key and item index; the rest of the
    batch is stored. Inserts are conflict-ignore on ``(source, external_id)``, so an
    event staged twice (a sender's retry, a re-polled feed) is stored once.
    ``Source.last_received_at`` and ``input_watermark`` only move forward.
    ``source_id`` is the task's routing information; the row's own source is used.

    Side effects after commit: hands the new ids to the enrich stage (also when there
    are none: the batch may carry a watermark the trend stage must see), counts them
    in the team's rate, and marks the batch's dispatch record done.
    """
    with transaction.atomic():
        staged = _take_staged(batch_key)
        if staged is None:
            log.info("ingest.batch_already_stored", batch_key=batch_key, source_id=source_id)
            transaction.on_commit(lambda: pipeline.mark_done("ingest", [batch_key]))
            return PersistResult()
        source = Source.objects.filter(id=staged.source_id, enabled=True).first()
        if source is None:
            log.info(
                "ingest.batch_dropped_source_disabled",
                batch_key=batch_key,
                source_id=staged.source_id,
            )
            staged.delete()
            transaction.on_commit(lambda: pipeline.mark_done("ingest", [batch_key]))
            return PersistResult()
        result = _store(staged, source, batch_key)
        staged.delete()

    log.info(
        "ingest.batch_persisted",
        source_id=source.id,
        inserted=len(result.inserted_ids),
        duplicates=result.duplicates,
        dead_letters=result.dead_letters,
    )
    return result


def _take_staged(batch_key: str) -> StagedBatch | None:
    """The staged row ``batch_key``, locked until the transaction ends; None when it is
    gone (stored already) or ``batch_key`` is not a UUID (no row can have it)."""
    try:
        key = uuid.UUID(batch_key)
    except ValueError:
        log.warning("ingest.batch_key_invalid", batch_key=batch_key)
        return None
    return StagedBatch.objects.select_for_update().filter(key=key).first()


def _store(staged: StagedBatch, source: Source, batch_key: str) -> PersistResult:
    """Insert ``staged``'s events for ``source`` and park what cannot be stored; queue
    the after-commit work. Runs inside ``persist_batch``'s transaction."""
    received_at = staged.received_at
    watermark = staged.watermark
    if watermark is None and source.kind != Source.Kind.REPLAY:
        watermark = received_at - timedelta(seconds=live_lateness_s(source))
    dead: list[tuple[str, dict[str, Any]]] = []
    dead_keys: list[str | None] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, item in enumerate(json.loads(staged.items)):
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
                dead.append((f"refused by database: {exc}".strip(), {"external_id": external_id}))
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
    source_id, team_id = source.id, source.team_id
    transaction.on_commit(lambda: _after_persist(batch_key, source_id, inserted, team_id))
    return PersistResult(
        inserted_ids=inserted, duplicates=len(rows) - len(inserted), dead_letters=new_dead
    )


def _after_persist(batch_key: str, source_id: int, event_ids: list[int], team_id: int) -> None:
    if event_ids:
        count_source_events(source_id, len(event_ids))
        add_to_rate(events_rate_name(team_id), len(event_ids))
        add_to_rate(EVENTS_RATE_ALL, len(event_ids))
        pipeline.add_progress("ingest", source_id, len(event_ids))
    pipeline.mark_done("ingest", [batch_key])
    if event_ids:
        hotcache.bump("events", [team_id])


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
    # Poll the quick estimate while over the cap; confirm with the full one (which also
    # counts every unenriched event of the source) once it says there is room.
    while (
        in_flight_events(source.id, quick=True) >= max_in_flight
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
    """Re-send the persist task of staged batches received over ``older_than_s`` seconds
    ago that are really stuck (see ``twiscope.pipeline.stuck``: never sent, or sent
    long ago while the ingest queue is empty; a Redis that lost its data lost their
    dispatch records too, so they count as never sent). Reads keys only, never items.
    Forgets the records of batches already persisted (``pipeline.forget_finished``).
    Returns how many were sent again."""
    cutoff = timezone.now() - timedelta(seconds=older_than_s)
    staged = {
        str(key): source_id
        for key, source_id in StagedBatch.objects.filter(received_at__lt=cutoff)
        .order_by("received_at")
        .values_list("key", "source_id")
    }
    resend = pipeline.stuck("ingest", list(staged), older_than_s=older_than_s)
    pipeline.forget_finished("ingest", staged, older_than_s=older_than_s)
    for key in resend:
        pipeline.send("ingest", items=[key], batch_key=key, source_id=staged[key])
    if resend:
        log.info("ingest.batches_resent", batches=len(resend))
    return len(resend)
