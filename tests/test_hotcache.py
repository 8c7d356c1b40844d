"""The hot cache (``twiscope.hotcache``): stats, current trends and the alerts list come
from Redis, change when the pipeline changes their data, never cross teams, and read no
table on a hit."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from alerts import push
from ingest import services as ingest_services
from tests import factories
from tests.factories import Personas
from twiscope import hotcache
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db

TRENDS = "/api/trends/?current=true&ordering=-score"
HOT_PATHS = ["/api/stats/", TRENDS, "/api/alerts/"]
DATA_TABLES = ("ingest_", "mlengine_", "alerts_")


@pytest.fixture
def personas() -> Personas:
    get_redis().flushdb()
    return factories.make_personas()


def test_stats_change_when_the_pipeline_persists_events(personas: Personas) -> None:
    source = factories.make_source(personas.team)
    client = factories.as_user(personas.member)
    factories.run_through(source, [factories.envelope("first post")])
    assert client.get("/api/stats/").json()["events_total"] == 1
    assert client.get("/api/stats/").json()["events_total"] == 1  # a hit

    factories.run_through(source, [factories.envelope(f"post {i}", minutes=i) for i in (1, 2)])

    assert client.get("/api/stats/").json()["events_total"] == 3


def test_stats_change_when_the_pipeline_parks_a_dead_letter(personas: Personas) -> None:
    source = factories.make_source(personas.team)
    client = factories.as_user(personas.member)
    assert client.get("/api/stats/").json()["dead_letters_total"] == 0

    with factories.commits_without_broker():
        ingest_services.record_dead_letters(
            stage="replay", source=source, items=[("bad row", {"line": 1})]
        )

    assert client.get("/api/stats/").json()["dead_letters_total"] == 1


def test_current_trends_change_when_the_trend_stage_detects_one(personas: Personas) -> None:
    source = factories.make_source(personas.team)
    client = factories.as_user(personas.member)
    factories.run_through(source, factories.quiet_history(6), close=False)
    assert client.get(TRENDS).json()["results"] == []

    factories.run_through(source, factories.burst("#blizzard", count=12, minutes=91))

    assert "#blizzard" in {t["term"] for t in client.get(TRENDS).json()["results"]}


def test_alerts_list_changes_when_alerts_fire_and_are_pushed(personas: Personas) -> None:
    client = factories.as_user(personas.member)
    assert client.get("/api/alerts/").json()["results"] == []
    assert client.get("/api/stats/").json()["alert_latency_ms"]["n"] == 0

    with factories.commits_without_broker():
        alert_ids = factories.fire_blizzard_alerts(personas.team)  # on commit: pushed
    listed = client.get("/api/alerts/").json()["results"]

    assert sorted(a["id"] for a in listed) == sorted(alert_ids)
    assert all(a["pushed_at"] is not None for a in listed)
    assert client.get("/api/stats/").json()["alert_latency_ms"]["n"] == len(alert_ids)


def test_a_committed_alert_shows_once_its_push_starts(personas: Personas) -> None:
    client = factories.as_user(personas.member)
    client.get("/api/alerts/")
    alert_ids = factories.fire_blizzard_alerts(personas.team)  # not pushed

    push.push_alerts(alert_ids=alert_ids)

    assert len(client.get("/api/alerts/").json()["results"]) == len(alert_ids)


@pytest.mark.parametrize("path", HOT_PATHS)
def test_another_teams_data_never_appears(personas: Personas, path: str) -> None:
    with factories.commits_without_broker():
        factories.fire_blizzard_alerts(personas.other_team)
    theirs = factories.as_user(personas.outsider).get(path).json()  # cached for their team

    mine = factories.as_user(personas.member).get(path).json()

    assert mine != theirs
    if "results" in mine:
        assert mine["results"] == []
    else:
        assert mine["events_total"] == 0
        assert mine["alert_latency_ms"]["n"] == 0


@pytest.mark.parametrize("path", HOT_PATHS)
def test_a_member_of_two_teams_gets_a_fresh_answer(personas: Personas, path: str) -> None:
    with factories.commits_without_broker():
        factories.fire_blizzard_alerts(personas.team)
    alone = factories.as_user(personas.member).get(path).json()
    personas.other_team.memberships.create(user_id=personas.member.pk, role="member")
    with factories.commits_without_broker():
        factories.fire_blizzard_alerts(personas.other_team)

    both = factories.as_user(personas.member).get(path).json()

    assert both != alone


@pytest.mark.parametrize("path", HOT_PATHS)
def test_a_cached_hit_reads_no_data_table(personas: Personas, path: str) -> None:
    with factories.commits_without_broker():
        factories.fire_blizzard_alerts(personas.team)
    client = factories.as_user(personas.member)
    first = client.get(path)

    with CaptureQueriesContext(connection) as queries:
        hit = client.get(path)

    assert hit.json() == first.json()
    tables = [q["sql"] for q in queries.captured_queries]
    assert not [sql for sql in tables if any(f'"{t}' in sql or f" {t}" in sql for t in DATA_TABLES)]
    # the token (with its user) and the caller's teams: authentication and scope only
    assert len(queries.captured_queries) <= 2


def test_the_cache_is_off_with_a_ttl_of_zero(personas: Personas, settings: Any) -> None:
    settings.HOT_CACHE_TTL_S = 0
    client = factories.as_user(personas.member)
    client.get("/api/stats/")
    with CaptureQueriesContext(connection) as second:
        client.get("/api/stats/")

    # authentication, teams, and the four stored numbers again
    assert len(second.captured_queries) == 2 + 4


def test_bump_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown cache kind"):
        hotcache.bump("everything", [1])
