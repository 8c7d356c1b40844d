"""The alert stream over WebSockets: who may connect, and what they receive."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
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


async def test_it_refuses_a_socket_without_credentials(personas) -> None:
    communicator = WebsocketCommunicator(application, "/ws/alerts/")

    connected, code = await communicator.connect()

    assert connected is False and code == 4401


async def test_it_refuses_a_bad_token(personas) -> None:
    communicator = WebsocketCommunicator(application, "/ws/alerts/?token=nope")

    connected, _ = await communicator.connect()

    assert connected is False


async def test_a_session_socket_from_a_foreign_origin_is_refused(personas) -> None:
    client = await sync_to_async(_logged_in_cookie)(personas.member)
    communicator = WebsocketCommunicator(
        application,
        "/ws/alerts/",
        headers=[(b"cookie", client.encode()), (b"origin", b"https://evil.example")],
    )

    connected, _ = await communicator.connect()

    assert connected is False


async def test_a_session_socket_from_the_dashboards_origin_is_accepted(personas) -> None:
    cookie = await sync_to_async(_logged_in_cookie)(personas.member)
    communicator = WebsocketCommunicator(
        application,
        "/ws/alerts/",
        headers=[(b"cookie", cookie.encode()), (b"origin", b"http://127.0.0.1:8000")],
    )

    connected, _ = await communicator.connect()
    hello = await communicator.receive_json_from()
    await communicator.disconnect()

    assert connected is True
    assert hello == {"type": "hello", "v": 1, "teams": {str(personas.team.id): 0}}


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
