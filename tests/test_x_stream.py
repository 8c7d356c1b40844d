"""X's filtered stream: rules synced with the sources' keywords, tweets stored once
across a dropped connection (the gap backfilled by recent search), a malformed line
dead-lettered, and the stream's 401 / 403 / 429. X is faked at tweepy's HTTP layer
(requests), with the v2 payload shapes of ``/2/tweets/search/stream``, its ``/rules``
and ``/2/tweets/search/recent``; persistence runs through a real Celery worker and
PostgreSQL."""

from __future__ import annotations

import io
import json
import threading
import time
from datetime import datetime
from unittest import mock

import pytest
import requests
import tweepy
from requests.structures import CaseInsensitiveDict
from rest_framework.test import APIClient

from ingest import streaming
from ingest.models import DeadLetter, Event, Source
from ingest.sources.x.stream import parse_line, rules_diff
from tests.factories import api_key, make_personas

pytestmark = pytest.mark.django_db(transaction=True)

USER = {
    "id": "2244994945",
    "name": "Twitter Dev",
    "username": "TwitterDev",
    "public_metrics": {"followers_count": 513958},
}


def tweet(tweet_id: str, text: str) -> dict:
    return {
        "id": tweet_id,
        "text": text,
        "author_id": USER["id"],
        "created_at": "2026-11-30T10:15:07.000Z",
        "lang": "en",
        "edit_history_tweet_ids": [tweet_id],
        "public_metrics": {"retweet_count": 2, "reply_count": 0, "like_count": 5},
    }


def line(tweet_id: str, text: str, *tags: str) -> bytes:
    return json.dumps(
        {
            "data": tweet(tweet_id, text),
            "includes": {"users": [USER]},
            "matching_rules": [{"id": f"r{i}", "tag": tag} for i, tag in enumerate(tags)],
        }
    ).encode()


def page(*tweets: dict) -> dict:
    if not tweets:
        return {"meta": {"result_count": 0}}
    ids = [t["id"] for t in tweets]
    return {
        "data": list(tweets),
        "includes": {"users": [USER]},
        "meta": {"newest_id": max(ids), "oldest_id": min(ids), "result_count": len(ids)},
    }


class Raw:
    """A streamed body: the given lines, then a dropped connection (``drop``) or
    keep-alives until the client stops reading."""

    def __init__(self, lines: list[bytes], *, drop: bool) -> None:
        self.chunks = [chunk + b"\r\n" for chunk in lines]
        self.drop = drop
        self.closed = False

    def read(self, *_args, **_kwargs) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.drop:
            raise requests.exceptions.ChunkedEncodingError("connection broken mid-stream")
        time.sleep(0.05)
        return b"\r\n"

    def close(self) -> None:
        self.closed = True


class FakeStreamX:
    """X's stream, rules and search endpoints. ``connections``: one entry per stream
    connection, ``(status, headers, Raw or None)``; ``searches``: one page per search."""

    def __init__(self, *, rules: list[dict], connections: list, searches: list[dict]) -> None:
        self.rules = rules
        self.connections = list(connections)
        self.searches = list(searches)
        self.search_calls: list[dict] = []
        self.rule_posts: list[dict] = []
        self.lock = threading.Lock()
        self.real = requests.Session.request

    def __call__(self, session, method, url, **kwargs):
        if "api.twitter.com" not in url:
            return self.real(session, method, url, **kwargs)
        response = self.route(method, url, **kwargs)
        for hook in session.hooks.get("response", []):  # as requests dispatches them
            hook(response)
        return response

    def route(self, method, url, **kwargs) -> requests.Response:
        with self.lock:
            if url.endswith("/2/tweets/search/stream/rules"):
                if method == "GET":
                    return self.answer(200, {"data": self.rules, "meta": {}})
                body = kwargs.get("json") or {}
                self.rule_posts.append(body)
                return self.answer(200, {"meta": {"summary": {}}})
            if url.endswith("/2/tweets/search/recent"):
                self.search_calls.append(dict(kwargs.get("params") or {}))
                return self.answer(200, self.searches.pop(0) if self.searches else page())
            if url.endswith("/2/tweets/search/stream"):
                if not self.connections:
                    return self.answer(200, None, raw=Raw([], drop=False))
                status, headers, raw = self.connections.pop(0)
                return self.answer(status, {"title": "refused"}, headers=headers, raw=raw)
        raise AssertionError(f"unexpected request {method} {url}")

    def answer(self, status, body, *, headers=None, raw=None) -> requests.Response:
        response = requests.Response()
        response.status_code = status
        response.headers = CaseInsensitiveDict(
            {"content-type": "application/json", **(headers or {})}
        )
        response.url = "https://api.twitter.com/"
        if raw is not None and status == 200:
            response.raw = raw
        else:
            response._content = json.dumps(body).encode()
            response.raw = io.BytesIO(response._content)
        return response


def add_x(client: APIClient, **config) -> dict:
    body = {
        "kind": "x",
        "name": "floods",
        "config": {"keywords": ["#flood"], **config},
        "credentials": {"bearer_token": "AAAA-stream-bearer"},
    }
    response = client.post("/api/sources/", body, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def owner() -> APIClient:
    client = APIClient()
    personas = make_personas()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(personas.owner)}")
    return client


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def run_streams(fake: FakeStreamX, until, *, ticks_after: int = 0) -> streaming.XStreams:
    streams = streaming.XStreams()
    with mock.patch.object(requests.Session, "request", lambda *a, **k: fake(*a, **k)):
        try:
            streams.tick()
            assert wait_for(lambda: until(streams)), "the stream did not get there in time"
            for _ in range(ticks_after):
                streams.tick()
        finally:
            streams.stop()
    return streams


def test_rules_diff_adds_missing_replaces_stale_and_leaves_foreign_rules() -> None:
    existing = [
        tweepy.StreamRule(value="#flood", tag="twiscope:1", id="10"),
        tweepy.StreamRule(value="old words", tag="twiscope:2", id="11"),
        tweepy.StreamRule(value="#gone", tag="twiscope:3", id="12"),
        tweepy.StreamRule(value="cats", tag="another-tool", id="13"),
        tweepy.StreamRule(value="dogs", id="14"),
    ]

    add, delete = rules_diff(existing, {1: "#flood", 2: "new OR words", 4: "#quake"})

    assert sorted(delete) == ["11", "12"]
    assert {(r.value, r.tag) for r in add} == {
        ("new OR words", "twiscope:2"),
        ("#quake", "twiscope:4"),
    }


def test_parse_line_routes_by_tag_and_refuses_what_is_not_a_tweet() -> None:
    parsed = parse_line(line("1862500000000000009", "hi #flood", "twiscope:7", "other"))
    assert parsed is not None
    assert parsed.source_ids == (7,)
    assert parsed.envelope.author.handle == "TwitterDev"
    assert parse_line(b'{"errors": [{"title": "operational-disconnect"}]}') is None
    for bad in (b'{"data": {"id": "1"', b"[]", b'{"includes": {}}', b'{"data": {"id": "x"}}'):
        with pytest.raises(ValueError):
            parse_line(bad)


def test_a_dropped_stream_loses_nothing_and_stores_nothing_twice(
    celery_worker, monkeypatch
) -> None:
    monkeypatch.setattr(streaming, "FLUSH_S", 0.0)
    client = owner()
    source_id = add_x(client)["id"]
    tag = f"twiscope:{source_id}"
    first = [
        line("1862500000000000002", "A40 closed by #flood water", tag),
        b'{"data": {"id": "1862500000000000099", "text": "cut',
        line("1862500000000000098", "a tweet for another source", "twiscope:999999"),
    ]
    fake = FakeStreamX(
        rules=[
            {"id": "1", "value": "#old", "tag": f"twiscope:{source_id}"},
            {"id": "2", "value": "cats", "tag": "another-tool"},
        ],
        connections=[
            (200, {}, Raw(first, drop=True)),
            (200, {}, Raw([line("1862500000000000004", "still #flood", tag)], drop=False)),
        ],
        searches=[
            page(tweet("1862500000000000001", "#flood warning issued")),
            # The gap while disconnected, and one tweet the stream already gave.
            page(
                tweet("1862500000000000003", "#flood: bridge shut"),
                tweet("1862500000000000002", "A40 closed by #flood water"),
            ),
        ],
    )

    run_streams(fake, lambda s: Event.objects.filter(source_id=source_id).count() >= 4)

    stored = sorted(Event.objects.filter(source_id=source_id).values_list("external_id", flat=True))
    assert stored == [f"186250000000000000{i}" for i in (1, 2, 3, 4)]
    # The first connect took the newest page; the reconnect asked from the last staged id.
    assert fake.search_calls[0].get("since_id") is None
    assert fake.search_calls[1]["since_id"] == "1862500000000000002"
    assert fake.rule_posts == [
        {"delete": {"ids": ["1"]}},
        {"add": [{"value": "#flood", "tag": tag}]},
    ]
    parked = DeadLetter.objects.get(stage=DeadLetter.Stage.SOURCE)
    assert "not a tweet" in parked.reason
    assert "1862500000000000099" in parked.payload["line"]
    assert Source.objects.get(id=source_id).cursor["since_id"] == "1862500000000000004"


def test_a_rate_limited_stream_waits_for_the_reset_and_a_401_fails_the_source(
    clean_redis,
) -> None:
    client = owner()
    source_id = add_x(client)["id"]
    reset = int(time.time()) + 900
    fake = FakeStreamX(
        rules=[],
        connections=[(429, {"x-rate-limit-reset": str(reset)}, None)],
        searches=[],
    )

    run_streams(fake, lambda s: not s.streaming_ids(), ticks_after=1)

    shown = client.get(f"/api/sources/{source_id}/").json()
    assert shown["state"] == "backing_off"
    retry_at = datetime.fromisoformat(Source.objects.get(id=source_id).cursor["retry_at"])
    assert retry_at.timestamp() >= reset - 2

    Source.objects.filter(id=source_id).update(cursor={})
    fake = FakeStreamX(rules=[], connections=[(401, {}, None)], searches=[])
    run_streams(fake, lambda s: not s.streaming_ids(), ticks_after=1)

    shown = client.get(f"/api/sources/{source_id}/").json()
    assert (shown["state"], shown["error_permanent"]) == ("failing", True)
    assert "401" in shown["last_error"]


def test_an_app_without_the_stream_falls_back_to_polling(clean_redis) -> None:
    client = owner()
    source_id = add_x(client)["id"]
    fake = FakeStreamX(rules=[], connections=[], searches=[])
    forbidden = requests.Response()
    forbidden.status_code = 403
    forbidden._content = b'{"title": "client-not-enrolled"}'

    with mock.patch.object(
        tweepy.StreamingClient, "get_rules", side_effect=tweepy.Forbidden(forbidden)
    ):
        streams = run_streams(fake, lambda s: True, ticks_after=1)

    assert streams.streaming_ids() == set()
    assert source_id not in streams.streaming_ids()
    shown = client.get(f"/api/sources/{source_id}/").json()
    assert shown["state"] == "running"
    assert shown["last_error"] == ""


def test_stream_is_a_boolean_setting() -> None:
    client = owner()
    body = {
        "kind": "x",
        "name": "bad",
        "config": {"keywords": ["#flood"], "stream": "yes"},
        "credentials": {"bearer_token": "AAAA"},
    }

    response = client.post("/api/sources/", body, format="json")

    assert response.status_code == 400
    assert "stream" in response.json()["config"]
    assert add_x(client, stream=False)["config"]["stream"] is False
