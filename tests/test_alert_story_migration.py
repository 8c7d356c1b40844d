"""The migration that gives alerts their story as a plain value backfills it from the
trends of the alerts fired before it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from mlengine.models import Trend
from tests.factories import ORIGIN, make_personas, make_rule, make_source

BEFORE = [("alerts", "0005_viral_post")]
AFTER = [("alerts", "0006_alert_story_id")]


def make_trend(source_id: int, term: str, **kw: object) -> Trend:
    return Trend.objects.create(
        source_id=source_id,
        term=term,
        bucket_start=ORIGIN,
        bucket_s=900,
        events=12,
        expected=1.0,
        score=9.0,
        authors_count=12,
        velocity=1.0,
        detected_at=ORIGIN,
        updated_at=ORIGIN,
        evidence_received_at=ORIGIN + timedelta(minutes=1),
        evidence_created_at=ORIGIN + timedelta(minutes=1),
        **kw,
    )


def migrate(targets: list[tuple[str, str]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


@pytest.mark.django_db(transaction=True)
def test_alerts_fired_before_the_story_column_take_their_trends_story() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    rule = make_rule(personas.team)
    first = make_trend(source.id, "#blizzard")
    Trend.objects.filter(id=first.id).update(story_id=first.id)
    member = make_trend(source.id, "#snowstorm", story_id=first.id)
    alone = make_trend(source.id, "#flood")  # no story: the tests' and old rows' case
    migrate(BEFORE)
    try:
        with connection.cursor() as cursor:
            for seq, (trend_id, column) in enumerate(
                [
                    (first.id, "trend_id"),
                    (member.id, "trend_id"),
                    (alone.id, "trend_id"),
                    (None, "anomaly_id"),
                ],
                start=1,
            ):
                cursor.execute(
                    f"INSERT INTO alerts_alert (team_id, rule_id, {column}, seq, title, severity,"
                    " evidence, event_received_at, event_created_at, created_at)"
                    " VALUES (%s, %s, %s, %s, 't', 'info', '{}', now(), now(), now())",
                    [personas.team.id, rule.id, trend_id, seq],
                )
    finally:
        migrate(AFTER)

    with connection.cursor() as cursor:
        cursor.execute("SELECT trend_id, story_id FROM alerts_alert ORDER BY seq")
        rows = cursor.fetchall()
    assert rows == [(first.id, first.id), (member.id, first.id), (alone.id, None), (None, None)]
