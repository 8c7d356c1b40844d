"""The X adapter: a ``Source`` of kind ``"x"`` polls X's v2 recent search with tweepy.

``config``: ``{"keywords": [...], "poll_interval_s": <15..3600, default 60>,
"stream": <bool, default true>}``; the query is the keywords joined with ``OR`` (each
quoted when it holds a space). A source that streams is served by the filtered stream
(``ingest.sources.x.stream``, ``ingest.streaming``) and polled here only to backfill a
gap, or when the app has no filtered stream.
``credentials``: ``{"bearer_token": "..."}`` (an app's bearer token; sealed at rest).

Each poll asks ``GET /2/tweets/search/recent`` for what is newer than the last tweet
stored (``since_id``, kept in the source's cursor), 100 a page, following
``next_token`` up to ``MAX_PAGES`` pages, with the author expansion (handle, name,
followers) and the public metrics. The first poll of a source takes the newest page
only. A restart resumes from ``since_id``: nothing is lost inside the API's seven-day
window, and nothing is stored twice (the events' unique key). A poll reads at most
``MAX_PAGES`` × 100 tweets: a query busier than that per interval loses the older ones
of the interval (shorten ``poll_interval_s``).

Errors (tweepy's exceptions): 401 and 403 (a revoked or wrong token, an app without
access) and 400 (a query X refuses) are permanent; 429 is temporary and waits until
``x-rate-limit-reset``; 5xx and connection failures are temporary.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, ClassVar

import requests
import structlog
import tweepy

from ingest import credentials
from ingest.envelope import MAX_TEXT_CHARS, Author, Envelope, clean_text
from ingest.sources.base import Poll, PollingAdapter, SourceError
from ingest.sources.registry import register

log = structlog.get_logger(__name__)

DEFAULT_POLL_INTERVAL_S = 60
MIN_POLL_INTERVAL_S = 15
MAX_POLL_INTERVAL_S = 3600
MAX_KEYWORDS = 25
MAX_QUERY_CHARS = 512
MAX_PAGES = 10
TWEET_FIELDS = [
    "created_at",
    "author_id",
    "lang",
    "public_metrics",
    "referenced_tweets",
    "conversation_id",
]
USER_FIELDS = ["username", "name", "public_metrics"]


def build_query(keywords: list[str]) -> str:
    """The recent-search query of ``keywords``: ``a OR "two words" OR #tag``."""
    terms = [f'"{k}"' if " " in k else k for k in (k.strip() for k in keywords) if k]
    return " OR ".join(terms)


def tweet_envelope(tweet: dict[str, Any], users: dict[str, dict[str, Any]]) -> Envelope:
    """One v2 tweet object (and the expanded users, by id) as an envelope.

    Raises:
        ValueError: no ``id`` or no parseable ``created_at``.
    """
    tweet_id = str(tweet.get("id") or "")
    if not tweet_id.isdigit():
        raise ValueError(f"tweet without a numeric id: {tweet_id!r}")
    created_at = datetime.fromisoformat(str(tweet["created_at"]).replace("Z", "+00:00"))
    user = users.get(str(tweet.get("author_id") or ""), {})
    handle = str(user.get("username") or "")
    followers = (user.get("public_metrics") or {}).get("followers_count")
    referenced = {
        str(r.get("type")): str(r.get("id")) for r in tweet.get("referenced_tweets") or []
    }
    metrics = {
        str(k): int(v)
        for k, v in (tweet.get("public_metrics") or {}).items()
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0
    }
    return Envelope(
        external_id=tweet_id,
        created_at=created_at.astimezone(UTC),
        text=clean_text(str(tweet.get("text") or ""))[:MAX_TEXT_CHARS],
        author=Author(
            id=str(tweet.get("author_id") or ""),
            handle=handle[:128],
            name=str(user.get("name") or "")[:256],
            followers=followers if isinstance(followers, int) and followers >= 0 else None,
        ),
        lang=str(tweet.get("lang") or "")[:16],
        url=f"https://x.com/{handle or 'i'}/status/{tweet_id}",
        reply_to=referenced.get("replied_to", ""),
        repost_of=referenced.get("retweeted", ""),
        quote_of=referenced.get("quoted", ""),
        metrics=metrics,
        raw=tweet,
    )


def x_error(exc: Exception, what: str) -> SourceError:
    """A tweepy call's failure as a ``SourceError``: 400, 401 and 403 (a query X
    refuses, a revoked or wrong token, an app without access) are permanent; 429 is
    temporary and waits until ``x-rate-limit-reset``; 5xx, connection failures and
    unreadable answers are temporary. ``what`` names the call in the reason."""
    if isinstance(exc, (tweepy.Unauthorized, tweepy.Forbidden, tweepy.BadRequest)):
        return SourceError(f"X refused {what}: {exc}", permanent=True)
    if isinstance(exc, tweepy.TooManyRequests):
        reset = getattr(exc, "reset_time", None)
        wait = max(0.0, reset - time.time()) if reset else None
        return SourceError(
            "X's rate limit: waiting for its reset", permanent=False, retry_after_s=wait
        )
    if isinstance(exc, tweepy.HTTPException):
        return SourceError(f"X failed {what}: {exc}", permanent=False)
    return SourceError(f"reaching X for {what}: {exc}", permanent=False)


@register
class XAdapter(PollingAdapter):
    """Polls X's recent search for ``source.config["keywords"]`` (see the module
    docstring); resumes from ``source.cursor["since_id"]``."""

    kind: ClassVar[str] = "x"
    default_poll_interval_s: ClassVar[int] = DEFAULT_POLL_INTERVAL_S

    def poll(self) -> Poll:
        """Search once for what is newer than ``since_id``.

        Raises:
            SourceError: see the module docstring (``retry_after_s`` on a 429).
        """
        token = str(credentials.unseal(self.source.credentials).get("bearer_token") or "")
        if not token:
            raise SourceError("no bearer_token in the source's credentials", permanent=True)
        client = tweepy.Client(bearer_token=token, wait_on_rate_limit=False)
        cursor = dict(self.source.cursor or {})
        since_id = cursor.get("since_id")
        query = build_query(list(self.source.config.get("keywords") or []))
        envelopes: list[Envelope] = []
        newest = since_id
        next_token = None
        for _ in range(MAX_PAGES if since_id else 1):
            try:
                response = client.search_recent_tweets(
                    query,
                    since_id=since_id,
                    next_token=next_token,
                    max_results=100,
                    tweet_fields=TWEET_FIELDS,
                    expansions=["author_id"],
                    user_fields=USER_FIELDS,
                )
            except (tweepy.TweepyException, requests.RequestException, ValueError) as exc:
                raise x_error(exc, "the search") from None
            users = {
                str(user.data.get("id")): user.data
                for user in (response.includes or {}).get("users", [])
            }
            for tweet in response.data or []:
                try:
                    envelopes.append(tweet_envelope(tweet.data, users))
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("x.tweet_skipped", source_id=self.source.id, reason=str(exc))
            meta = response.meta or {}
            if meta.get("newest_id") and (newest is None or int(meta["newest_id"]) > int(newest)):
                newest = str(meta["newest_id"])
            next_token = meta.get("next_token")
            if not next_token:
                break
        kept = {"since_id": newest} if newest else {}
        return Poll(envelopes=envelopes, cursor=kept)
