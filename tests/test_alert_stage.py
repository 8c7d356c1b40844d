"""The alert stage under concurrency: two workers on overlapping multi-team batches, the
cooldown-0 race, and retries of lock conflicts. Real PostgreSQL, one connection per
worker thread."""

from __future__ import annotations

import threading
from datetime import timedelta
from unittest import mock

import pytest
from django.db import OperationalError, connection
from psycopg2 import errorcodes

from alerts import claims, evaluation
from alerts.models import Alert, AlertRule, TrendCheck
from ingest.models import Source
from mlengine.models import Trend
from teams.models import Team
from tests.factories import ORIGIN, make_rule, make_source, make_team


def make_trend(source: Source, term: str, bucket: int, *, events: int = 20) -> Trend:
    start = ORIGIN + timedelta(hours=bucket)
    return Trend.objects.create(
        source=source,
        term=term,
        bucket_start=start,
        bucket_s=3600,
        events=events,
        expected=1.0,
        score=9.0,
        authors_count=events,
        velocity=1.0,
        detected_at=ORIGIN,
        updated_at=ORIGIN,
        evidence_received_at=start,
        evidence_created_at=start,
    )


def three_teams_of_trends() -> tuple[list[Team], list[int]]:
    """Three teams, each with a source, a cooldown-0 rule and a 1-hour-cooldown rule,
    and 40 trends per team (10 terms × 4 hourly buckets)."""
    teams = [make_team(f"desk{i}") for i in range(3)]
    trend_ids = []
    for team in teams:
        source = make_source(team, name=f"stream-{team.slug}")
        make_rule(team, name="every bucket", cooldown_s=0)
        make_rule(team, name="hourly", cooldown_s=3600)
        trend_ids += [
            make_trend(source, f"#t{t}", bucket).id for t in range(10) for bucket in range(4)
        ]
    return teams, trend_ids


def run_concurrently(*batches: list[int]) -> list[list[int]]:
    """``evaluate_trends`` on each batch in its own thread (own connection), together."""
    barrier = threading.Barrier(len(batches))
    results: list[list[int]] = [[] for _ in batches]
    errors: list[BaseException] = []

    def work(i: int, batch: list[int]) -> None:
        try:
            barrier.wait()
            results[i] = evaluation.evaluate_trends(trend_ids=batch)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(i, b)) for i, b in enumerate(batches)]
    # Patched once, here: a patch is process-wide, and two threads patching and
    # restoring it in turn would leave the mock in place for later tests.
    with mock.patch("alerts.push.push_alerts"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    return results


@pytest.mark.django_db(transaction=True)
def test_two_alert_workers_on_overlapping_multi_team_batches_lose_and_double_nothing() -> None:
    teams, trend_ids = three_teams_of_trends()
    forward = trend_ids[: len(trend_ids) * 2 // 3]
    backward = list(reversed(trend_ids[len(trend_ids) // 3 :]))

    first, second = run_concurrently(forward, backward)

    alerts = Alert.objects.all()
    # "every bucket" fires on all 40 trends of its team; "hourly" on every bucket too
    # (buckets are exactly one hour apart): 80 alerts a team.
    assert alerts.count() == len(first) + len(second) == 3 * 80
    assert set(alerts.values_list("rule_id", "trend_id").distinct()) == {
        (rule.id, trend_id)
        for rule in AlertRule.objects.all()
        for trend_id in Trend.objects.filter(source__team=rule.team).values_list("id", flat=True)
    }
    for team in teams:
        seqs = sorted(Alert.objects.filter(team=team).values_list("seq", flat=True))
        assert seqs == list(range(1, 81))
    assert TrendCheck.objects.count() == len(trend_ids)


@pytest.mark.django_db(transaction=True)
def test_a_redelivered_batch_racing_the_original_with_cooldown_zero_fires_once() -> None:
    team = make_team("desk")
    source = make_source(team)
    make_rule(team, name="every bucket", cooldown_s=0)
    trend_ids = [make_trend(source, f"#t{t}", 0).id for t in range(30)]

    first, second = run_concurrently(trend_ids, trend_ids)

    assert sorted(first + second) == sorted(Alert.objects.values_list("id", flat=True))
    assert Alert.objects.count() == 30
    assert sorted(Alert.objects.values_list("seq", flat=True)) == list(range(1, 31))


@pytest.mark.django_db
def test_the_cooldown_is_in_event_time_and_per_bucket() -> None:
    team = make_team("desk")
    source = make_source(team)
    make_rule(team, name="six hours", cooldown_s=6 * 3600)
    trends = [make_trend(source, "#storm", bucket).id for bucket in (0, 1, 6, 7, 12)]

    with mock.patch("alerts.push.push_alerts"):
        fired = evaluation.evaluate_trends(trend_ids=trends)

    buckets = sorted(
        Alert.objects.filter(id__in=fired).values_list("trend__bucket_start", flat=True)
    )
    assert buckets == [ORIGIN + timedelta(hours=h) for h in (0, 6, 12)]


@pytest.mark.django_db
def test_a_deadlock_is_retried_not_dropped() -> None:
    team = make_team("desk")
    source = make_source(team)
    make_rule(team)
    trend_id = make_trend(source, "#storm", 0).id

    class PostgresDeadlock(Exception):
        pgcode = errorcodes.DEADLOCK_DETECTED

    deadlock = OperationalError("deadlock detected")
    deadlock.__cause__ = PostgresDeadlock()
    real = claims.claim_checks
    calls = {"n": 0}

    def flaky(ids: list[int]) -> set[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise deadlock
        return real(ids)

    with (
        mock.patch("alerts.claims.claim_checks", flaky),
        mock.patch("alerts.push.push_alerts"),
    ):
        fired = evaluation.evaluate_trends(trend_ids=[trend_id])

    assert calls["n"] == 2
    assert len(fired) == 1


@pytest.mark.django_db
def test_the_stage_takes_a_fixed_number_of_queries_whatever_the_batch(
    django_assert_max_num_queries,
) -> None:
    _, trend_ids = three_teams_of_trends()

    with mock.patch("alerts.push.push_alerts"), django_assert_max_num_queries(12):
        fired = evaluation.evaluate_trends(trend_ids=trend_ids[:40])

    assert len(fired) == 80
