"""``manage.py run_sources``: the process that runs the live sources.

It keeps X's filtered streams connected for the X sources that stream (one connection
per app, the gap backfilled by recent search at each connect) and a live connection
for each Telegram source (new-message events, the history read at connect and every
interval), both in ``ingest.streaming``. It polls each other enabled polling source
(RSS/Atom feeds, X searches of apps without the stream, Telegram sources with
``"live": false``) when its interval has passed (``poll_interval_s``; by default 300 s
for a feed, 60 s for X and Telegram) and its backoff, if any, is over, one source at a
time. SIGTERM or SIGINT let the poll in progress finish (its batches staged, its cursor
saved), stage what the streams buffered, and exit 0. ``--once`` polls every enabled
polling source once, due or not (streaming sources too, through recent search or the
channels' history), and exits (for cron and tests); a source failing permanently is
skipped until it is edited.

While PostgreSQL or Redis is down (``twiscope.outage.DEPENDENCY_ERRORS``), the loop
does not exit (under supervisord, exiting would crash-loop until the platform stopped):
it logs ``sources.dependency_down`` and tries again after a backoff that grows from
0.5 s to 10 s with jitter, with fresh database connections; ``sources.dependency_back``
says when a tick went through again. A poll cut off halfway is re-done at the next
due check (its cursor was not saved; duplicates are ignored at the database).
"""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime
from typing import Any

import structlog
from django.core.management.base import BaseCommand, CommandParser

from ingest.polling import is_due, poll_source, polling_sources
from ingest.streaming import TelegramListeners, XStreams
from twiscope.outage import DEPENDENCY_ERRORS, backoff_s, close_broken_connections, dependency_down

log = structlog.get_logger(__name__)

TICK_S = 1.0
"""How often (seconds) the loop flushes the streams' buffers and looks for due polls."""


class Command(BaseCommand):
    help = "Run the live sources: X streams, and polls when due (--once: poll all, once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once", action="store_true", help="poll every enabled polling source once and exit"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            for source in polling_sources():
                self._report(source, poll_source(source))
            return
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        self.stdout.write(f"run_sources: streaming, and polling due sources every {TICK_S:g} s")
        live = (XStreams(), TelegramListeners())
        failures = 0
        try:
            while not stop.is_set():
                try:
                    self._tick(live, stop)
                except DEPENDENCY_ERRORS as exc:
                    failures += 1
                    delay = backoff_s(failures)
                    log.warning(
                        "sources.dependency_down",
                        dependency=dependency_down(exc),
                        attempt=failures,
                        retry_in_s=round(delay, 2),
                        error=repr(exc)[:300],
                    )
                    close_broken_connections()
                    stop.wait(delay)
                    continue
                if failures:
                    log.info("sources.dependency_back", attempts=failures)
                    failures = 0
                stop.wait(TICK_S)
        finally:
            for streams in live:
                streams.stop()
        self.stdout.write("run_sources: stopped")

    def _tick(self, live: tuple[XStreams, TelegramListeners], stop: threading.Event) -> None:
        """One pass: flush the streams, poll each polling source that is due."""
        now = datetime.now(UTC)
        streaming: set[int] = set()
        for streams in live:
            streams.tick(now)
            streaming |= streams.streaming_ids()
        for source in polling_sources():
            if stop.is_set():
                break
            if source.id not in streaming and is_due(source, now):
                self._report(source, poll_source(source))

    def _report(self, source: Any, outcome: Any) -> None:
        if outcome.skipped:
            line = "skipped (another process is polling it)"
        elif outcome.error:
            kind = "permanent" if outcome.permanent else "temporary, will retry"
            line = f"failed ({kind}): {outcome.error}"
        elif outcome.not_modified:
            line = "not modified"
        else:
            line = f"{outcome.staged} new, {outcome.seen} already stored"
        self.stdout.write(f"{source.kind}:{source.name} (id {source.id}): {line}")
