"""Telegram sources: telethon faked at its client, with ``Message`` objects built from the
real channel posts in ``../shared/data/telegram_news/``; stored through a real Celery
worker and PostgreSQL; resume by message id, FloodWait and a revoked session."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime

import pytest
from django.core.management import call_command
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from telethon import errors
from telethon.tl.types import Message, PeerChannel

from ingest.models import Event, Source
from ingest.sources.telegram.adapter import TelegramAdapter
from tests.factories import make_personas

pytestmark = pytest.mark.django_db(transaction=True)

CHANNEL = "bbcrussian"


def saved_session() -> str:
    """A well-formed telethon session string (a data centre and a key, no account)."""
    from telethon.crypto import AuthKey
    from telethon.sessions import StringSession

    session = StringSession()
    session.set_dc(2, "149.154.167.51", 443)
    session.auth_key = AuthKey(bytes(256))
    return session.save()


def real_messages(shared_data, count: int) -> list[Message]:
    """The channel dump's newest ``count`` posts as telethon messages."""
    rows = json.loads((shared_data / "telegram_news" / "1001003921752_messages.json").read_text())
    rows = sorted(rows, key=lambda r: r["message_id"])[-count:]
    return [
        Message(
            id=row["message_id"],
            peer_id=PeerChannel(channel_id=1003921752),
            date=datetime.fromisoformat(row["date"]),
            message=row["text"],
            post=True,
            views=1000 + row["message_id"] % 97,
        )
        for row in rows
    ]


class FakeClient:
    """telethon's ``TelegramClient``, as the adapter uses it: the channel's history
    (``history``), newest first as telethon gives it, and what to raise."""

    history: list[Message] = []
    authorised = True
    raise_on_get: Exception | None = None
    calls: list[dict] = []

    def __init__(self, session, api_id, api_hash) -> None:
        self.api_id = api_id

    async def connect(self) -> None:
        pass

    async def disconnect(self) -> None:
        pass

    async def is_user_authorized(self) -> bool:
        return self.authorised

    async def get_messages(self, channel, *, limit, min_id):
        FakeClient.calls.append({"channel": channel, "limit": limit, "min_id": min_id})
        if self.raise_on_get is not None:
            raise self.raise_on_get
        newer = [m for m in self.history if m.id > min_id]
        return sorted(newer, key=lambda m: m.id, reverse=True)[:limit]


@pytest.fixture
def fake_telegram(monkeypatch):
    FakeClient.history, FakeClient.authorised, FakeClient.raise_on_get = [], True, None
    FakeClient.calls = []
    monkeypatch.setattr(TelegramAdapter, "client_class", FakeClient)
    return FakeClient


def owner(personas) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get(user=personas.owner).key}")
    return client


def add_channel(client: APIClient, name: str = "bbc") -> dict:
    response = client.post(
        "/api/sources/",
        {
            "kind": "telegram",
            "name": name,
            "config": {"channels": [f"@{CHANNEL}"]},
            "credentials": {"api_id": 12345, "api_hash": "0123abcd", "session": saved_session()},
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    return response.json()


def poll() -> str:
    out = io.StringIO()
    call_command("run_sources", "--once", stdout=out)
    return out.getvalue()


def wait_for(count: int) -> None:
    deadline = time.monotonic() + 30
    while Event.objects.count() < count and time.monotonic() < deadline:
        time.sleep(0.1)


def test_new_posts_are_stored_once_and_a_restart_resumes_by_message_id(
    shared_data, fake_telegram, celery_worker
) -> None:
    messages = real_messages(shared_data, 30)
    fake_telegram.history = messages[:25]
    client = owner(make_personas())
    created = add_channel(client)
    assert created["config"]["channels"] == [CHANNEL]

    first = poll()  # first poll of a channel: its newest 20
    wait_for(20)
    fake_telegram.history = messages  # five more posted meanwhile
    second = poll()
    wait_for(25)
    third = poll()

    assert "20 new" in first and "5 new" in second and "0 new" in third
    assert [c["min_id"] for c in fake_telegram.calls] == [
        0,
        messages[24].id,
        messages[29].id,
    ]
    stored = Event.objects.filter(source_id=created["id"])
    assert stored.count() == 25
    newest = stored.get(external_id=f"{CHANNEL}:{messages[29].id}")
    assert newest.text == messages[29].message.strip()
    assert newest.url == f"https://t.me/{CHANNEL}/{messages[29].id}"
    assert newest.metrics["views"] == messages[29].views
    assert newest.created_at == messages[29].date
    assert Source.objects.get(id=created["id"]).cursor["last_ids"] == {CHANNEL: messages[29].id}


def test_flood_wait_backs_off_and_a_revoked_session_fails(fake_telegram, clean_redis) -> None:
    client = owner(make_personas())
    created = add_channel(client)
    fake_telegram.raise_on_get = errors.FloodWaitError(request=None, capture=420)

    assert "failed (temporary, will retry)" in poll()
    retry_at = datetime.fromisoformat(Source.objects.get(id=created["id"]).cursor["retry_at"])
    assert (retry_at - datetime.now(retry_at.tzinfo)).total_seconds() > 400
    assert client.get(f"/api/sources/{created['id']}/").json()["state"] == "backing_off"

    Source.objects.filter(id=created["id"]).update(cursor={})
    fake_telegram.raise_on_get = errors.AuthKeyUnregisteredError(request=None)
    report = poll()
    shown = client.get(f"/api/sources/{created['id']}/").json()
    assert "failed (permanent)" in report
    assert (shown["state"], shown["error_permanent"]) == ("failing", True)

    other = add_channel(client, name="unsigned")
    fake_telegram.raise_on_get, fake_telegram.authorised = None, False
    assert f"unsigned (id {other['id']}): failed (permanent)" in poll()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"config": {"channels": []}}, "config"),
        ({"credentials": {"api_id": "abc", "api_hash": "x", "session": "s"}}, "credentials"),
        ({"credentials": {"api_id": 1, "api_hash": "x"}}, "credentials"),
        (
            {"credentials": {"api_id": 1, "api_hash": "x", "session": "not-a-session"}},
            "credentials",
        ),
    ],
)
def test_a_bad_telegram_source_answers_400(body, field) -> None:
    payload = {
        "kind": "telegram",
        "name": "bad",
        "config": {"channels": ["rian_ru"]},
        "credentials": {"api_id": 1, "api_hash": "x", "session": saved_session()},
        **body,
    }

    response = owner(make_personas()).post("/api/sources/", payload, format="json")

    assert response.status_code == 400
    assert field in response.json()
