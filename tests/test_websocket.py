"""The alert stream over WebSockets: who may connect, and what they receive."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from channels_redis.core import RedisChannelLayer
from django.conf import settings
from django.db import OperationalError
from django.db.backends.utils import CursorWrapper
from django.test import override_settings

from alerts import consumers, push
from tests.factories import (
    api_key,
    fire_blizzard_alerts,
    make_alerts,
    make_personas,
    token_socket,
)
from twiscope.asgi import application
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db(transaction=True)


def _token(user) -> str:
    return api_key(user)


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
    communicator = token_socket("nope")

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


async def test_a_token_in_the_query_string_is_refused_with_4401(personas) -> None:
    # Query strings land in proxy logs: ?token= is no longer read, even a valid one.
    communicator = WebsocketCommunicator(
        application, f"/ws/alerts/?token={api_key(personas.member)}"
    )

    assert await _close_code(communicator) == 4401


async def test_a_token_subprotocol_socket_selects_twiscope_v1_and_never_echoes_the_token(
    personas,
) -> None:
    communicator = token_socket(api_key(personas.member))

    connected, subprotocol = await communicator.connect()
    hello = await communicator.receive_json_from()
    await communicator.disconnect()

    assert connected is True and subprotocol == "twiscope.v1" and hello["type"] == "hello"


async def test_a_token_in_the_authorization_header_opens_a_socket(personas) -> None:
    communicator = WebsocketCommunicator(
        application,
        "/ws/alerts/",
        headers=[(b"authorization", f"Token {api_key(personas.member)}".encode())],
    )

    connected, _ = await communicator.connect()
    hello = await communicator.receive_json_from()
    await communicator.disconnect()

    assert connected is True and hello["type"] == "hello"


async def test_revoking_a_token_closes_its_open_socket_at_once_with_4401(personas) -> None:
    from teams import services as team_services
    from teams.models import ApiToken

    key = api_key(personas.member)
    communicator = token_socket(key)
    assert (await communicator.connect())[0]
    await communicator.receive_json_from()

    @database_sync_to_async
    def revoke() -> None:
        team_services.revoke_token(ApiToken.objects.get(user=personas.member))

    await revoke()
    message = await communicator.receive_output(timeout=2)

    assert message == {"type": "websocket.close", "code": 4401}
    assert await _close_code(token_socket(key)) == 4401


async def test_an_expired_token_opens_no_socket(personas) -> None:
    from django.utils import timezone

    from teams.models import ApiToken

    await database_sync_to_async(
        lambda: ApiToken.objects.filter(user=personas.member).update(expiry=timezone.now())
    )()

    assert await _close_code(token_socket(api_key(personas.member))) == 4401


async def test_a_token_socket_is_accepted_from_any_origin(personas) -> None:
    token = await database_sync_to_async(_token)(personas.member)
    communicator = token_socket(
        token, headers=[(b"origin", b"https://evil.example"), (b"host", b"127.0.0.1:8000")]
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
    member = token_socket(token)
    outsider = token_socket(outsider_token)
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
    member = token_socket(token)
    assert (await member.connect())[0]
    await member.receive_json_from()

    assert await member.receive_nothing(timeout=6.5) is True
    alert_ids = await database_sync_to_async(fire_blizzard_alerts)(personas.team)
    await database_sync_to_async(push.push_alerts)(alert_ids=alert_ids)

    assert (await member.receive_json_from(timeout=5))["type"] == "alert.created"
    await member.disconnect()


# --- Nothing lost between the join and the hello; bad frames; outages -------------------


def _fire(team, count: int = 1) -> list[int]:
    """Commit ``count`` alerts of ``team`` and push them, as the alerts stage does."""
    ids = make_alerts(team, count)
    push.push_alerts(alert_ids=ids)
    return ids


async def _messages_until_quiet(communicator: WebsocketCommunicator) -> list[dict]:
    """Every JSON message the socket sends until it is quiet for half a second."""
    messages = []
    while not await communicator.receive_nothing(timeout=0.5):
        messages.append(await communicator.receive_json_from())
    return messages


@pytest.mark.parametrize("moment", ["before", "after"])
async def test_an_alert_committed_while_the_socket_joins_its_groups_is_not_lost(
    personas, monkeypatch, moment: str
) -> None:
    # The alert is committed and pushed just before or just after the consumer joins its
    # team's group: it must be counted in hello's seq (the client fetches it over REST)
    # or be pushed to the socket, or both (a duplicate the client drops by seq).
    token = await database_sync_to_async(_token)(personas.member)
    join = RedisChannelLayer.group_add
    fired: list[int] = []

    async def group_add(layer: RedisChannelLayer, group: str, channel: str) -> None:
        if group.startswith("ws.token."):  # the socket's token's group: no alerts there
            return await join(layer, group, channel)
        if moment == "after":
            await join(layer, group, channel)
        fired.extend(await database_sync_to_async(_fire)(personas.team))
        if moment == "before":
            await join(layer, group, channel)

    monkeypatch.setattr(RedisChannelLayer, "group_add", group_add)
    communicator = token_socket(token)

    connected, _ = await communicator.connect()
    messages = await _messages_until_quiet(communicator)
    await communicator.disconnect()

    hello = next(m for m in messages if m["type"] == "hello")
    pushed = {m["seq"] for m in messages if m["type"] == "alert.created"}
    assert connected is True and len(fired) == 1
    assert hello["teams"][str(personas.team.id)] >= 1 or 1 in pushed


async def test_an_alert_pushed_before_the_hello_is_within_the_hellos_seq(
    personas, monkeypatch
) -> None:
    # The duplicate side of joining first: what arrives before hello is also counted in
    # it, so a client that drops a seq ≤ hello's (it fetches those over REST) holds it once.
    token = await database_sync_to_async(_token)(personas.member)
    join = RedisChannelLayer.group_add

    async def group_add(layer: RedisChannelLayer, group: str, channel: str) -> None:
        await join(layer, group, channel)
        if not group.startswith("ws.token."):  # the socket's token's group: no alerts
            await database_sync_to_async(_fire)(personas.team, 3)

    monkeypatch.setattr(RedisChannelLayer, "group_add", group_add)
    communicator = token_socket(token)

    assert (await communicator.connect())[0]
    messages = await _messages_until_quiet(communicator)
    await communicator.disconnect()

    hello_at = [m["type"] for m in messages].index("hello")
    early = [m["seq"] for m in messages[:hello_at]]
    assert messages[hello_at]["teams"] == {str(personas.team.id): 3}
    assert all(seq <= 3 for seq in early)


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "websocket.receive", "text": "not json {"},
        {"type": "websocket.receive", "text": ""},
        {"type": "websocket.receive", "bytes": b"\x00\xffbinary"},
        {"type": "websocket.receive", "text": '{"type": "subscribe"}'},
    ],
    ids=["not-json", "empty-text", "binary", "json"],
)
async def test_a_frame_from_the_client_is_ignored_and_the_socket_keeps_delivering(
    personas, frame
) -> None:
    token = await database_sync_to_async(_token)(personas.member)
    communicator = token_socket(token)
    assert (await communicator.connect())[0]
    await communicator.receive_json_from()

    await communicator.send_input(frame)
    assert await communicator.receive_nothing(timeout=0.3) is True
    ids = await database_sync_to_async(_fire)(personas.team)
    message = await communicator.receive_json_from(timeout=5)
    await communicator.disconnect()

    assert (message["type"], message["alert"]["id"]) == ("alert.created", ids[0])


def _database_down(monkeypatch) -> None:
    """Every query fails as when the PostgreSQL server is gone (in every thread)."""

    def refuse(*args, **kwargs):
        raise OperationalError("connection to server failed: Connection refused")

    monkeypatch.setattr(CursorWrapper, "execute", refuse)
    monkeypatch.setattr(CursorWrapper, "executemany", refuse)


async def test_a_token_socket_is_closed_with_4503_while_the_database_is_down(
    personas, monkeypatch
) -> None:
    token = await database_sync_to_async(_token)(personas.member)
    _database_down(monkeypatch)

    assert await _close_code(token_socket(token)) == 4503


async def test_a_session_socket_is_closed_with_4503_while_the_database_is_down(
    personas, monkeypatch
) -> None:
    cookie = await sync_to_async(_logged_in_cookie)(personas.member)
    _database_down(monkeypatch)
    communicator = _session_socket(cookie, origin=b"http://127.0.0.1:8000", host=b"127.0.0.1:8000")

    assert await _close_code(communicator) == 4503


async def test_the_socket_is_closed_with_4503_when_the_sequence_read_fails(
    personas, monkeypatch
) -> None:
    # Authenticated, joined, then the database goes: no hello, a 4503 (retry) close.
    token = await database_sync_to_async(_token)(personas.member)

    def down(team_ids):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(consumers, "team_sequences", down)

    assert await _close_code(token_socket(token)) == 4503


async def test_the_socket_is_closed_with_4503_while_redis_is_down(personas) -> None:
    token = await database_sync_to_async(_token)(personas.member)
    nowhere = {
        "default": {
            **settings.CHANNEL_LAYERS["default"],
            "CONFIG": {
                **settings.CHANNEL_LAYERS["default"]["CONFIG"],
                "hosts": [_closed_port_url()],
            },
        }
    }

    with override_settings(CHANNEL_LAYERS=nowhere):
        code = await _close_code(token_socket(token))

    assert code == 4503


def _closed_port_url() -> str:
    """A Redis URL on a local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def private_redis() -> Iterator[tuple[str, subprocess.Popen]]:
    """A ``redis-server`` of this test's own on a free port (never the shared one), so
    the test may kill it; yields its URL and process."""
    port = int(_closed_port_url().rsplit(":", 1)[1].split("/")[0])
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", process
    process.kill()
    process.wait(timeout=10)


async def test_an_open_socket_is_closed_with_4503_when_redis_dies(personas, private_redis) -> None:
    url, server = private_redis
    token = await database_sync_to_async(_token)(personas.member)
    layers = {
        "default": {
            **settings.CHANNEL_LAYERS["default"],
            "CONFIG": {**settings.CHANNEL_LAYERS["default"]["CONFIG"], "hosts": [url]},
        }
    }

    with override_settings(CHANNEL_LAYERS=layers):
        communicator = token_socket(token)
        assert (await communicator.connect())[0]
        hello = await communicator.receive_json_from()
        server.kill()
        closed = await communicator.receive_output(timeout=10)

    assert hello["type"] == "hello"
    assert (closed["type"], closed.get("code")) == ("websocket.close", 4503)
