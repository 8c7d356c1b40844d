"""Streaming sources in ``manage.py run_sources``, beside the polling of
``ingest.polling``: X's filtered stream, one connection per bearer token
(``XStreams``), and Telegram's new-message events, one connection per source
(``TelegramListeners``).

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

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from django.conf import settings
from django.db import connection, transaction
from telethon import events

from ingest import credentials
from ingest.envelope import Envelope
from ingest.models import DeadLetter, Source
from ingest.persistence import enqueue_envelopes
from ingest.polling import poll_source, record_failure, retry_at_of
from ingest.services import only_new, poll_interval_s, record_dead_letters
from ingest.sources.base import SourceError
from ingest.sources.telegram.adapter import (
    TelegramAdapter,
    channel_key,
    message_envelope,
    open_client,
    read_new,
    telegram_error,
)
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


@dataclass
class _Listener:
    """One Telegram source's live connection, on a thread with its own event loop."""

    source_id: int
    version: str
    thread: threading.Thread | None = None
    loop: asyncio.AbstractEventLoop | None = None
    stopping: asyncio.Event | None = None
    failure: SourceError | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    """Set once ``loop`` and ``stopping`` exist (before connecting), or when it ended."""

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class TelegramListeners:
    """Live Telegram sources: one telethon connection per source, on its own thread.

    A Telegram source listens live unless its config says ``"live": false``. Its
    connection receives new-message events from its channels and stages each at once
    (``only_new``, ``enqueue_envelopes``). Telegram delivers a user account the new
    messages of the channels it has joined, and a bot those of the channels it
    administers; so the connection also reads each channel's history after
    ``cursor["last_ids"]`` when it opens (the gap since the last run) and then every
    ``poll_interval_s`` (``ingest.sources.telegram.adapter.read_new``), and only that
    read moves ``last_ids``. A live message is thus never what the cursor skips past,
    and one that the read finds again is dropped as already stored (or by the events'
    unique key while it is in flight).

    Failures end the connection and are recorded on the source (``telegram_error``):
    FloodWait and connection failures back off, a revoked session or an unknown channel
    fails until edited. Not thread-safe: ``tick`` and ``stop`` are for the run loop.
    """

    def __init__(self) -> None:
        self._listeners: dict[int, _Listener] = {}

    def streaming_ids(self) -> set[int]:
        """Ids of the sources listening live: the run loop does not poll them."""
        return {sid for sid, listener in self._listeners.items() if listener.alive}

    def tick(self, now: datetime | None = None) -> None:
        """Record why a connection ended, restart edited sources, start missing ones."""
        now = now or datetime.now(UTC)
        for sid, listener in list(self._listeners.items()):
            if not listener.alive:
                self._end(sid, listener, now)
        wanted = self._wanted(now)
        for sid, listener in list(self._listeners.items()):
            if wanted.get(sid) != listener.version:
                self._end(sid, listener, now)
        for sid, version in wanted.items():
            if sid not in self._listeners:
                listener = _Listener(source_id=sid, version=version)
                listener.thread = threading.Thread(
                    target=self._run, args=(listener,), name=f"telegram-{sid}", daemon=True
                )
                self._listeners[sid] = listener
                listener.thread.start()
                listener.ready.wait(JOIN_TIMEOUT_S)  # its loop exists: it can be stopped

    def stop(self) -> None:
        """Stop every connection after what it is staging, and wait for its thread."""
        for sid, listener in list(self._listeners.items()):
            self._end(sid, listener, None)

    def _wanted(self, now: datetime) -> dict[int, str]:
        """Source id → a digest of its config and credentials, for the sources that
        should listen now."""
        wanted: dict[int, str] = {}
        sources = Source.objects.filter(kind=Source.Kind.TELEGRAM, enabled=True).order_by("id")
        for source in sources:
            config = source.config if isinstance(source.config, dict) else {}
            if config.get("live", True) is False:
                continue
            if source.last_error and source.error_permanent:
                continue
            retry_at = retry_at_of(source)
            if retry_at is not None and retry_at > now:
                continue
            identity = json.dumps([config, source.credentials], sort_keys=True, default=str)
            wanted[source.id] = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return wanted

    def _end(self, sid: int, listener: _Listener, now: datetime | None) -> None:
        if listener.alive and listener.loop is not None and listener.stopping is not None:
            listener.loop.call_soon_threadsafe(listener.stopping.set)
        if listener.thread is not None:
            listener.thread.join(JOIN_TIMEOUT_S)
        del self._listeners[sid]
        if listener.failure is not None:
            for source in Source.objects.filter(id=sid):
                record_failure(source, listener.failure, now or datetime.now(UTC))

    def _run(self, listener: _Listener) -> None:
        try:
            asyncio.run(self._listen(listener))
        except Exception as exc:
            failure = telegram_error(exc)
            if failure is None:
                log.exception("telegram.listener_crashed", source_id=listener.source_id)
                failure = SourceError(f"unexpected error: {exc!r}", permanent=False)
            listener.failure = failure
        finally:
            listener.ready.set()
            connection.close()

    async def _listen(self, listener: _Listener) -> None:
        listener.loop = asyncio.get_running_loop()
        listener.stopping = asyncio.Event()
        listener.ready.set()  # it can be told to stop from here on, while it connects
        source = await asyncio.to_thread(_fresh_source, listener.source_id)
        channels = [channel_key(str(c)) for c in source.config.get("channels") or []]
        client = await open_client(
            TelegramAdapter.client_class, credentials.unseal(source.credentials)
        )
        try:
            by_peer: dict[int, str] = {}
            for channel in channels:
                try:
                    entity = await client.get_entity(channel)
                except ValueError as exc:
                    raise SourceError(f"channel {channel!r}: {exc}", permanent=True) from None
                by_peer[int(entity.id)] = channel
            staging = asyncio.Lock()

            async def on_new_message(event: Any) -> None:
                message = event.message
                channel = by_peer.get(getattr(message.peer_id, "channel_id", None) or 0)
                if channel is None or not message.message or message.date is None:
                    return
                async with staging:
                    envelope = message_envelope(message, channel)
                    await asyncio.to_thread(_stage_messages, listener.source_id, [envelope], None)

            client.add_event_handler(on_new_message, events.NewMessage(chats=list(by_peer)))
            log.info("telegram.listening", source_id=listener.source_id, channels=channels)
            interval = poll_interval_s(source)
            while not listener.stopping.is_set():
                async with staging:
                    fresh = await asyncio.to_thread(_fresh_source, listener.source_id)
                    last_ids = dict((fresh.cursor or {}).get("last_ids") or {})
                    envelopes, last_ids = await read_new(client, channels, last_ids)
                    await asyncio.to_thread(
                        _stage_messages, listener.source_id, envelopes, last_ids
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.stopping.wait(), interval)
            async with staging:
                pass  # a live message being staged is finished first
        finally:
            await client.disconnect()


def _fresh_source(source_id: int) -> Source:
    try:
        return Source.objects.get(id=source_id)
    finally:
        connection.close()


def _stage_messages(source_id: int, envelopes: list[Envelope], last_ids: dict | None) -> None:
    """Stage a Telegram source's new ``envelopes``; then, when given, save ``last_ids``
    and clear the source's last error (a worker thread of the listener's loop)."""
    try:
        source = Source.objects.get(id=source_id)
        fresh, _seen = only_new(source, envelopes)
        size = settings.INGEST_BATCH_SIZE
        for start in range(0, len(fresh), size):
            enqueue_envelopes(source=source, envelopes=fresh[start : start + size])
        if last_ids is not None:
            with transaction.atomic():
                locked = Source.objects.select_for_update().get(id=source_id)
                locked.cursor = {**(locked.cursor or {}), "last_ids": last_ids}
                for stale in ("failures", "retry_at"):
                    locked.cursor.pop(stale, None)
                locked.last_polled_at = datetime.now(UTC)
                locked.last_error, locked.error_permanent, locked.last_error_at = "", False, None
                locked.save(
                    update_fields=[
                        "cursor",
                        "last_polled_at",
                        "last_error",
                        "error_permanent",
                        "last_error_at",
                    ]
                )
        if fresh:
            log.info("telegram.staged", source_id=source_id, staged=len(fresh))
    finally:
        connection.close()
