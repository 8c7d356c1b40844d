"""A rule alerts on a story exactly once: a member that loses its cooldown lets the next
member fire, and two alert workers evaluating two members of one story at the same
moment give one alert, which the other member updates. Real PostgreSQL; the race runs
in threads with their own connections and in real Celery worker processes."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.db import connection
from structlog.testing import capture_logs

from alerts import claims, evaluation
from alerts.models import Alert, AlertRule, TrendCheck
from ingest.models import Source
from mlengine.models import Trend
from tests.conftest import worker_processes
from tests.factories import ORIGIN, make_rule, make_source, make_team
from twiscope.celery import app


def make_trend(
    source: Source, term: str, *, hours: float, story: Trend | None = None, minute: int = 0
) -> Trend:
    """A trend of ``term`` in the hourly bucket ``hours`` after ``ORIGIN``, detected
    ``minute`` minutes into it; the first of its own story when ``story`` is None,
    else a later member of ``story``."""
    start = ORIGIN + timedelta(hours=hours)
    trend = Trend.objects.create(
        source=source,
        term=term,
        bucket_start=start,
        bucket_s=3600,
        events=20,
        expected=1.0,
        score=9.0,
        authors_count=20,
        velocity=1.0,
        detected_at=ORIGIN,
        updated_at=ORIGIN,
        evidence_received_at=start + timedelta(minutes=minute),
        evidence_created_at=start + timedelta(minutes=minute),
        story=story,
    )
    if story is None:
        Trend.objects.filter(id=trend.id).update(story_id=trend.id)
    return trend


def a_desk() -> tuple[Source, AlertRule]:
    team = make_team("desk")
    return make_source(team), make_rule(team, name="six hours", cooldown_s=6 * 3600)


def evaluate(trend_ids: list[int]) -> list[int]:
    with mock.patch("alerts.push.push_alerts"), mock.patch("alerts.push.push_updates"):
        return evaluation.evaluate_trends(trend_ids=trend_ids)


@pytest.mark.django_db
def test_a_story_whose_first_member_lost_its_cooldown_alerts_through_the_next_in_one_batch() -> (
    None
):
    source, rule = a_desk()
    evaluate([make_trend(source, "#storm", hours=0).id])  # "#storm" cools down until hour 6
    first = make_trend(source, "#storm", hours=2)
    member = make_trend(source, "#blizzard", hours=2, story=first, minute=5)
    later = make_trend(source, "#snow", hours=2, story=first, minute=10)

    fired = evaluate([first.id, member.id, later.id])

    story_alerts = Alert.objects.filter(rule=rule, story_id=first.id)
    assert list(story_alerts.values_list("id", "trend_id")) == [(fired[0], member.id)]
    alert = story_alerts.get()
    assert alert.evidence["story"]["terms"] == ["#storm", "#blizzard", "#snow"]
    assert alert.updated_at is not None  # the member after the one that fired joined it


@pytest.mark.django_db
def test_a_story_whose_first_member_lost_its_cooldown_alerts_through_the_next_batch() -> None:
    source, rule = a_desk()
    evaluate([make_trend(source, "#storm", hours=0).id])
    first = make_trend(source, "#storm", hours=2)
    assert evaluate([first.id]) == []
    member = make_trend(source, "#blizzard", hours=2, story=first, minute=5)

    fired = evaluate([member.id])

    assert list(
        Alert.objects.filter(rule=rule, story_id=first.id).values_list("id", "trend_id")
    ) == [(fired[0], member.id)]


@pytest.mark.django_db
def test_a_story_whose_every_member_is_cooling_down_says_why_it_did_not_alert() -> None:
    source, rule = a_desk()
    evaluate([make_trend(source, t, hours=0).id for t in ("#storm", "#blizzard")])
    first = make_trend(source, "#storm", hours=2)
    member = make_trend(source, "#blizzard", hours=2, story=first, minute=5)

    with capture_logs() as logs:
        assert evaluate([first.id, member.id]) == []

    assert not Alert.objects.filter(story_id=first.id).exists()
    assert [entry for entry in logs if entry["event"] == "alerts.story_not_alerted"] == [
        {
            "event": "alerts.story_not_alerted",
            "log_level": "info",
            "reason": "cooldown",
            "rule_id": rule.id,
            "story_id": first.id,
            "trend_ids": [first.id, member.id],
            "terms": ["#storm", "#blizzard"],
        }
    ]


@pytest.mark.django_db
def test_members_of_a_story_already_alerted_update_it_and_claim_no_cooldown() -> None:
    source, _ = a_desk()
    first = make_trend(source, "#storm", hours=0)
    (fired,) = evaluate([first.id])
    member = make_trend(source, "#blizzard", hours=0, story=first, minute=5)

    assert evaluate([member.id]) == []

    alert = Alert.objects.get(story_id=first.id)
    assert alert.id == fired
    assert alert.evidence["story"]["terms"] == ["#storm", "#blizzard"]
    # "#blizzard" did not spend the rule's cooldown: alone, an hour later, it alerts.
    assert len(evaluate([make_trend(source, "#blizzard", hours=1).id])) == 1


def race(first: Trend, member: Trend) -> list[list[int]]:
    """Two alert workers (threads, each with its own connection) evaluate ``first`` and
    ``member`` at the same moment: both have read the story's alerts and claimed their
    cooldowns before either inserts (a barrier in front of the insert)."""
    start, at_insert = threading.Barrier(2), threading.Barrier(2)
    real_insert = claims.insert_alerts
    results: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def insert_together(*args: Any, **kwargs: Any) -> claims.Inserted:
        at_insert.wait(timeout=30)
        return real_insert(*args, **kwargs)

    def work(i: int, trend_id: int) -> None:
        try:
            start.wait(timeout=30)
            results[i] = evaluation.evaluate_trends(trend_ids=[trend_id])
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(i, t.id)) for i, t in enumerate((first, member))]
    with (
        mock.patch("alerts.claims.insert_alerts", insert_together),
        mock.patch("alerts.push.push_alerts"),
        mock.patch("alerts.push.push_updates"),
    ):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    return results


@pytest.mark.django_db(transaction=True)
def test_two_alert_workers_on_two_members_of_a_story_at_once_fire_one_alert_30_times() -> None:
    source, rule = a_desk()

    for i in range(30):
        first = make_trend(source, f"#first{i}", hours=i)
        member = make_trend(source, f"#member{i}", hours=i, story=first, minute=5)

        created = race(first, member)

        alert = Alert.objects.get(story_id=first.id)
        assert sorted(created, key=len) == [[], [alert.id]]
        assert alert.updated_at is not None  # the other member joined it
        assert alert.evidence["story"]["terms"] == [f"#first{i}", f"#member{i}"]
    assert list(Alert.objects.order_by("seq").values_list("seq", flat=True)) == list(range(1, 31))
    assert Alert.objects.filter(rule=rule).count() == 30


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_two_celery_alert_workers_on_two_members_of_a_story_fire_one_alert_30_times() -> None:
    source, rule = a_desk()
    stories = []
    for i in range(30):
        first = make_trend(source, f"#first{i}", hours=i)
        stories.append((first, make_trend(source, f"#member{i}", hours=i, story=first, minute=5)))

    with worker_processes((["alerts"], 2)):
        for first, member in stories:
            for trend in (first, member):
                app.send_task("alerts.evaluate_trends", kwargs={"trend_ids": [trend.id]})
            deadline = time.monotonic() + 30
            while TrendCheck.objects.filter(trend_id__in=[first.id, member.id]).count() < 2:
                assert time.monotonic() < deadline, "the alert workers did not evaluate both"
                time.sleep(0.05)

    for first, member in stories:
        alert = Alert.objects.get(story_id=first.id)
        assert alert.trend_id in {first.id, member.id}
        assert alert.evidence["story"]["terms"] == [first.term, member.term]
    assert list(Alert.objects.order_by("seq").values_list("seq", flat=True)) == list(range(1, 31))
    assert Alert.objects.filter(rule=rule).count() == 30
