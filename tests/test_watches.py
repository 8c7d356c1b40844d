"""Watches: a team's set of terms whose joint volume the anomaly stage follows in every
source it covers; their series, anomalies and alerts, and the ``/api/watches/``
endpoint (members read, owners write); real PostgreSQL and Redis."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client, TestCase
from django.urls import reverse
from rest_framework.test import APIClient

from alerts import evaluation
from alerts.models import Alert, AlertRule
from ingest.envelope import Envelope
from mlengine.anomalies import stage as anomaly_stage
from mlengine.anomalies import watches
from mlengine.models import Anomaly, Series, SeriesPoint, Watch
from tests.factories import envelope, make_personas, make_rule, make_source, run_through
from tests.test_anomaly_stage import (
    BUCKET_MIN,
    SPIKE_BUCKET,
    advance_all,
    bucket,
    client_for,
    steady,
    stream,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]


def make_watch(team: Any, **fields: Any) -> Watch:
    data: dict[str, Any] = {"team": team, "name": "floods", "terms": ["#flood"]}
    return watches.save_watch(watch=None, data=data | fields)


def posts(texts: list[str], *, in_bucket: int) -> list[Envelope]:
    """One post of each text in bucket ``in_bucket``, half a minute apart."""
    return [
        envelope(text, minutes=in_bucket * BUCKET_MIN + 0.5 + i * 0.01)
        for i, text in enumerate(texts)
    ]


def watch_series(watch: Watch, **filters: Any) -> Any:
    return Series.objects.filter(kind=Series.Kind.WATCH, watch=watch, **filters)


def test_a_watch_has_a_series_per_covered_source_counting_each_post_once() -> None:
    personas = make_personas()
    here, there = make_source(personas.team, name="here"), make_source(personas.team, "there")
    both = make_watch(personas.team, name="water", terms=[" #Flood ", "#STORM"])
    only_here = make_watch(personas.team, name="here only", source=here)
    make_watch(personas.team, name="off", enabled=False)
    make_watch(personas.other_team, name="theirs")
    flood = ["#flood and #storm tonight", "#flood again", "#storm here", "a quiet #sunny day"]
    run_through(here, sorted(steady(30) + posts(flood, in_bucket=10), key=lambda e: e.created_at))
    run_through(there, steady(30))

    advance_all()

    assert both.terms == ["#flood", "#storm"]
    assert set(watch_series(both).values_list("source", flat=True)) == {here.id, there.id}
    assert set(watch_series(only_here).values_list("source", flat=True)) == {here.id}
    assert set(Series.objects.filter(kind=Series.Kind.WATCH).values_list("watch", flat=True)) == {
        both.id,
        only_here.id,
    }
    series = watch_series(both).get(source=here)
    assert series.watch_terms == ["#flood", "#storm"] and series.term == ""
    values = dict(SeriesPoint.objects.filter(series=series).values_list("bucket_start", "value"))
    assert values[bucket(10)] == 3  # the post with both terms counts once
    assert values[bucket(9)] == 0 and len(values) == 29
    there_points = SeriesPoint.objects.filter(series=watch_series(both).get(source=there))
    assert set(there_points.values_list("value", flat=True)) == {0}


def test_a_burst_of_a_watch_term_is_an_anomaly_a_rule_with_its_terms_alerts_on() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    watch = make_watch(personas.team, name="Floods", terms=["#flood", "#levee"])
    hit = make_rule(personas.team, name="levees", kind=AlertRule.Kind.ANOMALY, terms=["#Levee"])
    make_rule(personas.team, name="elsewhere", kind=AlertRule.Kind.ANOMALY, terms=["#snow"])
    baseline = [
        envelope(f"#levee report {b}", minutes=b * BUCKET_MIN + 2.5)
        for b in range(0, SPIKE_BUCKET + 12, 3)
    ]
    burst = [
        envelope(f"#flood rising at the river {i}", minutes=b * BUCKET_MIN + 0.5 + i * 0.01)
        for b in range(SPIKE_BUCKET, SPIKE_BUCKET + 3)
        for i in range(20)
    ]
    stream(source, baseline, burst)

    new_ids = advance_all()
    with TestCase.captureOnCommitCallbacks(execute=False):
        alert_ids = evaluation.evaluate_anomalies(anomaly_ids=new_ids)

    found = Anomaly.objects.get(series__kind=Series.Kind.WATCH)
    assert found.series.watch_id == watch.id and found.id in new_ids
    assert bucket(SPIKE_BUCKET) <= found.window_start <= bucket(SPIKE_BUCKET + 2)
    assert found.high is not None and found.high < found.value
    alert = Alert.objects.get(id__in=alert_ids, anomaly=found)
    assert alert.rule_id == hit.id
    assert not Alert.objects.filter(rule__name="elsewhere").exists()
    assert alert.title.startswith("Anomaly: watch Floods volume in archive: ")
    assert alert.evidence["series"] == {
        "kind": "watch",
        "term": "",
        "watch": {"id": watch.id, "name": "Floods"},
    }

    member, outsider = client_for(personas.member), client_for(personas.outsider)
    listed = member.get("/api/anomalies/", {"watch": str(watch.id)})
    query = {"source": str(source.id), "kind": "watch", "watch": str(watch.id)}
    series = member.get("/api/series/", query)
    volume = member.get("/api/series/", {"source": str(source.id), "kind": "volume"})

    assert [a["id"] for a in listed.json()["results"]] == [found.id]
    assert listed.json()["results"][0]["watch"] == {"id": watch.id, "name": "Floods"}
    assert series.status_code == 200, series.json()
    assert series.json()["watch"] == {"id": watch.id, "name": "Floods"}
    assert series.json()["watch_terms"] == ["#flood", "#levee"]
    assert [w["id"] for w in series.json()["anomalies"]] == [found.id]
    assert volume.json()["watches"] == [{"id": watch.id, "name": "Floods", "active": True}]
    assert outsider.get("/api/series/", query).status_code == 404
    assert outsider.get("/api/anomalies/", {"watch": str(watch.id)}).status_code == 400
    no_watch = {"source": str(source.id), "kind": "watch"}
    assert member.get("/api/series/", no_watch).status_code == 400


def test_disabling_a_watch_retires_its_series_and_new_terms_restart_it() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    watch = make_watch(personas.team, terms=["#flood"])
    run_through(source, steady(50))

    anomaly_stage.advance_anomalies(max_buckets=10)
    first = watch_series(watch).get()
    watches.save_watch(watch=watch, data={"enabled": False})
    anomaly_stage.advance_anomalies(max_buckets=10)
    first.refresh_from_db()
    retired = (first.active, first.state, SeriesPoint.objects.filter(series=first).count())
    watches.save_watch(watch=watch, data={"enabled": True})
    anomaly_stage.advance_anomalies(max_buckets=10)
    first.refresh_from_db()
    reactivated = (first.active, SeriesPoint.objects.filter(series=first).count())
    watches.save_watch(watch=watch, data={"terms": ["#Storm", "#flood"]})
    anomaly_stage.advance_anomalies(max_buckets=10)

    assert retired == (False, None, 10)
    assert reactivated == (True, 20)
    first.refresh_from_db()
    assert not first.active and first.state is None
    restarted = watch_series(watch, active=True).get()
    assert restarted.id != first.id and restarted.watch_terms == ["#flood", "#storm"]
    assert restarted.first_bucket == bucket(30)
    assert SeriesPoint.objects.filter(series=restarted).count() == 10

    watches.delete_watch(watch=watch)

    assert not Series.objects.filter(kind=Series.Kind.WATCH).exists()
    assert Series.objects.filter(source=source).count() == 2  # volume, negative share


def test_members_read_watches_and_owners_write_them() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    theirs = make_source(personas.other_team, name="theirs")
    owner, member = client_for(personas.owner), client_for(personas.member)
    outsider = client_for(personas.outsider)
    body = {
        "team": personas.team.id,
        "name": "floods",
        "terms": [" #Flood ", "@Gauge", "$tsla", "#flood", "Levee"],
        "source": source.id,
    }

    created = owner.post("/api/watches/", body, format="json")

    assert created.status_code == 201, created.json()
    watch_id = created.json()["id"]
    assert created.json()["terms"] == ["#flood", "@gauge", "$TSLA", "levee"]
    assert Watch.objects.get(id=watch_id).terms == ["#flood", "@gauge", "$TSLA", "levee"]
    assert [w["id"] for w in member.get("/api/watches/").json()["results"]] == [watch_id]
    assert member.get(f"/api/watches/{watch_id}/").json()["name"] == "floods"
    refused = member.post("/api/watches/", {**body, "name": "mine"}, format="json")
    assert refused.status_code == 400 and "team" in refused.json()
    patch = {"enabled": False}
    assert member.patch(f"/api/watches/{watch_id}/", patch, format="json").status_code == 403
    assert member.delete(f"/api/watches/{watch_id}/").status_code == 403

    assert outsider.get("/api/watches/").json()["results"] == []
    assert outsider.get(f"/api/watches/{watch_id}/").status_code == 404
    assert outsider.patch(f"/api/watches/{watch_id}/", patch, format="json").status_code == 404
    assert outsider.delete(f"/api/watches/{watch_id}/").status_code == 404
    foreign = outsider.post("/api/watches/", {**body, "name": "spy"}, format="json")
    assert foreign.status_code == 400 and "team" in foreign.json()
    wrong_source = owner.post(
        "/api/watches/", {**body, "name": "x", "source": theirs.id}, format="json"
    )
    assert wrong_source.status_code == 400 and "source" in wrong_source.json()
    assert APIClient().get("/api/watches/").status_code == 401

    changed = owner.patch(f"/api/watches/{watch_id}/", {"terms": ["#Storm"]}, format="json")
    assert changed.status_code == 200 and changed.json()["terms"] == ["#storm"]
    assert owner.delete(f"/api/watches/{watch_id}/").status_code == 204
    assert not Watch.objects.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("terms", []),
        ("terms", ["  "]),
        ("terms", "#flood"),
        ("terms", [f"#t{i}" for i in range(51)]),
        ("terms", ["x" * 201]),
        ("name", "taken"),
    ],
)
def test_a_bad_watch_is_a_400_naming_the_field(field: str, value: Any) -> None:
    personas = make_personas()
    make_watch(personas.team, name="taken")
    body = {"team": personas.team.id, "name": "new", "terms": ["#flood"], field: value}

    response = client_for(personas.owner).post("/api/watches/", body, format="json")

    assert response.status_code == 400 and field in response.json()
    assert Watch.objects.count() == 1


def test_the_openapi_schema_documents_watches() -> None:
    schema = APIClient().get("/api/schema/", {"format": "json"}).json()

    assert set(schema["paths"]["/api/watches/"]["post"]["responses"]) == {
        "201",
        "400",
        "401",
        "403",
        "409",  # Idempotency-Key (teams/api/idempotency.py)
        "422",
        "429",  # past the rate limit (teams/api/throttling.py)
    }
    assert {"404", "403"} <= set(schema["paths"]["/api/watches/{id}/"]["delete"]["responses"])
    series_params = {p["name"] for p in schema["paths"]["/api/series/"]["get"]["parameters"]}
    anomaly_params = {p["name"] for p in schema["paths"]["/api/anomalies/"]["get"]["parameters"]}
    assert "watch" in series_params and "watch" in anomaly_params


def test_the_admin_saves_a_watch_through_the_watch_service() -> None:
    personas = make_personas()
    theirs = make_source(personas.other_team, name="theirs")
    operator = Client()
    operator.force_login(User.objects.create_superuser("root", "root@example.com", "pw-root-42"))
    form = {"team": personas.team.id, "name": "floods", "terms": " #Flood,#STORM", "enabled": "on"}

    added = operator.post(reverse("admin:mlengine_watch_add"), form)
    refused = operator.post(
        reverse("admin:mlengine_watch_add"), {**form, "name": "x", "source": theirs.id}
    )
    listed = operator.get(reverse("admin:mlengine_watch_changelist"))

    assert added.status_code == 302
    assert Watch.objects.get(name="floods").terms == ["#flood", "#storm"]
    assert refused.status_code == 200 and "belongs to another team" in refused.content.decode()
    assert listed.status_code == 200 and listed.context["cl"].result_count == 1


def test_the_dashboards_series_picker_offers_watches(client: Any) -> None:
    personas = make_personas()
    client.force_login(personas.member)

    page = client.get(reverse("dashboard:home")).content.decode()

    assert '<option value="watch">' in page and 'id="series-watch"' in page


def test_a_team_has_at_most_anomaly_max_watches(settings: Any) -> None:
    settings.ANOMALY_MAX_WATCHES = 2
    personas = make_personas()
    make_watch(personas.team, name="one")
    owner = client_for(personas.owner)
    body = {"team": personas.team.id, "terms": ["#flood"]}

    second = owner.post("/api/watches/", {**body, "name": "two"}, format="json")
    third = owner.post("/api/watches/", {**body, "name": "three"}, format="json")
    edited = owner.patch(f"/api/watches/{second.json()['id']}/", {"enabled": False}, format="json")

    assert second.status_code == 201
    assert third.status_code == 400 and "at most 2 watches" in third.json()["team"][0]
    assert edited.status_code == 200  # the cap counts new watches only
    assert Watch.objects.filter(team=personas.team).count() == 2
