"""The CSV archives: Twitter US Airline Sentiment, the dslabs Trump archive, CrisisLexT26.

Each CSV is read one physical line at a time (``_Lines``), so a record the csv module
refuses, or one with the wrong column count, costs that row (``RowError``), not the file.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Final

from ingest.envelope import Author, Envelope, EnvelopeError
from ingest.sources.replay.rows import (
    MAX_RAW_CHARS,
    SPACED_OFFSET,
    RowError,
    RowProblem,
    metrics_of,
    parse_time,
    parse_tweet_id,
    row_reason,
    scrub,
    snowflake_time,
    status_url,
    validated,
)

TRUMP_HANDLE: Final = "realDonaldTrump"
TRUMP_NAME: Final = "Donald J. Trump"

AIRLINE_COLUMNS = frozenset({"tweet_id", "tweet_created", "name", "text"})
TRUMP_COLUMNS = frozenset({"id_str", "created_at", "text", "retweet_count", "favorite_count"})
CRISISLEX_COLUMNS = frozenset({"Tweet ID", "Tweet Text"})


class _Lines:
    """The physical lines of a binary file, decoded one at a time, with push-back.

    ``take`` returns the ``(line number, text)`` pairs handed out since the last
    ``take``: exactly the lines of the record the csv reader just produced.
    """

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._next_number = 1
        self._pushed: list[tuple[int, str]] = []
        self._taken: list[tuple[int, str]] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._pushed:
            item = self._pushed.pop()
        else:
            data = self._fh.readline()
            if not data:
                raise StopIteration
            item = (self._next_number, data.decode("utf-8", errors="replace"))
            self._next_number += 1
        self._taken.append(item)
        return item[1]

    @property
    def next_number(self) -> int:
        return self._pushed[-1][0] if self._pushed else self._next_number

    def take(self) -> list[tuple[int, str]]:
        taken, self._taken = self._taken, []
        return taken

    def push_back(self, items: list[tuple[int, str]]) -> None:
        self._pushed.extend(reversed(items))


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, str], str] | RowError]:
    """``(first line, row keyed by stripped header name, raw text)`` per CSV record.

    A record whose column count differs from the header's, or that the csv module
    refuses, is a ``RowError``; when it spans several lines (an unbalanced quote
    swallows the lines after it), those lines are parsed again on their own, so one
    stray quote costs one row, not the rows it swallowed.
    """
    with path.open("rb") as fh:
        lines = _Lines(fh)
        reader = csv.reader(lines)
        header: list[str] | None = None
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                taken = lines.take()
                number = taken[0][0] if taken else lines.next_number
                yield RowError(number, f"bad csv: {exc}", _raw_text(taken))
                lines.push_back(taken[1:])
                reader = csv.reader(lines)
                continue
            taken = lines.take()
            if not fields:
                continue  # blank line
            if header is None:
                header = [name.strip() for name in fields]
                header[0] = header[0].lstrip("\ufeff").strip()
                continue
            if len(fields) != len(header):
                yield RowError(
                    taken[0][0],
                    f"wrong column count: expected {len(header)}, found {len(fields)}",
                    _raw_text(taken),
                )
                if len(taken) > 1:
                    lines.push_back(taken[1:])
                    reader = csv.reader(lines)
                continue
            yield taken[0][0], dict(zip(header, fields, strict=True)), _raw_text(taken)


def read_csv(
    path: Path, to_envelope: Callable[[dict[str, str]], Envelope]
) -> Iterator[Envelope | RowError]:
    """Stream a CSV archive's rows, each made an envelope by ``to_envelope`` or a ``RowError``."""
    for record in _csv_records(path):
        if isinstance(record, RowError):
            yield record
            continue
        line, row, raw = record
        try:
            yield validated(to_envelope(row))
        except (RowProblem, EnvelopeError) as exc:
            yield RowError(line, row_reason(exc), raw)


def airline_envelope(row: dict[str, str]) -> Envelope:
    """An airline CSV row (``AIRLINE_COLUMNS``) as an envelope.

    Raises:
        RowProblem: no usable id or time.
    """
    tweet_id = parse_tweet_id(row["tweet_id"], "tweet_id")
    handle = row["name"].strip()
    return Envelope(
        external_id=tweet_id,
        created_at=parse_time(row["tweet_created"], "tweet_created", SPACED_OFFSET),
        text=row["text"],
        author=Author(handle=handle),
        url=status_url(handle, tweet_id),
        metrics=metrics_of(row, {"retweet_count": "reposts"}),
        raw=scrub(row),
    )


def trump_envelope(row: dict[str, str]) -> Envelope:
    """A Trump archive CSV row (``TRUMP_COLUMNS``) as an envelope.

    Raises:
        RowProblem: no usable id or time.
    """
    # in_reply_to_user_id_str names a user, not a post: it stays in raw only.
    tweet_id = parse_tweet_id(row["id_str"], "id_str")
    return Envelope(
        external_id=tweet_id,
        created_at=parse_time(row["created_at"], "created_at"),
        text=row["text"],
        author=Author(handle=TRUMP_HANDLE, name=TRUMP_NAME),
        url=status_url(TRUMP_HANDLE, tweet_id),
        metrics=metrics_of(row, {"retweet_count": "reposts", "favorite_count": "likes"}),
        raw=scrub(row),
    )


def crisislex_envelope(row: dict[str, str]) -> Envelope:
    """A CrisisLexT26 CSV row as an envelope; event time from the snowflake id.

    Raises:
        RowProblem: no usable id, or an id that predates snowflake ids.
    """
    # Ids may come wrapped in quotes or behind a leading apostrophe (a spreadsheet's
    # "keep as text" mark).
    tweet_id = parse_tweet_id(row["Tweet ID"].strip().strip("'\""), "Tweet ID")
    try:
        created_at = snowflake_time(int(tweet_id))
    except ValueError as exc:
        raise RowProblem(f"no event time: {exc}") from exc
    return Envelope(
        external_id=tweet_id,
        created_at=created_at,
        text=row["Tweet Text"],
        raw=scrub(row),
    )


def _raw_text(lines: list[tuple[int, str]]) -> str:
    return "".join(text for _, text in lines)[:MAX_RAW_CHARS]
