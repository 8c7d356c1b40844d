"""Every list endpoint's query budget, on at least 1,000 rows: a page of 10 and a page
of 500 cost the same number of queries (no per-row query: an N+1 would show as 490
more)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import pytest
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from alerts.models import Alert, AlertActivity, AlertRule, Channel, Delivery, DeliveryAttempt
from ingest.models import DeadLetter, Event, Source
from mlengine.models import Anomaly, ModelVersion, Series, StreamClock, Trend, Watch
from tests.factories import make_personas, make_source
from tests.test_api_errors import client_for
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db

ROWS = 1_000
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def at(i: int) -> datetime:
    return T0 + timedelta(seconds=i)


def sources(team: Any, n: int = ROWS) -> list[Source]:
    return Source.objects.bulk_create(
        Source(team=team, kind=Source.Kind.REPLAY, name=f"s{i}", config={}) for i in range(n)
    )


def events(source: Source, term: str = "#x") -> None:
    Event.objects.bulk_create(
        Event(
            source=source,
            external_id=f"e{i}",
            created_at=at(i),
            received_at=at(i),
            text=f"post {i} {term}",
            hashtags=[term],
        )
        for i in range(ROWS)
    )


TREND_FIELDS = {"bucket_s": 900, "events": 10, "expected": 1.0, "score": 5.0}


def trend(source: Source, i: int, **changes: Any) -> Trend:
    """An unsaved trend of ``source``, the ``i``-th (its own term and bucket)."""
    moments = dict.fromkeys(
        ("detected_at", "updated_at", "evidence_received_at", "evidence_created_at"), at(i)
    )
    fields = {"term": f"#t{i}", "bucket_start": at(i * 900), "authors_count": 4, "velocity": 1.0}
    return Trend(source=source, **{**TREND_FIELDS, **fields, **moments, **changes})


def trends(source: Source) -> list[Trend]:
    return Trend.objects.bulk_create(trend(source, i) for i in range(ROWS))


def build_events(team: Any) -> str:
    events(make_source(team))
    return "/api/events/"


def build_trend_events(team: Any) -> str:
    source = make_source(team)
    events(source, term="#x")
    row = trend(source, 0, term="#x", bucket_start=T0, bucket_s=86400, events=ROWS)
    row.save()
    return f"/api/trends/{row.id}/events/"


def build_stories(team: Any) -> str:
    """1,000 stories of two members each (the first trend is its own story)."""
    source = make_source(team)
    firsts = trends(source)
    Trend.objects.filter(id__in=[t.id for t in firsts]).update(story_id=F("id"))
    Trend.objects.bulk_create(
        trend(source, ROWS + i, term=f"#m{i}", story_id=first.id) for i, first in enumerate(firsts)
    )
    return "/api/stories/"


def build_trends(team: Any) -> str:
    trends(make_source(team))
    return "/api/trends/"


def build_sources(team: Any) -> str:
    sources(team)
    return "/api/sources/"


def build_streams(team: Any) -> str:
    StreamClock.objects.bulk_create(
        StreamClock(source=source, bucket_s=900) for source in sources(team)
    )
    return "/api/streams/"


def build_dead_letters(team: Any) -> str:
    source = make_source(team)
    DeadLetter.objects.bulk_create(
        DeadLetter(stage=DeadLetter.Stage.INGEST, source=source, reason=f"bad {i}", key=f"k{i}")
        for i in range(ROWS)
    )
    return "/api/dead-letters/"


def build_rules(team: Any) -> str:
    AlertRule.objects.bulk_create(AlertRule(team=team, name=f"r{i}") for i in range(ROWS))
    return "/api/rules/"


def build_watches(team: Any) -> str:
    Watch.objects.bulk_create(Watch(team=team, name=f"w{i}", terms=["#x"]) for i in range(ROWS))
    return "/api/watches/"


def build_alerts(team: Any) -> str:
    """1,000 alerts, each assigned, with two activity entries."""
    rules = AlertRule.objects.bulk_create(AlertRule(team=team, name=f"r{i}") for i in range(3))
    source_trends = trends(make_source(team))
    Alert.objects.bulk_create(
        Alert(
            team=team,
            rule=rules[i % 3],
            seq=i + 1,
            title=f"alert {i}",
            severity="info",
            trend=source_trends[i],
            event_received_at=at(i),
            event_created_at=at(i),
            created_at=at(i),
            assignee=team.memberships.get(role="member").user,
        )
        for i in range(ROWS)
    )
    AlertActivity.objects.bulk_create(
        AlertActivity(alert=alert, at=at(i), user=alert.assignee, action=action)
        for alert in Alert.objects.filter(team=team)
        for i, action in enumerate(("assign", "comment"))
    )
    return "/api/alerts/?state=open&q=alert&assignee=me"


def build_channels(team: Any) -> str:
    Channel.objects.bulk_create(
        Channel(team=team, kind="email", name=f"c{i}", config={"to": ["a@example.com"]})
        for i in range(ROWS)
    )
    return "/api/channels/"


def build_deliveries(team: Any) -> str:
    channel = Channel.objects.create(team=team, kind="email", name="c", config={})
    build_alerts(team)
    deliveries = Delivery.objects.bulk_create(
        Delivery(
            alert=alert,
            channel=channel,
            team=team,
            event="alert.created",
            webhook_id=f"msg_{alert.id}",
            created_at=at(0),
        )
        for alert in Alert.objects.filter(team=team)
    )
    DeliveryAttempt.objects.bulk_create(
        DeliveryAttempt(delivery=d, at=at(0), outcome="retry", http_status=503, latency_ms=1.0)
        for d in deliveries
        for _ in range(2)
    )
    return "/api/deliveries/"


ANOMALY_FIELDS = {"bucket_s": 300, "score": 4.0, "value": 10.0}
ANOMALY_MOMENTS = ("evidence_created_at", "evidence_received_at", "detected_at", "updated_at")


def build_anomalies(team: Any) -> str:
    source = make_source(team)
    watch = Watch.objects.create(team=team, name="w", terms=["#x"])
    series = Series.objects.create(
        source=source,
        kind=Series.Kind.WATCH,
        watch=watch,
        bucket_s=300,
        first_bucket=T0,
        last_bucket=T0,
        created_at=T0,
    )
    Anomaly.objects.bulk_create(
        Anomaly(
            series=series,
            source=source,
            window_start=at(i * 300),
            window_end=at(i * 300 + 300),
            peak_at=at(i * 300),
            **ANOMALY_FIELDS,
            **dict.fromkeys(ANOMALY_MOMENTS, at(i)),
        )
        for i in range(ROWS)
    )
    return "/api/anomalies/"


def build_models(team: Any) -> str:
    ModelVersion.objects.bulk_create(
        ModelVersion(
            task=("sentiment", "emotion", "offensive")[i % 3],
            name="head",
            version=i,
            artefact=f"a{i}",
            sha256="0" * 64,
        )
        for i in range(ROWS)
    )
    return "/api/models/"


BUILDERS: dict[str, Callable[[Any], str]] = {
    "events": build_events,
    "trend events": build_trend_events,
    "trends": build_trends,
    "stories": build_stories,
    "sources": build_sources,
    "streams": build_streams,
    "dead letters": build_dead_letters,
    "rules": build_rules,
    "watches": build_watches,
    "alerts": build_alerts,
    "channels": build_channels,
    "deliveries": build_deliveries,
    "anomalies": build_anomalies,
    "models": build_models,
}


def queries_for(client: Any, path: str, page_size: int) -> tuple[int, int]:
    base, _, query = path.partition("?")
    params = {**dict(parse_qsl(query)), "page_size": str(page_size)}
    with CaptureQueriesContext(connection) as queries:
        response = client.get(base, params)
    assert response.status_code == 200, response.content[:300]
    return len(queries), len(response.json()["results"])


@pytest.mark.parametrize("endpoint", list(BUILDERS))
def test_a_list_costs_the_same_queries_at_any_page_size(endpoint: str) -> None:
    get_redis().flushdb()
    personas = make_personas()
    path = BUILDERS[endpoint](personas.team)
    client = client_for(personas.member)
    queries_for(client, path, 1)  # warm what is cached per process

    small, small_rows = queries_for(client, path, 10)
    large, large_rows = queries_for(client, path, 500)

    assert (small_rows, large_rows) == (10, 500)
    assert small == large, f"{endpoint}: {small} queries for 10 rows, {large} for 500"
