"""The "viral_post" alert rule: posts the virality model scored likely viral go from the
ml pool to the alerts stage (``alerts.evaluate_viral``), fire their team's rules once,
with a per-author cooldown in event time, and are swept when their message was lost;
real PostgreSQL, Redis and channel layer."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.core.management import call_command
from django.test import TestCase
from django.urls import reverse

from alerts import evaluation, push, sweeps
from alerts.models import Alert, AlertRule, ViralCheck
from ingest import services as ingest_services
from ingest.envelope import Author, Envelope
from ingest.models import Event, Source
from mlengine.inference import scoring
from tests.factories import (
    ORIGIN,
    commits_without_broker,
    make_personas,
    make_rule,
    make_source,
    run_through,
)
from tests.test_api import client_for
from tests.test_sweeper import age_dispatch_records
from tests.test_virality import _write_csv
from tests.test_virality_stage import _posts
from twiscope import pipeline
from twiscope.redis import get_redis

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]

MODEL = "virality-hgb v1"


def post(source: Source, external_id: str, *, author: str, minutes: float, text: str) -> Event:
    """One stored post of ``author`` (handle and id), ``minutes`` after ``ORIGIN``."""
    run_through(
        source,
        [
            Envelope(
                external_id=external_id,
                created_at=ORIGIN + timedelta(minutes=minutes),
                text=text,
                author=Author(id=f"id-{author}", handle=author),
                metrics={"reposts": 10, "likes": 20},
            )
        ],
        close=False,
    )
    return Event.objects.get(source=source, external_id=external_id)


def score(*scored: tuple[Event, float]) -> list[int]:
    """Write virality scores as the ml pool does; return the event ids."""
    ingest_services.save_labels(
        [{"id": e.id, "virality_score": p, "virality_model": MODEL} for e, p in scored]
    )
    return [e.id for e, _ in scored]


def test_a_viral_post_rule_fires_on_posts_at_its_threshold_once_per_author_cooldown() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    rule = make_rule(
        personas.team, name="viral", kind=AlertRule.Kind.VIRAL_POST, min_score=0.7, cooldown_s=3600
    )
    make_rule(personas.team, name="trends")  # a new_trend rule: not for posts
    first = post(source, "a1", author="mayor", minutes=0, text="Bridge closed #Storm now")
    within = post(source, "a2", author="mayor", minutes=30, text="Still closed #Storm")
    after = post(source, "a3", author="mayor", minutes=61, text="Reopened #Storm")
    low = post(source, "b1", author="clerk", minutes=5, text="minutes of the meeting")
    other = post(source, "c1", author="ranger", minutes=6, text="Trail update")
    ids = score((first, 0.91), (within, 0.88), (after, 0.75), (low, 0.62), (other, 0.7))

    with TestCase.captureOnCommitCallbacks(execute=False):
        created = evaluation.evaluate_viral(event_ids=ids)

    alerts = Alert.objects.filter(id__in=created).order_by("seq")
    # The author's second post falls in the rule's cooldown; the third is past it.
    assert [a.event_id for a in alerts] == [first.id, other.id, after.id]
    assert {a.rule_id for a in alerts} == {rule.id}
    alert = alerts[0]
    assert alert.title == f"Likely viral (91%): @mayor in {source.name}: “Bridge closed #Storm now”"
    assert alert.evidence["virality_score"] == 0.91
    assert alert.evidence["virality_model"] == MODEL
    assert alert.evidence["text"] == "Bridge closed #Storm now"
    assert alert.evidence["source"] == {"id": source.id, "name": source.name}
    assert alert.event_created_at == first.created_at
    assert alert.event_received_at == first.received_at
    # A redelivered task alerts nothing twice.
    assert evaluation.evaluate_viral(event_ids=ids) == []
    assert ViralCheck.objects.filter(event_id__in=ids).count() == len(ids)


def test_source_and_terms_filter_and_other_teams_rules_never_fire() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    elsewhere = make_source(personas.team, name="elsewhere")
    make_rule(
        personas.team,
        name="storm posts here",
        kind=AlertRule.Kind.VIRAL_POST,
        min_score=0.5,
        source=source,
        terms=["#STORM"],
        cooldown_s=0,
    )
    make_rule(personas.other_team, name="theirs", kind=AlertRule.Kind.VIRAL_POST, min_score=0.5)
    storm = post(source, "s1", author="a", minutes=0, text="Flooding on Main St #storm")
    plain = post(source, "s2", author="b", minutes=1, text="Flooding on Main St")
    away = post(elsewhere, "s3", author="c", minutes=2, text="Flooding #storm")

    with TestCase.captureOnCommitCallbacks(execute=False):
        created = evaluation.evaluate_viral(
            event_ids=score((storm, 0.9), (plain, 0.9), (away, 0.9))
        )

    assert list(Alert.objects.filter(id__in=created).values_list("event_id", flat=True)) == [
        storm.id
    ]
    assert not Alert.objects.filter(team=personas.other_team).exists()


def test_the_alert_is_pushed_with_its_post(settings: Any) -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team, name="viral", kind=AlertRule.Kind.VIRAL_POST, min_score=0.8)
    hit = post(source, "p1", author="mayor", minutes=0, text="Evacuate the riverside now")
    with TestCase.captureOnCommitCallbacks(execute=False):
        created = evaluation.evaluate_viral(event_ids=score((hit, 0.93)))

    async def push_and_listen() -> list[dict[str, Any]]:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(push.alerts_group(personas.team.id), channel)
        await sync_to_async(push.push_alerts)(alert_ids=created)
        return (await layer.receive(channel))["messages"]

    [message] = async_to_sync(push_and_listen)()
    assert message["type"] == "alert.created"
    assert message["alert"]["event"] == hit.id
    assert message["alert"]["evidence"]["author"] == "@mayor"
    listed = client_for(personas.owner).get(reverse("alert-list")).json()["results"]
    assert [a["event"] for a in listed] == [hit.id]


def test_the_ml_pool_hands_likely_viral_posts_to_the_alerts_stage(
    settings: Any, tmp_path: Path
) -> None:
    """The real model and encoder: posts scored at least 0.5 go to ``alerts.evaluate_viral``
    after the scores commit, with their dispatch records written before it."""
    settings.MODELS_DIR = tmp_path / "models"
    settings.SCORING_LAG_S = 3600.0
    data = _write_csv(tmp_path / "posts.csv", n=300)
    call_command(
        "train", "virality", "--data", str(data), stdout=io.StringIO(), stderr=io.StringIO()
    )
    source = make_source(make_personas().team)
    run_through(source, _posts("veteran", 110))
    ids = list(Event.objects.filter(source=source).values_list("id", flat=True))

    with commits_without_broker() as send_task:
        scoring.score_events(ids)

    scored = dict(
        Event.objects.filter(source=source, virality_score__isnull=False).values_list(
            "id", "virality_score"
        )
    )
    likely = sorted(i for i, p in scored.items() if p >= 0.5)
    assert len(scored) == 10 and likely  # loud posts of the generated account score high
    calls = [c for c in send_task.call_args_list if c.args[0] == "alerts.evaluate_viral"]
    assert [sorted(c.kwargs["kwargs"]["event_ids"]) for c in calls] == [likely]
    key = pipeline.DISPATCH_KEY.format(stage="alerts")
    assert sorted(int(m.decode().split(":")[1]) for m in get_redis().zrange(key, 0, -1)) == likely


def test_a_scored_post_whose_alert_task_was_lost_is_sent_again_then_marked_done() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team, name="viral", kind=AlertRule.Kind.VIRAL_POST, min_score=0.6)
    lost = post(source, "l1", author="mayor", minutes=0, text="Road closed")
    ids = score((lost, 0.8))
    pipeline.record("alerts", [f"viral:{lost.id}"])  # written; the process died before the send

    assert sweeps.sweep(older_than_s=120)["viral_posts"] == 0  # too fresh yet
    age_dispatch_records("alerts", 600)
    with commits_without_broker() as send_task:
        assert sweeps.sweep(older_than_s=120)["viral_posts"] == 1
    [call] = [c for c in send_task.call_args_list if c.args[0] == "alerts.evaluate_viral"]
    assert call.kwargs["kwargs"] == {"event_ids": ids}

    with TestCase.captureOnCommitCallbacks(execute=True):
        assert len(evaluation.evaluate_viral(event_ids=ids)) == 1
    age_dispatch_records("alerts", 600)
    assert sweeps.sweep(older_than_s=120)["viral_posts"] == 0
    assert get_redis().zcard(pipeline.DISPATCH_KEY.format(stage="alerts")) == 0


def test_the_rules_api_needs_a_probability_for_a_viral_post_rule() -> None:
    personas = make_personas()
    client = client_for(personas.owner)
    url = reverse("alertrule-list")
    base = {"team": personas.team.id, "name": "viral", "kind": "viral_post"}

    missing = client.post(url, base, format="json")
    too_high = client.post(url, {**base, "min_score": 4}, format="json")
    too_low = client.post(url, {**base, "min_score": 0.2}, format="json")
    made = client.post(url, {**base, "min_score": 0.8, "terms": ["#storm"]}, format="json")

    for refused in (missing, too_high, too_low):
        assert refused.status_code == 400
        assert "P(viral)" in refused.json()["min_score"][0]
    assert made.status_code == 201, made.json()
    rule = AlertRule.objects.get(id=made.json()["id"])
    assert (rule.kind, rule.min_score, rule.terms) == ("viral_post", 0.8, ["#storm"])
    # Turning a trend rule into a viral one keeps the check: its score is in sigmas.
    trend_rule = make_rule(personas.team, min_score=4.0)
    detail = reverse("alertrule-detail", args=[trend_rule.id])
    assert client.patch(detail, {"kind": "viral_post"}, format="json").status_code == 400
