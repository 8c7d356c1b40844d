"""The Telegram archive: one JSON array of messages, read whole and item by item."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ingest.envelope import Author, Envelope, EnvelopeError
from ingest.sources.replay.rows import (
    MAX_RAW_CHARS,
    RowError,
    RowProblem,
    parse_time,
    require_id,
    row_reason,
    scrub,
    skip_ws,
    validated,
)


def read_telegram(path: Path) -> Iterator[Envelope | RowError]:
    """Item by item with ``raw_decode``: a broken or truncated item costs that item."""
    text = path.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
    lines = _LineCounter(text)
    decoder = json.JSONDecoder()
    pos = skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        yield RowError(1, "bad json: expected a JSON array", text[:MAX_RAW_CHARS])
        return
    pos += 1
    while True:
        pos = skip_ws(text, pos)
        if pos >= len(text):
            yield RowError(lines.at(pos), "bad json: truncated array (no closing ']')", "")
            return
        if text[pos] == "]":
            return
        if text[pos] == ",":
            pos += 1
            continue
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            resume = _next_object(decoder, text, pos + 1)
            stop = len(text) if resume is None else resume
            yield RowError(lines.at(pos), f"bad json: {exc.msg}", text[pos:stop][:MAX_RAW_CHARS])
            if resume is None:
                return
            pos = resume
            continue
        try:
            yield validated(_telegram_envelope(item))
        except (RowProblem, EnvelopeError) as exc:
            yield RowError(lines.at(pos), row_reason(exc), text[pos:end][:MAX_RAW_CHARS])
        pos = end


def _next_object(decoder: json.JSONDecoder, text: str, pos: int) -> int | None:
    """Where the next decodable JSON object starts at or after ``pos``, if anywhere."""
    while (pos := text.find("{", pos)) != -1:
        try:
            item, _ = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos += 1
            continue
        if isinstance(item, dict):
            return pos
        pos += 1
    return None


def _telegram_envelope(item: Any) -> Envelope:
    if not isinstance(item, dict):
        raise RowProblem(f"not a post: expected an object, found {type(item).__name__}")
    message_id = require_id(item.get("message_id"), "message_id")
    sender_id = require_id(item.get("sender_id"), "sender_id")
    text = item.get("text") or ""  # media posts have none; still an event
    if not isinstance(text, str):
        raise RowProblem(f"bad field: text must be a string, not {type(text).__name__}")
    channel = item.get("channel")
    return Envelope(
        external_id=f"{sender_id}/{message_id}",
        created_at=parse_time(item.get("date"), "date"),
        text=text,
        author=Author(id=sender_id, name=channel if isinstance(channel, str) else ""),
        raw=scrub(item),
    )


class _LineCounter:
    """1-based line number of a position in ``text``; positions must not go back."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line = 1

    def at(self, pos: int) -> int:
        self._line += self._text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line
