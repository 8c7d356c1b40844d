"""A dashboard that was away gets every alert it missed: in order, each once.

The channel layer is at most once, so a client that reconnects (or sees a gap in
``seq``) catches up over REST: ``GET /api/alerts/?team=<id>&after_seq=<held>&ordering=seq``,
following ``next`` until it is null. Tested three ways: the API's paging, a WebSocket
client plus that REST loop (the protocol), and the real dashboard (``app.js``) in a
headless Chromium driven over the DevTools protocol, against daphne as ``make run``
serves it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from websockets.sync.client import connect

from alerts import push
from tests.factories import make_alerts, make_personas
from twiscope.asgi import application
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db(transaction=True)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def personas():
    get_redis().flushdb()
    return make_personas()


def _fire(team, count: int) -> list[int]:
    """Commit ``count`` alerts of ``team`` and push them, as the alerts stage does."""
    ids = make_alerts(team, count)
    push.push_alerts(alert_ids=ids)
    return ids


def _api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def catch_up(
    client: Client | APIClient, team_id: int, after_seq: int, page_size: int
) -> list[dict]:
    """What the dashboard does after a reconnect or a gap: every alert of the team after
    ``after_seq``, oldest first, following ``next`` until it is null."""
    url: str | None = (
        f"/api/alerts/?team={team_id}&after_seq={after_seq}&ordering=seq&page_size={page_size}"
    )
    alerts: list[dict] = []
    while url:
        page = client.get(url).json()
        alerts.extend(page["results"])
        url = page["next"]
    return alerts


# --- The API ---------------------------------------------------------------------------


def test_ordering_by_seq_pages_through_every_later_alert_oldest_first(personas) -> None:
    ids = make_alerts(personas.team, 120)
    make_alerts(personas.other_team, 5)

    alerts = catch_up(_api(personas.member), personas.team.id, after_seq=7, page_size=50)

    assert [a["seq"] for a in alerts] == list(range(8, 121))
    assert [a["id"] for a in alerts] == ids[7:]


def test_the_default_order_stays_newest_first(personas) -> None:
    ids = make_alerts(personas.team, 3)

    results = _api(personas.member).get("/api/alerts/").json()["results"]

    assert [a["id"] for a in results] == ids[::-1]


def test_an_unknown_ordering_answers_400(personas) -> None:
    response = _api(personas.member).get("/api/alerts/", {"ordering": "title"})

    assert response.status_code == 400
    assert "ordering" in response.json()


def test_a_catch_up_never_shows_another_teams_alerts(personas) -> None:
    make_alerts(personas.team, 4)

    response = _api(personas.outsider).get(
        "/api/alerts/", {"team": personas.team.id, "after_seq": 0, "ordering": "seq"}
    )

    assert response.status_code == 400  # not a team of the caller: no data, no hint


# --- The protocol: a WebSocket client plus the REST catch-up ---------------------------


async def test_120_alerts_missed_while_disconnected_all_arrive_after_the_reconnect(
    personas,
) -> None:
    token = await database_sync_to_async(lambda: Token.objects.get(user=personas.member).key)()
    path = f"/ws/alerts/?token={token}"
    team = str(personas.team.id)
    first = WebsocketCommunicator(application, path)
    assert (await first.connect())[0]
    held = (await first.receive_json_from())["teams"][team]
    before = await database_sync_to_async(_fire)(personas.team, 2)
    received = [await first.receive_json_from(timeout=5) for _ in before]
    held = max([held] + [m["seq"] for m in received])
    await first.disconnect()

    missed = []
    for _ in range(4):  # four batches of 30, as four alert tasks would commit them
        missed += await database_sync_to_async(_fire)(personas.team, 30)
    again = WebsocketCommunicator(application, path)
    assert (await again.connect())[0]
    hello = await again.receive_json_from()
    caught_up = await database_sync_to_async(catch_up)(
        _api(personas.member), personas.team.id, held, 50
    )
    after = await database_sync_to_async(_fire)(personas.team, 3)
    pushed = [await again.receive_json_from(timeout=5) for _ in after]
    await again.disconnect()

    by_seq = {a["seq"]: a["id"] for a in caught_up} | {m["seq"]: m["alert"]["id"] for m in pushed}
    assert hello["teams"][team] == held + 120
    assert [a["id"] for a in caught_up] == missed
    assert list(by_seq) == list(range(held + 1, held + 124))
    assert list(by_seq.values()) == missed + after


# --- The dashboard in a real browser ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, probe: Callable[[], Any], timeout: float = 30) -> Any:
    """``probe()``'s first truthy value, polled every 0.1 s; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what} (last: {value!r})"
        time.sleep(0.1)


@contextmanager
def _daphne(port: int, **env: str) -> Iterator[None]:
    """daphne serving ``twiscope.asgi:application`` on ``port`` over the test database,
    as ``make run`` runs it; stopped (SIGTERM) on exit."""
    db = settings.DATABASES["default"]
    database_url = (
        f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "daphne", "-b", "127.0.0.1", "-p", str(port)),
            "twiscope.asgi:application",
        ],
        cwd=REPO,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "twiscope.settings_test",
            "DATABASE_URL": database_url,
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            assert process.poll() is None, "daphne exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        _wait("daphne to listen", listening)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


class Page:
    """One Chromium tab driven over the Chrome DevTools Protocol (JSON over a
    WebSocket: https://chromedevtools.github.io/devtools-protocol/)."""

    def __init__(self, ws_url: str) -> None:
        self._stack = ExitStack()
        self._ws = self._stack.enter_context(connect(ws_url, max_size=None, proxy=None))
        self._ids = iter(range(1, 1_000_000))

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and return its ``result`` (events in between are dropped)."""
        command_id = next(self._ids)
        self._ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=30))
            if message.get("id") == command_id:
                assert "error" not in message, message["error"]
                return dict(message["result"])

    def eval(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def chromium() -> Iterator[Callable[[], Page]]:
    """Opens tabs of a headless Chromium (Debian's ``chromium``); skips when it is not
    installed."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="twiscope-chromium-")
    process = subprocess.Popen(
        [
            binary,
            *("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"),
            *("--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    pages: list[Page] = []
    try:
        assert process.stderr is not None
        port = None
        while port is None:
            line = process.stderr.readline()
            assert line, "chromium exited before it listened"
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = match and int(match.group(1))

        def open_page() -> Page:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = json.load(r)
            page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
            pages.append(page)
            return page

        yield open_page
    finally:
        for page in pages:
            page.close()
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def _logged_in_page(open_page: Callable[[], Page], user, base: str) -> Page:
    client = Client()
    client.force_login(user)
    page = open_page()
    page.call(
        "Network.setCookie", name="sessionid", value=client.cookies["sessionid"].value, url=base
    )
    page.call("Page.navigate", url=f"{base}/")
    return page


CONN_LABEL = "document.querySelector('#conn .conn-label')?.textContent || ''"
ALERT_ROWS = (
    "[...document.querySelectorAll('#alerts-list li.alert')]"
    ".map(li => [Number(li.dataset.id), Number(li.dataset.seq)])"
)


@pytest.mark.slow
def test_the_dashboard_shows_all_120_alerts_missed_while_disconnected_in_order_once(
    personas, chromium
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    earlier = make_alerts(personas.team, 3)
    with _daphne(port):
        page = _logged_in_page(chromium, personas.member, base)
        _wait("the feed to go live", lambda: page.eval(CONN_LABEL) == "live")
        _wait("the first alerts", lambda: len(page.eval(ALERT_ROWS)) == 3)

    reconnecting = _wait(
        "the reconnecting notice",
        lambda: "reconnecting" in page.eval(CONN_LABEL) and page.eval(CONN_LABEL),
    )
    missed = []
    for _ in range(4):  # pushed while no server listens: only the catch-up can bring them
        missed += _fire(personas.team, 30)

    with _daphne(port):
        rows = _wait(
            "the 120 missed alerts",
            lambda: len(page.eval(ALERT_ROWS)) == 123 and page.eval(ALERT_ROWS),
            timeout=60,
        )
        label = page.eval(CONN_LABEL)

    assert reconnecting.startswith("reconnecting")
    assert label == "live"
    assert [seq for _, seq in rows] == list(range(123, 0, -1))
    assert [alert_id for alert_id, _ in rows] == (earlier + missed)[::-1]


@pytest.mark.slow
def test_the_dashboard_says_reconnecting_while_the_server_refuses_with_4503(
    personas, chromium
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with _daphne(port, REDIS_URL=f"redis://127.0.0.1:{_free_port()}/0"):
        page = _logged_in_page(chromium, personas.member, base)
        label = _wait(
            "the 4503 notice",
            lambda: "server unavailable" in page.eval(CONN_LABEL) and page.eval(CONN_LABEL),
        )

    assert label.startswith("reconnecting in ")
