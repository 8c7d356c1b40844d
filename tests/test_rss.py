"""RSS/Atom sources: the real feeds in ``../shared/data/rss_feeds/`` served on
127.0.0.1, added through the API, polled by ``manage.py run_sources --once`` through a
real Celery worker and PostgreSQL; conditional GET, resume, errors and the SSRF guard."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest
from django.core.management import call_command
from django.test import override_settings
from rest_framework.test import APIClient

from ingest.models import Event, Source
from ingest.polling import backoff_s
from ingest.sources import http
from ingest.sources.rss.adapter import html_to_text
from tests.factories import api_key, make_personas
from twiscope.redis import get_redis

pytestmark = [pytest.mark.django_db(transaction=True)]

FEED_TYPES = {".rss": "application/rss+xml", ".atom": "application/atom+xml"}

# Feeds not in ../shared/data: other encodings and date formats.
LATIN1_RSS = """<?xml version="1.0" encoding="ISO-8859-1"?>
<rss version="2.0"><channel><title>Le Journal</title>
<item><guid>lj-1</guid><title>Météo : alerte orange à Besançon</title>
<pubDate>Mon, 30 Nov 2026 08:15:00 +0100</pubDate>
<description>&lt;p&gt;Fortes pluies &lt;b&gt;attendues&lt;/b&gt;.&lt;/p&gt;</description></item>
<item><guid>lj-2</guid><title>Élections régionales</title>
<pubDate>30 Nov 2026 09:00 GMT</pubDate><description>Résultats.</description></item>
</channel></rss>""".encode("iso-8859-1")
ATOM_ISO = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Desk</title><id>urn:desk</id>
<updated>2026-11-30T10:00:00Z</updated>
<entry><id>urn:desk:1</id><title>Bridge reopened</title>
<updated>2026-11-30T09:30:00.250+02:00</updated>
<content type="html">&lt;div&gt;Traffic &amp;amp; trains resume.&lt;/div&gt;</content></entry>
<entry><id>urn:desk:2</id><title>Storm warning lifted</title>
<published>2026-11-30T07:00:00Z</published>
<summary>All clear.</summary></entry>
</feed>"""
TRUNCATED_RSS = b"""<?xml version="1.0"?><rss version="2.0"><channel><title>Broken</title>
<item><guid>b-1</guid><title>First item survives</title>
<pubDate>Mon, 30 Nov 2026 08:00:00 GMT</pubDate></item>
<item><guid>b-2</guid><title>Second item survives too</title></item>
<item><guid>b-3</guid><title>cut off in the mid"""


class FeedServer:
    """Serves ``documents`` (path → bytes) with an ETag and a Last-Modified, answering
    304 to a matching If-None-Match; ``statuses`` (path → (status, headers)) overrides.
    Counts requests and conditional ones; answers after ``delay_s`` seconds."""

    def __init__(self) -> None:
        self.documents: dict[str, bytes] = {}
        self.statuses: dict[str, tuple[int, dict[str, str]]] = {}
        self.requests: list[tuple[str, bool]] = []
        self.delay_s = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                conditional = "If-None-Match" in self.headers
                server.requests.append((self.path, conditional))
                if self.path in server.statuses:
                    status, headers = server.statuses[self.path]
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    return
                body = server.documents.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                etag = '"' + hashlib.sha1(body).hexdigest() + '"'
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                suffix = Path(self.path).suffix
                self.send_header("Content-Type", FEED_TYPES.get(suffix, "application/xml"))
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", "Mon, 30 Nov 2026 10:00:00 GMT")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def feeds() -> Iterator[FeedServer]:
    server = FeedServer()
    yield server
    server.close()


def owner_client(personas) -> APIClient:
    client = APIClient()
    token = api_key(personas.owner)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


def add_feed(client: APIClient, name: str, url: str) -> dict:
    response = client.post(
        "/api/sources/", {"kind": "rss", "name": name, "config": {"url": url}}, format="json"
    )
    assert response.status_code == 201, response.json()
    return response.json()


def poll_all() -> str:
    out = io.StringIO()
    call_command("run_sources", "--once", stdout=out)
    return out.getvalue()


def wait_for_events(expected: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if Event.objects.count() >= expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"{Event.objects.count()} of {expected} events after {timeout_s} s")


@override_settings(SOURCES_ALLOW_PRIVATE_URLS=True)
def test_every_real_feed_item_arrives_once_over_three_polls(
    shared_data, feeds, celery_worker
) -> None:
    import feedparser

    folder = shared_data / "rss_feeds"
    expected: dict[str, set[str]] = {}
    client = owner_client(make_personas())
    for path in sorted(folder.iterdir()):
        if path.suffix not in FEED_TYPES:
            continue
        feeds.documents["/" + path.name] = path.read_bytes()
        created = add_feed(client, path.stem, f"{feeds.base}/{path.name}")
        parsed = feedparser.parse(path.read_bytes())
        ids = {str(e.get("id") or e.get("link")) for e in parsed.entries}
        expected[str(created["id"])] = ids
    feeds.documents["/latin1.rss"] = LATIN1_RSS
    feeds.documents["/desk.atom"] = ATOM_ISO
    latin = add_feed(client, "le journal", f"{feeds.base}/latin1.rss")
    desk = add_feed(client, "desk", f"{feeds.base}/desk.atom")
    total = sum(len(ids) for ids in expected.values()) + 4

    first = poll_all()
    wait_for_events(total)
    second, third = poll_all(), poll_all()
    time.sleep(1)  # anything wrongly staged twice would be stored by now

    assert Event.objects.count() == total
    for source_id, ids in expected.items():
        stored = set(
            Event.objects.filter(source_id=source_id).values_list("external_id", flat=True)
        )
        assert len(stored) == len(ids), source_id
    assert "new, 0 already stored" in first
    assert second.count("not modified") == len(expected) + 2
    assert third.count("not modified") == len(expected) + 2
    assert all(conditional for _, conditional in feeds.requests[-len(expected) - 2 :])
    journal = Event.objects.get(source_id=latin["id"], external_id="lj-1")
    assert journal.text == "Météo : alerte orange à Besançon. Fortes pluies attendues ."
    assert journal.created_at == datetime(2026, 11, 30, 7, 15, tzinfo=UTC)
    assert Event.objects.get(external_id="lj-2").created_at == datetime(2026, 11, 30, 9, tzinfo=UTC)
    bridge = Event.objects.get(source_id=desk["id"], external_id="urn:desk:1")
    assert bridge.text == "Bridge reopened. Traffic & trains resume."
    # feedparser gives whole seconds (a struct_time); the offset is applied.
    assert bridge.created_at == datetime(2026, 11, 30, 7, 30, tzinfo=UTC)
    listed = client.get(f"/api/events/?source={desk['id']}").json()["results"]
    assert sorted(e["external_id"] for e in listed) == ["urn:desk:1", "urn:desk:2"]


@override_settings(SOURCES_ALLOW_PRIVATE_URLS=True)
def test_a_changed_feed_gives_only_its_new_items(feeds, celery_worker) -> None:
    client = owner_client(make_personas())
    feeds.documents["/desk.atom"] = ATOM_ISO
    source = add_feed(client, "desk", f"{feeds.base}/desk.atom")
    poll_all()
    wait_for_events(2)

    feeds.documents["/desk.atom"] = ATOM_ISO.replace(
        b"</feed>",
        b"<entry><id>urn:desk:3</id><title>Ferry back</title>"
        b"<updated>2026-11-30T11:00:00Z</updated></entry></feed>",
    )
    report = poll_all()
    wait_for_events(3)

    assert f"desk (id {source['id']}): 1 new, 2 already stored" in report
    assert Event.objects.count() == 3


@override_settings(SOURCES_ALLOW_PRIVATE_URLS=True)
def test_a_malformed_feed_gives_what_it_can_and_says_so(feeds, celery_worker) -> None:
    client = owner_client(make_personas())
    feeds.documents["/broken.rss"] = TRUNCATED_RSS
    source = add_feed(client, "broken", f"{feeds.base}/broken.rss")

    poll_all()
    wait_for_events(2)

    assert {"b-1", "b-2"} <= set(Event.objects.values_list("external_id", flat=True))
    shown = client.get(f"/api/sources/{source['id']}/").json()
    assert shown["last_error"].startswith("the feed was read in part")
    assert shown["error_permanent"] is False
    assert shown["state"] == "running"


@override_settings(SOURCES_ALLOW_PRIVATE_URLS=True)
def test_a_gone_feed_fails_until_edited_and_a_busy_one_backs_off(feeds, clean_redis) -> None:
    client = owner_client(make_personas())
    gone = add_feed(client, "gone", f"{feeds.base}/gone.rss")
    busy = add_feed(client, "busy", f"{feeds.base}/busy.rss")
    feeds.statuses["/busy.rss"] = (503, {"Retry-After": "120"})

    report = poll_all()
    gone_shown = client.get(f"/api/sources/{gone['id']}/").json()
    busy_shown = client.get(f"/api/sources/{busy['id']}/").json()

    assert "failed (permanent): HTTP 404" in report
    assert (gone_shown["state"], gone_shown["error_permanent"]) == ("failing", True)
    assert "failed (temporary, will retry): HTTP 503" in report
    assert busy_shown["state"] == "backing_off"
    retry_at = datetime.fromisoformat(Source.objects.get(id=busy["id"]).cursor["retry_at"])
    assert (retry_at - datetime.now(UTC)).total_seconds() > 110  # Retry-After honoured

    requests_before = len(feeds.requests)
    assert f"gone (id {gone['id']})" not in poll_all()  # failing: not retried
    assert len(feeds.requests) == requests_before + 1  # only the busy feed

    feeds.documents["/gone.rss"] = LATIN1_RSS
    url = f"{feeds.base}/gone.rss"
    edited = client.patch(
        f"/api/sources/{gone['id']}/", {"config": {"url": url}}, format="json"
    ).json()
    assert edited["state"] == "running"
    assert f"gone (id {gone['id']}): 2 new" in poll_all()


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    draws = [backoff_s(failures) for failures in (1, 3, 20) for _ in range(50)]

    assert all(0 <= d <= 30 for d in draws[:50])
    assert all(0 <= d <= 120 for d in draws[50:100])
    assert max(draws[100:]) <= 3600 and max(draws[100:]) > 1000
    assert len(set(draws)) > 100  # jittered, not a fixed schedule
    assert backoff_s(1, retry_after_s=900) >= 900


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/feed.xml",
        "http://localhost/feed",
        "http://10.1.2.3/feed",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/feed",
        "file:///etc/passwd",
        "gopher://example.org/",
        "not a url",
    ],
)
def test_a_feed_url_inside_the_network_is_refused_with_400(url: str) -> None:
    client = owner_client(make_personas())

    response = client.post(
        "/api/sources/", {"kind": "rss", "name": "probe", "config": {"url": url}}, format="json"
    )

    assert response.status_code == 400
    assert "url" in response.json()["config"]
    assert not Source.objects.filter(name="probe").exists()


def test_a_public_name_resolving_inside_is_refused_and_redirects_are_checked(feeds) -> None:
    inside = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 80))]
    with (
        mock.patch("socket.getaddrinfo", return_value=inside),
        pytest.raises(http.UnsafeURL, match=r"10\.0\.0\.7"),
    ):
        http.check_url("http://feeds.example.com/rss")

    feeds.statuses["/hop"] = (302, {"Location": "/private/admin"})
    real_check = http.check_url

    def allow_only_public(url: str, *, allow_private: bool | None = None) -> None:
        if "/private" in url:
            raise http.UnsafeURL("redirected inside")
        real_check(url, allow_private=True)

    with (
        mock.patch.object(http, "check_url", allow_only_public),
        pytest.raises(http.UnsafeURL, match="redirected inside"),
    ):
        http.fetch(f"{feeds.base}/hop")
    assert [path for path, _ in feeds.requests] == ["/hop"]  # never fetched the target


def test_bad_feed_configs_answer_400_per_field() -> None:
    client = owner_client(make_personas())

    response = client.post(
        "/api/sources/",
        {"kind": "rss", "name": "f", "config": {"poll_interval_s": 5, "colour": "red"}},
        format="json",
    )

    assert response.status_code == 400
    assert set(response.json()["config"]) == {"url", "poll_interval_s", "colour"}


def test_html_is_reduced_to_text() -> None:
    assert html_to_text("<p>One &amp; <b>two</b></p><p>three</p>") == "One & two three"
    assert html_to_text("plain") == "plain"


@override_settings(SOURCES_ALLOW_PRIVATE_URLS=True)
def test_items_published_minutes_before_the_poll_count_in_trends(feeds, celery_worker) -> None:
    """A feed's new items are dated minutes before the poll that finds them: with a
    push source's one-second lateness they would all be late, never in a trend."""
    from email.utils import format_datetime

    from ingest.services import declare_live_progress
    from mlengine.models import StreamClock

    now = datetime.now(UTC)

    def document(*minutes_ago: int) -> bytes:
        items = "".join(
            f"<item><guid>fresh-{m}</guid><title>Levee breach #flood {m}</title>"
            f"<pubDate>{format_datetime(now - timedelta(minutes=m))}</pubDate></item>"
            for m in minutes_ago
        )
        return f'<?xml version="1.0"?><rss version="2.0"><channel>{items}</channel></rss>'.encode()

    feeds.documents["/fresh.rss"] = document(25)
    source = add_feed(owner_client(make_personas()), "fresh", f"{feeds.base}/fresh.rss")
    poll_all()
    wait_for_events(1)
    declare_live_progress()  # the live watermark moves on, as beat does every few seconds
    feeds.documents["/fresh.rss"] = document(25, 12, 3)
    poll_all()
    wait_for_events(3)
    declare_live_progress()

    # Under a push source's lateness the two new items are late within a second or two.
    deadline = time.monotonic() + 10
    late = 0
    while time.monotonic() < deadline and not late:
        late = StreamClock.objects.get(source_id=source["id"]).late_events
        time.sleep(0.2)
    assert late == 0
    watermark = Source.objects.get(id=source["id"]).input_watermark
    assert watermark is not None
    expected = datetime.now(UTC) - timedelta(seconds=300 + 3600)
    assert abs((watermark - expected).total_seconds()) < 30


def stop_mid_poll(feeds, signum: int) -> tuple[int, str]:
    """Start ``manage.py run_sources`` as its own process (as ``make run`` and compose
    run it), send it ``signum`` once it is reading a feed, and return its exit status
    and output."""
    import os
    import subprocess
    import sys

    from django.db import connection

    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "twiscope.settings_test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{db['NAME']}",
        "SOURCES_ALLOW_PRIVATE_URLS": "true",
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "manage.py", "run_sources"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not feeds.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert feeds.requests, "run_sources never polled the feed"
        process.send_signal(signum)  # mid-poll: the feed answers in 3 s
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    feeds.delay_s = 0.0
    return process.returncode, output


@override_settings(SOURCES_ALLOW_PRIVATE_URLS=True)
def test_sigterm_mid_poll_lets_the_poll_finish_and_a_restart_stores_nothing_twice(
    shared_data, feeds, celery_worker
) -> None:
    """``run_sources`` stopped with SIGTERM while a slow feed is answering: the poll in
    progress finishes (its items staged, its cursor saved), the process exits 0, and the
    next poll stores nothing twice."""
    import signal

    feeds.documents["/guardian.rss"] = (shared_data / "rss_feeds" / "guardian.rss").read_bytes()
    feeds.delay_s = 3.0
    source = add_feed(owner_client(make_personas()), "slow", f"{feeds.base}/guardian.rss")

    returncode, output = stop_mid_poll(feeds, signal.SIGTERM)

    assert returncode == 0, output
    assert f"slow (id {source['id']}): 55 new" in output
    assert "run_sources: stopped" in output
    wait_for_events(55)
    assert "not modified" in poll_all()  # the cursor (ETag) was saved before exiting
    time.sleep(1)
    assert Event.objects.filter(source_id=source["id"]).count() == 55


@override_settings(SOURCES_ALLOW_PRIVATE_URLS=True)
def test_sigkill_mid_poll_loses_nothing_and_a_restart_stores_each_item_once(
    shared_data, feeds, celery_worker
) -> None:
    """``run_sources`` killed outright (SIGKILL: no cleanup at all) while a slow feed is
    answering: nothing was staged and no cursor saved, so the restart reads the feed
    again and stores each item exactly once."""
    import signal

    feeds.documents["/guardian.rss"] = (shared_data / "rss_feeds" / "guardian.rss").read_bytes()
    feeds.delay_s = 3.0
    source = add_feed(owner_client(make_personas()), "killed", f"{feeds.base}/guardian.rss")

    returncode, _ = stop_mid_poll(feeds, signal.SIGKILL)

    assert returncode == -signal.SIGKILL
    assert Source.objects.get(id=source["id"]).cursor == {}
    # The killed process's poll lock outlives it until its TTL (LOCK_TTL_S): until then
    # a restart skips the source rather than poll it twice at once.
    assert "skipped (another process is polling it)" in poll_all()
    get_redis().delete(f"twiscope:poll:{source['id']}")  # the TTL, run out
    assert f"killed (id {source['id']}): 55 new" in poll_all()
    wait_for_events(55)
    again = poll_all()
    assert "0 new" in again or "not modified" in again
    time.sleep(1)
    assert Event.objects.filter(source_id=source["id"]).count() == 55
