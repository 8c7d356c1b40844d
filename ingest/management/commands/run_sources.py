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
"""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from ingest.polling import is_due, poll_source, polling_sources
from ingest.streaming import TelegramListeners, XStreams

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
        try:
            while not stop.is_set():
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
                stop.wait(TICK_S)
        finally:
            for streams in live:
                streams.stop()
        self.stdout.write("run_sources: stopped")

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
