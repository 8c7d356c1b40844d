"""The admin (``/admin/``): every core model is there for a superuser, the pipeline's
record (events, dead letters, alerts, stream clocks, trends) is read-only, and a
source's secrets are never shown."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from alerts.models import Alert, AlertRule
from ingest import services
from ingest.models import DeadLetter, Event, Source
from mlengine.models import StreamClock, Trend
from teams.models import Team
from tests.factories import fire_blizzard_alerts, make_personas

pytestmark = pytest.mark.django_db

REGISTERED = [
    "teams.team",
    "teams.membership",
    "ingest.source",
    "ingest.event",
    "ingest.deadletter",
    "alerts.alertrule",
    "alerts.alert",
    "mlengine.streamclock",
    "mlengine.trend",
    "teams.apitoken",
    "auth.user",
]
READ_ONLY = [
    ("ingest.event", Event),
    ("ingest.deadletter", DeadLetter),
    ("alerts.alert", Alert),
    ("mlengine.streamclock", StreamClock),
    ("mlengine.trend", Trend),
]


def url(model: str, view: str, *args: object) -> str:
    app_label, model_name = model.split(".")
    return reverse(f"admin:{app_label}_{model_name}_{view}", args=args)


@pytest.fixture
def team(clean_redis: None) -> Team:
    """A team with its personas, and a source with events, a stream clock, a trend, an
    alert and a dead letter, all written by the pipeline's own functions."""
    personas = make_personas()
    fire_blizzard_alerts(personas.team)
    services.record_dead_letters(
        stage=DeadLetter.Stage.INGEST,
        source=Source.objects.get(),
        items=[("invalid envelope: created_at: required", {"line": 3})],
    )
    return personas.team


@pytest.fixture
def operator(db: None) -> Client:
    """A browser logged in as a superuser."""
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw-root-42"))
    return client


@pytest.mark.parametrize("model", REGISTERED)
def test_a_superuser_sees_the_list_of(model: str, team: Team, operator: Client) -> None:
    response = operator.get(url(model, "changelist"))

    assert response.status_code == 200
    assert response.context["cl"].result_count > 0


@pytest.mark.parametrize(("model", "cls"), READ_ONLY)
def test_the_pipelines_record_is_read_only(
    model: str, cls: type[Event], team: Team, operator: Client
) -> None:
    row = cls.objects.first()
    assert row is not None

    page = operator.get(url(model, "change", row.pk))

    assert page.status_code == 200
    assert page.context["has_change_permission"] is False
    assert operator.get(url(model, "add")).status_code == 403
    assert operator.get(url(model, "delete", row.pk)).status_code == 403
    assert operator.post(url(model, "change", row.pk), {}).status_code == 403
    assert 'name="_save"' not in page.content.decode()


def test_events_are_searched_by_text_and_external_id(team: Team, operator: Client) -> None:
    event = Event.objects.filter(text__contains="#blizzard").first()
    assert event is not None

    by_text = operator.get(url("ingest.event", "changelist"), {"q": "blizzard"})
    by_id = operator.get(url("ingest.event", "changelist"), {"q": event.external_id})

    assert by_text.context["cl"].result_count == 12
    assert event in by_id.context["cl"].result_list


def test_the_event_list_is_served_in_a_bounded_number_of_queries(
    team: Team, operator: Client, django_assert_max_num_queries: object
) -> None:
    with django_assert_max_num_queries(12):  # type: ignore[operator]
        response = operator.get(url("ingest.event", "changelist"))

    assert len(response.context["cl"].result_list) == 84  # 60 quiet, 12 + 12 in bursts


def test_a_source_never_shows_its_secrets(team: Team, operator: Client) -> None:
    source = Source.objects.get()
    source.config = {
        "path": "airline.csv",
        "api_token": "tok-very-secret",
        "auth": {"password": "hunter2"},
    }
    source.save()

    html = operator.get(url("ingest.source", "change", source.pk)).content.decode()

    assert "tok-very-secret" not in html
    assert "hunter2" not in html
    assert "********" in html
    assert "airline.csv" in html


def test_saving_a_source_with_masked_secrets_keeps_them(team: Team, operator: Client) -> None:
    source = Source.objects.get()
    source.config = {"path": "airline.csv", "api_token": "tok-very-secret"}
    source.save()

    response = operator.post(
        url("ingest.source", "change", source.pk),
        {
            "name": source.name,
            "config": '{"path": "other.csv", "api_token": "********"}',
            "enabled": "",
            "disabled_reason": "paused for the night",
        },
    )
    source.refresh_from_db()

    assert response.status_code == 302
    assert source.config == {"path": "other.csv", "api_token": "tok-very-secret"}
    assert source.enabled is False


def test_a_rule_is_saved_through_the_rules_service(team: Team, operator: Client) -> None:
    response = operator.post(
        url("alerts.alertrule", "add"),
        {
            "team": team.pk,
            "name": "airport",
            "kind": "new_trend",
            "enabled": "on",
            "severity": "warning",
            "terms": "#blizzard,#snow",
            "min_score": "4",
            "min_events": "5",
            "min_authors": "3",
            "cooldown_s": "3600",
            "min_peak": "5",
        },
    )

    assert response.status_code == 302
    rule = AlertRule.objects.get(name="airport")
    assert rule.terms == ["#blizzard", "#snow"]
    assert rule.severity == "warning"


def test_a_rule_cannot_watch_another_teams_source(team: Team, operator: Client) -> None:
    other = Team.objects.get(slug="rivals")

    response = operator.post(
        url("alerts.alertrule", "add"),
        {
            "team": other.pk,
            "name": "poach",
            "kind": "new_trend",
            "severity": "info",
            "source": Source.objects.get().pk,
            "terms": "",
            "min_score": "4",
            "min_events": "5",
            "min_authors": "3",
            "cooldown_s": "3600",
            "min_peak": "5",
        },
    )

    assert response.status_code == 200
    assert "belongs to another team" in response.content.decode()
    assert not AlertRule.objects.filter(name="poach").exists()


def test_a_team_page_lists_its_members_inline(team: Team, operator: Client) -> None:
    html = operator.get(url("teams.team", "change", team.pk)).content.decode()

    assert "memberships-TOTAL_FORMS" in html
    assert "olga" in html
