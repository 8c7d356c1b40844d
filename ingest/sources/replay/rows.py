"""Rows of an archive: the error a bad row becomes, and the field helpers every parser uses.

A row needs an id and a parseable, UTC-offset event time; other fields are best effort
(a malformed count is left out of ``metrics``). Every envelope passes
``Envelope.from_json`` validation (``validated``), so the persist stage will accept it.
A parser raises ``RowProblem`` for a row it cannot use and turns it into a ``RowError``
(``row_reason``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from ingest.envelope import Envelope, EnvelopeError, clean_text

MAX_RAW_CHARS: Final = 2_000
"""A ``RowError.raw`` keeps at most this many characters of the row."""

SNOWFLAKE_EPOCH_MS: Final = 1_288_834_974_657
"""X snowflake ids: ms since the Unix epoch = (id >> 22) + this (2010-11-04T01:42:54.657Z)."""
FIRST_SNOWFLAKE_ID: Final = 60_000 << 22
"""Ids below this (an implied time within a minute of the snowflake epoch, ~2.5e11) are
the sequential ids of before November 2010 (they had reached only ~3e10), which carry
no time."""


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


class RowProblem(Exception):
    """Why one row cannot become an envelope (becomes ``RowError.reason``)."""


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


def validated(envelope: Envelope) -> Envelope:
    """The envelope as the persist stage will rebuild it (same checks, same trimming).

    Raises:
        EnvelopeError: a field the pipeline would refuse.
    """
    return Envelope.from_json(envelope.to_json())


def row_reason(exc: Exception) -> str:
    """The ``RowError.reason`` of a ``RowProblem`` or an ``EnvelopeError``."""
    if isinstance(exc, EnvelopeError):
        return f"invalid envelope: {exc}"
    return str(exc)


def require_id(value: Any, field: str) -> str:
    """A non-empty id (an int or a string, stripped) as a string.

    Raises:
        RowProblem: missing, empty, or of another type.
    """
    if value is None or value == "":
        raise RowProblem(f"missing id: {field} is empty")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RowProblem(f"bad id: {field} must be a string or integer, not {value!r}"[:200])
    stripped: str = value.strip()
    if not stripped:
        raise RowProblem(f"missing id: {field} is empty")
    return stripped


def parse_tweet_id(value: Any, field: str) -> str:
    """A numeric tweet id (``require_id``, ASCII digits only).

    Raises:
        RowProblem: missing, or not all digits.
    """
    tweet_id = require_id(value, field)
    if not tweet_id.isascii() or not tweet_id.isdigit():
        raise RowProblem(f"bad id: {field} {tweet_id[:64]!r} is not a numeric tweet id")
    return tweet_id


def optional_id(value: Any) -> str:
    """An id as a string (an int or a stripped string); "" for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value.strip() if isinstance(value, str) else ""


def optional_str(value: Any) -> str:
    """``value`` when it is a string, else ""."""
    return value if isinstance(value, str) else ""


SPACED_OFFSET = "%Y-%m-%d %H:%M:%S %z"


def parse_time(value: Any, field: str, fmt: str | None = None) -> datetime:
    """A UTC datetime from ISO 8601 (``fmt`` None) or ``strptime`` format ``fmt``."""
    if not isinstance(value, str) or not value.strip():
        raise RowProblem(f"missing time: {field} is empty")
    value = value.strip()
    if fmt == SPACED_OFFSET and len(value) == 25 and value[19] == " ":
        # "2015-02-24 11:35:52 -0800" is ISO 8601 but for the space before the offset;
        # fromisoformat reads it without the space ten times faster than strptime.
        value = value[:19] + value[20:]
        fmt = None
    try:
        parsed = datetime.strptime(value, fmt) if fmt else datetime.fromisoformat(value)
    except ValueError as exc:
        raise RowProblem(f"bad time: {field} {value[:64]!r} is not a date and time") from exc
    if parsed.tzinfo is None:
        raise RowProblem(f"bad time: {field} {value[:64]!r} has no UTC offset")
    return parsed.astimezone(UTC)


def parse_count(value: Any) -> int | None:
    """A non-negative count from an int or a string of digits; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isascii() and value.isdigit() else None
    return None


def metrics_of(source: dict[str, Any], names: dict[str, str]) -> dict[str, int]:
    """``{our metric name: count}`` for the source fields present and well formed."""
    metrics = {}
    for field, name in names.items():
        count = parse_count(source.get(field))
        if count is not None:
            metrics[name] = count
    return metrics


def status_url(handle: str, tweet_id: str) -> str:
    """The post's X URL; "" without a handle."""
    return f"https://x.com/{handle}/status/{tweet_id}" if handle else ""


def scrub(value: Any) -> Any:
    """``value`` without NUL characters in any string (PostgreSQL jsonb refuses them)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        if all(type(k) is str and type(v) is str for k, v in value.items()):
            # A CSV row: one pass with no call per cell (a replay reads tens of thousands).
            return {k.replace("\x00", ""): v.replace("\x00", "") for k, v in value.items()}
        return {clean_text(str(k)): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def skip_ws(text: str, pos: int) -> int:
    """The first position at or after ``pos`` that is not JSON whitespace."""
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos
