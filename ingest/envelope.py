"""The canonical event envelope every source adapter produces (DESIGN.md).

An ``Envelope`` is what crosses from an adapter into the pipeline: adapters build one
per post, ``to_json`` turns it into the JSON-safe dict stored in a raw batch, and the
persist stage rebuilds it with ``Envelope.from_json``, which validates every field and
raises ``EnvelopeError`` (the caller dead-letters that one item and goes on).

Event times are bounded where every envelope is validated: from ``EVENT_TIME_MIN`` to
``EVENT_MAX_FUTURE_S`` (a setting, default one day) after now. A post dated further
ahead is refused, not clamped: the webhook answers a field error on ``created_at``, a
replay counts the row as skipped, and the persist stage parks it as a dead letter with
the reason (a clock error at the source is the source's to fix, and a clamped time
would put the post in a bucket it was not posted in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings

MAX_TEXT_CHARS = 20_000
MAX_ID_CHARS = 128
METRIC_NAMES = ("reposts", "likes", "replies", "quotes", "views")
MAX_FOLLOWERS = 2**31 - 1
"""``author.followers`` is stored in a PostgreSQL ``integer``."""
MAX_METRIC = 2**63 - 1
EVENT_TIME_MIN = datetime(1900, 1, 1, tzinfo=UTC)
"""The earliest event time an envelope may carry."""


def check_event_time(created_at: datetime, now: datetime | None = None) -> datetime:
    """``created_at`` (timezone-aware) in UTC, if it is from ``EVENT_TIME_MIN`` to
    ``settings.EVENT_MAX_FUTURE_S`` seconds after ``now`` (default: the clock).

    Raises:
        EnvelopeError: ``created_at: …`` naming the bound it is past.
    """
    now = now or datetime.now(UTC)
    try:
        utc = created_at.astimezone(UTC)
    except OverflowError:
        raise EnvelopeError("created_at: out of range") from None
    if utc < EVENT_TIME_MIN:
        raise EnvelopeError(f"created_at: before {EVENT_TIME_MIN.isoformat()}")
    limit = now + timedelta(seconds=settings.EVENT_MAX_FUTURE_S)
    if utc > limit:
        raise EnvelopeError(
            f"created_at: more than {settings.EVENT_MAX_FUTURE_S} s in the future "
            f"(after {limit.replace(microsecond=0).isoformat()}; EVENT_MAX_FUTURE_S)"
        )
    return utc


class EnvelopeError(ValueError):
    """An item that cannot become an event; the message says which field and why."""


def clean_text(value: str) -> str:
    """Drop NUL characters, which PostgreSQL text and jsonb refuse; keep all else."""
    return value.replace("\x00", "")


@dataclass(frozen=True, slots=True)
class Author:
    """The poster, as far as the source tells: all fields optional."""

    id: str = ""
    handle: str = ""
    name: str = ""
    followers: int | None = None

    def key(self, external_id: str) -> str:
        """A key for counting distinct authors.

        When the source does not tell the author (e.g. CrisisLexT26 rows), each post
        counts as its own author: we cannot tell two posts' authors apart, so we do
        not pretend they are the same.
        """
        return self.id or (f"@{self.handle.lower()}" if self.handle else f"?{external_id}")


@dataclass(frozen=True, slots=True)
class Envelope:
    """One post. ``created_at`` is event time and must be timezone-aware (UTC)."""

    external_id: str
    created_at: datetime
    text: str
    author: Author = field(default_factory=Author)
    lang: str = ""
    url: str = ""
    reply_to: str = ""
    repost_of: str = ""
    quote_of: str = ""
    metrics: dict[str, int] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (datetimes as ISO 8601 strings).

        ``metrics`` and ``raw`` are shared, not copied (``dataclasses.asdict`` deep-copied
        every raw payload: a third of a replay's CPU); the caller serialises the dict.
        """
        author = self.author
        return {
            "external_id": self.external_id,
            "created_at": self.created_at.astimezone(UTC).isoformat(),
            "text": self.text,
            "author": {
                "id": author.id,
                "handle": author.handle,
                "name": author.name,
                "followers": author.followers,
            },
            "lang": self.lang,
            "url": self.url,
            "reply_to": self.reply_to,
            "repost_of": self.repost_of,
            "quote_of": self.quote_of,
            "metrics": self.metrics,
            "raw": self.raw,
        }

    @classmethod
    def from_json(cls, data: Any) -> Envelope:
        """Validate and rebuild an envelope from ``to_json`` output.

        Raises:
            EnvelopeError: a missing or malformed field (the message names it).
        """
        if not isinstance(data, dict):
            raise EnvelopeError(f"envelope must be an object, not {type(data).__name__}")
        external_id = _id(data.get("external_id"), "external_id", required=True)
        created_raw = data.get("created_at")
        if not isinstance(created_raw, str):
            raise EnvelopeError("created_at: required ISO 8601 string")
        try:
            created_at = datetime.fromisoformat(created_raw)
        except ValueError as exc:
            raise EnvelopeError(f"created_at: not ISO 8601: {created_raw!r}") from exc
        if created_at.tzinfo is None:
            raise EnvelopeError("created_at: must carry a UTC offset")
        created_at = check_event_time(created_at)
        text = data.get("text", "")
        if not isinstance(text, str):
            raise EnvelopeError("text: must be a string")
        author_raw = _or_empty(data.get("author"))
        if not isinstance(author_raw, dict):
            raise EnvelopeError("author: must be an object")
        followers = author_raw.get("followers")
        if followers is not None and (
            isinstance(followers, bool)
            or not isinstance(followers, int)
            or not 0 <= followers <= MAX_FOLLOWERS
        ):
            raise EnvelopeError(
                f"author.followers: must be a whole number from 0 to {MAX_FOLLOWERS}"
            )
        metrics_raw = _or_empty(data.get("metrics"))
        if not isinstance(metrics_raw, dict):
            raise EnvelopeError("metrics: must be an object")
        metrics: dict[str, int] = {}
        for name, value in metrics_raw.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value <= MAX_METRIC
            ):
                raise EnvelopeError(f"metrics.{name}: must be a whole number from 0 to 2**63 - 1")
            metrics[str(name)] = value
        raw = _or_empty(data.get("raw"))
        if not isinstance(raw, dict):
            raise EnvelopeError("raw: must be an object")
        return cls(
            external_id=external_id,
            created_at=created_at,
            text=clean_text(text)[:MAX_TEXT_CHARS],
            author=Author(
                id=_id(author_raw.get("id"), "author.id"),
                handle=_str(author_raw.get("handle"), "author.handle", 128),
                name=_str(author_raw.get("name"), "author.name", 256),
                followers=followers,
            ),
            lang=_str(data.get("lang"), "lang", 16),
            url=_str(data.get("url"), "url", 2000),
            reply_to=_id(data.get("reply_to"), "reply_to"),
            repost_of=_id(data.get("repost_of"), "repost_of"),
            quote_of=_id(data.get("quote_of"), "quote_of"),
            metrics=metrics,
            raw=raw,
        )


def _or_empty(value: Any) -> Any:
    return {} if value is None else value


def _str(value: Any, name: str, max_chars: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EnvelopeError(f"{name}: must be a string")
    return clean_text(value)[:max_chars]


def _id(value: Any, name: str, *, required: bool = False) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None or value == "":
        if required:
            raise EnvelopeError(f"{name}: required")
        return ""
    if not isinstance(value, str):
        raise EnvelopeError(f"{name}: must be a string or integer id")
    value = clean_text(value).strip()
    if len(value) > MAX_ID_CHARS:
        raise EnvelopeError(f"{name}: longer than {MAX_ID_CHARS} characters")
    if required and not value:
        raise EnvelopeError(f"{name}: required")
    return value
