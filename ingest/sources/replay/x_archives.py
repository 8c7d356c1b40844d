"""The X archives: API v2 responses or tweets, and API v1.1 statuses, one JSON object a line."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ingest.envelope import Author, Envelope, EnvelopeError
from ingest.sources.replay.rows import (
    MAX_RAW_CHARS,
    RowError,
    RowProblem,
    metrics_of,
    optional_id,
    optional_str,
    parse_count,
    parse_time,
    parse_tweet_id,
    row_reason,
    scrub,
    status_url,
    validated,
)

V1_TIME_RE = re.compile(
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


def read_jsonl(
    path: Path, to_items: Callable[[Any, int, str], Iterator[Envelope | RowError]]
) -> Iterator[Envelope | RowError]:
    """Stream a JSON-lines archive: each line's object through ``to_items``, a
    ``RowError`` for a line that is not JSON."""
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


def x_v2_items(obj: Any, line: int, raw: str) -> Iterator[Envelope | RowError]:
    """The envelopes (or ``RowError``s) of one X API v2 line: a page, a response or a tweet."""
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
            yield validated(_x_v2_envelope(tweet, users))
        except (RowProblem, EnvelopeError) as exc:
            yield RowError(line, row_reason(exc), _json_text(tweet))


def _v2_users(includes: Any) -> dict[str, dict[str, Any]]:
    users = includes.get("users") if isinstance(includes, dict) else None
    if not isinstance(users, list):
        return {}
    return {str(u["id"]): u for u in users if isinstance(u, dict) and u.get("id") is not None}


def _x_v2_envelope(tweet: Any, users: dict[str, dict[str, Any]]) -> Envelope:
    if not isinstance(tweet, dict):
        raise RowProblem(f"not a post: expected a tweet object, found {type(tweet).__name__}")
    tweet_id = parse_tweet_id(tweet.get("id"), "id")
    author_id = optional_id(tweet.get("author_id"))
    user = users.get(author_id, {})
    handle = optional_str(user.get("username"))
    user_metrics = user.get("public_metrics")
    followers = (
        parse_count(user_metrics.get("followers_count")) if isinstance(user_metrics, dict) else None
    )
    links = {"replied_to": "", "retweeted": "", "quoted": ""}
    references = tweet.get("referenced_tweets")
    for ref in references if isinstance(references, list) else []:
        if isinstance(ref, dict) and ref.get("type") in links:
            links[ref["type"]] = optional_id(ref.get("id"))
    public_metrics = tweet.get("public_metrics")
    # Keep the tweet in the single-tweet response shape, with its author, so that raw
    # can be parsed again by this very function.
    raw: dict[str, Any] = {"data": tweet}
    if user:
        raw["includes"] = {"users": [user]}
    return Envelope(
        external_id=tweet_id,
        created_at=parse_time(tweet.get("created_at"), "created_at"),
        text=optional_str(tweet.get("text")),
        author=Author(
            id=author_id,
            handle=handle,
            name=optional_str(user.get("name")),
            followers=followers,
        ),
        lang=optional_str(tweet.get("lang")),
        url=status_url(handle, tweet_id),
        metrics=metrics_of(public_metrics if isinstance(public_metrics, dict) else {}, _V2_METRICS),
        reply_to=links["replied_to"],
        repost_of=links["retweeted"],
        quote_of=links["quoted"],
        raw=scrub(raw),
    )


def x_v1_items(obj: Any, line: int, raw: str) -> Iterator[Envelope | RowError]:
    """The envelope (or ``RowError``) of one X API v1.1 status line; nothing for a notice."""
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in _V1_NOTICES:
        return  # a stream notice (a deletion, a rate-limit count), not a post
    try:
        yield validated(_x_v1_envelope(obj))
    except (RowProblem, EnvelopeError) as exc:
        yield RowError(line, row_reason(exc), raw[:MAX_RAW_CHARS])


def _x_v1_envelope(status: Any) -> Envelope:
    if not isinstance(status, dict):
        raise RowProblem(f"not a post: expected a status object, found {type(status).__name__}")
    tweet_id = parse_tweet_id(status.get("id_str") or status.get("id"), "id_str")
    user_value = status.get("user")
    user: dict[str, Any] = user_value if isinstance(user_value, dict) else {}
    handle = optional_str(user.get("screen_name"))
    extended = status.get("extended_tweet")
    text = status.get("full_text") or (
        extended.get("full_text") if isinstance(extended, dict) else None
    )
    retweeted = status.get("retweeted_status")
    quoted = status.get("quoted_status")
    return Envelope(
        external_id=tweet_id,
        created_at=_parse_v1_time(status.get("created_at")),
        text=optional_str(text or status.get("text")),
        author=Author(
            id=optional_id(user.get("id_str") or user.get("id")),
            handle=handle,
            name=optional_str(user.get("name")),
            followers=parse_count(user.get("followers_count")),
        ),
        lang=optional_str(status.get("lang")),
        url=status_url(handle, tweet_id),
        reply_to=optional_id(
            status.get("in_reply_to_status_id_str") or status.get("in_reply_to_status_id")
        ),
        repost_of=optional_id(
            (retweeted.get("id_str") or retweeted.get("id")) if isinstance(retweeted, dict) else ""
        ),
        quote_of=optional_id(
            status.get("quoted_status_id_str")
            or (quoted.get("id_str") if isinstance(quoted, dict) else "")
        ),
        metrics=metrics_of(status, _V1_METRICS),
        raw=scrub(status),
    )


def _parse_v1_time(value: Any) -> datetime:
    """``Wed Oct 10 20:19:24 +0000 2018``, read without the locale (unlike ``%a %b``)."""
    if not isinstance(value, str) or not value.strip():
        raise RowProblem("missing time: created_at is empty")
    match = V1_TIME_RE.match(value.strip())
    month = _MONTHS.get(match["mon"]) if match else None
    if match is None or month is None:
        raise RowProblem(f"bad time: created_at {value[:64]!r} is not a v1.1 date and time")
    try:
        parsed = datetime.strptime(
            f"{match['year']}-{month:02d}-{match['day']} "
            f"{match['h']}:{match['m']}:{match['s']} {match['tz']}",
            "%Y-%m-%d %H:%M:%S %z",
        )
    except ValueError as exc:
        raise RowProblem(f"bad time: created_at {value[:64]!r} is not a valid date") from exc
    return parsed.astimezone(UTC)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:MAX_RAW_CHARS]
