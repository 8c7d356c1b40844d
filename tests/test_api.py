"""The REST API: authentication, team scoping (no IDOR), filters, pagination, budgets."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from alerts import services as alert_services
from alerts.models import Alert, AlertRule
from mlengine.models import Trend
from tests.factories import (
    ORIGIN,
    burst,
    envelope,
    make_personas,
    make_rule,
    make_source,
    quiet_history,
    run_through,
)
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get(user=user).key}")
    return client


@pytest.fixture
def world():
    get_redis().flushdb()
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team, name="everything")
    trend_ids = run_through(source, quiet_history(6) + burst("#blizzard", count=12, minutes=91))
    alert_services.evaluate_trends(trend_ids=trend_ids)
    other_source = make_source(personas.other_team, name="theirs")
    run_through(other_source, [envelope("secret of the rivals #hidden")])
    return personas, source, other_source


@pytest.mark.parametrize(
    "path",
    [
        "/api/events/",
        "/api/trends/",
        "/api/alerts/",
        "/api/stats/",
        "/api/sources/",
        "/api/rules/",
        "/api/dead-letters/",
    ],
)
def test_every_endpoint_refuses_an_anonymous_caller(path: str) -> None:
    assert APIClient().get(path).status_code == 401


def test_a_bad_token_is_refused() -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert client.get("/api/events/").status_code == 401


def test_events_are_scoped_to_the_callers_teams(world) -> None:
    personas, source, _other_source = world

    mine = client_for(personas.member).get("/api/events/?page_size=500").json()["results"]
    theirs = client_for(personas.outsider).get("/api/events/").json()["results"]

    assert {e["source"] for e in mine} == {source.id}
    assert [e["text"] for e in theirs] == ["secret of the rivals #hidden"]


def test_another_teams_object_answers_404_not_its_data(world) -> None:
    personas, _source, other_source = world
    their_event = other_source.events.get()
    client = client_for(personas.member)

    assert client.get(f"/api/events/{their_event.id}/").status_code == 404
    assert client.get(f"/api/sources/{other_source.id}/").status_code == 404
    assert client.get(f"/api/events/?source={other_source.id}").status_code == 400


def test_events_filter_by_event_time_text_and_trend(world) -> None:
    personas, _source, _ = world
    client = client_for(personas.member)
    trend = Trend.objects.get(term="#blizzard")
    since = (ORIGIN + timedelta(minutes=90)).isoformat().replace("+00:00", "Z")

    by_time = client.get("/api/events/", {"since": since, "page_size": 500}).json()["results"]
    by_text = client.get("/api/events/", {"q": "ORDINARY DAY", "page_size": 500}).json()["results"]
    by_trend = client.get("/api/events/", {"trend": trend.id, "page_size": 500}).json()["results"]

    assert len(by_time) == 12
    assert len(by_text) == 60
    assert len(by_trend) == 12 and all("#blizzard" in e["hashtags"] for e in by_trend)


def test_events_are_cursor_paginated_newest_event_time_first(world) -> None:
    personas, _, _ = world
    client = client_for(personas.member)

    first = client.get("/api/events/", {"page_size": 50}).json()
    second = client.get(first["next"]).json()

    times = [datetime.fromisoformat(e["created_at"]) for e in first["results"] + second["results"]]
    assert times == sorted(times, reverse=True)
    assert len({e["id"] for e in first["results"] + second["results"]}) == 72
    assert "cursor=" in first["next"]


def test_a_malformed_filter_answers_400_with_field_errors(world) -> None:
    personas, _, _ = world

    response = client_for(personas.member).get("/api/events/", {"since": "last tuesday"})

    assert response.status_code == 400
    assert "since" in response.json()


def test_trends_list_current_trends_by_score(world) -> None:
    personas, source, _ = world

    body = client_for(personas.member).get("/api/trends/?current=true&ordering=-score").json()

    terms = [t["term"] for t in body["results"]]
    assert "#blizzard" in terms
    assert body["results"][0]["source"] == {"id": source.id, "name": source.name, "kind": "replay"}
    scores = [t["score"] for t in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_alerts_carry_their_latency_fields(world) -> None:
    personas, _, _ = world

    alert = client_for(personas.member).get("/api/alerts/").json()["results"][0]

    assert {
        "id",
        "rule",
        "title",
        "severity",
        "event_received_at",
        "created_at",
        "pushed_at",
        "seq",
        "evidence",
        "latency_ms",
    } <= alert.keys()
    assert alert["rule"]["name"] == "everything"


def test_the_outsider_sees_no_alerts_of_the_team(world) -> None:
    personas, _, _ = world

    assert client_for(personas.outsider).get("/api/alerts/").json()["results"] == []


@pytest.mark.parametrize(
    "path", ["/api/events/", "/api/trends/", "/api/alerts/", "/api/rules/", "/api/sources/"]
)
def test_list_endpoints_keep_their_query_budget(world, path, django_assert_max_num_queries) -> None:
    personas, _, _ = world
    client = client_for(personas.member)

    with django_assert_max_num_queries(4):
        response = client.get(path, {"page_size": 100})

    assert response.status_code == 200


def test_stats_report_volume_queues_and_alert_latency(world) -> None:
    personas, _, _ = world
    Alert.objects.update(pushed_at=ORIGIN)

    stats = client_for(personas.member).get("/api/stats/").json()

    assert stats["events_total"] == 72
    assert set(stats["queue_lag"]) == {"ingest", "enrich", "ml", "alerts"}
    assert stats["alert_latency_ms"]["n"] == Alert.objects.filter(team=personas.team).count()
    assert stats["alert_latency_ms"]["p95"] is not None
    assert stats["sources_total"] == 1


def test_an_owner_creates_a_rule_and_a_member_cannot(world) -> None:
    personas, source, _ = world
    body = {
        "team": personas.team.id,
        "name": "storms",
        "terms": ["#blizzard"],
        "min_score": 5,
        "severity": "critical",
        "source": source.id,
    }

    created = client_for(personas.owner).post("/api/rules/", body, format="json")
    refused = client_for(personas.member).post("/api/rules/", {**body, "name": "x"}, format="json")

    assert created.status_code == 201, created.json()
    assert AlertRule.objects.get(name="storms").severity == "critical"
    assert refused.status_code == 400 and "team" in refused.json()


def test_a_member_cannot_change_a_rule_but_the_owner_can(world) -> None:
    personas, _, _ = world
    rule = AlertRule.objects.get(name="everything")

    member = client_for(personas.member).patch(
        f"/api/rules/{rule.id}/", {"enabled": False}, format="json"
    )
    owner = client_for(personas.owner).patch(
        f"/api/rules/{rule.id}/", {"enabled": False}, format="json"
    )

    assert member.status_code == 403
    assert owner.status_code == 200
    rule.refresh_from_db()
    assert rule.enabled is False


def test_a_rule_cannot_point_at_another_teams_source(world) -> None:
    personas, _, other_source = world

    response = client_for(personas.owner).post(
        "/api/rules/",
        {"team": personas.team.id, "name": "spy", "source": other_source.id},
        format="json",
    )

    assert response.status_code == 400 and "source" in response.json()


def test_a_rule_with_a_negative_cooldown_is_refused_with_a_field_error(world) -> None:
    personas, _, _ = world

    response = client_for(personas.owner).post(
        "/api/rules/", {"team": personas.team.id, "name": "bad", "cooldown_s": -5}, format="json"
    )

    assert response.status_code == 400 and "cooldown_s" in response.json()


def test_the_outsider_cannot_see_or_edit_the_teams_rules(world) -> None:
    personas, _, _ = world
    rule = AlertRule.objects.get(name="everything")
    client = client_for(personas.outsider)

    assert client.get(f"/api/rules/{rule.id}/").status_code == 404
    assert (
        client.patch(f"/api/rules/{rule.id}/", {"enabled": False}, format="json").status_code == 404
    )


def test_the_openapi_schema_is_generated() -> None:
    response = APIClient().get("/api/schema/")

    assert response.status_code == 200
    assert b"/api/events/" in response.content and b"/api/stats/" in response.content
