"""X sources: created through the API with a sealed bearer token, polled through tweepy
with X faked at its HTTP layer (recorded v2 payload shapes of ``GET
/2/tweets/search/recent``), stored through a real Celery worker and PostgreSQL."""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from unittest import mock

import pytest
import requests
from django.core.management import call_command
from requests.structures import CaseInsensitiveDict
from rest_framework.test import APIClient

from ingest.models import Event, Source
from tests.factories import api_key, make_personas

pytestmark = pytest.mark.django_db(transaction=True)

USERS = [
    {
        "id": "2244994945",
        "name": "Twitter Dev",
        "username": "TwitterDev",
        "public_metrics": {"followers_count": 513958, "following_count": 2039},
    },
    {"id": "783214", "name": "X", "username": "X", "public_metrics": {"followers_count": 66e6}},
]


def tweet(tweet_id: str, text: str, **extra) -> dict:
    return {
        "id": tweet_id,
        "text": text,
        "author_id": "2244994945",
        "created_at": "2026-11-30T10:15:07.000Z",
        "lang": "en",
        "edit_history_tweet_ids": [tweet_id],
        "public_metrics": {
            "retweet_count": 7,
            "reply_count": 1,
            "like_count": 30,
            "quote_count": 0,
        },
        **extra,
    }


PAGE = {
    "data": [
        tweet("1862500000000000003", "Flooding on the A40 near Oxford #flood"),
        tweet(
            "1862500000000000002",
            "RT @X: Roads closed after the flood",
            author_id="783214",
            referenced_tweets=[{"type": "retweeted", "id": "1862400000000000000"}],
        ),
        {"id": "1862500000000000001", "text": "no date on this one", "author_id": "783214"},
    ],
    "includes": {"users": USERS},
    "meta": {
        "newest_id": "1862500000000000003",
        "oldest_id": "1862500000000000001",
        "result_count": 3,
    },
}
EMPTY = {"meta": {"result_count": 0}}


class FakeX:
    """Answers tweepy's requests to api.twitter.com from a list of (status, body,
    headers); records each request's query parameters."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.calls: list[dict] = []
        self.real = requests.Session.request

    def __call__(self, session, method, url, **kwargs):
        if "api.twitter.com" not in url:
            return self.real(session, method, url, **kwargs)
        self.calls.append({"url": url, **(kwargs.get("params") or {})})
        status, body, headers = self.answers.pop(0)
        if isinstance(body, Exception):
            raise body
        response = requests.Response()
        response.status_code = status
        response.reason = {200: "OK", 401: "Unauthorized", 429: "Too Many Requests"}.get(status, "")
        response._content = json.dumps(body).encode()
        response.headers = CaseInsensitiveDict({"content-type": "application/json", **headers})
        response.url = url
        return response


def owner(personas) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(personas.owner)}")
    return client


def add_x(client: APIClient, **changes) -> dict:
    body = {
        "kind": "x",
        "name": "floods",
        "config": {"keywords": ["#flood", "road closed"]},
        "credentials": {"bearer_token": "AAAA-test-bearer"},
        **changes,
    }
    response = client.post("/api/sources/", body, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def poll(fake: FakeX) -> str:
    out = io.StringIO()
    # A function, so that it binds as a method and receives the session.
    with mock.patch.object(requests.Session, "request", lambda *a, **k: fake(*a, **k)):
        call_command("run_sources", "--once", stdout=out)
    return out.getvalue()


def test_an_x_search_is_stored_once_and_resumes_from_since_id(celery_worker) -> None:
    client = owner(make_personas())
    created = add_x(client)
    assert "credentials" not in created
    assert "AAAA-test-bearer" not in Source.objects.get(id=created["id"]).credentials

    fake = FakeX((200, PAGE, {}), (200, EMPTY, {}))
    first = poll(fake)
    deadline = time.monotonic() + 30
    while Event.objects.count() < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    second = poll(fake)

    assert f"floods (id {created['id']}): 2 new, 0 already stored" in first
    assert "0 new, 0 already stored" in second
    assert fake.calls[0]["query"] == '#flood OR "road closed"'
    assert "since_id" not in fake.calls[0] or fake.calls[0]["since_id"] is None
    assert fake.calls[1]["since_id"] == "1862500000000000003"
    assert "author_id" in fake.calls[0]["expansions"]
    stored = Event.objects.get(external_id="1862500000000000003")
    assert stored.author_handle == "TwitterDev"
    assert stored.author_followers == 513958
    assert stored.metrics["retweet_count"] == 7
    assert stored.created_at == datetime(2026, 11, 30, 10, 15, 7, tzinfo=UTC)
    assert stored.url == "https://x.com/TwitterDev/status/1862500000000000003"
    assert Event.objects.get(external_id="1862500000000000002").repost_of == "1862400000000000000"
    assert Event.objects.count() == 2  # the dateless tweet was skipped


def test_a_rate_limit_waits_for_its_reset_and_a_revoked_token_fails(clean_redis) -> None:
    client = owner(make_personas())
    busy = add_x(client, name="busy")
    reset = int(time.time()) + 600
    poll(FakeX((429, {"title": "Too Many Requests"}, {"x-rate-limit-reset": str(reset)})))

    shown = client.get(f"/api/sources/{busy['id']}/").json()
    assert shown["state"] == "backing_off"
    retry_at = datetime.fromisoformat(Source.objects.get(id=busy["id"]).cursor["retry_at"])
    assert retry_at.timestamp() >= reset - 2

    Source.objects.filter(id=busy["id"]).update(enabled=False)
    revoked = add_x(client, name="revoked")
    report = poll(FakeX((401, {"title": "Unauthorized", "status": 401}, {})))
    shown = client.get(f"/api/sources/{revoked['id']}/").json()
    assert "failed (permanent)" in report
    assert (shown["state"], shown["error_permanent"]) == ("failing", True)

    again = poll(FakeX())  # failing: not polled, so no request at all
    assert f"revoked (id {revoked['id']})" not in again


def test_a_connection_failure_is_temporary(clean_redis) -> None:
    client = owner(make_personas())
    created = add_x(client)

    report = poll(FakeX((0, requests.ConnectionError("connection reset by peer"), {})))

    assert "failed (temporary, will retry)" in report
    assert client.get(f"/api/sources/{created['id']}/").json()["state"] == "backing_off"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"config": {"keywords": ["#flood"]}, "credentials": {}}, "credentials"),
        ({"config": {"keywords": []}}, "config"),
        ({"config": {"keywords": ["ok", "  "]}}, "config"),
        ({"config": {"keywords": ["x" * 100] * 6}}, "config"),
        ({"config": {"keywords": ["ok"], "poll_interval_s": 5}}, "config"),
    ],
)
def test_a_bad_x_source_answers_400(body, field) -> None:
    client = owner(make_personas())
    payload = {
        "kind": "x",
        "name": "bad",
        "credentials": {"bearer_token": "AAAA"},
        **body,
    }

    response = client.post("/api/sources/", payload, format="json")

    assert response.status_code == 400
    assert field in response.json()
