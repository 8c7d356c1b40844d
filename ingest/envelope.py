"""The canonical event envelope every source adapter produces (DESIGN.md).

An ``Envelope`` is what crosses from an adapter into the pipeline: adapters build one
per post, ``to_json`` turns it into the JSON-safe dict stored in a raw batch, and the
persist stage rebuilds it with ``Envelope.from_json``, which validates every field and
raises ``EnvelopeError`` (the caller dead-letters that one item and goes on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

MAX_TEXT_CHARS = 20_000
MAX_ID_CHARS = 128
METRIC_NAMES = ("reposts", "likes", "replies", "quotes", "views")


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
        text = data.get("text", "")
        if not isinstance(text, str):
            raise EnvelopeError("text: must be a string")
        author_raw = _or_empty(data.get("author"))
        if not isinstance(author_raw, dict):
            raise EnvelopeError("author: must be an object")
        followers = author_raw.get("followers")
        if followers is not None and (
            isinstance(followers, bool) or not isinstance(followers, int) or followers < 0
        ):
            raise EnvelopeError("author.followers: must be a non-negative integer")
        metrics_raw = _or_empty(data.get("metrics"))
        if not isinstance(metrics_raw, dict):
            raise EnvelopeError("metrics: must be an object")
        metrics: dict[str, int] = {}
        for name, value in metrics_raw.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EnvelopeError(f"metrics.{name}: must be a non-negative integer")
            metrics[str(name)] = value
        raw = _or_empty(data.get("raw"))
        if not isinstance(raw, dict):
            raise EnvelopeError("raw: must be an object")
        return cls(
            external_id=external_id,
            created_at=created_at.astimezone(UTC),
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
