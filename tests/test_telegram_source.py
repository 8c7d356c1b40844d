"""Telegram sources: telethon faked at its client, with ``Message`` objects built from the
real channel posts in ``../shared/data/telegram_news/``; stored through a real Celery
worker and PostgreSQL; resume by message id, FloodWait and a revoked session."""

from __future__ import annotations

import asyncio
import io
import json
import time
from datetime import datetime
from types import SimpleNamespace

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient
from telethon import errors
from telethon.tl.types import Message, PeerChannel

from ingest import streaming
from ingest.models import Event, Source
from ingest.sources.telegram.adapter import TelegramAdapter
from tests.factories import api_key, make_personas

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

    instances: list[FakeClient] = []

    def __init__(self, session, api_id, api_hash) -> None:
        self.api_id = api_id
        self.handlers: list = []
        self.loop: asyncio.AbstractEventLoop | None = None
        FakeClient.instances.append(self)

    async def get_entity(self, channel):
        if channel != CHANNEL:
            raise ValueError(f'No user has "{channel}" as username')
        return SimpleNamespace(id=1003921752, username=CHANNEL)

    def add_event_handler(self, callback, event) -> None:
        self.loop = asyncio.get_running_loop()
        self.handlers.append((callback, event))

    def emit(self, message: Message) -> None:
        """Telegram pushes ``message`` to the live connection (from the test's thread)."""
        for callback, _event in self.handlers:
            asyncio.run_coroutine_threadsafe(
                callback(SimpleNamespace(message=message)), self.loop
            ).result(10)

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
    FakeClient.calls, FakeClient.instances = [], []
    monkeypatch.setattr(TelegramAdapter, "client_class", FakeClient)
    return FakeClient


def owner(personas) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(personas.owner)}")
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


def test_live_messages_arrive_at_once_and_a_restart_reads_the_gap(
    shared_data, fake_telegram, celery_worker
) -> None:
    messages = real_messages(shared_data, 30)
    fake_telegram.history = messages[:25]
    created = add_channel(owner(make_personas()))
    listeners = streaming.TelegramListeners()

    listeners.tick()  # connects, reads the newest 20, listens
    wait_for(20)
    assert listeners.streaming_ids() == {created["id"]}
    fake_telegram.instances[-1].emit(messages[25])
    wait_for(21)
    live = Event.objects.get(external_id=f"{CHANNEL}:{messages[25].id}")
    listeners.stop()  # a restart: meanwhile four more posts, and the live one again
    fake_telegram.history = messages
    listeners.tick()
    wait_for(25)
    listeners.stop()

    stored = Event.objects.filter(source_id=created["id"])
    assert stored.count() == 25
    assert sorted(int(e.split(":")[1]) for e in stored.values_list("external_id", flat=True)) == [
        m.id for m in messages[5:]
    ]
    assert Event.objects.get(id=live.id).text == messages[25].message.strip()
    # The live message did not move the cursor; the history read after the restart did.
    assert [c["min_id"] for c in fake_telegram.calls] == [0, messages[24].id]
    assert Source.objects.get(id=created["id"]).cursor["last_ids"] == {CHANNEL: messages[29].id}


def settle(listeners: streaming.TelegramListeners) -> bool:
    """Tick until no connection is alive (each that ended has had its failure recorded)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listeners.tick()
        if not listeners.streaming_ids():
            return True
        time.sleep(0.05)
    return False


def test_a_live_connection_backs_off_on_flood_wait_and_fails_on_a_revoked_session(
    fake_telegram, clean_redis
) -> None:
    client = owner(make_personas())
    created = add_channel(client)
    fake_telegram.raise_on_get = errors.FloodWaitError(request=None, capture=420)
    listeners = streaming.TelegramListeners()

    # The connection ends: why is recorded, and it is not restarted.
    assert settle(listeners)
    assert client.get(f"/api/sources/{created['id']}/").json()["state"] == "backing_off"
    retry_at = datetime.fromisoformat(Source.objects.get(id=created["id"]).cursor["retry_at"])
    assert (retry_at - datetime.now(retry_at.tzinfo)).total_seconds() > 400

    Source.objects.filter(id=created["id"]).update(cursor={})
    fake_telegram.raise_on_get = errors.SessionRevokedError(request=None)
    assert settle(listeners)
    listeners.stop()

    shown = client.get(f"/api/sources/{created['id']}/").json()
    assert (shown["state"], shown["error_permanent"]) == ("failing", True)
    assert "Telegram refused" in shown["last_error"]
