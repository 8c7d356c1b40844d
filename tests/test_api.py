"""The REST API: authentication, team scoping (no IDOR), filters, pagination, budgets."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from rest_framework.test import APIClient

from alerts import evaluation
from alerts.models import Alert, AlertRule
from ingest import services as ingest_services
from mlengine.models import Trend
from tests.factories import (
    ORIGIN,
    api_key,
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
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    return client


@pytest.fixture
def world():
    get_redis().flushdb()
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team, name="everything")
    trend_ids = run_through(source, quiet_history(6) + burst("#blizzard", count=12, minutes=91))
    evaluation.evaluate_trends(trend_ids=trend_ids)
    ingest_services.record_dead_letters(
        stage="replay", source=source, items=[(f"bad row {i}", {"line": i}) for i in range(3)]
    )
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
        "/api/sentiment/",
        "/api/sources/",
        "/api/rules/",
        "/api/dead-letters/",
        "/api/streams/",
        "/api/trends/1/events/",
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


def test_events_filter_by_event_time_text_and_term(world) -> None:
    personas, _source, _ = world
    client = client_for(personas.member)
    since = (ORIGIN + timedelta(minutes=90)).isoformat().replace("+00:00", "Z")

    by_time = client.get("/api/events/", {"since": since, "page_size": 500}).json()["results"]
    by_text = client.get("/api/events/", {"q": "ORDINARY DAY", "page_size": 500}).json()["results"]
    by_term = client.get("/api/events/", {"term": "#Blizzard", "page_size": 500}).json()["results"]

    assert len(by_time) == 12
    assert len(by_text) == 60
    assert len(by_term) == 12 and all("#blizzard" in e["hashtags"] for e in by_term)


def test_a_trends_events_are_the_posts_behind_it(world) -> None:
    personas, source, _ = world
    trend = Trend.objects.get(term="#blizzard", source=source)

    response = client_for(personas.member).get(f"/api/trends/{trend.id}/events/?page_size=500")

    posts = response.json()["results"]
    assert response.status_code == 200
    assert len(posts) == 12 and all("#blizzard" in e["hashtags"] for e in posts)
    times = [datetime.fromisoformat(e["created_at"]) for e in posts]
    assert times == sorted(times, reverse=True)


def test_the_events_filter_by_trend_is_gone_and_says_so(world) -> None:
    personas, source, _ = world
    trend = Trend.objects.get(term="#blizzard", source=source)

    response = client_for(personas.member).get("/api/events/", {"trend": trend.id})

    assert response.status_code == 400 and "trend" in response.json()


def test_another_teams_trend_has_no_events_for_you(world) -> None:
    personas, source, _ = world
    trend = Trend.objects.get(term="#blizzard", source=source)

    response = client_for(personas.outsider).get(f"/api/trends/{trend.id}/events/")

    assert response.status_code == 404


def test_streams_show_each_sources_event_time_clock(world) -> None:
    personas, source, _ = world

    streams = client_for(personas.member).get("/api/streams/").json()["results"]

    assert [s["source"] for s in streams] == [
        {"id": source.id, "name": source.name, "kind": "replay"}
    ]
    assert streams[0]["counted_events"] == 72 and streams[0]["late_events"] == 0
    assert streams[0]["bucket_s"] == 900
    assert datetime.fromisoformat(streams[0]["watermark"]) > ORIGIN + timedelta(minutes=91)


def test_sources_show_their_declared_input_watermark(world) -> None:
    personas, source, _ = world

    listed = client_for(personas.member).get("/api/sources/").json()["results"]

    assert [s["id"] for s in listed] == [source.id]
    assert {"input_watermark", "events_total", "last_received_at"} <= listed[0].keys()
    assert not {"watermark", "late_events", "trend_bucket_s"} & listed[0].keys()


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
    "path",
    [
        "/api/events/",
        "/api/trends/",
        "/api/alerts/",
        "/api/rules/",
        "/api/sources/",
        "/api/dead-letters/",
        "/api/streams/",
        "/api/trends/{blizzard}/events/",
    ],
)
def test_list_endpoints_keep_their_query_budget(world, path, django_assert_max_num_queries) -> None:
    personas, source, _ = world
    blizzard = Trend.objects.get(term="#blizzard", source=source)
    client = client_for(personas.member)

    # The token, its last use (written once a minute), the caller's teams, then the page:
    # a count or the rows, and one prefetch (an alert's activity).
    with django_assert_max_num_queries(5):
        response = client.get(path.format(blizzard=blizzard.id), {"page_size": 100})

    assert response.status_code == 200
    assert len(response.json()["results"]) >= 1


def test_stats_report_volume_queues_and_alert_latency(world) -> None:
    personas, _, _ = world
    Alert.objects.update(pushed_at=ORIGIN)

    stats = client_for(personas.member).get("/api/stats/").json()

    assert stats["events_total"] == 72
    assert set(stats["queue_lag"]) == {
        "ingest",
        "enrich",
        "detect",
        "anomalies",
        "inference",
        "alerts",
        "notify",
    }
    assert [queue["name"] for queue in stats["queues"]] == [
        "ingest",
        "enrich",
        "detect",
        "anomalies",
        "inference",
        "alerts",
        "notify",
    ]
    assert all(queue["work"] and queue["waiting"] >= 0 for queue in stats["queues"])
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


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cooldown_s", -5),
        ("min_events", -3),
        ("min_events", 0),
        ("min_authors", -2),
        ("min_authors", 0),
        ("min_score", -0.5),
        ("min_score", "nan"),
        ("terms", [""]),
        ("terms", ["#ok", "   "]),
        ("terms", "#blizzard"),
        ("severity", "apocalypse"),
    ],
)
def test_a_rule_with_an_impossible_threshold_is_refused_with_a_field_error(
    world, field: str, value: object
) -> None:
    personas, _, _ = world

    response = client_for(personas.owner).post(
        "/api/rules/", {"team": personas.team.id, "name": "bad", field: value}, format="json"
    )

    assert response.status_code == 400
    assert set(response.json()) == {field}
    assert not AlertRule.objects.filter(name="bad").exists()


def test_a_rule_takes_the_smallest_sensible_thresholds(world) -> None:
    personas, _, _ = world
    body = {
        "team": personas.team.id,
        "name": "eager",
        "terms": ["#blizzard", "snow"],
        "min_score": 0,
        "min_events": 1,
        "min_authors": 1,
        "cooldown_s": 0,
        "severity": "warning",
    }

    response = client_for(personas.owner).post("/api/rules/", body, format="json")

    assert response.status_code == 201, response.json()
    assert {k: response.json()[k] for k in body} == body


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
