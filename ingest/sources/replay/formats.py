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
    column: event time follows from the snowflake id (see ``snowflake_time``).
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
undecodable byte costs one replacement character, never the file. A row needs an id and
a parseable, UTC-offset event time; other fields are best effort (a malformed count is
left out of ``metrics``). Every envelope passes ``Envelope.from_json`` validation, so
the persist stage will accept it.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final

from ingest.envelope import Author, Envelope, EnvelopeError, clean_text

AIRLINE_CSV: Final = "airline_csv"
TRUMP_CSV: Final = "trump_csv"
CRISISLEX_CSV: Final = "crisislex_csv"
TELEGRAM_JSON: Final = "telegram_json"
X_V2_JSONL: Final = "x_v2_jsonl"
X_V1_JSONL: Final = "x_v1_jsonl"
FORMATS: Final = (AIRLINE_CSV, TRUMP_CSV, CRISISLEX_CSV, TELEGRAM_JSON, X_V2_JSONL, X_V1_JSONL)

MAX_RAW_CHARS: Final = 2_000
"""A ``RowError.raw`` keeps at most this many characters of the row."""

DETECT_BYTES: Final = 64 * 1024
"""Detection reads this much of a CSV or JSON-array file."""
DETECT_JSONL_LINES: Final = 5
DETECT_JSONL_LINE_BYTES: Final = 8 * 1024 * 1024
"""Detection of JSONL reads up to this many non-blank lines of at most this many bytes
(a v2 response page is one long line)."""

SNOWFLAKE_EPOCH_MS: Final = 1_288_834_974_657
"""X snowflake ids: ms since the Unix epoch = (id >> 22) + this (2010-11-04T01:42:54.657Z)."""
FIRST_SNOWFLAKE_ID: Final = 60_000 << 22
"""Ids below this (an implied time within a minute of the snowflake epoch, ~2.5e11) are
the sequential ids of before November 2010 (they had reached only ~3e10), which carry
no time."""

TRUMP_HANDLE: Final = "realDonaldTrump"
TRUMP_NAME: Final = "Donald J. Trump"

_AIRLINE_COLUMNS = frozenset({"tweet_id", "tweet_created", "name", "text"})
_TRUMP_COLUMNS = frozenset({"id_str", "created_at", "text", "retweet_count", "favorite_count"})
_CRISISLEX_COLUMNS = frozenset({"Tweet ID", "Tweet Text"})
_V1_TIME_RE = re.compile(
    r"^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?P<mon>[A-Z][a-z]{2}) (?P<day>\d{2})"
    r" (?P<h>\d{2}):(?P<m>\d{2}):(?P<s>\d{2}) (?P<tz>[+-]\d{4}) (?P<year>\d{4})$"
)
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        start=1,
    )
}
# v1.1 stream control messages: not posts and not errors.
_V1_NOTICES = frozenset(
    {"delete", "limit", "scrub_geo", "status_withheld", "user_withheld", "disconnect", "warning"}
)
_V2_METRICS = {
    "retweet_count": "reposts",
    "like_count": "likes",
    "reply_count": "replies",
    "quote_count": "quotes",
    "impression_count": "views",
}
_V1_METRICS = {
    "retweet_count": "reposts",
    "favorite_count": "likes",
    "reply_count": "replies",
    "quote_count": "quotes",
}


class ArchiveFormatError(ValueError):
    """The file's format cannot be told (or is not one of ``FORMATS``)."""


@dataclass(frozen=True, slots=True)
class RowError:
    """A row that did not become an envelope.

    ``line`` is the 1-based line of the file where the row starts; ``reason`` starts
    with a short category followed by a colon (``"bad time: ..."``); ``raw`` is the
    row's text, cut to ``MAX_RAW_CHARS``.
    """

    line: int
    reason: str
    raw: str

    @property
    def category(self) -> str:
        """The reason's short category, e.g. ``"bad time"``, for counting."""
        return self.reason.split(":", 1)[0]


class _RowProblem(Exception):
    """Internal: why one row cannot become an envelope (becomes ``RowError.reason``)."""


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
        (AIRLINE_CSV, _AIRLINE_COLUMNS),
        (TRUMP_CSV, _TRUMP_COLUMNS),
        (CRISISLEX_CSV, _CRISISLEX_COLUMNS),
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
    pos = _skip_ws(text, 1)
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
    if "id_str" in obj and isinstance(created, str) and _V1_TIME_RE.match(created):
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


def snowflake_time(tweet_id: int) -> datetime:
    """The creation time (UTC, ms precision) encoded in an X snowflake id.

    Source: X's snowflake layout (41 bits of ms since ``SNOWFLAKE_EPOCH_MS``, then
    22 bits of worker and sequence), https://github.com/twitter-archive/snowflake.

    Raises:
        ValueError: ``tweet_id`` predates snowflake ids (below ``FIRST_SNOWFLAKE_ID``).
    """
    if tweet_id < FIRST_SNOWFLAKE_ID:
        raise ValueError(f"id {tweet_id} predates snowflake ids and carries no time")
    ms = (tweet_id >> 22) + SNOWFLAKE_EPOCH_MS
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


# --- CSV --------------------------------------------------------------------------------


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


def _read_csv(
    path: Path, to_envelope: Callable[[dict[str, str]], Envelope]
) -> Iterator[Envelope | RowError]:
    for record in _csv_records(path):
        if isinstance(record, RowError):
            yield record
            continue
        line, row, raw = record
        try:
            yield _validated(to_envelope(row))
        except (_RowProblem, EnvelopeError) as exc:
            yield RowError(line, _reason(exc), raw)


def _airline_envelope(row: dict[str, str]) -> Envelope:
    tweet_id = _tweet_id(row["tweet_id"], "tweet_id")
    handle = row["name"].strip()
    return Envelope(
        external_id=tweet_id,
        created_at=_parse_time(row["tweet_created"], "tweet_created", _SPACED_OFFSET),
        text=row["text"],
        author=Author(handle=handle),
        url=_status_url(handle, tweet_id),
        metrics=_metrics(row, {"retweet_count": "reposts"}),
        raw=_scrub(row),
    )


def _trump_envelope(row: dict[str, str]) -> Envelope:
    # in_reply_to_user_id_str names a user, not a post: it stays in raw only.
    tweet_id = _tweet_id(row["id_str"], "id_str")
    return Envelope(
        external_id=tweet_id,
        created_at=_parse_time(row["created_at"], "created_at"),
        text=row["text"],
        author=Author(handle=TRUMP_HANDLE, name=TRUMP_NAME),
        url=_status_url(TRUMP_HANDLE, tweet_id),
        metrics=_metrics(row, {"retweet_count": "reposts", "favorite_count": "likes"}),
        raw=_scrub(row),
    )


def _crisislex_envelope(row: dict[str, str]) -> Envelope:
    # Ids may come wrapped in quotes or behind a leading apostrophe (a spreadsheet's
    # "keep as text" mark).
    tweet_id = _tweet_id(row["Tweet ID"].strip().strip("'\""), "Tweet ID")
    try:
        created_at = snowflake_time(int(tweet_id))
    except ValueError as exc:
        raise _RowProblem(f"no event time: {exc}") from exc
    return Envelope(
        external_id=tweet_id,
        created_at=created_at,
        text=row["Tweet Text"],
        raw=_scrub(row),
    )


# --- Telegram JSON array ----------------------------------------------------------------


def _read_telegram(path: Path) -> Iterator[Envelope | RowError]:
    """Item by item with ``raw_decode``: a broken or truncated item costs that item."""
    text = path.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
    lines = _LineCounter(text)
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        yield RowError(1, "bad json: expected a JSON array", text[:MAX_RAW_CHARS])
        return
    pos += 1
    while True:
        pos = _skip_ws(text, pos)
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
            yield _validated(_telegram_envelope(item))
        except (_RowProblem, EnvelopeError) as exc:
            yield RowError(lines.at(pos), _reason(exc), text[pos:end][:MAX_RAW_CHARS])
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
        raise _RowProblem(f"not a post: expected an object, found {type(item).__name__}")
    message_id = _require_id(item.get("message_id"), "message_id")
    sender_id = _require_id(item.get("sender_id"), "sender_id")
    text = item.get("text") or ""  # media posts have none; still an event
    if not isinstance(text, str):
        raise _RowProblem(f"bad field: text must be a string, not {type(text).__name__}")
    channel = item.get("channel")
    return Envelope(
        external_id=f"{sender_id}/{message_id}",
        created_at=_parse_time(item.get("date"), "date"),
        text=text,
        author=Author(id=sender_id, name=channel if isinstance(channel, str) else ""),
        raw=_scrub(item),
    )


# --- X JSON lines -----------------------------------------------------------------------


def _read_jsonl(
    path: Path, to_items: Callable[[Any, int, str], Iterator[Envelope | RowError]]
) -> Iterator[Envelope | RowError]:
    with path.open("rb") as fh:
        for number, data in enumerate(fh, start=1):
            line = data.decode("utf-8", errors="replace").strip().lstrip("\ufeff")
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                reason = f"bad json: {exc.msg} (column {exc.colno})"
                yield RowError(number, reason, line[:MAX_RAW_CHARS])
                continue
            yield from to_items(obj, number, line)


def _x_v2_items(obj: Any, line: int, raw: str) -> Iterator[Envelope | RowError]:
    if not isinstance(obj, dict):
        yield RowError(line, f"not a post: expected an object, found {type(obj).__name__}", raw)
        return
    data = obj.get("data")
    if isinstance(data, list):
        tweets: list[Any] = data
    elif isinstance(data, dict):
        tweets = [data]
    elif data is None and "id" in obj:
        tweets = [obj]  # a bare tweet object
    elif data is None and "errors" not in obj:
        return  # an empty page ({"meta": {"result_count": 0}}): nothing to replay
    else:
        yield RowError(line, "not a post: a v2 response without tweet data", raw[:MAX_RAW_CHARS])
        return
    users = _v2_users(obj.get("includes"))
    for tweet in tweets:
        try:
            yield _validated(_x_v2_envelope(tweet, users))
        except (_RowProblem, EnvelopeError) as exc:
            yield RowError(line, _reason(exc), _json_text(tweet))


def _v2_users(includes: Any) -> dict[str, dict[str, Any]]:
    users = includes.get("users") if isinstance(includes, dict) else None
    if not isinstance(users, list):
        return {}
    return {str(u["id"]): u for u in users if isinstance(u, dict) and u.get("id") is not None}


def _x_v2_envelope(tweet: Any, users: dict[str, dict[str, Any]]) -> Envelope:
    if not isinstance(tweet, dict):
        raise _RowProblem(f"not a post: expected a tweet object, found {type(tweet).__name__}")
    tweet_id = _tweet_id(tweet.get("id"), "id")
    author_id = _optional_id(tweet.get("author_id"))
    user = users.get(author_id, {})
    handle = _optional_str(user.get("username"))
    user_metrics = user.get("public_metrics")
    followers = (
        _count(user_metrics.get("followers_count")) if isinstance(user_metrics, dict) else None
    )
    links = {"replied_to": "", "retweeted": "", "quoted": ""}
    references = tweet.get("referenced_tweets")
    for ref in references if isinstance(references, list) else []:
        if isinstance(ref, dict) and ref.get("type") in links:
            links[ref["type"]] = _optional_id(ref.get("id"))
    public_metrics = tweet.get("public_metrics")
    # Keep the tweet in the single-tweet response shape, with its author, so that raw
    # can be parsed again by this very function.
    raw: dict[str, Any] = {"data": tweet}
    if user:
        raw["includes"] = {"users": [user]}
    return Envelope(
        external_id=tweet_id,
        created_at=_parse_time(tweet.get("created_at"), "created_at"),
        text=_optional_str(tweet.get("text")),
        author=Author(
            id=author_id,
            handle=handle,
            name=_optional_str(user.get("name")),
            followers=followers,
        ),
        lang=_optional_str(tweet.get("lang")),
        url=_status_url(handle, tweet_id),
        metrics=_metrics(public_metrics if isinstance(public_metrics, dict) else {}, _V2_METRICS),
        reply_to=links["replied_to"],
        repost_of=links["retweeted"],
        quote_of=links["quoted"],
        raw=_scrub(raw),
    )


def _x_v1_items(obj: Any, line: int, raw: str) -> Iterator[Envelope | RowError]:
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in _V1_NOTICES:
        return  # a stream notice (a deletion, a rate-limit count), not a post
    try:
        yield _validated(_x_v1_envelope(obj))
    except (_RowProblem, EnvelopeError) as exc:
        yield RowError(line, _reason(exc), raw[:MAX_RAW_CHARS])


def _x_v1_envelope(status: Any) -> Envelope:
    if not isinstance(status, dict):
        raise _RowProblem(f"not a post: expected a status object, found {type(status).__name__}")
    tweet_id = _tweet_id(status.get("id_str") or status.get("id"), "id_str")
    user_value = status.get("user")
    user: dict[str, Any] = user_value if isinstance(user_value, dict) else {}
    handle = _optional_str(user.get("screen_name"))
    extended = status.get("extended_tweet")
    text = status.get("full_text") or (
        extended.get("full_text") if isinstance(extended, dict) else None
    )
    retweeted = status.get("retweeted_status")
    quoted = status.get("quoted_status")
    return Envelope(
        external_id=tweet_id,
        created_at=_parse_v1_time(status.get("created_at")),
        text=_optional_str(text or status.get("text")),
        author=Author(
            id=_optional_id(user.get("id_str") or user.get("id")),
            handle=handle,
            name=_optional_str(user.get("name")),
            followers=_count(user.get("followers_count")),
        ),
        lang=_optional_str(status.get("lang")),
        url=_status_url(handle, tweet_id),
        reply_to=_optional_id(
            status.get("in_reply_to_status_id_str") or status.get("in_reply_to_status_id")
        ),
        repost_of=_optional_id(
            (retweeted.get("id_str") or retweeted.get("id")) if isinstance(retweeted, dict) else ""
        ),
        quote_of=_optional_id(
            status.get("quoted_status_id_str")
            or (quoted.get("id_str") if isinstance(quoted, dict) else "")
        ),
        metrics=_metrics(status, _V1_METRICS),
        raw=_scrub(status),
    )


_PARSERS: dict[str, Callable[[Path], Iterator[Envelope | RowError]]] = {
    AIRLINE_CSV: lambda path: _read_csv(path, _airline_envelope),
    TRUMP_CSV: lambda path: _read_csv(path, _trump_envelope),
    CRISISLEX_CSV: lambda path: _read_csv(path, _crisislex_envelope),
    TELEGRAM_JSON: _read_telegram,
    X_V2_JSONL: lambda path: _read_jsonl(path, _x_v2_items),
    X_V1_JSONL: lambda path: _read_jsonl(path, _x_v1_items),
}


# --- Field helpers ----------------------------------------------------------------------


def _validated(envelope: Envelope) -> Envelope:
    """The envelope as the persist stage will rebuild it (same checks, same trimming).

    Raises:
        EnvelopeError: a field the pipeline would refuse.
    """
    return Envelope.from_json(envelope.to_json())


def _reason(exc: Exception) -> str:
    if isinstance(exc, EnvelopeError):
        return f"invalid envelope: {exc}"
    return str(exc)


def _require_id(value: Any, field: str) -> str:
    if value is None or value == "":
        raise _RowProblem(f"missing id: {field} is empty")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _RowProblem(f"bad id: {field} must be a string or integer, not {value!r}"[:200])
    stripped: str = value.strip()
    if not stripped:
        raise _RowProblem(f"missing id: {field} is empty")
    return stripped


def _tweet_id(value: Any, field: str) -> str:
    tweet_id = _require_id(value, field)
    if not tweet_id.isascii() or not tweet_id.isdigit():
        raise _RowProblem(f"bad id: {field} {tweet_id[:64]!r} is not a numeric tweet id")
    return tweet_id


def _optional_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value.strip() if isinstance(value, str) else ""


def _optional_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


_SPACED_OFFSET = "%Y-%m-%d %H:%M:%S %z"


def _parse_time(value: Any, field: str, fmt: str | None = None) -> datetime:
    """A UTC datetime from ISO 8601 (``fmt`` None) or ``strptime`` format ``fmt``."""
    if not isinstance(value, str) or not value.strip():
        raise _RowProblem(f"missing time: {field} is empty")
    value = value.strip()
    if fmt == _SPACED_OFFSET and len(value) == 25 and value[19] == " ":
        # "2015-02-24 11:35:52 -0800" is ISO 8601 but for the space before the offset;
        # fromisoformat reads it without the space ten times faster than strptime.
        value = value[:19] + value[20:]
        fmt = None
    try:
        parsed = datetime.strptime(value, fmt) if fmt else datetime.fromisoformat(value)
    except ValueError as exc:
        raise _RowProblem(f"bad time: {field} {value[:64]!r} is not a date and time") from exc
    if parsed.tzinfo is None:
        raise _RowProblem(f"bad time: {field} {value[:64]!r} has no UTC offset")
    return parsed.astimezone(UTC)


def _parse_v1_time(value: Any) -> datetime:
    """``Wed Oct 10 20:19:24 +0000 2018``, read without the locale (unlike ``%a %b``)."""
    if not isinstance(value, str) or not value.strip():
        raise _RowProblem("missing time: created_at is empty")
    match = _V1_TIME_RE.match(value.strip())
    month = _MONTHS.get(match["mon"]) if match else None
    if match is None or month is None:
        raise _RowProblem(f"bad time: created_at {value[:64]!r} is not a v1.1 date and time")
    try:
        parsed = datetime.strptime(
            f"{match['year']}-{month:02d}-{match['day']} "
            f"{match['h']}:{match['m']}:{match['s']} {match['tz']}",
            "%Y-%m-%d %H:%M:%S %z",
        )
    except ValueError as exc:
        raise _RowProblem(f"bad time: created_at {value[:64]!r} is not a valid date") from exc
    return parsed.astimezone(UTC)


def _count(value: Any) -> int | None:
    """A non-negative count from an int or a string of digits; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isascii() and value.isdigit() else None
    return None


def _metrics(source: dict[str, Any], names: dict[str, str]) -> dict[str, int]:
    """``{our metric name: count}`` for the source fields present and well formed."""
    metrics = {}
    for field, name in names.items():
        count = _count(source.get(field))
        if count is not None:
            metrics[name] = count
    return metrics


def _status_url(handle: str, tweet_id: str) -> str:
    return f"https://x.com/{handle}/status/{tweet_id}" if handle else ""


def _scrub(value: Any) -> Any:
    """``value`` without NUL characters in any string (PostgreSQL jsonb refuses them)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        if all(type(k) is str and type(v) is str for k, v in value.items()):
            # A CSV row: one pass with no call per cell (a replay reads tens of thousands).
            return {k.replace("\x00", ""): v.replace("\x00", "") for k, v in value.items()}
        return {clean_text(str(k)): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _raw_text(lines: list[tuple[int, str]]) -> str:
    return "".join(text for _, text in lines)[:MAX_RAW_CHARS]


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:MAX_RAW_CHARS]


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


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
