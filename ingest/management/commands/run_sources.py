"""``manage.py run_sources``: the process that runs the live sources.

It polls each enabled polling source (RSS/Atom feeds, X searches) when its interval
has passed (``poll_interval_s``; by default 300 s for a feed, 60 s for X) and its
backoff, if any, is over, one source at a time, until SIGTERM or SIGINT, which let the
poll in progress finish (its batches staged, its cursor saved) and then exit 0.
``--once`` polls every enabled polling source once, due or not, and exits (for cron
and tests); a source failing permanently is skipped until it is edited.
"""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from ingest.polling import is_due, poll_source, polling_sources

TICK_S = 5.0


class Command(BaseCommand):
    help = "Run the live sources: poll feeds and X searches when due (--once: all, once)."

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
        self.stdout.write(f"run_sources: polling due sources every {TICK_S:g} s")
        while not stop.is_set():
            now = datetime.now(UTC)
            for source in polling_sources():
                if stop.is_set():
                    break
                if is_due(source, now):
                    self._report(source, poll_source(source))
            stop.wait(TICK_S)
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
