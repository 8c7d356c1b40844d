"""The anomaly stage in production: series counted in event time from the stored
events, one Anomaly per burst with its expected band, alerts of "anomaly" rules pushed,
idempotent runs; real PostgreSQL and Redis."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime, timedelta
from typing import Any, cast
from unittest import mock

import numpy as np
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.test import TestCase
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from alerts import evaluation, push, sweeps
from alerts.models import Alert, AlertRule
from ingest.envelope import Envelope
from ingest.models import Source
from mlengine.anomalies import series as anomaly_series
from mlengine.anomalies import stage as anomaly_stage
from mlengine.anomalies import watches as anomaly_watches
from mlengine.anomalies.detector import Detector
from mlengine.models import Anomaly, Series, SeriesPoint
from mlengine.tasks import advance_anomalies as advance_anomalies_task
from tests.factories import (
    ORIGIN,
    Personas,
    api_key,
    commits_without_broker,
    envelope,
    make_personas,
    make_rule,
    make_source,
    run_through,
)
from twiscope.redis import get_redis
from twiscope.schedules import BEAT_SCHEDULE

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]

BUCKET_MIN = 5
HISTORY_BUCKETS = 440  # the detector scores after a day of median and half a day of MAD
SPIKE_BUCKET = HISTORY_BUCKETS + 2


def steady(buckets: int, *, per_bucket: int = 2, negative: int = 0) -> list[Envelope]:
    """``per_bucket`` posts in each 5-minute bucket, ``negative`` of them negative."""
    return [
        envelope(
            "this is terrible awful horrible news" if i < negative else f"the gate number {i}",
            minutes=b * BUCKET_MIN + i,
        )
        for b in range(buckets)
        for i in range(per_bucket)
    ]


def spike(first_bucket: int, buckets: int, per_bucket: int) -> list[Envelope]:
    """``per_bucket`` extra posts in each of ``buckets`` buckets from ``first_bucket``."""
    return [
        envelope(f"look at the departures board {i}", minutes=b * BUCKET_MIN + 0.5 + i * 0.01)
        for b in range(first_bucket, first_bucket + buckets)
        for i in range(per_bucket)
    ]


def stream(source: Source, *extra: list[Envelope], per_bucket: int = 1, negative: int = 0) -> None:
    """A steady stream over 37 hours of event time, plus ``extra`` posts, run
    through persist, enrich and trends."""
    envelopes = steady(HISTORY_BUCKETS + 12, per_bucket=per_bucket, negative=negative)
    envelopes += [e for part in extra for e in part]
    run_through(source, sorted(envelopes, key=lambda e: e.created_at), batch_size=500)


def advance_all() -> list[int]:
    """Run the stage until no complete bucket is left; return the new anomaly ids."""
    new: list[int] = []
    result = anomaly_stage.advance_anomalies(max_buckets=200)
    new += result.anomaly_ids
    while result.more:
        result = anomaly_stage.advance_anomalies(max_buckets=200)
        new += result.anomaly_ids
    return new


def bucket(n: int) -> datetime:
    return ORIGIN + timedelta(minutes=n * BUCKET_MIN)


def client_for(user: Any) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    return client


def spiked_source(personas: Personas) -> Source:
    """A source with a steady day and a half, then three buckets of 25 extra posts."""
    source = make_source(personas.team)
    stream(source, spike(SPIKE_BUCKET, 3, 25))
    return source


def test_a_volume_spike_after_a_steady_day_is_one_anomaly_in_its_window() -> None:
    spiked_source(make_personas())

    new_ids = advance_all()

    anomalies = list(Anomaly.objects.filter(series__kind=Series.Kind.VOLUME))
    assert len(anomalies) == 1
    found = anomalies[0]
    assert bucket(SPIKE_BUCKET) <= found.window_start <= bucket(SPIKE_BUCKET + 2)
    assert found.window_end > found.window_start
    assert found.low is not None and found.high is not None and found.expected is not None
    assert found.low <= found.expected <= found.high < found.value
    assert found.id in new_ids
    points = SeriesPoint.objects.filter(series=found.series)
    assert points.count() == HISTORY_BUCKETS + 11  # the last bucket is not complete
    assert points.get(bucket_start=bucket(SPIKE_BUCKET)).value == 26


def test_an_anomaly_rule_fires_once_and_its_alert_is_pushed() -> None:
    personas = make_personas()
    rule = make_rule(personas.team, name="spikes", kind=AlertRule.Kind.ANOMALY, min_score=5)
    make_rule(personas.team, name="trends only")  # a new_trend rule: not for anomalies
    spiked_source(personas)
    with commits_without_broker() as send_task:
        new_ids = advance_all()
    volume = Anomaly.objects.get(series__kind=Series.Kind.VOLUME)
    handed = [
        c.kwargs["kwargs"]["anomaly_ids"]
        for c in send_task.call_args_list
        if c.args[0] == "alerts.evaluate_anomalies"
    ]
    assert handed == [new_ids]

    with TestCase.captureOnCommitCallbacks(execute=False):
        alert_ids = evaluation.evaluate_anomalies(anomaly_ids=new_ids)
    again = evaluation.evaluate_anomalies(anomaly_ids=new_ids)

    alerts = Alert.objects.filter(id__in=alert_ids)
    assert again == []
    assert {a.rule_id for a in alerts} == {rule.id}
    alert = alerts.get(anomaly=volume)
    assert alert.evidence["series"] == {"kind": "volume", "term": ""}
    assert alert.evidence["low"] <= alert.evidence["expected"] <= alert.evidence["high"]
    assert alert.evidence["window_start"] == volume.window_start.isoformat()
    assert alert.title.startswith("Anomaly: post volume in archive")

    async def push_and_listen() -> tuple[int, list[dict[str, Any]]]:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(push.alerts_group(personas.team.id), channel)
        pushed = await sync_to_async(push.push_alerts)(alert_ids=alert_ids)
        return pushed, (await layer.receive(channel))["messages"]

    pushed, messages = async_to_sync(push_and_listen)()
    assert pushed == len(alert_ids)
    assert [m["type"] for m in messages] == ["alert.created"] * len(alert_ids)
    assert [m["seq"] for m in messages] == list(range(1, len(alert_ids) + 1))
    assert alert.id in {m["alert"]["id"] for m in messages}
    assert {m["alert"]["anomaly"] for m in messages} == set(new_ids)


def test_an_anomaly_alert_follows_its_window_as_it_grows() -> None:
    personas = make_personas()
    make_rule(personas.team, name="spikes", kind=AlertRule.Kind.ANOMALY, min_score=5)
    spiked_source(personas)
    # The stage steps a bucket at a time up to the anomaly, whose alert fires at once.
    anomaly_stage.advance_anomalies(max_buckets=SPIKE_BUCKET)
    volumes = Anomaly.objects.filter(series__kind=Series.Kind.VOLUME)
    while not volumes.exists():
        assert anomaly_stage.advance_anomalies(max_buckets=1).buckets == 1
    volume = volumes.get()
    assert not volume.closed
    opened_end = volume.window_end
    with TestCase.captureOnCommitCallbacks(execute=False):
        [alert_id] = evaluation.evaluate_anomalies(anomaly_ids=[volume.id])
    first = Alert.objects.get(id=alert_id)
    assert first.evidence["window_end"] == opened_end.isoformat()
    assert first.evidence["closed"] is False

    # The next buckets of the spike grow the window: the stage hands the anomaly on.
    with commits_without_broker() as send_task:
        advance_all()
    volume.refresh_from_db()
    assert volume.window_end > opened_end
    updates = [
        c.kwargs["kwargs"]["anomaly_ids"]
        for c in send_task.call_args_list
        if c.args[0] == "alerts.update_anomaly_alerts"
    ]
    assert updates and all(volume.id in ids for ids in updates)

    with (
        mock.patch("alerts.push.push_updates") as push_updates,
        TestCase.captureOnCommitCallbacks(execute=True),
    ):
        assert evaluation.update_anomaly_alerts(anomaly_ids=[volume.id]) == [alert_id]
    alert = Alert.objects.get(id=alert_id)
    assert alert.evidence["window_end"] == volume.window_end.isoformat()
    assert alert.evidence["closed"] is volume.closed and alert.updated_at is not None
    assert alert.seq == first.seq  # the same alert, updated in place
    assert push_updates.call_args.kwargs == {"alert_ids": [alert_id]}
    assert evaluation.update_anomaly_alerts(anomaly_ids=[volume.id]) == []

    # Had that message been lost, the alerts sweeper brings the alert up to date.
    Alert.objects.filter(id=alert_id).update(
        evidence=first.evidence, created_at=timezone.now() - timedelta(minutes=10)
    )
    with TestCase.captureOnCommitCallbacks(execute=False):
        assert sweeps.sweep(older_than_s=120)["alerts_updated"] == 1
    assert Alert.objects.get(id=alert_id).evidence["window_end"] == volume.window_end.isoformat()


def test_a_second_run_and_a_redelivered_alert_task_double_nothing() -> None:
    personas = make_personas()
    make_rule(personas.team, name="spikes", kind=AlertRule.Kind.ANOMALY)
    spiked_source(personas)
    new_ids = advance_all()
    points = SeriesPoint.objects.count()
    first = evaluation.evaluate_anomalies(anomaly_ids=new_ids)

    assert anomaly_stage.advance_anomalies().anomaly_ids == []
    assert evaluation.evaluate_anomalies(anomaly_ids=new_ids) == []
    assert SeriesPoint.objects.count() == points
    assert Anomaly.objects.count() == len(new_ids) >= 1
    assert Alert.objects.count() == len(first) == len(new_ids)


def test_a_steady_stream_has_no_anomaly_and_fires_no_alert() -> None:
    personas = make_personas()
    make_rule(personas.team, name="spikes", kind=AlertRule.Kind.ANOMALY)
    stream(make_source(personas.team))

    new_ids = advance_all()

    assert new_ids == []
    assert not Anomaly.objects.exists()
    assert SeriesPoint.objects.filter(series__kind=Series.Kind.VOLUME).count() == (
        HISTORY_BUCKETS + 11
    )
    assert not Alert.objects.exists()


def souring() -> list[Envelope]:
    """Two posts a bucket, one negative, for a day and a half; then six buckets where
    both are negative (in event-time order)."""
    angry = [
        envelope("this is terrible awful horrible news", minutes=b * BUCKET_MIN + 1.5)
        for b in range(SPIKE_BUCKET, SPIKE_BUCKET + 6)
    ]
    calm = [
        e
        for e in steady(HISTORY_BUCKETS + 12, per_bucket=2, negative=1)
        if not (
            bucket(SPIKE_BUCKET) <= e.created_at < bucket(SPIKE_BUCKET + 6)
            and "terrible" not in e.text
        )
    ]
    return sorted(calm + angry, key=lambda e: e.created_at)


def test_a_rise_of_the_negative_share_is_an_anomaly_of_that_series() -> None:
    source = make_source(make_personas().team)
    run_through(source, souring(), batch_size=500)

    advance_all()

    share = Anomaly.objects.get(series__kind=Series.Kind.NEGATIVE_SHARE)
    assert bucket(SPIKE_BUCKET) <= share.window_start < bucket(SPIKE_BUCKET + 6)
    assert share.value == 1.0 and share.expected == 0.5
    assert not Anomaly.objects.filter(series__kind=Series.Kind.VOLUME).exists()


def test_the_stage_runs_on_beat() -> None:
    entry = BEAT_SCHEDULE["anomalies.advance"]

    assert entry["task"] == "anomalies.advance"
    assert entry["schedule"] <= 60 and entry["options"]["expires"] < entry["schedule"]


def test_the_api_shows_anomalies_and_series_to_their_team_only() -> None:
    personas = make_personas()
    source = spiked_source(personas)
    advance_all()
    member, outsider = client_for(personas.member), client_for(personas.outsider)
    volume = Anomaly.objects.get(series__kind=Series.Kind.VOLUME)

    listed = member.get("/api/anomalies/", {"source": str(source.id), "kind": "volume"})
    series = member.get("/api/series/", {"source": str(source.id), "kind": "volume"})

    assert listed.status_code == 200, listed.json()
    assert [a["id"] for a in listed.json()["results"]] == [volume.id]
    row = listed.json()["results"][0]
    assert row["source"]["id"] == source.id and row["kind"] == "volume"
    assert row["low"] <= row["expected"] <= row["high"] < row["value"]
    assert series.status_code == 200, series.json()
    body = series.json()
    assert len(body["points"]) == 288  # the last 24 h of event time
    assert [w["id"] for w in body["anomalies"]] == [volume.id]
    assert {"start", "value", "expected", "low", "high", "score", "anomaly"} == set(
        body["points"][0]
    )
    assert outsider.get("/api/anomalies/").json()["results"] == []
    assert outsider.get(f"/api/anomalies/{volume.id}/").status_code == 404
    assert outsider.get("/api/anomalies/", {"source": source.id}).status_code == 400
    assert (
        outsider.get("/api/series/", {"source": str(source.id), "kind": "volume"}).status_code
        == 404
    )
    assert member.get("/api/series/", {"source": str(source.id), "kind": "term"}).status_code == 400
    assert member.get("/api/series/", {"source": str(source.id), "kind": "x"}).status_code == 400


def test_the_rules_api_takes_the_anomaly_kind_and_refuses_unknown_kinds() -> None:
    personas = make_personas()
    owner = client_for(personas.owner)
    body = {"team": personas.team.id, "name": "spikes", "kind": "anomaly", "min_score": 6}

    created = owner.post("/api/rules/", body, format="json")
    refused = owner.post("/api/rules/", {**body, "name": "x", "kind": "bogus"}, format="json")

    assert created.status_code == 201, created.json()
    assert AlertRule.objects.get(name="spikes").kind == AlertRule.Kind.ANOMALY
    assert refused.status_code == 400 and "kind" in refused.json()


def test_the_rules_api_takes_min_peak_from_1_and_defaults_it_to_5() -> None:
    personas = make_personas()
    owner = client_for(personas.owner)
    body = {"team": personas.team.id, "name": "spikes", "kind": "anomaly", "min_score": 6}

    default = owner.post("/api/rules/", body, format="json")
    small = owner.post("/api/rules/", {**body, "name": "small", "min_peak": 1}, format="json")
    refused = owner.post("/api/rules/", {**body, "name": "none", "min_peak": 0}, format="json")

    assert default.status_code == 201 and default.json()["min_peak"] == 5
    assert small.status_code == 201 and small.json()["min_peak"] == 1
    assert refused.status_code == 400 and "min_peak" in refused.json()


def test_the_openapi_schema_documents_the_anomaly_endpoints() -> None:
    response = APIClient().get("/api/schema/")

    assert b"/api/anomalies/" in response.content and b"/api/series/" in response.content


def test_the_dashboard_has_the_anomalies_panel(client: Any) -> None:
    personas = make_personas()
    client.force_login(personas.member)

    page = client.get(reverse("dashboard:home")).content.decode()

    assert 'id="anomalies"' in page and 'id="anomaly-chart"' in page
    assert 'id="series-kind"' in page and "anomalies.advance" in page


def test_a_series_state_saved_before_the_likelihood_gate_loads_and_steps_on() -> None:
    """A blob written before the likelihood's arrays existed resumes: its robust
    baseline is kept, the likelihood starts fresh."""
    params = anomaly_series.params_for(anomaly_series.COUNTS)
    detector = Detector(1, params)
    for value in [3.0, 4.0, 2.0] * 200:
        detector.update(np.array([value]))
    state = detector.state()
    old_keys = ("values", "residuals", "smoothed", "scale", "count", "since_alert")
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: state[k][0] for k in old_keys})

    loaded = anomaly_series.load_state(buf.getvalue())
    group = anomaly_series.Group(params)
    [row] = group.add([loaded])
    step = group.step(np.array([3.0]))

    assert set(loaded) == set(old_keys)
    assert group.detector is not None and step is not None
    resumed = group.detector.state()
    assert set(resumed) >= set(Detector.STATE_KEYS)
    assert int(resumed["count"][row]) == int(state["count"][0]) + 1  # the history went on
    assert np.isfinite(step.expected[row])


def test_a_run_shares_its_buckets_among_the_sources_catching_up(settings: Any) -> None:
    settings.ANOMALY_MAX_STEPS = 10
    personas = make_personas()
    sources = [make_source(personas.team, name=f"s{i}") for i in range(2)]
    for source in sources:
        run_through(source, steady(30), batch_size=500)

    result = anomaly_stage.advance_anomalies(max_buckets=288)

    assert (result.buckets, result.more) == (10, True)
    for source in sources:
        volume = Series.objects.get(source=source, kind=Series.Kind.VOLUME)
        assert SeriesPoint.objects.filter(series=volume).count() == 5
    while anomaly_stage.advance_anomalies(max_buckets=288).more:
        pass
    assert SeriesPoint.objects.filter(series__kind=Series.Kind.VOLUME).count() == 2 * 29


# --- jumping over empty time ------------------------------------------------------------

DAY_MIN = 24 * 60


def storm(at_min: float, *, buckets: int = 3, per_bucket: int = 25) -> list[Envelope]:
    """A "#storm" burst from ``at_min``: ``per_bucket`` posts (a third negative) in each
    of ``buckets`` buckets, after 7 hours of a post a bucket (the trend stage's baseline),
    and then a post 2, 5, 11 and 23 hours later."""
    lead = [envelope(f"the wind {b}", minutes=at_min - 420 + b * BUCKET_MIN) for b in range(84)]
    posts = [
        envelope(
            f"{'this is terrible awful news' if i % 3 == 0 else 'look at the sky'} #storm",
            minutes=at_min + b * BUCKET_MIN + i * 0.01,
            author=f"fan{i}",
        )
        for b in range(buckets)
        for i in range(per_bucket)
    ]
    after = [envelope(f"a quiet word {h}", minutes=at_min + h * 60) for h in (2, 5, 11, 23)]
    return lead + posts + after


def bursts_apart(days: tuple[int, ...]) -> list[Envelope]:
    """A steady day and a half, then a "#storm" burst on each of ``days``."""
    posts = steady(HISTORY_BUCKETS + 12) + [e for d in days for e in storm(d * DAY_MIN + 7)]
    return sorted(posts, key=lambda e: e.created_at)


def catch_up(*, jump: bool, max_buckets: int = 2000) -> list[anomaly_stage.AdvanceResult]:
    """Run the stage until no complete bucket is left; every run's result."""
    runs = [anomaly_stage.advance_anomalies(max_buckets=max_buckets, jump=jump)]
    while runs[-1].more:
        runs.append(anomaly_stage.advance_anomalies(max_buckets=max_buckets, jump=jump))
    return runs


def state_bits(blob: Any) -> dict[str, bytes] | None:
    if blob is None:
        return None
    return {k: a.tobytes() for k, a in anomaly_series.load_state(blob).items()}


def stage_results(source: Source) -> dict[str, Any]:
    """What the stage wrote for ``source``, by series (kind, term, watch and its terms)
    and bucket, without ids and processing times (an anomaly opened in an empty bucket
    takes the run's as its evidence's): each series' activity, first and last bucket and
    detector state (its float64 bits), its points and its anomalies."""
    rows = list(Series.objects.filter(source=source))
    key = {s.id: (s.kind, s.term, s.watch_id, tuple(s.watch_terms)) for s in rows}
    points = SeriesPoint.objects.filter(series__source=source).values_list(
        "series_id", "bucket_start", "value", "expected", "low", "high", "score", "anomaly"
    )
    anomalies = Anomaly.objects.filter(source=source).values_list(
        "series_id",
        "window_start",
        "window_end",
        "peak_at",
        "score",
        "value",
        "expected",
        "low",
        "high",
        "closed",
        "evidence_created_at",
    )
    return {
        "series": {
            key[s.id]: (s.active, s.first_bucket, s.last_bucket, state_bits(s.state)) for s in rows
        },
        "points": {(key[p[0]], p[1]): p[2:] for p in points},
        "anomalies": {(key[a[0]], a[1]): a[2:] for a in anomalies},
    }


def jumped_and_stepped(source: Source) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """The stage's results for ``source`` stepped bucket by bucket, then afresh (its
    series deleted) with jumps; and the jumping runs."""
    catch_up(jump=False)
    stepped = stage_results(source)
    Series.objects.filter(source=source).delete()
    runs = catch_up(jump=True)
    return stepped, stage_results(source), runs


def test_jumping_over_weeks_without_events_writes_what_stepping_every_bucket_writes() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    anomaly_watches.save_watch(
        watch=None, data={"team": personas.team, "name": "storms", "terms": ["#storm"]}
    )
    run_through(source, bursts_apart((3, 6, 20)), batch_size=500)

    stepped, jumped, runs = jumped_and_stepped(source)

    assert jumped == stepped
    kinds = {k[0] for k in stepped["series"]}
    assert kinds == {"volume", "negative_share", "term", "watch"}
    assert len(stepped["points"]) > 3 * 288 * 14  # the last 14 days of three series at least
    assert {series[0] for series, _ in stepped["anomalies"]} >= {"volume", "term", "watch"}
    assert sum(r.jumps for r in runs) >= 3
    # The stepping runs stepped every bucket; the jumping ones a fraction of them.
    assert sum(r.buckets for r in runs) > 20 * 288
    assert sum(r.steps for r in runs) < sum(r.buckets for r in runs) / 4


def test_buckets_flagged_inside_a_jump_are_the_ones_stepping_flags() -> None:
    # A flagged bucket's value lies outside its band, so an empty bucket is never flagged
    # as a rise; flagging falls too, with no refractory period and a lower threshold, the
    # empty buckets after the steady day and half are flagged, inside runs of empty
    # buckets (they open no anomaly: the stage opens one only above the band).
    shares = anomaly_series.params_for(anomaly_series.SHARES)
    no_refractory = anomaly_series.Params(refractory=0, direction="both", threshold=3.0)
    params = {anomaly_series.COUNTS: no_refractory, anomaly_series.SHARES: shares}
    counts = mock.patch.object(anomaly_stage, "params_for", params.__getitem__)
    source = make_source(make_personas().team)
    run_through(source, bursts_apart((3, 5)), batch_size=500)

    with counts:
        stepped, jumped, runs = jumped_and_stepped(source)

    assert jumped == stepped
    flagged_empty = [at for at, point in stepped["points"].items() if point[0] == 0 and point[-1]]
    assert flagged_empty and sum(r.jumps for r in runs) >= 2
    assert all(stepped["points"][at][0] > 0 for at in stepped["anomalies"])


def test_a_source_over_five_years_catches_up_in_runs_bounded_by_its_events(
    settings: Any,
) -> None:
    rng = np.random.default_rng(3)
    minutes = np.sort(rng.uniform(0, 5 * 365 * DAY_MIN, 300))
    posts = [envelope(f"feed item {i}", minutes=float(m)) for i, m in enumerate(minutes)]
    source = make_source(make_personas().team, name="old feed")
    run_through(source, posts, batch_size=500)
    busy = len({int(m) // BUCKET_MIN for m in minutes})

    with CaptureQueriesContext(connection) as queries:
        runs = catch_up(jump=True, max_buckets=settings.ANOMALY_MAX_BUCKETS)

    buckets = sum(r.buckets for r in runs)
    steps, jumps = sum(r.steps for r in runs), sum(r.jumps for r in runs)
    first, last = int(minutes[0]) // BUCKET_MIN, int(minutes[-1]) // BUCKET_MIN
    assert buckets == last - first > 5 * 365 * 288 * 0.99  # all of it (the last incomplete), ...
    assert steps <= busy * anomaly_stage.JUMP_MIN  # ... stepping only the buckets near events
    assert jumps <= busy + 1
    # Each run but the last spends its budget but for less than a jump (2 series).
    jump = 2 * settings.ANOMALY_JUMP_COST
    cost = steps + jumps * jump
    assert len(runs) <= cost // (settings.ANOMALY_MAX_BUCKETS - jump) + 1
    assert len(queries) <= 40 * len(runs)
    volume = Series.objects.get(source=source, kind=Series.Kind.VOLUME)
    assert volume.last_bucket == bucket(last - 1)
    kept = SeriesPoint.objects.filter(series=volume).count()
    assert kept == settings.ANOMALY_RETENTION_S // 300 + 1  # the last 14 days, every bucket


def test_a_run_writes_at_most_its_share_of_points_however_far_it_jumps(settings: Any) -> None:
    settings.ANOMALY_MAX_POINTS = 4_000  # a week of its 2 series: two weeks are kept
    rng = np.random.default_rng(5)
    minutes = np.sort(rng.uniform(0, 60 * DAY_MIN, 20))
    posts = [envelope(f"feed item {i}", minutes=float(m)) for i, m in enumerate(minutes)]
    source = make_source(make_personas().team, name="old feed")
    run_through(source, posts, batch_size=500)
    volume = Series.objects.filter(source=source, kind=Series.Kind.VOLUME)

    runs = [anomaly_stage.advance_anomalies()]
    written = [SeriesPoint.objects.filter(series__source=source).count()]
    while runs[-1].more:
        since = volume.get().last_bucket
        runs.append(anomaly_stage.advance_anomalies())
        points = SeriesPoint.objects.filter(series__source=source, bucket_start__gt=since)
        written.append(points.count())
    capped = stage_results(source)
    Series.objects.filter(source=source).delete()
    settings.ANOMALY_MAX_POINTS = 10_000_000
    uncapped = catch_up(jump=True, max_buckets=settings.ANOMALY_MAX_BUCKETS)

    assert stage_results(source) == capped  # the same, in more runs
    assert len(runs) > len(uncapped) >= 1
    # Each run's own points: the jumped buckets' within the cap, and the stepped ones'.
    assert all(n <= 4_000 + 2 * r.steps for n, r in zip(written, runs, strict=True))


def _queued_anomaly_task_ids() -> list[str]:
    raw = cast("list[bytes]", get_redis().lrange("anomalies", 0, -1))
    return [json.loads(message)["headers"]["id"] for message in raw]


@pytest.mark.usefixtures("clean_redis")
def test_beat_ticks_with_work_left_never_multiply_the_follow_ups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While buckets remain, the task queues one follow-up; a beat tick meanwhile queues
    none of its own (the queue would otherwise fill with chains, one per tick). Real
    broker: the ``anomalies`` queue is a Redis list."""
    monkeypatch.setattr(
        anomaly_stage,
        "advance_anomalies",
        lambda: anomaly_stage.AdvanceResult(buckets=288, anomaly_ids=[], more=True),
    )

    advance_anomalies_task.apply()  # a beat tick: work left, one follow-up
    advance_anomalies_task.apply()  # the next tick, the follow-up still waiting
    (follow_up,) = _queued_anomaly_task_ids()

    get_redis().delete("anomalies")  # a worker takes the follow-up and runs it
    advance_anomalies_task.apply(task_id=follow_up)

    (next_one,) = _queued_anomaly_task_ids()
    assert next_one != follow_up


def _mark_pipeline_busy() -> None:
    """Two staged batches not yet persisted, as the ingest stage records them."""
    from twiscope import pipeline

    pipeline.record("ingest", ["batch:a", "batch:b"])


def test_anomaly_work_yields_to_a_busy_pipeline_then_runs(settings: Any) -> None:
    """While the pipeline has batches in hand the run steps nothing and queues one
    follow-up; once the pipeline is free, or after ANOMALY_YIELD_MAX_S of yielding, it
    steps the buckets as it would have."""
    source = make_source(make_personas().team)
    stream(source)
    settings.ANOMALY_YIELD_MAX_S = 60
    _mark_pipeline_busy()

    assert advance_anomalies_task() == 0  # called in-process: the test's connection stays
    assert not Series.objects.filter(source=source).exists()
    (follow_up,) = _queued_anomaly_task_ids()
    advance_anomalies_task()  # a beat tick meanwhile: no second follow-up
    assert _queued_anomaly_task_ids() == [follow_up]

    # Yielding since more than ANOMALY_YIELD_MAX_S ago: it runs, busy or not.
    get_redis().set("anomalies:yielding-since", time.time() - 61)
    advance_anomalies_task()
    assert Series.objects.filter(source=source, kind=Series.Kind.VOLUME).exists()


def test_anomaly_work_runs_at_once_when_the_pipeline_is_free_or_yielding_is_off(
    settings: Any,
) -> None:
    source = make_source(make_personas().team)
    stream(source)
    settings.ANOMALY_YIELD = False
    _mark_pipeline_busy()

    advance_anomalies_task()

    assert Series.objects.filter(source=source, kind=Series.Kind.VOLUME).exists()


# ---- alerts that are right: history, minimum counts, figures inside their band ----------


def quiet(buckets: int, *, every: int = 12, skip: range = range(0)) -> list[Envelope]:
    """One post every ``every`` buckets (an hour by default), none in ``skip``: a
    sparse stream."""
    return [
        envelope(f"a quiet note number {b}", minutes=b * BUCKET_MIN + 1)
        for b in range(0, buckets, every)
        if b not in skip
    ]


def quiet_with_burst(burst: list[Envelope], first: int, buckets: int) -> list[Envelope]:
    """A quiet stream of ``HISTORY_BUCKETS + 24`` buckets with ``burst`` (in ``buckets``
    buckets from ``first``) instead of its own posts there, in event-time order."""
    calm = quiet(HISTORY_BUCKETS + 24, skip=range(first - 9, first + buckets))
    return sorted(calm + burst, key=lambda e: e.created_at)


def alert_on(rule: AlertRule, new_ids: list[int]) -> list[Alert]:
    """Evaluate the new anomalies (the alerts stage's call); the rule's alerts."""
    with TestCase.captureOnCommitCallbacks(execute=False):
        evaluation.evaluate_anomalies(anomaly_ids=new_ids)
    return list(Alert.objects.filter(rule=rule))


def test_a_brand_new_source_cannot_alert_before_its_stated_history() -> None:
    personas = make_personas()
    rule = make_rule(personas.team, name="spikes", kind=AlertRule.Kind.ANOMALY, min_score=0)
    source = make_source(personas.team)
    young = Detector(1).params.warmup - 12  # an hour short of 36 h of history
    assert young * BUCKET_MIN / 60 == 35
    envelopes = steady(young + 12, per_bucket=1) + spike(young, 3, 25)
    run_through(source, sorted(envelopes, key=lambda e: e.created_at), batch_size=500)

    new_ids = advance_all()

    assert new_ids == []
    assert not Anomaly.objects.exists()
    assert alert_on(rule, new_ids) == []
    scored = SeriesPoint.objects.filter(series__kind=Series.Kind.VOLUME, score__isnull=False)
    assert not scored.filter(bucket_start__lt=bucket(Detector(1).params.warmup)).exists()


@pytest.mark.parametrize("posts", [1, 2, 3])
def test_a_spike_of_a_few_posts_is_no_alert_unless_the_rule_asks_for_it(posts: int) -> None:
    personas = make_personas()
    default = make_rule(personas.team, name="spikes", kind=AlertRule.Kind.ANOMALY, min_score=5)
    small = make_rule(
        personas.team, name="small spikes", kind=AlertRule.Kind.ANOMALY, min_score=5, min_peak=1
    )
    assert default.min_peak == 5
    source = make_source(personas.team)
    # A quiet stream (a post an hour), then an hour with ``posts`` posts in each bucket:
    # the detector sees it (a post or more a bucket where none is expected, sustained),
    # a rule alerts only when it asks for spikes that small. One post a bucket stays
    # inside the band (its sustained level is a robust z of 3.4).
    burst = spike(SPIKE_BUCKET, 12, posts)
    run_through(source, quiet_with_burst(burst, SPIKE_BUCKET, 12))

    new_ids = advance_all()
    with TestCase.captureOnCommitCallbacks(execute=False):
        evaluation.evaluate_anomalies(anomaly_ids=new_ids)

    volume = list(Anomaly.objects.filter(series__kind=Series.Kind.VOLUME))
    assert [a.value for a in volume] == ([] if posts == 1 else [posts])
    assert all(a.high is not None and a.value > a.high for a in volume)
    assert not Alert.objects.filter(rule=default).exists()
    assert {a.anomaly_id for a in Alert.objects.filter(rule=small)} >= {a.id for a in volume}


def test_a_rule_fires_when_the_peak_of_an_open_anomaly_rises_past_its_min_peak() -> None:
    personas = make_personas()
    rule = make_rule(personas.team, name="spikes", kind=AlertRule.Kind.ANOMALY, min_score=5)
    source = make_source(personas.team)
    # Three posts a bucket open the anomaly (below min_peak 5); forty posts later raise it.
    calm = quiet(SPIKE_BUCKET, skip=range(SPIKE_BUCKET - 9, SPIKE_BUCKET))
    first = sorted(calm + spike(SPIKE_BUCKET, 9, 3), key=lambda e: e.created_at)
    run_through(source, first, close=False)
    new_ids = advance_all()
    assert alert_on(rule, new_ids) == []
    opened = Anomaly.objects.get(series__kind=Series.Kind.VOLUME)
    assert opened.value < 5

    later = [
        envelope(f"now everyone is talking {i}", minutes=(SPIKE_BUCKET + 9) * BUCKET_MIN + i * 0.1)
        for i in range(40)
    ]
    run_through(source, later + quiet(SPIKE_BUCKET + 24)[-1:], batch_size=500)
    advance_all()
    grown = Anomaly.objects.get(id=opened.id)
    assert grown.value == 40
    with TestCase.captureOnCommitCallbacks(execute=False):
        evaluation.update_anomaly_alerts(anomaly_ids=[opened.id])
        again = evaluation.update_anomaly_alerts(anomaly_ids=[opened.id])

    alert = Alert.objects.get(rule=rule)
    assert alert.anomaly_id == opened.id
    assert alert.evidence["value"] == 40
    assert again == []
    assert Alert.objects.count() == 1


def test_every_anomaly_and_alert_of_a_sparse_bursty_run_shows_a_value_outside_its_band() -> None:
    personas = make_personas()
    rule = make_rule(personas.team, name="Volume spikes", kind=AlertRule.Kind.ANOMALY, min_score=6)
    source = make_source(personas.team)
    rng = np.random.default_rng(18)
    days = 4
    buckets = days * 288
    envelopes: list[Envelope] = []
    for b in range(buckets):
        daytime = 0.6 if (b % 288) // 12 in range(8, 22) else 0.1
        for i in range(int(rng.poisson(daytime))):
            envelopes.append(envelope(f"ordinary chatter {b} {i}", minutes=b * BUCKET_MIN + i))
    # Bursts of every size: 1 to 60 posts a bucket for 1 to 6 buckets, some about a term.
    for start in rng.choice(np.arange(300, buckets - 20), size=24, replace=False):
        size, length = int(rng.choice([1, 2, 3, 5, 10, 25, 60])), int(rng.integers(1, 7))
        for b in range(int(start), int(start) + length):
            for i in range(size):
                envelopes.append(
                    envelope(
                        f"#ntsb investigators on site {b} {i}",
                        minutes=b * BUCKET_MIN + 0.5 + i * 0.004,
                    )
                )
    run_through(source, sorted(envelopes, key=lambda e: e.created_at), batch_size=500)

    new_ids = advance_all()
    alerts = alert_on(rule, new_ids)

    anomalies = list(Anomaly.objects.exclude(series__kind=Series.Kind.NEGATIVE_SHARE))
    assert anomalies, "the run should hold some anomalies"
    assert all(
        a.low is not None
        and a.expected is not None
        and a.high is not None
        and a.low <= a.expected <= a.high < a.value
        for a in anomalies
    )
    assert alerts, "the run should fire some alerts"
    for alert in alerts:
        evidence = alert.evidence
        assert evidence["value"] > evidence["high"]
        assert evidence["value"] >= rule.min_peak
        assert evidence["score"] >= rule.min_score
        shown, band = alert.title.rsplit(": ", 1)[1].split(" posts in 5 min, expected ")
        assert float(shown) > float(band.split("–")[1].split(" ")[0])
