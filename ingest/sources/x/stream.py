"""X's filtered stream (API v2, ``GET /2/tweets/search/stream``) through tweepy's
``StreamingClient``: rules kept in sync with the sources' keywords, each tweet routed to
the sources whose rules it matched.

X keeps filtered-stream rules per app (per bearer token), not per connection, and lets
an app hold one connection. So one stream serves every streaming X source that shares
a bearer token: each source owns one rule, tagged ``twiscope:<source id>``, whose value
is its search query (``build_query``); each tweet carries the tags of the rules it
matched. Rules without a Twiscope tag (another tool's, on the same app) are left alone.

Errors, as for the search (``x_error``): a 401 is permanent; a 403 on the stream means
the app's access level has no filtered stream (``StreamUnavailable``: the sources fall
back to recent-search polling); a 429 waits until ``x-rate-limit-reset``; 5xx and
dropped connections are retried by tweepy with its backoff (X's "handling
disconnections" guide). A line that is not a tweet (malformed JSON, no ``data``) is
handed to ``on_malformed`` and the stream goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import tweepy

from ingest.envelope import Envelope
from ingest.sources.base import SourceError
from ingest.sources.x.adapter import TWEET_FIELDS, USER_FIELDS, tweet_envelope, x_error

log = structlog.get_logger(__name__)

RULE_TAG_PREFIX = "twiscope:"


class StreamUnavailable(SourceError):
    """The app's access level has no filtered stream (X answers 403): its sources are
    polled through recent search instead. Not permanent: access can be upgraded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, permanent=False)


def rule_tag(source_id: int) -> str:
    """The tag of the filtered-stream rule a source owns."""
    return f"{RULE_TAG_PREFIX}{source_id}"


def rules_diff(
    existing: Sequence[tweepy.StreamRule], wanted: Mapping[int, str]
) -> tuple[list[tweepy.StreamRule], list[str]]:
    """What makes the app's Twiscope rules exactly ``wanted`` (source id → query):
    ``(rules to add, ids of rules to delete)``. A rule whose tag or value is stale is
    deleted and added again (X cannot edit a rule); untagged or foreign rules stay."""
    keep: set[tuple[str, str]] = set()
    delete: list[str] = []
    wanted_rules = {(rule_tag(sid), query) for sid, query in wanted.items()}
    for rule in existing:
        tag = str(rule.tag or "")
        if not tag.startswith(RULE_TAG_PREFIX):
            continue
        if (tag, rule.value) in wanted_rules and (tag, rule.value) not in keep:
            keep.add((tag, rule.value))
        else:
            delete.append(str(rule.id))
    add = [tweepy.StreamRule(value=q, tag=t) for t, q in sorted(wanted_rules - keep)]
    return add, delete


def sync_rules(client: tweepy.StreamingClient, wanted: Mapping[int, str]) -> None:
    """Make the app's Twiscope-tagged rules exactly ``wanted`` (source id → query).

    Side effects: ``DELETE``/``POST /2/tweets/search/stream/rules`` on X.

    Raises:
        StreamUnavailable: the app has no filtered stream (403).
        SourceError: X refused or failed (``x_error``), or rejected a rule.
    """
    try:
        existing = client.get_rules().data or []
        add, delete = rules_diff(existing, wanted)
        if delete:
            client.delete_rules(delete)
        if add:
            response = client.add_rules(add)
            refused = [e for e in (response.errors or []) if e.get("title") != "DuplicateRule"]
            if refused:
                raise SourceError(f"X refused a stream rule: {refused[0]}", permanent=True)
    except tweepy.Forbidden as exc:
        raise StreamUnavailable(f"no filtered stream for this app (403): {exc}") from None
    except (tweepy.TweepyException, ValueError) as exc:
        raise x_error(exc, "the stream rules") from None
    except OSError as exc:  # requests' connection errors are OSErrors
        raise x_error(exc, "the stream rules") from None


@dataclass(frozen=True, slots=True)
class StreamedTweet:
    """One tweet from the stream: its envelope and the ids of the sources whose rules
    it matched."""

    envelope: Envelope
    source_ids: tuple[int, ...]


def parse_line(raw: bytes | str) -> StreamedTweet | None:
    """One line of the stream as a tweet; None for an operational message (a line
    with ``errors`` only: X says why it will disconnect).

    Raises:
        ValueError: the line is not JSON, holds no tweet, or its tweet cannot become an
            envelope (``tweet_envelope``).
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if "data" not in data:
        if data.get("errors"):
            return None
        raise ValueError("no tweet in the line")
    includes = data.get("includes")
    if not isinstance(includes, dict):
        includes = {}
    users = {str(u.get("id")): u for u in includes.get("users") or [] if isinstance(u, dict)}
    try:
        envelope = tweet_envelope(data["data"], users)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a tweet: {exc!r}") from None
    ids = []
    for rule in data.get("matching_rules") or []:
        tag = str(rule.get("tag") or "") if isinstance(rule, dict) else ""
        if tag.startswith(RULE_TAG_PREFIX) and tag[len(RULE_TAG_PREFIX) :].isdigit():
            ids.append(int(tag[len(RULE_TAG_PREFIX) :]))
    return StreamedTweet(envelope=envelope, source_ids=tuple(sorted(set(ids))))


class XStream(tweepy.StreamingClient):
    """One filtered-stream connection (see the module docstring), reporting through
    callbacks, all called on the stream's thread:

    - ``on_tweet(StreamedTweet)`` for each tweet;
    - ``on_connected()`` each time a connection opens (before its first line): the
      moment to backfill the gap with recent search;
    - ``on_malformed(line, reason)`` for a line that is not a tweet;
    - ``on_failure(SourceError)`` when the stream gives up: a 401 (permanent), a 403
      (``StreamUnavailable``), a 429 (``retry_after_s`` from ``x-rate-limit-reset``) or
      an unexpected exception. The stream then disconnects; 5xx answers and dropped
      connections are retried by tweepy and only logged.

    ``start()`` connects on a thread of its own, with the author expansion and the
    public metrics, as the search asks for them.
    """

    def __init__(
        self,
        bearer_token: str,
        *,
        on_tweet: Callable[[StreamedTweet], None],
        on_connected: Callable[[], None],
        on_malformed: Callable[[bytes, str], None],
        on_failure: Callable[[SourceError], None],
    ) -> None:
        super().__init__(bearer_token, wait_on_rate_limit=False)
        self._on_tweet = on_tweet
        self._on_connected = on_connected
        self._on_malformed = on_malformed
        self._on_failure = on_failure
        self._headers: Mapping[str, str] = {}
        self.session.hooks["response"].append(self._remember_headers)

    def start(self) -> Any:
        """Connect on a new thread; returns the thread."""
        return self.filter(
            threaded=True,
            expansions=["author_id"],
            tweet_fields=TWEET_FIELDS,
            user_fields=USER_FIELDS,
        )

    def _remember_headers(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        self._headers = response.headers
        return response

    def on_connect(self) -> None:
        log.info("x.stream_connected")
        self._on_connected()

    def on_data(self, raw_data: bytes) -> None:
        if not self.running:
            return  # stopping: recent search backfills it after the next connect
        try:
            tweet = parse_line(raw_data)
        except ValueError as exc:
            self._on_malformed(raw_data, str(exc))
            return
        if tweet is None:
            log.warning("x.stream_operational_message", line=raw_data[:500])
        else:
            self._on_tweet(tweet)

    def on_request_error(self, status_code: int) -> None:
        failure: SourceError | None = None
        if status_code == 401:
            failure = SourceError("X refused the stream: 401 Unauthorized", permanent=True)
        elif status_code == 403:
            failure = StreamUnavailable("no filtered stream for this app (403 Forbidden)")
        elif status_code in (420, 429):
            reset = str(self._headers.get("x-rate-limit-reset") or "")
            wait = max(0.0, int(reset) - time.time()) if reset.isdigit() else None
            failure = SourceError(
                f"X's rate limit on the stream ({status_code}): waiting for its reset",
                permanent=False,
                retry_after_s=wait,
            )
        log.warning("x.stream_request_error", status=status_code, giving_up=failure is not None)
        if failure is not None:
            self._on_failure(failure)
            self.disconnect()

    def on_connection_error(self) -> None:
        log.warning("x.stream_connection_error")

    def on_closed(self, response: Any) -> None:
        log.warning("x.stream_closed_by_x")

    def on_exception(self, exception: Exception) -> None:
        log.error("x.stream_crashed", error=repr(exception))
        self._on_failure(SourceError(f"the stream failed: {exception!r}", permanent=False))
