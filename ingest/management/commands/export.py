"""``manage.py export``: a source's or a team's events to a CSV or JSON Lines file.

The file is exactly what ``GET /api/events/export/`` streams for the same selection (both
write ``ingest.exporting.export_chunks``), newest event time first, in constant memory.
The selection is ``--source ID`` and/or ``--team SLUG|ID`` (at least one), narrowed by
the events list's filters, each as an option of the same name (``--since``, ``--until``,
``--q``, ``--lang``, ``--term``, ``--sentiment``, ``--emotion``, ``--offensive``,
``--min-virality``...: ``ingest.api.filters.EventFilter``, read from it, so a filter
added there is an option here). A bad value is a ``CommandError`` naming the option.

The file is written beside ``--out`` as ``<out>.partial`` and renamed when complete, so
an interrupted export leaves no file that looks whole; ``--out -`` writes to stdout. A
progress bar (tqdm, on stderr, when it is a terminal) counts the rows.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import QuerySet
from tqdm import tqdm

from ingest import exporting
from ingest.api.filters import EventFilter
from ingest.models import Event, Source
from teams.models import Team

SCOPE_FILTERS = frozenset({"source"})
"""Filters of the events list that the command takes as its scope options instead."""


def filter_options() -> list[str]:
    """The events list's filters the command takes as options (``--<name>``)."""
    return [name for name in EventFilter.base_filters if name not in SCOPE_FILTERS]


def _team(value: str) -> Team:
    team = (
        Team.objects.filter(id=int(value)).first()
        if value.isdigit()
        else Team.objects.filter(slug=value).first()
    )
    if team is None:
        raise CommandError(f"--team: no team with slug or id {value!r}")
    return team


class Command(BaseCommand):
    help = "Export a source's or a team's events (with the API's filters) to CSV or JSON Lines."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--source", type=int, help="a source id")
        parser.add_argument("--team", help="a team's slug or id")
        parser.add_argument("--format", required=True, choices=exporting.FORMATS)
        parser.add_argument("--out", required=True, help="the file to write ('-': stdout)")
        for name in filter_options():
            parser.add_argument(
                f"--{name.replace('_', '-')}",
                dest=f"filter_{name}",
                metavar=name.upper(),
                help=f"the events list's {name!r} filter",
            )

    def handle(self, *args: Any, **options: Any) -> None:
        queryset = self._select(options)
        fmt: str = options["format"]
        out: str = options["out"]
        total = queryset.count()
        started = time.monotonic()
        if out == "-":
            written = self._write(queryset, fmt, sys.stdout.buffer, total)
        else:
            target = Path(out)
            partial = target.with_name(target.name + ".partial")
            try:
                with partial.open("wb") as handle:
                    written = self._write(queryset, fmt, handle, total)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        elapsed = time.monotonic() - started
        rate = written / elapsed if elapsed > 0 else 0.0
        self.stderr.write(
            f"exported {written} events to {out} ({fmt}) in {elapsed:.1f} s ({rate:,.0f} rows/s)"
        )

    def _select(self, options: dict[str, Any]) -> QuerySet[Event]:
        """The events of ``--source`` / ``--team`` that the filter options select."""
        if options["source"] is None and options["team"] is None:
            raise CommandError("give --source ID or --team SLUG|ID (or both)")
        queryset = Event.objects.all()
        if options["team"] is not None:
            queryset = queryset.filter(source__team=_team(options["team"]))
        if options["source"] is not None:
            if not Source.objects.filter(id=options["source"]).exists():
                raise CommandError(f"--source: no source with id {options['source']}")
            queryset = queryset.filter(source_id=options["source"])
        data = {
            name: options[f"filter_{name}"]
            for name in filter_options()
            if options.get(f"filter_{name}") not in (None, "")
        }
        filterset = EventFilter(data=data, queryset=queryset, request=None)
        if not filterset.is_valid():
            problems = "; ".join(
                f"--{name.replace('_', '-')}: {' '.join(messages)}"
                for name, messages in filterset.errors.items()
            )
            raise CommandError(problems)
        selected: QuerySet[Event] = filterset.qs
        return selected

    def _write(self, queryset: QuerySet[Event], fmt: str, handle: IO[bytes], total: int) -> int:
        """Writes the export to ``handle``; returns the number of events written."""
        written = 0
        with tqdm(total=total, unit="rows", unit_scale=True, file=sys.stderr, disable=None) as bar:
            for data, rows in exporting.export_chunks(queryset, fmt):
                handle.write(data)
                written += rows
                bar.update(rows)
        return written
