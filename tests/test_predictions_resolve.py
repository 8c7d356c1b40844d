"""Predictions resolve (issue "Alerts that are right", item 5): an emerging trend is
confirmed or, when its bucket closes without passing, withdrawn; its alert then says "did
not materialise", is pushed as ``alert.updated`` over the real channel layer, and can be
filtered out; each stream reports the share of its predictions confirmed. Runs the real
persist, enrich and trend stages on PostgreSQL and Redis (``run_through``)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from unittest import mock

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.test import TestCase
from django.utils import timezone
from rest_framework.test import APIClient

from alerts import evaluation, push, sweeps
from alerts.models import Alert
from ingest.envelope import Envelope
from mlengine.models import Trend
from tests.factories import envelope, make_personas, make_rule, make_source, run_through
from tests.test_pipeline import accelerating_flood
from twiscope import pipeline

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]


def next_bucket_chatter() -> list[Envelope]:
    """Ordinary posts in the bucket after the flood's (105–120 min): the flood's bucket
    closes without its count having passed."""
    return [
        envelope(f"an ordinary day number {i}", minutes=106 + i, author=f"n{i}") for i in range(10)
    ]


def predicted_flood_alert() -> tuple[object, Alert]:
    """A team with a rule and a source whose #flood emerges; returns (personas, alert)."""
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team)
    emerging, _ = accelerating_flood()
    created = evaluation.evaluate_trends(trend_ids=run_through(source, emerging))
    alert = Alert.objects.get(id__in=created)
    push.push_alerts(alert_ids=created)
    return personas, alert


def test_a_prediction_shows_the_figures_its_score_was_computed_on() -> None:
    _, alert = predicted_flood_alert()
    trend = Trend.objects.get(term="#flood")

    assert trend.predicted and trend.projected is not None
    # Its count so far may be below what a whole bucket expects; its projection may not.
    assert trend.projected > trend.expected
    assert alert.evidence["projected"] == trend.projected
    assert f"projected {trend.projected:.0f}" in alert.title
    assert f"expected {trend.expected:.1f}" in alert.title
    assert alert.evidence["story"]["prediction"] == "open"


def test_a_prediction_whose_bucket_closes_without_passing_is_withdrawn_and_pushed() -> None:
    personas, alert = predicted_flood_alert()
    source = Trend.objects.get(term="#flood").source

    with mock.patch.object(pipeline, "hand_off", wraps=pipeline.hand_off) as hand_off:
        run_through(source, next_bucket_chatter())
    trend = Trend.objects.get(term="#flood")
    assert trend.confirmed_at is None
    assert trend.withdrawn_at == trend.bucket_start + timedelta(seconds=trend.bucket_s)
    assert mock.call("detect", task="withdrawals", trend_ids=[trend.id]) in hand_off.call_args_list

    async def listen() -> list[dict]:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(push.alerts_group(personas.team.id), channel)
        updated = await sync_to_async(evaluation.withdraw_predictions)(trend_ids=[trend.id])
        assert updated == [alert.id]
        batch = await asyncio.wait_for(layer.receive(channel), timeout=10)
        return batch["messages"]

    with mock.patch("django.db.transaction.on_commit", side_effect=lambda f, **_: f()):
        messages = async_to_sync(listen)()

    alert.refresh_from_db()
    assert alert.title.startswith("Did not materialise: #flood")
    assert alert.evidence["story"]["predicted"] is False
    assert alert.evidence["story"]["prediction"] == "withdrawn"
    assert [m["type"] for m in messages] == ["alert.updated"]
    assert messages[0]["alert"]["evidence"]["story"]["prediction"] == "withdrawn"
    assert evaluation.withdraw_predictions(trend_ids=[trend.id]) == []  # nothing left

    # The alert desk filters them out; the stream reports its predictions' outcome.
    client = APIClient()
    client.force_authenticate(personas.member)
    listed = client.get(f"/api/alerts/?team={personas.team.id}").json()["results"]
    hidden = client.get(f"/api/alerts/?team={personas.team.id}&hide_withdrawn=true").json()
    only = client.get(f"/api/alerts/?team={personas.team.id}&prediction=withdrawn").json()
    assert [a["id"] for a in listed] == [alert.id]
    assert hidden["results"] == []
    assert [a["id"] for a in only["results"]] == [alert.id]
    assert client.get("/api/alerts/?prediction=maybe").status_code == 400
    [stream] = client.get("/api/streams/").json()["results"]
    assert stream["predictions"] == {
        "made": 1,
        "confirmed": 0,
        "withdrawn": 1,
        "open": 0,
        "confirmed_share": 0.0,
    }


def test_a_confirmed_prediction_is_never_withdrawn() -> None:
    personas, _ = predicted_flood_alert()
    source = Trend.objects.get(term="#flood").source
    _, later = accelerating_flood()
    run_through(source, later)
    run_through(source, next_bucket_chatter())

    trend = Trend.objects.get(term="#flood")
    assert trend.confirmed_at is not None and trend.withdrawn_at is None
    client = APIClient()
    client.force_authenticate(personas.member)
    [stream] = client.get("/api/streams/").json()["results"]
    assert stream["predictions"]["confirmed_share"] == 1.0


def test_a_withdrawal_whose_message_was_lost_is_applied_by_the_alerts_sweeper() -> None:
    _, alert = predicted_flood_alert()
    source = Trend.objects.get(term="#flood").source
    run_through(source, next_bucket_chatter())  # withdrawn; the withdrawals task never runs
    assert Alert.objects.get(id=alert.id).evidence["story"]["predicted"] is True

    Alert.objects.filter(id=alert.id).update(created_at=timezone.now() - timedelta(minutes=10))
    with TestCase.captureOnCommitCallbacks(execute=False):
        assert sweeps.sweep(older_than_s=120)["alerts_updated"] == 1

    alert.refresh_from_db()
    assert alert.title.startswith("Did not materialise: #flood")
    with TestCase.captureOnCommitCallbacks(execute=False):
        assert sweeps.sweep(older_than_s=120)["alerts_updated"] == 0
