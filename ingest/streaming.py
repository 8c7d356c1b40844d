"""Streaming sources in ``manage.py run_sources``: X's filtered stream, one connection
per bearer token, beside the polling of ``ingest.polling``.

An X source streams unless its config says ``"stream": false``. ``XStreams.tick``,
called by the run loop about once a second, keeps the connections in line with the
enabled sources: it syncs each app's rules (``ingest.sources.x.stream.sync_rules``),
connects, and reconnects when a source's keywords change or a stream gave up.

Delivery, so that a restart or a disconnect loses nothing and duplicates nothing:

- tweets are buffered and staged as batches (``enqueue_envelopes``) at least every
  ``FLUSH_S`` seconds, less those the source already stored (``only_new``; the events'
  unique key catches the rest);
- after a batch is staged, the source's ``cursor["since_id"]`` moves up to its newest
  tweet, so ``since_id`` never passes a tweet that was not staged;
- each time a connection opens, the gap since ``since_id`` is backfilled with one
  recent-search poll (``ingest.polling.poll_source``), on the stream's thread, before
  its first tweet is read;
- a line that is not a tweet becomes a dead-letter row (stage ``source``).

Failures (``XStream``): a 401 marks the token's sources failing until edited; a 429
backs them off until X's reset; a 403 means the app has no filtered stream, and its
sources are polled through recent search instead (tried again after
``UNAVAILABLE_RETRY_S``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from django.conf import settings
from django.db import connection, transaction

from ingest import credentials
from ingest.envelope import Envelope
from ingest.models import DeadLetter, Source
from ingest.polling import poll_source, record_failure, retry_at_of
from ingest.services import enqueue_envelopes, only_new, record_dead_letters
from ingest.sources.base import SourceError
from ingest.sources.x.adapter import build_query
from ingest.sources.x.stream import StreamedTweet, StreamUnavailable, XStream, sync_rules

log = structlog.get_logger(__name__)

FLUSH_S = 0.5
"""Tweets wait at most about this long (seconds) in a stream's buffer before staging."""
UNAVAILABLE_RETRY_S = 3600
"""After a 403 (no filtered stream), how long (seconds) the sources poll before the
stream is tried again."""
JOIN_TIMEOUT_S = 25.0
"""How long ``stop`` waits for a stream's thread (X sends a keep-alive every 20 s)."""


def streams(source: Source) -> bool:
    """Whether an X source asks for the filtered stream (its config's ``stream``,
    default true)."""
    config = source.config if isinstance(source.config, dict) else {}
    return source.kind == Source.Kind.X and config.get("stream", True) is not False


@dataclass
class _Connection:
    """One stream: the sources it serves (id → query) and what it has buffered."""

    token: str
    queries: dict[int, str]
    stream: XStream | None = None
    thread: threading.Thread | None = None
    buffer: list[StreamedTweet] = field(default_factory=list)
    oldest: float = 0.0
    failure: SourceError | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class XStreams:
    """The filtered-stream connections of this process (see the module docstring).

    Not thread-safe: ``tick`` and ``stop`` are called from the run loop's thread; the
    streams' own threads only buffer tweets, flush them and backfill.
    """

    def __init__(self) -> None:
        self._connections: dict[str, _Connection] = {}
        self._unavailable_until: dict[str, float] = {}

    def streaming_ids(self) -> set[int]:
        """Ids of the sources a live stream serves: the run loop does not poll them."""
        return {sid for c in self._connections.values() if c.alive for sid in c.queries}

    def tick(self, now: datetime | None = None) -> None:
        """Flush what the streams buffered; stop streams whose sources changed or that
        gave up (recording why on their sources); start the ones that are missing.

        Side effects: staged batches, cursors, source errors, X's rules, threads.
        """
        now = now or datetime.now(UTC)
        for key, conn in list(self._connections.items()):
            self._flush(conn)
            if not conn.alive:
                self._close(key, conn, now)  # it gave up: why is recorded first
        wanted = self._wanted(now)
        for key, conn in list(self._connections.items()):
            if wanted.get(key) != conn.queries:
                self._close(key, conn, now)
        for key, (token, queries) in wanted.items():
            if key not in self._connections:
                self._open(key, token, queries, now)

    def stop(self) -> None:
        """Disconnect every stream, wait for its thread, and stage what it buffered."""
        for conn in self._connections.values():
            if conn.stream is not None:
                conn.stream.disconnect()
        for conn in self._connections.values():
            if conn.thread is not None:
                conn.thread.join(JOIN_TIMEOUT_S)
            self._flush(conn, force=True)
        self._connections.clear()

    def _wanted(self, now: datetime) -> dict[str, tuple[str, dict[int, str]]]:
        """Token key → (token, source id → query) for the sources that should stream now."""
        groups: dict[str, tuple[str, dict[int, str]]] = {}
        sources = Source.objects.filter(kind=Source.Kind.X, enabled=True).order_by("id")
        for source in sources:
            if not streams(source):
                continue
            if source.last_error and source.error_permanent:
                continue  # waits to be edited
            retry_at = retry_at_of(source)
            if retry_at is not None and retry_at > now:
                continue
            token = str(credentials.unseal(source.credentials).get("bearer_token") or "")
            if not token:
                continue
            key = hashlib.sha256(token.encode()).hexdigest()[:16]
            if self._unavailable_until.get(key, 0.0) > time.monotonic():
                continue
            keywords = list(source.config.get("keywords") or [])
            groups.setdefault(key, (token, {}))[1][source.id] = build_query(keywords)
        return groups

    def _open(self, key: str, token: str, queries: dict[int, str], now: datetime) -> None:
        conn = _Connection(token=token, queries=dict(queries))
        stream = XStream(
            token,
            on_tweet=lambda tweet: self._take(conn, tweet),
            on_connected=lambda: self._backfill(conn),
            on_malformed=lambda line, reason: self._park(conn, line, reason),
            on_failure=lambda failure: setattr(conn, "failure", conn.failure or failure),
        )
        try:
            sync_rules(stream, queries)
        except SourceError as exc:
            self._failed(key, conn, exc, now)
            return
        conn.stream = stream
        conn.thread = stream.start()
        self._connections[key] = conn
        log.info("x.stream_started", sources=sorted(queries))

    def _close(self, key: str, conn: _Connection, now: datetime) -> None:
        if conn.stream is not None:
            conn.stream.disconnect()
        if conn.thread is not None:
            conn.thread.join(JOIN_TIMEOUT_S)
        self._flush(conn, force=True)
        del self._connections[key]
        if conn.failure is not None:
            self._failed(key, conn, conn.failure, now)

    def _failed(self, key: str, conn: _Connection, failure: SourceError, now: datetime) -> None:
        """Record a stream's failure: on its sources, or, for a 403, as a switch to
        polling."""
        if isinstance(failure, StreamUnavailable):
            self._unavailable_until[key] = time.monotonic() + UNAVAILABLE_RETRY_S
            log.warning("x.stream_unavailable", sources=sorted(conn.queries), reason=failure.reason)
            return
        for source in Source.objects.filter(id__in=list(conn.queries)):
            record_failure(source, failure, now)

    def _take(self, conn: _Connection, tweet: StreamedTweet) -> None:
        """Buffer a tweet (stream thread); flush when the buffer is old or full."""
        with conn.lock:
            if not conn.buffer:
                conn.oldest = time.monotonic()
            conn.buffer.append(tweet)
        self._flush(conn)

    def _flush(self, conn: _Connection, *, force: bool = False) -> None:
        """Stage the buffered tweets per source, then move each source's ``since_id``.

        Called from the run loop and from the stream's thread; the lock keeps one flush
        at a time per connection.
        """
        with conn.lock:
            due = force or (
                conn.buffer
                and (
                    time.monotonic() - conn.oldest >= FLUSH_S
                    or len(conn.buffer) >= settings.INGEST_BATCH_SIZE
                )
            )
            if not due or not conn.buffer:
                return
            taken, conn.buffer = conn.buffer, []
            by_source: dict[int, list[Envelope]] = defaultdict(list)
            for tweet in taken:
                for sid in tweet.source_ids:
                    if sid in conn.queries:
                        by_source[sid].append(tweet.envelope)
            try:
                for source in Source.objects.filter(id__in=list(by_source)):
                    _stage(source, by_source[source.id])
            finally:
                if threading.current_thread() is not threading.main_thread():
                    connection.close()  # a stream thread's own connection

    def _backfill(self, conn: _Connection) -> None:
        """On each connect: one recent-search poll per source, for the gap."""
        try:
            for source in Source.objects.filter(id__in=list(conn.queries)):
                outcome = poll_source(source)
                log.info("x.stream_backfilled", source_id=source.id, staged=outcome.staged)
        finally:
            connection.close()

    def _park(self, conn: _Connection, line: bytes, reason: str) -> None:
        """A line that is not a tweet, as a dead-letter row (stream thread)."""
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
        digest = hashlib.sha256(text.encode()).hexdigest()
        try:
            record_dead_letters(
                stage=DeadLetter.Stage.SOURCE,
                source=None,
                items=[(f"not a tweet: {reason}", {"line": text[:10000], "sources": []})],
                keys=[f"x-stream:{digest}"],
            )
        finally:
            connection.close()
        log.warning("x.stream_malformed_line", reason=reason, sources=sorted(conn.queries))


def _stage(source: Source, envelopes: list[Envelope]) -> None:
    """Stage ``envelopes`` of ``source`` and move its ``since_id`` past them."""
    fresh, _seen = only_new(source, envelopes)
    size = settings.INGEST_BATCH_SIZE
    for start in range(0, len(fresh), size):
        enqueue_envelopes(source=source, envelopes=fresh[start : start + size])
    newest = max(int(e.external_id) for e in envelopes)
    with transaction.atomic():
        locked = Source.objects.select_for_update().get(id=source.id)
        cursor: dict[str, Any] = dict(locked.cursor or {})
        if int(cursor.get("since_id") or 0) < newest:
            cursor["since_id"] = str(newest)
            locked.cursor = cursor
            locked.save(update_fields=["cursor"])
