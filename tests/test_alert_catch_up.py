"""A dashboard that was away gets every alert it missed: in order, each once.

The channel layer is at most once, so a client that reconnects (or sees a gap in
``seq``) catches up over REST: ``GET /api/alerts/?team=<id>&after_seq=<held>&ordering=seq``,
following ``next`` until it is null. Tested three ways: the API's paging, a WebSocket
client plus that REST loop (the protocol), and the real dashboard (``app.js``) in a
headless Chromium driven by Playwright (the ``page`` fixture of ``conftest.py``), against
daphne as ``make run`` serves it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client
from playwright.async_api import Locator, Page, expect
from rest_framework.test import APIClient

from alerts import push
from teams.models import Team
from tests.factories import Personas, api_key, make_alerts, make_personas, token_socket
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db(transaction=True)

REPO = Path(__file__).resolve().parents[1]
PATIENCE_MS = 30_000
"""How long the browser tests wait for the page to show a state (Playwright's default,
5 s, is short for daphne's first answers on a busy machine)."""


@pytest.fixture
def personas() -> Personas:
    get_redis().flushdb()
    return make_personas()


def _fire(team: Team, count: int) -> list[int]:
    """Commit ``count`` alerts of ``team`` and push them, as the alerts stage does."""
    ids = make_alerts(team, count)
    push.push_alerts(alert_ids=ids)
    return ids


def _api(user: AbstractBaseUser) -> APIClient:
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


def test_ordering_by_seq_pages_through_every_later_alert_oldest_first(personas: Personas) -> None:
    ids = make_alerts(personas.team, 120)
    make_alerts(personas.other_team, 5)

    alerts = catch_up(_api(personas.member), personas.team.id, after_seq=7, page_size=50)

    assert [a["seq"] for a in alerts] == list(range(8, 121))
    assert [a["id"] for a in alerts] == ids[7:]


def test_the_default_order_stays_newest_first(personas: Personas) -> None:
    ids = make_alerts(personas.team, 3)

    results = _api(personas.member).get("/api/alerts/").json()["results"]

    assert [a["id"] for a in results] == ids[::-1]


def test_an_unknown_ordering_answers_400(personas: Personas) -> None:
    response = _api(personas.member).get("/api/alerts/", {"ordering": "title"})

    assert response.status_code == 400
    assert "ordering" in response.json()


def test_a_catch_up_never_shows_another_teams_alerts(personas: Personas) -> None:
    make_alerts(personas.team, 4)

    response = _api(personas.outsider).get(
        "/api/alerts/", {"team": personas.team.id, "after_seq": 0, "ordering": "seq"}
    )

    assert response.status_code == 400  # not a team of the caller: no data, no hint


# --- The protocol: a WebSocket client plus the REST catch-up ---------------------------


async def test_120_alerts_missed_while_disconnected_all_arrive_after_the_reconnect(
    personas: Personas,
) -> None:
    token = api_key(personas.member)
    team = str(personas.team.id)
    first = token_socket(token)
    assert (await first.connect())[0]
    held = (await first.receive_json_from())["teams"][team]
    before = await database_sync_to_async(_fire)(personas.team, 2)
    received = [await first.receive_json_from(timeout=5) for _ in before]
    held = max([held] + [m["seq"] for m in received])
    await first.disconnect()

    missed = []
    for _ in range(4):  # four batches of 30, as four alert tasks would commit them
        missed += await database_sync_to_async(_fire)(personas.team, 30)
    again = token_socket(token)
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
    as ``make run`` runs it; stopped (SIGTERM) on exit. Blocks while it starts and stops
    (seconds); in an async test the browser's messages wait in the pipe meanwhile."""
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


def _session_cookie(user: AbstractBaseUser) -> str:
    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


async def _open_dashboard(page: Page, user: AbstractBaseUser, base: str) -> None:
    """Log ``user`` in (a session cookie for ``base``) and open the dashboard."""
    session = await database_sync_to_async(_session_cookie)(user)
    await page.context.add_cookies([{"name": "sessionid", "value": session, "url": base}])
    await page.goto(f"{base}/")


def _conn_label(page: Page) -> Locator:
    return page.locator("#conn .conn-label")


def _alert_rows(page: Page) -> Locator:
    return page.locator("#alerts-list li.alert")


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_the_dashboard_shows_all_120_alerts_missed_while_disconnected_in_order_once(
    personas: Personas, page: Page
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    earlier = await database_sync_to_async(make_alerts)(personas.team, 3)
    with _daphne(port):
        await _open_dashboard(page, personas.member, base)
        await expect(_conn_label(page)).to_have_text("live", timeout=PATIENCE_MS)
        await expect(_alert_rows(page)).to_have_count(3, timeout=PATIENCE_MS)

    await expect(_conn_label(page)).to_have_text(re.compile("^reconnecting"), timeout=PATIENCE_MS)
    missed = []
    for _ in range(4):  # pushed while no server listens: only the catch-up can bring them
        missed += await database_sync_to_async(_fire)(personas.team, 30)

    with _daphne(port):
        await expect(_alert_rows(page)).to_have_count(123, timeout=2 * PATIENCE_MS)
        rows = await _alert_rows(page).evaluate_all(
            "lis => lis.map(li => [Number(li.dataset.id), Number(li.dataset.seq)])"
        )
        label = await _conn_label(page).text_content()

    assert label == "live"
    assert [seq for _, seq in rows] == list(range(123, 0, -1))
    assert [alert_id for alert_id, _ in rows] == (earlier + missed)[::-1]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_the_dashboard_says_reconnecting_while_the_server_refuses_with_4503(
    personas: Personas, page: Page
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with _daphne(port, REDIS_URL=f"redis://127.0.0.1:{_free_port()}/0"):
        await _open_dashboard(page, personas.member, base)
        await expect(_conn_label(page)).to_have_text(
            re.compile(r"^reconnecting in .*server unavailable"), timeout=PATIENCE_MS
        )
