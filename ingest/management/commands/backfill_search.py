"""``manage.py backfill_search``: give the events enriched before full-text search
existed their ``search_vector`` (new events get it from the enrich stage).

A command, not a data migration: on millions of rows one migration would be one long
transaction (every row locked until the end, the WAL of the whole table at once, and
``migrate`` blocked for as long). This walks the ids in ranges of ``--batch`` (default
5,000), one short transaction each (``ingest.services.backfill_search_vectors``), so the
pipeline keeps writing meanwhile; it can be stopped and run again at any time (it skips
rows that have a vector). ``--rebuild`` rewrites every vector (after the language
mapping, ``ingest.search.LANGUAGE_CONFIGS``, changed). Run ``ANALYZE ingest_event``
after a large backfill, so the planner knows the new column.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import Max, Min

from ingest import services
from ingest.models import Event


class Command(BaseCommand):
    help = "Fill the full-text search vector of events enriched before it existed, in batches."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch", type=int, default=5000, help="ids per transaction")
        parser.add_argument(
            "--rebuild", action="store_true", help="rewrite every vector, not just missing ones"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        batch: int = options["batch"]
        if batch < 1:
            raise CommandError("--batch must be at least 1")
        bounds = Event.objects.aggregate(first=Min("id"), last=Max("id"))
        if bounds["first"] is None:
            self.stdout.write("no events")
            return
        started = time.monotonic()
        written = 0
        for first_id in range(bounds["first"], bounds["last"] + 1, batch):
            with transaction.atomic():
                written += services.backfill_search_vectors(
                    first_id=first_id, end_id=first_id + batch, rebuild=options["rebuild"]
                )
            done = min(first_id + batch, bounds["last"] + 1) - bounds["first"]
            total = bounds["last"] + 1 - bounds["first"]
            self.stdout.write(f"\rids {done}/{total}: {written} vectors written", ending="")
        self.stdout.write(f"\n{written} vectors written in {time.monotonic() - started:.1f} s")
