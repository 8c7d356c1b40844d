"""Polling sources (RSS/Atom feeds, X recent search, Telegram channels): one poll of
one source, with resume, de-duplication, error recording and backoff. ``manage.py
run_sources`` drives it.

A poll asks the adapter for what the source has now (``RssAdapter.poll``), drops items
the source already stored (by ``external_id``, the events' unique key, so a restart
neither loses nor duplicates), stages the rest in batches of ``INGEST_BATCH_SIZE``, and
saves the adapter's cursor (a feed's ETag and Last-Modified) only after the batches are
staged. A failure is recorded on the source: a permanent one stops it until an owner
edits it (``state`` "failing"); a temporary one schedules the next try after an
exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff and
Jitter", 2015), never sooner than the service's own ``Retry-After``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from django.conf import settings
from django.db.models import Q
from redis.exceptions import LockNotOwnedError
from redis.lock import Lock

from ingest.models import Source
from ingest.persistence import enqueue_envelopes
from ingest.services import only_new, poll_interval_s, polling_adapter
from ingest.sources.base import SourceError
from twiscope.redis import get_redis

log = structlog.get_logger(__name__)

POLLING_KINDS = (Source.Kind.RSS, Source.Kind.X, Source.Kind.TELEGRAM)
BACKOFF_BASE_S = 30.0
BACKOFF_MAX_S = 3600.0
LOCK_TTL_S = 120
"""One poll of a source at a time, across processes: the lock's expiry, in seconds."""
POLL_LOCK_KEY = "twiscope:poll:{source_id}"
"""The Redis key of a source's poll lock (redis-py ``Lock``: its value is the holder's
token)."""


@dataclass(frozen=True, slots=True)
class PollOutcome:
    """What one poll did: ``staged`` new items, ``seen`` items already stored or
    repeated, ``not_modified`` (304), ``error`` (the failure, or ""), ``permanent``,
    ``skipped`` (another process held the source's lock)."""

    staged: int = 0
    seen: int = 0
    not_modified: bool = False
    error: str = ""
    permanent: bool = False
    skipped: bool = False


def backoff_s(failures: int, retry_after_s: float | None = None) -> float:
    """Seconds to wait after ``failures`` consecutive temporary failures: a uniform
    draw in [0, min(BACKOFF_MAX_S, BACKOFF_BASE_S × 2^(failures−1))] ("full jitter"),
    and at least ``retry_after_s``."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1))
    return max(random.uniform(0, ceiling), retry_after_s or 0.0)


def retry_at_of(source: Source) -> datetime | None:
    """When a backing-off source may be tried again (its cursor's ``retry_at``), or None."""
    value = (source.cursor or {}).get("retry_at")
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def polling_sources() -> list[Source]:
    """Enabled polling sources, less those failing permanently (they wait to be
    edited), by id."""
    failing = Q(error_permanent=True) & ~Q(last_error="")
    return list(
        Source.objects.filter(kind__in=POLLING_KINDS, enabled=True).exclude(failing).order_by("id")
    )


def is_due(source: Source, now: datetime) -> bool:
    """Whether ``source``'s interval has passed since its last poll and its backoff,
    if any, is over."""
    retry_at = retry_at_of(source)
    if retry_at is not None and retry_at > now:
        return False
    if source.last_polled_at is None:
        return True
    return now >= source.last_polled_at + timedelta(seconds=poll_interval_s(source))


def poll_source(source: Source) -> PollOutcome:
    """Poll ``source`` once (see the module docstring). Never raises for the source's
    own failures: they are recorded on it and returned.

    Side effects: staged batches and ingest tasks; the source's cursor,
    ``last_polled_at`` and error fields saved. One poll of a source at a time across
    processes: a token-checked Redis lock (redis-py ``Lock``, expiring after
    ``LOCK_TTL_S``); a poll that finds it held is skipped.
    """
    lock = get_redis().lock(
        POLL_LOCK_KEY.format(source_id=source.id), timeout=LOCK_TTL_S, blocking=False
    )
    if not lock.acquire():
        return PollOutcome(skipped=True)
    try:
        return _poll(source)
    finally:
        release_poll_lock(lock, source.id)


def release_poll_lock(lock: Lock, source_id: int) -> None:
    """Release ``lock`` if this holder still owns it.

    redis-py's release deletes the key only while it holds this holder's token. A poll
    that outlived ``LOCK_TTL_S`` lost its lock to the expiry, and the key may now be
    another process's: it is left alone, and the overrun logged
    (``sources.poll_lock_lost``). Its staged batches and cursor stand: staging is
    idempotent by ``external_id``.
    """
    try:
        lock.release()
    except LockNotOwnedError:
        log.warning("sources.poll_lock_lost", source_id=source_id, ttl_s=LOCK_TTL_S)


def _poll(source: Source) -> PollOutcome:
    now = datetime.now(UTC)
    try:
        poll = polling_adapter(source)(source).poll()
    except SourceError as exc:
        return record_failure(source, exc, now)
    except Exception as exc:
        # An adapter's own bug or an unforeseen failure of its client library: one
        # source's error never stops the process; it is retried with backoff.
        log.exception("sources.poll_crashed", source_id=source.id)
        return record_failure(
            source, SourceError(f"unexpected error: {exc!r}", permanent=False), now
        )
    fresh, seen = only_new(source, poll.envelopes)
    size = settings.INGEST_BATCH_SIZE
    for start in range(0, len(fresh), size):
        enqueue_envelopes(source=source, envelopes=fresh[start : start + size])
    source.cursor = poll.cursor
    source.last_polled_at = now
    source.last_error = f"the feed was read in part: {poll.problem}" if poll.problem else ""
    source.error_permanent = False
    source.last_error_at = now if poll.problem else None
    source.save(
        update_fields=["cursor", "last_error", "error_permanent", "last_error_at", "last_polled_at"]
    )
    log.info(
        "sources.polled",
        source_id=source.id,
        staged=len(fresh),
        seen=seen,
        not_modified=poll.not_modified,
    )
    return PollOutcome(staged=len(fresh), seen=seen, not_modified=poll.not_modified)


def record_failure(source: Source, error: SourceError, now: datetime) -> PollOutcome:
    """Save ``error`` on ``source``; a temporary one also schedules the next try."""
    cursor = dict(source.cursor or {})
    if not error.permanent:
        failures = int(cursor.get("failures", 0)) + 1
        wait = backoff_s(failures, error.retry_after_s)
        cursor.update(failures=failures, retry_at=(now + timedelta(seconds=wait)).isoformat())
    source.cursor = cursor
    source.last_error, source.error_permanent = error.reason[:2000], error.permanent
    source.last_error_at = source.last_polled_at = now
    source.save(
        update_fields=["cursor", "last_error", "error_permanent", "last_error_at", "last_polled_at"]
    )
    log.warning(
        "sources.poll_failed", source_id=source.id, reason=error.reason, permanent=error.permanent
    )
    return PollOutcome(error=error.reason, permanent=error.permanent)
