"""The why of every alert (issue 20): each alert kind fired through the pipeline's own
path carries an ``explanation`` (measure, value against baseline and threshold, score,
window, series, top terms and authors, evidence posts), hand-checked here; a story
member that joins updates it; the API and the channel layer carry it; and a batch
evaluation reads it in a fixed number of queries. Real PostgreSQL, Redis and channel
layer."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.test import TestCase
from django.test.utils import CaptureQueriesContext

from alerts import evaluation, explain, push
from alerts.models import Alert, AlertRule
from ingest.envelope import Author, Envelope
from ingest.models import Event
from mlengine.anomalies import watches as anomaly_watches
from mlengine.models import Anomaly, Series, Trend
from tests import factories
from tests.factories import ORIGIN, Personas
from tests.test_anomaly_stage import BUCKET_MIN, SPIKE_BUCKET, advance_all, souring, stream
from tests.test_api import client_for
from tests.test_pipeline import accelerating_flood
from tests.test_predictions_resolve import predicted_flood_alert
from tests.test_story_alerts_once import make_trend
from tests.test_viral_alerts import post, score

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]

WHYS = {"first", "most_engaged", "latest"}


def assert_shape(explanation: dict[str, Any], personas: Personas) -> None:
    """What every explanation holds, whatever its kind: the value above its baseline, a
    series of at least 24 buckets ending on the value, top authors' shares summing to
    at most 1, and evidence posts the team sees in ``/api/events/``."""
    assert explanation["value"] > explanation["baseline"]
    assert len(explanation["series"]) >= 24
    assert explanation["series"][-1]["value"] == explanation["value"]
    starts = [p["t"] for p in explanation["series"]]
    assert starts == sorted(starts)
    assert len(explanation["top_terms"]) <= 10
    assert len(explanation["top_authors"]) <= 5
    assert sum(a["share"] for a in explanation["top_authors"]) <= 1
    assert 1 <= len(explanation["evidence"]) <= 5
    assert {e["why"] for e in explanation["evidence"]} <= WHYS
    client = client_for(personas.member)
    for post_ in explanation["evidence"]:
        assert client.get(f"/api/events/{post_['event']}/").status_code == 200
    outsider = client_for(personas.outsider)
    assert outsider.get(f"/api/events/{explanation['evidence'][0]['event']}/").status_code == 404


def blizzard(personas: Personas) -> Alert:
    """30 quiet buckets, then 12 "#blizzard" posts by three authors (4 each) one
    minute into the 31st bucket; the trend rule's alert."""
    source = factories.make_source(personas.team)
    factories.make_rule(personas.team, name="trends")
    trend_ids = factories.run_through(
        source,
        factories.quiet_history(30)
        + factories.burst("#blizzard", count=12, minutes=30 * 15 + 1, authors=3),
    )
    with TestCase.captureOnCommitCallbacks(execute=False):
        created = evaluation.evaluate_trends(trend_ids=trend_ids)
    return Alert.objects.get(id__in=created)


def test_a_trend_alert_explains_its_term_its_baseline_its_authors_and_its_posts() -> None:
    personas = factories.make_personas()
    alert = blizzard(personas)
    trend = Trend.objects.get(term="#blizzard")
    why = alert.explanation
    assert why is not None

    assert why["measure"] == "posts per 15 min holding '#blizzard' in archive"
    assert why["value"] == trend.events == 12
    assert why["baseline"] == round(trend.expected, 4)
    assert why["threshold"] == max(
        math.ceil(trend.expected + 4.0 * math.sqrt(trend.expected + 1)), 5
    )
    assert why["value"] >= why["threshold"]
    assert why["score"] == round(trend.score, 4) and why["score_kind"] == "σ"
    assert why["window"] == {"start": "2015-02-20T19:30:00Z", "end": "2015-02-20T19:45:00Z"}
    # No "#blizzard" in the 23 quiet buckets before.
    assert len(why["series"]) == 24
    assert why["series"][0]["t"] == "2015-02-20T13:45:00Z"
    assert [p["value"] for p in why["series"][:-1]] == [0.0] * 23
    assert why["top_terms"][0] == {"term": "#blizzard", "count": 12}
    assert why["top_authors"] == [
        {"handle": "@fan0", "posts": 4, "share": 0.3333},
        {"handle": "@fan1", "posts": 4, "share": 0.3333},
        {"handle": "@fan2", "posts": 4, "share": 0.3333},
    ]
    first, latest = why["evidence"]  # no post was engaged with
    assert (first["why"], latest["why"]) == ("first", "latest")
    assert first["text"] == latest["text"] == "so much #blizzard here"
    assert (first["author"], latest["author"]) == ("@fan0", "@fan2")
    assert first["created_at"] == "2015-02-20T19:31:00Z"
    assert_shape(why, personas)
    assert "so_far" not in why


def test_a_predicted_trend_says_its_measure_is_projected_and_gives_the_count_so_far() -> None:
    personas, alert = predicted_flood_alert()
    trend = Trend.objects.get(term="#flood")
    why = alert.explanation
    assert why is not None

    assert why["measure"] == (
        "posts per 15 min holding '#flood' in archive, projected to the bucket's end"
    )
    assert why["so_far"] == trend.events
    assert why["projected"] == why["value"] == round(trend.projected or 0, 4)
    assert why["projected"] > why["baseline"] == round(trend.expected, 4)
    # #flood is everyday vocabulary: 3 posts in each of the six buckets before.
    assert [p["value"] for p in why["series"][-7:-1]] == [3.0] * 6
    assert why["top_terms"][0] == {"term": "#flood", "count": trend.events}
    assert_shape(why, personas)  # type: ignore[arg-type]


def test_a_confirmed_prediction_is_explained_by_its_count_not_its_projection() -> None:
    personas, alert = predicted_flood_alert()
    source = alert.trend.source if alert.trend else None
    assert source is not None
    _, later = accelerating_flood()
    factories.run_through(source, later)
    confirmed = list(
        Trend.objects.filter(term="#flood", confirmed_at__isnull=False).values_list("id", flat=True)
    )
    with TestCase.captureOnCommitCallbacks(execute=False):
        assert evaluation.confirm_trends(trend_ids=confirmed) == [alert.id]
    alert.refresh_from_db()
    trend = Trend.objects.get(id__in=confirmed)
    why = alert.explanation
    assert why is not None

    assert why["measure"] == "posts per 15 min holding '#flood' in archive"
    assert "so_far" not in why and "projected" not in why
    # Six early posts and fourteen later ones, all in the bucket.
    assert why["value"] == trend.events == 20
    assert why["top_terms"][0] == {"term": "#flood", "count": 20}
    assert_shape(why, personas)  # type: ignore[arg-type]


def test_a_story_member_that_joins_updates_the_explanation() -> None:
    personas = factories.make_personas()
    source = factories.make_source(personas.team)
    rule = factories.make_rule(personas.team, name="stories", cooldown_s=6 * 3600)
    posts = [
        Envelope(
            external_id=f"s{i}",
            created_at=ORIGIN + timedelta(hours=2, minutes=5 + i),
            text="roads shut #snow",
            author=Author(id=f"a{i % 2}", handle=f"a{i % 2}"),
            metrics={"likes": i},
        )
        for i in range(3)
    ]
    factories.run_through(source, posts, close=False)
    first = make_trend(source, "#blizzard", hours=1, minute=10)
    with TestCase.captureOnCommitCallbacks(execute=False):
        (alert_id,) = evaluation.evaluate_trends(trend_ids=[first.id])
    before = Alert.objects.get(id=alert_id).explanation
    assert before is not None
    assert before["measure"] == "posts per 1 h holding '#blizzard' in archive"

    member = make_trend(source, "#snow", hours=2, story=first, minute=30)
    with TestCase.captureOnCommitCallbacks(execute=False) as callbacks:
        assert evaluation.evaluate_trends(trend_ids=[member.id]) == []
    after = Alert.objects.get(id=alert_id)
    why = after.explanation
    assert why is not None

    assert rule.id == after.rule_id and callbacks
    assert why["measure"] == "posts per 1 h holding '#snow' in archive"
    assert why["window"] == {"start": "2015-02-20T14:00:00Z", "end": "2015-02-20T15:00:00Z"}
    assert (why["value"], why["baseline"], why["score"]) == (20.0, 1.0, 9.0)
    assert why["threshold"] == max(math.ceil(1.0 + 4.0 * math.sqrt(2.0)), 5)  # 7
    # Every post holds "#snow" and its words ('#' sorts first among equal counts).
    assert why["top_terms"][0] == {"term": "#snow", "count": 3}
    assert {t["count"] for t in why["top_terms"]} == {3}
    assert why["top_authors"] == [
        {"handle": "@a0", "posts": 2, "share": 0.6666},
        {"handle": "@a1", "posts": 1, "share": 0.3333},
    ]
    assert [(e["event"], e["why"]) for e in why["evidence"]] == [
        (Event.objects.get(external_id="s0").id, "first"),
        (Event.objects.get(external_id="s2").id, "most_engaged"),
    ]
    assert why != before


def spiked_with_storm(personas: Personas) -> list[int]:
    """A watch "storms" on "#storm", a steady day and a half, then three buckets of 25
    "#storm" posts by five authors; the anomalies' ids."""
    anomaly_watches.save_watch(
        watch=None, data={"team": personas.team, "name": "storms", "terms": ["#storm"]}
    )
    source = factories.make_source(personas.team)
    storm = [
        factories.envelope(
            "look at the sky #storm",
            minutes=b * BUCKET_MIN + 0.5 + i * 0.01,
            author=f"fan{i % 5}",
        )
        for b in range(SPIKE_BUCKET, SPIKE_BUCKET + 3)
        for i in range(25)
    ]
    stream(source, storm)
    return advance_all()


def test_anomaly_alerts_explain_volume_term_and_watch_series_with_their_band() -> None:
    personas = factories.make_personas()
    rule = factories.make_rule(
        personas.team, name="spikes", kind=AlertRule.Kind.ANOMALY, min_score=5
    )
    anomaly_ids = spiked_with_storm(personas)
    with TestCase.captureOnCommitCallbacks(execute=False):
        created = evaluation.evaluate_anomalies(anomaly_ids=anomaly_ids)
    alerts = {a.anomaly_id: a for a in Alert.objects.filter(id__in=created)}
    fired = [
        (anomaly, alerts[anomaly.id])
        for anomaly in Anomaly.objects.filter(id__in=[i for i in alerts if i]).select_related(
            "series"
        )
    ]
    kinds = {anomaly.series.kind: alert for anomaly, alert in fired}
    assert {"volume", "term", "watch"} <= set(kinds)

    measures = {
        "volume": "posts per 5 min in archive",
        "term": "posts per 5 min holding '{}' in archive",
        "watch": "posts per 5 min matching watch 'storms' in archive",
    }
    for anomaly, alert in fired:
        why = alert.explanation
        assert why is not None
        assert why["measure"] == measures[anomaly.series.kind].format(anomaly.series.term)
        assert why["value"] == anomaly.value
        assert why["baseline"] == round(anomaly.expected or 0, 4)
        assert why["threshold"] == round(anomaly.high or 0, 4) < why["value"]
        assert why["band"] == {"low": round(anomaly.low or 0, 4), "high": why["threshold"]}
        assert why["score"] == round(anomaly.score, 4) and why["score_kind"] == "robust z"
        assert why["window"]["start"] == anomaly.window_start.isoformat().replace("+00:00", "Z")
        assert rule.id == alert.rule_id
        # The band in words: the value is above it, said as posts in 5 min.
        value = f"{anomaly.value:.1f}".rstrip("0").rstrip(".")
        assert f": {value} posts in 5 min, expected " in alert.title
        assert_shape(why, personas)
    # The storm's five authors wrote the watch's posts, five each a bucket.
    watch = kinds["watch"].explanation
    assert watch is not None
    assert watch["top_terms"][0]["term"] == "#storm"
    assert [a["handle"] for a in watch["top_authors"]] == [f"@fan{i}" for i in range(5)]
    assert {a["share"] for a in watch["top_authors"]} == {0.2}


def test_a_negative_share_alert_explains_the_share_with_its_band() -> None:
    personas = factories.make_personas()
    factories.make_rule(personas.team, name="mood", kind=AlertRule.Kind.ANOMALY, min_score=1)
    source = factories.make_source(personas.team)
    factories.run_through(source, souring(), batch_size=500)
    with TestCase.captureOnCommitCallbacks(execute=False):
        created = evaluation.evaluate_anomalies(anomaly_ids=advance_all())
    alert = Alert.objects.get(id__in=created, anomaly__series__kind=Series.Kind.NEGATIVE_SHARE)
    why = alert.explanation
    assert why is not None

    assert why["measure"] == "share of posts labelled negative per 5 min in archive"
    assert (why["value"], why["baseline"]) == (1.0, 0.5)
    # One post in two was negative in each bucket before the turn, both after it.
    turn = ORIGIN + timedelta(minutes=SPIKE_BUCKET * BUCKET_MIN)
    start = turn.isoformat().replace("+00:00", "Z")
    assert [p["value"] for p in why["series"]] == [
        1.0 if p["t"] >= start else 0.5 for p in why["series"]
    ]
    assert "100.0% of posts negative in 5 min, expected" in alert.title
    assert_shape(why, personas)


def test_a_viral_post_alert_explains_its_score_against_the_sources_recent_posts() -> None:
    personas = factories.make_personas()
    source = factories.make_source(personas.team)
    factories.make_rule(personas.team, name="viral", kind=AlertRule.Kind.VIRAL_POST, min_score=0.7)
    older = post(source, "o1", author="clerk", minutes=-40, text="minutes of the meeting")
    old = post(source, "o2", author="ranger", minutes=-20, text="trail update")
    first = post(source, "a1", author="mayor", minutes=0, text="Bridge closed #Storm now")
    post(source, "b1", author="clerk", minutes=5, text="agenda for tonight")
    hit = post(source, "a2", author="mayor", minutes=10, text="Still closed #Storm")
    score((older, 0.5), (old, 0.3))
    ids = score((hit, 0.91))
    with TestCase.captureOnCommitCallbacks(execute=False):
        (alert_id,) = evaluation.evaluate_viral(event_ids=ids)
    why = Alert.objects.get(id=alert_id).explanation
    assert why is not None

    assert why["measure"] == "P(viral) of a post by @mayor in archive, scored at posting"
    assert why["value"] == why["score"] == 0.91 and why["score_kind"] == "P(viral)"
    assert why["baseline"] == 0.4  # the mean of 0.5 (11:15) and 0.3 (11:30)
    assert why["threshold"] == 0.7
    assert why["window"] == {"start": "2015-02-20T11:55:00Z", "end": "2015-02-20T12:10:00Z"}
    assert [p["value"] for p in why["series"][-4:]] == [0.5, 0.3, None, 0.91]
    assert why["top_authors"] == [
        {"handle": "@mayor", "posts": 2, "share": 0.6666},
        {"handle": "@clerk", "posts": 1, "share": 0.3333},
    ]
    assert [(e["event"], e["why"]) for e in why["evidence"]] == [
        (first.id, "first"),
        (hit.id, "latest"),
    ]
    assert why["evidence"][1]["text"] == "Still closed #Storm"
    assert_shape(why, personas)


def test_the_api_and_the_channel_layer_carry_the_explanation_and_old_alerts_show_null() -> None:
    personas = factories.make_personas()
    alert = blizzard(personas)
    (old_id,) = factories.make_alerts(personas.team, 1)

    listed = {a["id"]: a for a in client_for(personas.member).get("/api/alerts/").json()["results"]}
    assert listed[alert.id]["explanation"] == alert.explanation
    assert listed[old_id]["explanation"] is None

    async def push_and_listen() -> list[dict[str, Any]]:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(push.alerts_group(personas.team.id), channel)
        await sync_to_async(push.push_alerts)(alert_ids=[alert.id])
        return list((await layer.receive(channel))["messages"])

    (message,) = async_to_sync(push_and_listen)()
    assert message["alert"]["explanation"] == alert.explanation


def test_the_schema_documents_the_explanation_as_an_object() -> None:
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    components = schema["components"]["schemas"]
    alert = components["Alert"]["properties"]["explanation"]
    assert "Explanation" in str(alert)
    fields = components["Explanation"]["properties"]
    assert {
        "measure",
        "value",
        "baseline",
        "threshold",
        "score",
        "score_kind",
        "window",
        "series",
        "top_terms",
        "top_authors",
        "evidence",
    } <= set(fields)


def trends_of(personas: Personas, count: int) -> list[int]:
    source = factories.make_source(personas.team, name=f"desk{count}")
    return [make_trend(source, f"#term{i}", hours=1).id for i in range(count)]


def test_a_batch_explains_1_or_20_trend_alerts_in_the_same_queries() -> None:
    personas = factories.make_personas()
    factories.make_rule(personas.team, name="all")
    one, twenty = trends_of(personas, 1), trends_of(personas, 20)

    counts = []
    for ids in (one, twenty):
        with (
            CaptureQueriesContext(connection) as queries,
            TestCase.captureOnCommitCallbacks(execute=False),
        ):
            assert len(evaluation.evaluate_trends(trend_ids=ids)) == len(ids)
        counts.append(len(queries))
    assert counts[0] == counts[1]
    assert all(a.explanation for a in Alert.objects.all())


def test_a_batch_explains_1_or_20_viral_alerts_in_the_same_queries() -> None:
    personas = factories.make_personas()
    source = factories.make_source(personas.team)
    factories.make_rule(personas.team, name="viral", kind=AlertRule.Kind.VIRAL_POST, min_score=0.6)
    posts = [
        post(source, f"p{i}", author=f"author{i}", minutes=i, text=f"news {i}") for i in range(21)
    ]
    score(*[(p, 0.9) for p in posts])

    counts = []
    for batch in (posts[:1], posts[1:]):
        with (
            CaptureQueriesContext(connection) as queries,
            TestCase.captureOnCommitCallbacks(execute=False),
        ):
            created = evaluation.evaluate_viral(event_ids=[p.id for p in batch])
        assert len(created) == len(batch)
        counts.append(len(queries))
    assert counts[0] == counts[1]


def test_explaining_nothing_reads_nothing() -> None:
    with CaptureQueriesContext(connection) as queries:
        assert explain.for_trends([]) == {}
        assert explain.for_anomalies([]) == {}
        assert explain.for_posts([]) == {}
    assert len(queries) == 0
