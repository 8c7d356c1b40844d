"""The alert stream over WebSockets: who may connect, and what they receive."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import override_settings
from rest_framework.authtoken.models import Token

from alerts import push
from tests.factories import fire_blizzard_alerts, make_personas
from twiscope.asgi import application
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db(transaction=True)


def _token(user) -> str:
    return Token.objects.get(user=user).key


@pytest.fixture
def personas():
    get_redis().flushdb()
    return make_personas()


async def _close_code(communicator: WebsocketCommunicator) -> int | None:
    """The code the server closed with, after accepting: a close before the accept
    reaches a real client as a bare HTTP 403, its code lost."""
    connected, _ = await communicator.connect()
    assert connected is True
    message = await communicator.receive_output(timeout=1)
    assert message["type"] == "websocket.close"
    return message.get("code")


async def test_it_closes_a_socket_without_credentials_with_4401(personas) -> None:
    communicator = WebsocketCommunicator(application, "/ws/alerts/")

    assert await _close_code(communicator) == 4401


async def test_it_closes_a_socket_with_a_bad_token_with_4401(personas) -> None:
    communicator = WebsocketCommunicator(application, "/ws/alerts/?token=nope")

    assert await _close_code(communicator) == 4401


def _session_socket(cookie: str, *, origin: bytes, host: bytes) -> WebsocketCommunicator:
    return WebsocketCommunicator(
        application,
        "/ws/alerts/",
        headers=[(b"cookie", cookie.encode()), (b"origin", origin), (b"host", host)],
    )


async def test_a_session_socket_from_a_foreign_origin_is_closed_with_4403(personas) -> None:
    cookie = await sync_to_async(_logged_in_cookie)(personas.member)
    communicator = _session_socket(cookie, origin=b"https://evil.example", host=b"127.0.0.1:8000")

    assert await _close_code(communicator) == 4403


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        (b"http://127.0.0.1:9999", b"127.0.0.1:8000"),  # same host, another port
        (b"https://127.0.0.1:8000", b"127.0.0.1:8000"),  # another scheme
        (b"http://localhost:8000", b"127.0.0.1:8000"),  # another allowed host
        (b"http://evil.example:8000", b"evil.example:8000"),  # a host not allowed
        (b"null", b"127.0.0.1:8000"),  # a sandboxed page
    ],
)
async def test_a_session_socket_from_another_origin_than_its_own_is_closed_with_4403(
    personas, origin: bytes, host: bytes
) -> None:
    cookie = await sync_to_async(_logged_in_cookie)(personas.member)

    assert await _close_code(_session_socket(cookie, origin=origin, host=host)) == 4403


async def test_a_session_socket_without_an_origin_is_closed_with_4403(personas) -> None:
    cookie = await sync_to_async(_logged_in_cookie)(personas.member)
    communicator = WebsocketCommunicator(
        application, "/ws/alerts/", headers=[(b"cookie", cookie.encode())]
    )

    assert await _close_code(communicator) == 4403


async def test_a_session_socket_from_its_own_origin_is_accepted(personas) -> None:
    cookie = await sync_to_async(_logged_in_cookie)(personas.member)
    communicator = _session_socket(cookie, origin=b"http://127.0.0.1:8000", host=b"127.0.0.1:8000")

    connected, _ = await communicator.connect()
    hello = await communicator.receive_json_from()
    await communicator.disconnect()

    assert connected is True
    assert hello == {"type": "hello", "v": 1, "teams": {str(personas.team.id): 0}}


@override_settings(CSRF_TRUSTED_ORIGINS=["https://*.newsroom.example"])
async def test_a_session_socket_from_a_trusted_origin_is_accepted(personas) -> None:
    cookie = await sync_to_async(_logged_in_cookie)(personas.member)
    communicator = _session_socket(
        cookie, origin=b"https://desk.newsroom.example", host=b"127.0.0.1:8000"
    )

    connected, _ = await communicator.connect()
    hello = await communicator.receive_json_from()
    await communicator.disconnect()

    assert connected is True and hello["type"] == "hello"


async def test_a_token_socket_is_accepted_from_any_origin(personas) -> None:
    token = await database_sync_to_async(_token)(personas.member)
    communicator = WebsocketCommunicator(
        application,
        f"/ws/alerts/?token={token}",
        headers=[(b"origin", b"https://evil.example"), (b"host", b"127.0.0.1:8000")],
    )

    connected, _ = await communicator.connect()
    hello = await communicator.receive_json_from()
    await communicator.disconnect()

    assert connected is True and hello["type"] == "hello"


def _logged_in_cookie(user) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


async def test_members_receive_their_teams_alerts_and_outsiders_do_not(personas) -> None:
    token = await database_sync_to_async(_token)(personas.member)
    outsider_token = await database_sync_to_async(_token)(personas.outsider)
    member = WebsocketCommunicator(application, f"/ws/alerts/?token={token}")
    outsider = WebsocketCommunicator(application, f"/ws/alerts/?token={outsider_token}")
    assert (await member.connect())[0] and (await outsider.connect())[0]
    await member.receive_json_from()
    await outsider.receive_json_from()

    alert_ids = await database_sync_to_async(fire_blizzard_alerts)(personas.team)
    await database_sync_to_async(push.push_alerts)(alert_ids=alert_ids)
    messages = [await member.receive_json_from(timeout=5) for _ in alert_ids]

    assert [m["seq"] for m in messages] == list(range(1, len(alert_ids) + 1))
    assert any(m["alert"]["evidence"]["term"] == "#blizzard" for m in messages)
    assert await outsider.receive_nothing(timeout=0.5) is True
    await member.disconnect()
    await outsider.disconnect()


async def test_a_socket_quiet_for_longer_than_a_redis_timeout_still_receives(personas) -> None:
    # Regression: a client library's 5 s read timeout once killed idle consumers.
    token = await database_sync_to_async(_token)(personas.member)
    member = WebsocketCommunicator(application, f"/ws/alerts/?token={token}")
    assert (await member.connect())[0]
    await member.receive_json_from()

    assert await member.receive_nothing(timeout=6.5) is True
    alert_ids = await database_sync_to_async(fire_blizzard_alerts)(personas.team)
    await database_sync_to_async(push.push_alerts)(alert_ids=alert_ids)

    assert (await member.receive_json_from(timeout=5))["type"] == "alert.created"
    await member.disconnect()
