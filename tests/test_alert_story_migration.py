"""The migration that gives alerts their story as a plain value backfills it from the
trends of the alerts fired before it; the one that makes a rule alert on a story once
keeps the earliest alert of each story and lets go of the others' story."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
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


@pytest.fixture(autouse=True)
def back_to_the_latest_schema() -> Iterator[None]:
    """Each test moves the schema back; the tests after it need the latest one."""
    yield
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())


def insert_alert(
    team_id: int, rule_id: int, seq: int, *, trend_id: int | None, story_id: int | None
) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO alerts_alert (team_id, rule_id, trend_id, story_id, seq, title, severity,"
            " evidence, event_received_at, event_created_at, created_at)"
            " VALUES (%s, %s, %s, %s, %s, 't', 'info', '{}', now(), now(), now())",
            [team_id, rule_id, trend_id, story_id, seq],
        )


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


@pytest.mark.django_db(transaction=True)
def test_a_story_alerted_twice_keeps_its_earliest_alert_and_the_rule_alerts_on_it_once() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    rule = make_rule(personas.team)
    other_rule = make_rule(personas.team, name="other")
    first = make_trend(source.id, "#blizzard")
    Trend.objects.filter(id=first.id).update(story_id=first.id)
    members = [make_trend(source.id, f"#snow{i}", story_id=first.id) for i in range(2)]
    alone = make_trend(source.id, "#flood")
    migrate([("alerts", "0006_alert_story_id")])
    team = personas.team.id
    insert_alert(team, rule.id, 1, trend_id=first.id, story_id=first.id)
    insert_alert(team, rule.id, 2, trend_id=members[0].id, story_id=first.id)
    insert_alert(team, rule.id, 3, trend_id=members[1].id, story_id=first.id)
    insert_alert(team, other_rule.id, 4, trend_id=members[1].id, story_id=first.id)
    insert_alert(team, rule.id, 5, trend_id=alone.id, story_id=None)

    migrate([("alerts", "0007_alert_unique_story")])

    with connection.cursor() as cursor:
        cursor.execute("SELECT seq, story_id FROM alerts_alert ORDER BY seq")
        rows = cursor.fetchall()
    assert rows == [(1, first.id), (2, None), (3, None), (4, first.id), (5, None)]
    with pytest.raises(IntegrityError), transaction.atomic():
        insert_alert(team, rule.id, 6, trend_id=None, story_id=first.id)
