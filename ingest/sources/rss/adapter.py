"""The RSS/Atom adapter: a ``Source`` of kind ``"rss"`` polls one feed URL.

``config``: ``{"url": "<http(s) feed URL>", "poll_interval_s": <60..86400, default
300>}``. Each poll is a conditional GET (``If-None-Match`` with the last ``ETag``,
``If-Modified-Since`` with the last ``Last-Modified``; RFC 9110 §13.1); a 304 yields
nothing. feedparser (https://feedparser.readthedocs.io) reads the document: RSS 2.0,
RSS 1.0 and Atom, any declared or sniffed encoding, and dates in the formats real feeds
use (RFC 822 with or without day names or zones, ISO 8601/W3CDTF, and localised month
names), normalised to UTC. A feed it can read only in part (``bozo``: malformed XML, a
wrong declared encoding) still gives its items, and the problem is reported in
``Poll.problem``.

An item's ``external_id`` is its guid (RSS) or id (Atom), else its link, else a hash of
its title and date; ids over 128 characters become ``sha1:<hex>`` of themselves. Its
text is the title and the summary (or content), HTML reduced to text.
"""

from __future__ import annotations

import calendar
import hashlib
from datetime import UTC, datetime
from typing import Any, ClassVar

import feedparser
import requests
import structlog
from bs4 import BeautifulSoup

from ingest.envelope import MAX_TEXT_CHARS, Author, Envelope, clean_text
from ingest.sources import http
from ingest.sources.base import Poll, PollingAdapter, SourceError
from ingest.sources.registry import register

log = structlog.get_logger(__name__)

DEFAULT_POLL_INTERVAL_S = 300
MIN_POLL_INTERVAL_S = 60
MAX_POLL_INTERVAL_S = 86400
PERMANENT_STATUSES = frozenset({401, 403, 404, 410})
"""HTTP statuses that mean the feed is gone or closed to us: retrying cannot help."""


def html_to_text(value: str) -> str:
    """``value`` (HTML or plain text) as plain text: tags dropped, entities decoded,
    blocks separated by spaces, whitespace collapsed (BeautifulSoup's ``get_text``)."""
    if "<" in value or "&" in value:
        value = BeautifulSoup(value, "html.parser").get_text(" ")
    return clean_text(" ".join(value.split()))


def _external_id(entry: Any, title: str, when: datetime | None) -> str:
    raw = str(entry.get("id") or entry.get("guid") or entry.get("link") or "").strip()
    if not raw:
        raw = "title:" + title + "|" + (when.isoformat() if when else "")
    if len(raw) > 128:
        return "sha1:" + hashlib.sha1(raw.encode()).hexdigest()
    return raw


def _entry_time(entry: Any) -> datetime | None:
    for name in ("published_parsed", "updated_parsed", "created_parsed"):
        parsed = entry.get(name)
        if parsed:
            return datetime.fromtimestamp(calendar.timegm(parsed), tz=UTC)
    return None


def entry_envelope(entry: Any, *, fetched_at: datetime) -> Envelope:
    """One feed entry (a feedparser ``FeedParserDict``) as an envelope. Event time is
    the entry's published (else updated) date, else ``fetched_at``."""
    title = html_to_text(str(entry.get("title") or ""))
    body = ""
    if entry.get("content"):
        body = str(entry["content"][0].get("value") or "")
    body = body or str(entry.get("summary") or "")
    text = html_to_text(body)
    if title and not text.startswith(title):
        text = f"{title}. {text}" if text else title
    when = _entry_time(entry)
    author = str(entry.get("author") or "")[:128]
    return Envelope(
        external_id=_external_id(entry, title, when),
        created_at=when or fetched_at,
        text=text[:MAX_TEXT_CHARS],
        author=Author(handle=author, name=author),
        url=str(entry.get("link") or "")[:2000],
        raw={"title": title[:500], "tags": [t.get("term") for t in entry.get("tags", [])][:20]},
    )


@register
class RssAdapter(PollingAdapter):
    """Polls ``source.config["url"]`` (see the module docstring); resumes from
    ``source.cursor`` (``etag``, ``last_modified``)."""

    kind: ClassVar[str] = "rss"
    default_poll_interval_s: ClassVar[int] = DEFAULT_POLL_INTERVAL_S

    def poll(self) -> Poll:
        """Fetch the feed once, conditionally.

        Raises:
            SourceError: permanent for a refused URL (SSRF guard), a 401/403/404/410,
                or a document that is no feed at all; temporary for a timeout, a
                connection failure, a 429 or 5xx (``retry_after_s`` from
                ``Retry-After``), or an oversized document.
        """
        url = str(self.source.config.get("url", ""))
        cursor = self.source.cursor or {}
        headers = {}
        if cursor.get("etag"):
            headers["If-None-Match"] = str(cursor["etag"])
        if cursor.get("last_modified"):
            headers["If-Modified-Since"] = str(cursor["last_modified"])
        try:
            response = http.fetch(url, headers=headers)
        except http.UnsafeURL as exc:
            raise SourceError(str(exc), permanent=True) from None
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            failed = exc.response
            retry_after = failed.headers.get("Retry-After") if failed is not None else None
            raise SourceError(
                f"HTTP {status} from {url}",
                permanent=status in PERMANENT_STATUSES,
                retry_after_s=_seconds(retry_after),
            ) from None
        except (requests.RequestException, ValueError) as exc:
            raise SourceError(f"fetching {url}: {exc}", permanent=False) from None
        kept = {
            k: v
            for k, v in (
                ("etag", response.headers.get("etag")),
                ("last_modified", response.headers.get("last-modified")),
            )
            if v
        }
        if response.status == 304:
            return Poll(cursor={**cursor, **kept} if kept else dict(cursor), not_modified=True)
        parsed = feedparser.parse(response.body, response_headers=response.headers)
        if not parsed.entries and not parsed.get("version"):
            reason = str(parsed.get("bozo_exception") or "no items")
            raise SourceError(f"{url} is not an RSS or Atom feed: {reason}", permanent=True)
        now = datetime.now(UTC)
        envelopes = []
        for entry in parsed.entries:
            try:
                envelopes.append(entry_envelope(entry, fetched_at=now))
            except (TypeError, ValueError, OverflowError) as exc:
                log.warning("rss.item_skipped", source_id=self.source.id, reason=str(exc))
        problem = str(parsed.get("bozo_exception") or "") if parsed.get("bozo") else ""
        return Poll(envelopes=envelopes, cursor=kept, problem=problem[:500])


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` value (delay seconds, or an HTTP date) as seconds from now."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None
