"""Archive formats Twiscope can replay: detection from content, and streaming parsers.

Formats (the names ``detect_format`` returns and ``read_archive`` takes):

``airline_csv``
    Twitter US Airline Sentiment (``Tweets.csv``): ``tweet_id``, ``tweet_created`` like
    ``2015-02-24 11:35:52 -0800``, ``name`` (the poster's handle), ``retweet_count``.
``trump_csv``
    The dslabs Trump archive: ``id_str``, ``created_at`` like ``2009-12-23T17:38:18Z``,
    ``retweet_count``, ``favorite_count``; one account.
``crisislex_csv``
    CrisisLexT26 ``*-tweets_labeled.csv``: ``Tweet ID, Tweet Text, ...`` and no time
    column: event time follows from the snowflake id (see ``rows.snowflake_time``).
``telegram_json``
    One JSON array of ``{message_id, sender_id, text, date, channel, category}``.
``x_v2_jsonl``
    X API v2, one JSON object a line: a response page ``{"data": [...], "includes":
    {"users": [...]}}``, a single-tweet response ``{"data": {...}, ...}`` or a bare
    tweet object with ``id``, ``text``, ``author_id``.
``x_v1_jsonl``
    X API v1.1 statuses, one a line (``id_str``, ``user``, ``created_at`` like
    ``Wed Oct 10 20:19:24 +0000 2018``).

Every parser streams (the Telegram array excepted: one JSON document, read whole) and
yields an ``Envelope`` per post or a ``RowError`` per row it cannot use, then goes on.
Bytes are decoded as UTF-8 one physical line at a time with ``errors="replace"``, so an
undecodable byte costs one replacement character, never the file.

This module tells a file's format and hands it to its parser: ``csv_archives`` (airline,
trump, CrisisLexT26), ``telegram_archive``, ``x_archives`` (v2, v1.1); ``rows`` holds
``RowError`` and the field helpers they share.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from ingest.envelope import Envelope
from ingest.sources.replay.csv_archives import (
    AIRLINE_COLUMNS,
    CRISISLEX_COLUMNS,
    TRUMP_COLUMNS,
    airline_envelope,
    crisislex_envelope,
    read_csv,
    trump_envelope,
)
from ingest.sources.replay.rows import RowError, skip_ws
from ingest.sources.replay.telegram_archive import read_telegram
from ingest.sources.replay.x_archives import V1_TIME_RE, read_jsonl, x_v1_items, x_v2_items

AIRLINE_CSV: Final = "airline_csv"
TRUMP_CSV: Final = "trump_csv"
CRISISLEX_CSV: Final = "crisislex_csv"
TELEGRAM_JSON: Final = "telegram_json"
X_V2_JSONL: Final = "x_v2_jsonl"
X_V1_JSONL: Final = "x_v1_jsonl"
FORMATS: Final = (AIRLINE_CSV, TRUMP_CSV, CRISISLEX_CSV, TELEGRAM_JSON, X_V2_JSONL, X_V1_JSONL)

DETECT_BYTES: Final = 64 * 1024
"""Detection reads this much of a CSV or JSON-array file."""
DETECT_JSONL_LINES: Final = 5
DETECT_JSONL_LINE_BYTES: Final = 8 * 1024 * 1024
"""Detection of JSONL reads up to this many non-blank lines of at most this many bytes
(a v2 response page is one long line)."""


class ArchiveFormatError(ValueError):
    """The file's format cannot be told (or is not one of ``FORMATS``)."""


# --- Detection --------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    """Tell a file's archive format (one of ``FORMATS``) from its first bytes or lines.

    Raises:
        ArchiveFormatError: empty file, or content that matches no known format.
        OSError: the file cannot be read.
    """
    with path.open("rb") as fh:
        head = fh.read(DETECT_BYTES)
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    stripped = text.lstrip()
    if not stripped:
        raise ArchiveFormatError(f"{path}: empty file, nothing to tell its format by")
    if stripped[0] == "[":
        return _detect_json_array(path, stripped)
    if stripped[0] == "{":
        return _detect_jsonl(path)
    return _detect_csv(path, text)


def _detect_csv(path: Path, text: str) -> str:
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    header = {name.strip() for name in next(csv.reader([first_line]), [])}
    for fmt, columns in (
        (AIRLINE_CSV, AIRLINE_COLUMNS),
        (TRUMP_CSV, TRUMP_COLUMNS),
        (CRISISLEX_CSV, CRISISLEX_COLUMNS),
    ):
        if columns <= header:
            return fmt
    shown = ", ".join(sorted(header))[:300]
    raise ArchiveFormatError(
        f"{path}: not a known archive: the first line is not the header of an airline, "
        f"trump or CrisisLexT26 CSV, nor JSON (columns: {shown})"
    )


def _detect_json_array(path: Path, text: str) -> str:
    decoder = json.JSONDecoder()
    pos = skip_ws(text, 1)
    if pos < len(text) and text[pos] == "]":
        raise ArchiveFormatError(f"{path}: empty JSON array, nothing to tell its format by")
    try:
        first, _ = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        raise ArchiveFormatError(
            f"{path}: a JSON array whose first item cannot be read within "
            f"{DETECT_BYTES} bytes ({exc.msg})"
        ) from exc
    if isinstance(first, dict) and {"message_id", "sender_id", "date"} <= first.keys():
        return TELEGRAM_JSON
    keys = ", ".join(sorted(first))[:300] if isinstance(first, dict) else type(first).__name__
    raise ArchiveFormatError(
        f"{path}: a JSON array, but its first item is not a Telegram message "
        f"(message_id, sender_id, date); found: {keys}"
    )


def _detect_jsonl(path: Path) -> str:
    seen = 0
    with path.open("rb") as fh:
        while seen < DETECT_JSONL_LINES:
            data = fh.readline(DETECT_JSONL_LINE_BYTES)
            if not data:
                break
            line = data.decode("utf-8", errors="replace").strip().lstrip("\ufeff")
            if not line:
                continue
            seen += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a broken first row must not hide the format of the rest
            fmt = _classify_x(obj)
            if fmt is not None:
                return fmt
    raise ArchiveFormatError(
        f"{path}: JSON lines, but none of the first {DETECT_JSONL_LINES} is an X API v2 "
        "response or tweet (data, or id + text + author_id) or a v1.1 status "
        "(id_str + user, or a v1.1 created_at)"
    )


def _classify_x(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("data"), dict | list) or {"id", "text", "author_id"} <= obj.keys():
        return X_V2_JSONL
    if isinstance(obj.get("user"), dict) and ("id_str" in obj or "id" in obj):
        return X_V1_JSONL
    created = obj.get("created_at")
    if "id_str" in obj and isinstance(created, str) and V1_TIME_RE.match(created):
        return X_V1_JSONL
    return None


# --- Reading ----------------------------------------------------------------------------


def read_archive(path: Path, fmt: str | None = None) -> Iterator[Envelope | RowError]:
    """Stream ``path``'s posts as envelopes, and a ``RowError`` for each unusable row.

    ``fmt`` is one of ``FORMATS``; ``None`` detects it (``detect_format``). Rows come
    in file order (not sorted by time). Format errors and a missing file raise at the
    call; read errors raise from the iterator.

    Raises:
        ArchiveFormatError: ``fmt`` is unknown, or ``None`` and cannot be detected.
        OSError: the file cannot be read.
    """
    if fmt is None:
        fmt = detect_format(path)
    parser = _PARSERS.get(fmt)
    if parser is None:
        raise ArchiveFormatError(f"unknown archive format {fmt!r}; known: {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"no such archive file: {path}")
    return parser(path)


_PARSERS: dict[str, Callable[[Path], Iterator[Envelope | RowError]]] = {
    AIRLINE_CSV: lambda path: read_csv(path, airline_envelope),
    TRUMP_CSV: lambda path: read_csv(path, trump_envelope),
    CRISISLEX_CSV: lambda path: read_csv(path, crisislex_envelope),
    TELEGRAM_JSON: read_telegram,
    X_V2_JSONL: lambda path: read_jsonl(path, x_v2_items),
    X_V1_JSONL: lambda path: read_jsonl(path, x_v1_items),
}
