"""Events written out as CSV or JSON Lines, streamed from a server-side cursor.

One place encodes an export, for both ways out: ``GET /api/events/export/`` (a
``StreamingHttpResponse`` of :func:`export_chunks`'s bytes) and ``manage.py export`` (the
same chunks written to a file, with a progress bar). Memory stays constant in the number
of rows: the rows come from ``QuerySet.iterator(chunk_size=...)``, which on PostgreSQL is
a named (server-side) cursor fetched ``chunk_size`` rows at a time, and are read as
tuples (``values_list``), never model instances, and encoded ``chunk_rows`` at a time.

Under autocommit Django declares that cursor ``WITH HOLD``, so PostgreSQL keeps the rest
of the result on its side (spilling to a temporary file past ``work_mem``) once the
query has run; the web process holds one chunk at a time.

The fields (``EVENT_FIELDS``) are the API's event representation
(``ingest.api.serializers.EventSerializer``): JSON Lines has one such object per line
(``author`` nested as ``{id, handle, name, followers}``, datetimes in ISO 8601 UTC with
``Z``). CSV has a header row and one row per event, with ``author`` flattened into
``author_id``, ``author_handle``, ``author_name``, ``author_followers``; lists and
objects (``hashtags``, ``metrics``, ``*_scores``...) are JSON text and null is an empty
cell. Cells are the stored text as is (quoted by Python's ``csv`` module, never
rewritten): a spreadsheet may read a cell starting with ``=``, ``+``, ``-`` or ``@`` as a
formula.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, Final

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import QuerySet

from ingest.models import Event

FORMATS: Final = ("csv", "jsonl")
"""The export formats: ``csv`` (a header row, RFC 4180 quoting) and ``jsonl`` (one JSON
object per line)."""

CONTENT_TYPES: Final = {"csv": "text/csv; charset=utf-8", "jsonl": "application/jsonl"}
"""The media type of each format."""

CURSOR_CHUNK_ROWS: Final = 2000
"""Rows fetched from the server-side cursor per round trip."""

ENCODE_CHUNK_ROWS: Final = 500
"""Rows encoded into one bytes chunk (a chunk of the HTTP body, or one file write)."""

EXPORT_ORDERING: Final = ("-created_at", "-id")
"""The order of an export whose queryset has none: the events list's."""

_AUTHOR: Final = ("author_id", "author_handle", "author_name", "author_followers")

EVENT_FIELDS: Final = (
    *("id", "source", "external_id", "created_at", "received_at", "author"),
    *("text", "lang", "url", "reply_to", "repost_of", "quote_of", "metrics"),
    *("hashtags", "mentions", "cashtags", "urls", "keywords", "sentiment"),
    *("sentiment_label", "sentiment_scores", "sentiment_model"),
    *("emotion", "emotion_scores", "emotion_model"),
    *("offensive", "offensive_scores", "offensive_model"),
    *("virality_score", "virality_model", "enriched_at", "scored_at"),
)
"""The fields of an event, in order: those of the API's event representation
(``EventSerializer``) and of an export."""

_COLUMNS: Final = tuple(
    column
    for field in EVENT_FIELDS
    for column in (_AUTHOR if field == "author" else ("source_id" if field == "source" else field,))
)
"""The model columns read for :data:`EVENT_FIELDS`, in order (``author`` is four)."""

CSV_HEADER: Final = tuple(
    column for field in EVENT_FIELDS for column in (_AUTHOR if field == "author" else (field,))
)
"""The CSV header row: :data:`EVENT_FIELDS` with ``author`` flattened."""

_DATETIMES: Final = frozenset(
    field.attname
    for field in Event._meta.concrete_fields
    if isinstance(field, models.DateTimeField)
)
_STRUCTURED: Final = frozenset(
    field.attname
    for field in Event._meta.concrete_fields
    if isinstance(field, (models.JSONField, ArrayField))
)
"""Columns of lists and objects: JSON text in a CSV cell."""


def _iso(value: datetime | None) -> str | None:
    """DRF's rendering of an aware UTC datetime: ISO 8601 with ``Z`` for ``+00:00``."""
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


_DATETIME_AT: Final = tuple(i for i, c in enumerate(_COLUMNS) if c in _DATETIMES)
_AUTHOR_AT: Final = _COLUMNS.index("author_id")


def _as_object(row: Sequence[Any]) -> dict[str, Any]:
    """One row of :data:`_COLUMNS` as the API's event object (the JSON Lines line)."""
    values = list(row)
    for i in _DATETIME_AT:
        values[i] = _iso(values[i])
    author = dict(
        zip(("id", "handle", "name", "followers"), values[_AUTHOR_AT : _AUTHOR_AT + 4], strict=True)
    )
    values[_AUTHOR_AT : _AUTHOR_AT + 4] = [author]
    return dict(zip(EVENT_FIELDS, values, strict=True))


_STRUCTURED_AT: Final = tuple(i for i, c in enumerate(_COLUMNS) if c in _STRUCTURED)


def _as_csv_row(row: Sequence[Any]) -> list[Any]:
    """One row of :data:`_COLUMNS` as CSV cells, in :data:`CSV_HEADER`'s order."""
    values = list(row)
    for i in _DATETIME_AT:
        values[i] = _iso(values[i])
    for i in _STRUCTURED_AT:
        if values[i] is not None:
            values[i] = json.dumps(values[i], ensure_ascii=False, separators=(",", ":"))
    return values


def export_rows(queryset: QuerySet[Event]) -> Iterator[tuple[Any, ...]]:
    """The rows of ``queryset`` as tuples of the export's columns, from a server-side
    cursor (``CURSOR_CHUNK_ROWS`` rows a fetch). Keeps ``queryset``'s filters and its
    ordering if it has one, else newest event time first (``-created_at``, ``-id``: the
    events list's order). Lazy: the query runs at the first ``next``."""
    if not queryset.ordered:
        queryset = queryset.order_by(*EXPORT_ORDERING)
    return queryset.values_list(*_COLUMNS).iterator(chunk_size=CURSOR_CHUNK_ROWS)


def _encode_csv(rows: Iterator[tuple[Any, ...]], chunk_rows: int) -> Iterator[tuple[bytes, int]]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    pending = 0
    for row in rows:
        writer.writerow(_as_csv_row(row))
        pending += 1
        if pending == chunk_rows:
            yield buffer.getvalue().encode(), pending
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    yield buffer.getvalue().encode(), pending


def _encode_jsonl(rows: Iterator[tuple[Any, ...]], chunk_rows: int) -> Iterator[tuple[bytes, int]]:
    lines: list[str] = []
    for row in rows:
        lines.append(json.dumps(_as_object(row), ensure_ascii=False, separators=(",", ":")))
        if len(lines) == chunk_rows:
            yield ("\n".join(lines) + "\n").encode(), len(lines)
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n").encode(), len(lines)


_ENCODERS: Final[
    dict[str, Callable[[Iterator[tuple[Any, ...]], int], Iterator[tuple[bytes, int]]]]
] = {
    "csv": _encode_csv,
    "jsonl": _encode_jsonl,
}


def export_chunks(
    queryset: QuerySet[Event], fmt: str, *, chunk_rows: int = ENCODE_CHUNK_ROWS
) -> Iterator[tuple[bytes, int]]:
    """``queryset``'s events encoded as ``fmt``, as ``(UTF-8 bytes, rows in them)`` pairs
    of up to ``chunk_rows`` rows each (a CSV's first chunk also holds the header row;
    the row counts sum to the number of events). Lazy and constant in memory: nothing
    is queried until the first ``next``, and one chunk is held at a time.

    Raises:
        ValueError: ``fmt`` is not one of :data:`FORMATS` (raised at the call).
    """
    try:
        encode = _ENCODERS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}"
        ) from None
    return encode(export_rows(queryset), chunk_rows)


def export_filename(fmt: str, stamp: datetime) -> str:
    """The download's file name: ``twiscope-events-<UTC stamp>.<fmt>``."""
    return f"twiscope-events-{stamp:%Y%m%dT%H%M%SZ}.{fmt}"
