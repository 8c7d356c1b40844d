"""The pipeline's stages as plain functions: persist → enrich → trends → alerts → push.

Real PostgreSQL, Redis and channel layer; the Celery hand-offs between stages are
captured on-commit callbacks, and the tests run each stage in order themselves.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import timedelta
from unittest import mock

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.db import OperationalError
from django.test import TestCase
from django.utils import timezone

from alerts import evaluation, push, sweeps
from alerts.models import Alert
from ingest import counters, persistence, selectors
from ingest.envelope import Envelope
from ingest.models import DeadLetter, Event, Source, StagedBatch
from mlengine.enrichment import stage as enrichment
from mlengine.models import TOTAL_TERM, BucketCount, StreamClock, Trend
from mlengine.trends import stage as trend_stage
from tests.factories import (
    ORIGIN,
    burst,
    commits_without_broker,
    envelope,
    make_personas,
    make_rule,
    make_source,
    quiet_history,
    run_through,
)
from twiscope import pipeline

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]


def test_a_redelivered_batch_stores_nothing_twice() -> None:
    source = make_source(make_personas().team)
    key = persistence.stage_batch(source_id=source.id, envelopes=[envelope("a"), envelope("b")])

    first = persistence.persist_batch(batch_key=key, source_id=source.id)
    second = persistence.persist_batch(batch_key=key, source_id=source.id)  # delivered again

    assert len(first.inserted_ids) == 2
    assert second == persistence.PersistResult()
    assert Event.objects.filter(source=source).count() == 2
    assert Source.objects.get(id=source.id).events_total == 2


def test_events_staged_twice_are_stored_once() -> None:
    source = make_source(make_personas().team)
    batch = [envelope("a"), envelope("b")]
    # A sender's retry, a feed polled again before its first batch was stored:
    keys = [persistence.stage_batch(source_id=source.id, envelopes=batch) for _ in range(2)]

    first, second = (persistence.persist_batch(batch_key=k, source_id=source.id) for k in keys)

    assert len(first.inserted_ids) == 2
    assert second.inserted_ids == [] and second.duplicates == 2
    assert Event.objects.filter(source=source).count() == 2
    assert Source.objects.get(id=source.id).events_total == 2


def test_bad_items_are_dead_lettered_and_the_rest_of_the_batch_is_stored() -> None:
    source = make_source(make_personas().team)
    good = envelope("fine post").to_json()
    no_time = {**envelope("x").to_json(), "created_at": "yesterday"}
    naive = {**envelope("y").to_json(), "created_at": "2015-02-20T12:00:00"}
    nul = {**envelope("nul \x00 byte").to_json()}
    key = persistence.stage_batch(source_id=source.id, envelopes=[])
    StagedBatch.objects.filter(key=key).update(
        received_at=ORIGIN, items=json.dumps([good, no_time, "not an object", naive, nul])
    )

    result = persistence.persist_batch(batch_key=key, source_id=source.id)

    assert len(result.inserted_ids) == 2
    reasons = sorted(DeadLetter.objects.values_list("reason", flat=True))
    assert len(reasons) == 3
    assert any("created_at: not ISO 8601" in r for r in reasons)
    assert any("must carry a UTC offset" in r for r in reasons)
    assert any("envelope must be an object" in r for r in reasons)
    assert Event.objects.get(id__in=result.inserted_ids, text__startswith="nul").text == "nul  byte"


def test_a_raw_payload_holding_a_nul_is_staged_and_only_its_item_dead_lettered() -> None:
    source = make_source(make_personas().team)
    bad = dataclasses.replace(envelope("fine text"), raw={"note": "nul \x00 in the raw"})

    key = persistence.stage_batch(source_id=source.id, envelopes=[envelope("good"), bad])
    result = persistence.persist_batch(batch_key=key, source_id=source.id)

    assert len(result.inserted_ids) == 1 and result.dead_letters == 1
    assert DeadLetter.objects.get().payload == {"external_id": bad.external_id}
    assert not StagedBatch.objects.exists()


def test_a_batch_persisted_again_parks_no_second_dead_letter() -> None:
    source = make_source(make_personas().team)
    key = persistence.stage_batch(source_id=source.id, envelopes=[])
    items = [envelope("fine").to_json(), "not an object", {"external_id": "x"}]
    StagedBatch.objects.filter(key=key).update(received_at=ORIGIN, items=json.dumps(items))
    staged = StagedBatch.objects.get(key=key)
    first = persistence.persist_batch(batch_key=key, source_id=source.id)
    staged.save()  # staged again under the same key (a restored backup, say)

    second = persistence.persist_batch(batch_key=key, source_id=source.id)

    assert first.dead_letters == 2 and second.dead_letters == 0
    assert DeadLetter.objects.count() == 2
    assert Event.objects.count() == 1


def test_last_received_at_only_moves_forward() -> None:
    source = make_source(make_personas().team)
    new_key = persistence.stage_batch(source_id=source.id, envelopes=[envelope("new")])
    old_key = persistence.stage_batch(source_id=source.id, envelopes=[envelope("old")])
    StagedBatch.objects.filter(key=old_key).update(received_at=ORIGIN)

    persistence.persist_batch(batch_key=new_key, source_id=source.id)
    newest = Source.objects.get(id=source.id).last_received_at
    persistence.persist_batch(batch_key=old_key, source_id=source.id)  # an old batch, swept late

    assert Source.objects.get(id=source.id).last_received_at == newest > ORIGIN


@pytest.mark.parametrize("batch_key", [str(uuid.uuid4()), "twiscope:batch:7:not-a-uuid"])
def test_a_batch_key_naming_no_staged_batch_stores_nothing(batch_key: str) -> None:
    source = make_source(make_personas().team)

    with commits_without_broker() as send_task:
        result = persistence.persist_batch(batch_key=batch_key, source_id=source.id)

    assert result == persistence.PersistResult()
    assert send_task.call_count == 0
    assert Event.objects.count() == 0


def test_a_disabled_sources_staged_batch_is_dropped() -> None:
    source = make_source(make_personas().team)
    key = persistence.stage_batch(source_id=source.id, envelopes=[envelope("a")])
    Source.objects.filter(id=source.id).update(enabled=False)

    result = persistence.persist_batch(batch_key=key, source_id=source.id)

    assert result == persistence.PersistResult()
    assert not StagedBatch.objects.exists() and not Event.objects.exists()


def test_persist_queues_enrichment_only_after_commit(django_capture_on_commit_callbacks) -> None:
    source = make_source(make_personas().team)
    key = persistence.stage_batch(source_id=source.id, envelopes=[envelope("a")])

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        persistence.persist_batch(batch_key=key, source_id=source.id)

    assert len(callbacks) == 2  # hand the ids to the enrich stage; count and mark done
    # The staged row went with the transaction that stored its event.
    assert not StagedBatch.objects.filter(key=key).exists()
    assert Event.objects.filter(source=source).count() == 1


def test_a_batch_whose_store_fails_stays_staged() -> None:
    source = make_source(make_personas().team)
    key = persistence.stage_batch(source_id=source.id, envelopes=[envelope("a")])

    with (
        mock.patch("ingest.persistence.record_dead_letters", side_effect=OperationalError),
        pytest.raises(OperationalError),
    ):
        persistence.persist_batch(batch_key=key, source_id=source.id)

    assert StagedBatch.objects.filter(key=key).exists()
    assert not Event.objects.exists()


def test_enrichment_extracts_entities_language_and_sentiment_once() -> None:
    source = make_source(make_personas().team)
    key = persistence.stage_batch(
        source_id=source.id,
        envelopes=[envelope("@JetBlue our fleet is on fleek!! #Fleek love it http://t.co/x")],
    )
    ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids

    first = enrichment.enrich_events(event_ids=ids)
    second = enrichment.enrich_events(event_ids=ids)

    event = Event.objects.get(id=ids[0])
    assert first == ids and second == []
    assert event.mentions == ["@jetblue"] and event.hashtags == ["#fleek"]
    assert event.urls == ["http://t.co/x"]
    assert "fleet" in event.keywords and event.lang == "en"
    assert event.sentiment is not None and event.sentiment > 0.5


def test_a_term_longer_than_its_column_is_cut_and_its_batch_enriched() -> None:
    source = make_source(make_personas().team)
    long_tag = "#" + "a" * 299
    key = persistence.stage_batch(
        source_id=source.id,
        envelopes=[envelope(f"flooding {long_tag}"), envelope("a calm day")],
    )
    ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids

    enriched = enrichment.enrich_events(event_ids=ids)

    assert sorted(enriched) == sorted(ids)  # the whole batch, not a failed statement
    event = Event.objects.get(id=min(ids))
    assert event.hashtags == [long_tag[:200]]


def test_trend_counting_is_exactly_once() -> None:
    source = make_source(make_personas().team)
    run_through(source, [envelope("#storm now")])

    trend_stage.advance_stream(source_id=source.id)  # a redelivered task

    bucket = BucketCount.objects.get(source=source)
    assert bucket.term_events("#storm") == 1
    assert bucket.term_events(TOTAL_TERM) == 1
    assert bucket.terms["#storm"][1] == [bucket.authors[0]]


def test_the_watermark_waits_for_staged_and_unenriched_events() -> None:
    source = make_source(make_personas().team)
    early = persistence.stage_batch(
        source_id=source.id, envelopes=[envelope("#a", minutes=1)], watermark=ORIGIN
    )
    late = persistence.stage_batch(
        source_id=source.id,
        envelopes=[envelope("#a", minutes=5)],
        watermark=ORIGIN + timedelta(minutes=5),
    )
    with commits_without_broker():
        persistence.persist_batch(batch_key=late, source_id=source.id)  # overtakes the early one

    assert selectors.input_low_watermark(source.id) == ORIGIN + timedelta(minutes=1)
    trend_stage.advance_stream(source_id=source.id)
    assert BucketCount.objects.filter(source=source).count() == 0  # nothing final yet

    with commits_without_broker():
        ids = persistence.persist_batch(batch_key=early, source_id=source.id).inserted_ids
    assert selectors.input_low_watermark(source.id) == ORIGIN + timedelta(minutes=1)
    enrichment.enrich_events(event_ids=ids)
    trend_stage.advance_stream(source_id=source.id)

    # The minute-5 event waits: the source promised only "nothing before minute 5".
    assert BucketCount.objects.get(source=source).term_events("#a") == 1
    assert StreamClock.objects.get(source=source).watermark == ORIGIN + timedelta(minutes=5)


def test_a_burst_of_many_authors_becomes_a_trend_and_fires_the_rule_once() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    rule = make_rule(personas.team)

    trend_ids = run_through(
        source, quiet_history(6) + burst("#blizzard", count=12, minutes=6 * 15 + 1)
    )
    first = evaluation.evaluate_trends(trend_ids=trend_ids)
    again = evaluation.evaluate_trends(trend_ids=trend_ids)

    trend = Trend.objects.get(term="#blizzard")
    assert trend.events == 12 and trend.authors_count == 12
    assert trend.bucket_start == ORIGIN + timedelta(minutes=90)
    alert = Alert.objects.get(id__in=first, trend=trend)
    assert alert.rule == rule and alert.seq >= 1
    assert "#blizzard" in alert.title
    assert again == []


def test_one_account_repeating_a_hashtag_is_not_a_trend() -> None:
    source = make_source(make_personas().team)

    run_through(
        source, quiet_history(6) + burst("#buynow", count=30, minutes=6 * 15 + 1, authors=1)
    )

    assert not Trend.objects.filter(term="#buynow").exists()


def test_a_new_source_without_history_has_no_trends() -> None:
    source = make_source(make_personas().team)

    run_through(source, burst("#blizzard", count=30, minutes=0))

    assert Trend.objects.count() == 0


def test_events_behind_the_watermark_are_late_and_not_counted() -> None:
    source = make_source(make_personas().team)
    run_through(source, [envelope("first #a", minutes=0), envelope("much later #b", minutes=600)])

    run_through(source, [envelope("straggler #a", minutes=1)])

    trend_stage.count_late_events(source_ids=[source.id])

    assert StreamClock.objects.get(source=source).late_events == 1
    first = BucketCount.objects.filter(source=source).earliest("bucket_start")
    assert first.term_events("#a") == 1


def test_the_cooldown_keeps_a_term_from_alerting_again_within_it() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team, cooldown_s=6 * 3600)
    history = quiet_history(12)
    first = burst("#blizzard", count=12, minutes=6 * 15 + 1)
    second = burst("#blizzard", count=40, minutes=11 * 15 + 1)

    alerts = evaluation.evaluate_trends(trend_ids=run_through(source, history[:60] + first))
    alerts += evaluation.evaluate_trends(trend_ids=run_through(source, history[60:] + second))

    assert Trend.objects.filter(term="#blizzard").count() == 2
    assert Alert.objects.filter(id__in=alerts, trend__term="#blizzard").count() == 1


def test_rules_of_other_teams_never_fire_on_a_teams_trend() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.other_team)

    trend_ids = run_through(source, quiet_history(6) + burst("#blizzard", count=12, minutes=91))

    assert trend_ids
    assert evaluation.evaluate_trends(trend_ids=trend_ids) == []


def test_alerts_are_pushed_to_the_teams_group_with_consecutive_seq() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team)
    alert_ids = evaluation.evaluate_trends(
        trend_ids=run_through(
            source,
            quiet_history(6)
            + burst("#blizzard", count=12, minutes=91)
            + burst("#flood", count=12, minutes=92),
        )
    )

    async def push_and_listen() -> tuple[int, list[dict]]:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(push.alerts_group(personas.team.id), channel)
        pushed = await sync_to_async(push.push_alerts)(alert_ids=alert_ids)
        batch = await layer.receive(channel)  # one channel-layer message per team
        assert batch["type"] == "alerts.batch"
        return pushed, batch["messages"]

    pushed, messages = async_to_sync(push_and_listen)()

    assert pushed == len(alert_ids) >= 2
    assert [m["seq"] for m in messages] == list(range(1, len(alert_ids) + 1))
    assert {"#blizzard", "#flood"} <= {m["alert"]["evidence"]["term"] for m in messages}
    assert all(m["type"] == "alert.created" and m["v"] == 1 for m in messages)
    assert all(m["alert"]["pushed_at"] is not None for m in messages)
    assert Alert.objects.filter(pushed_at__isnull=True).count() == 0
    assert push.push_alerts(alert_ids=alert_ids) == 0


def test_a_staged_batch_is_counted_for_its_source_until_stored() -> None:
    source = make_source(make_personas().team)

    key = persistence.stage_batch(source_id=source.id, envelopes=[envelope("a")])

    assert counters.staged_batches(source.id) == 1
    assert counters.staged_batches(source.id + 1) == 0
    with commits_without_broker():
        persistence.persist_batch(batch_key=key, source_id=source.id)
    assert counters.staged_batches(source.id) == 0


def test_copies_of_a_text_in_a_batch_are_enriched_once() -> None:
    source = make_source(make_personas().team)
    text = "Our flight to #Boston is delayed again @united"
    key = persistence.stage_batch(
        source_id=source.id,
        envelopes=[envelope(text), envelope(text), envelope(text), envelope("other #x")],
    )
    ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids
    calls = mock.Mock(wraps=enrichment.enrich_text)

    with mock.patch("mlengine.enrichment.stage.enrich_text", calls):
        enriched = enrichment.enrich_events(event_ids=ids)

    assert calls.call_count == 2
    assert len(enriched) == 4
    hashtags = list(Event.objects.filter(text=text).values_list("hashtags", flat=True))
    assert hashtags == [["#boston"]] * 3


def test_terms_that_surge_together_are_one_story_with_one_alert_updated_as_it_grows() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team)
    # One event, three ways of naming it, posts mixing them; then an unrelated burst.
    story = [
        envelope(text, minutes=91 + i * 0.05, author=f"witness{i}")
        for i, text in enumerate(
            ["#blizzard hits the coast", "#snowstorm and #blizzard tonight", "#snowstorm again"] * 6
        )
    ]
    other = burst("#flood", count=12, minutes=93)

    trend_ids = run_through(source, quiet_history(6) + story + other)
    alert_ids = evaluation.evaluate_trends(trend_ids=trend_ids)

    trends = {t.term: t for t in Trend.objects.filter(id__in=trend_ids)}
    assert {"#blizzard", "#snowstorm", "#flood"} <= set(trends)
    assert trends["#snowstorm"].story_id == trends["#blizzard"].story_id == trends["#blizzard"].id
    assert trends["#flood"].story_id == trends["#flood"].id
    # A story one bucket old has too few buckets to extrapolate, and its forecast says so.
    assert trends["#blizzard"].forecast["method"] == "too_few_buckets"
    assert trends["#blizzard"].forecast["next_counts"] == []
    alerts = Alert.objects.filter(id__in=alert_ids).order_by("seq")
    assert [a.trend.term for a in alerts] == ["#blizzard", "#flood"]  # one per story
    assert [a.story_id for a in alerts] == [trends["#blizzard"].id, trends["#flood"].id]
    blizzard = alerts[0]
    assert blizzard.updated_at is not None
    assert set(blizzard.evidence["story"]["terms"]) >= {"#blizzard", "#snowstorm"}
    assert "#snowstorm" in blizzard.title and "#blizzard" in blizzard.title
    assert alerts[1].updated_at is None
    assert alerts[1].evidence["story"]["terms"] == ["#flood"]


def test_a_story_that_grows_after_its_alert_was_sent_pushes_alert_updated() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team)
    history = quiet_history(6)
    first = [
        envelope("#blizzard hits the coast", minutes=91 + i * 0.1, author=f"w{i}") for i in range(8)
    ]
    later = [
        envelope("#snowstorm and #blizzard now", minutes=94 + i * 0.1, author=f"v{i}")
        for i in range(10)
    ]
    created = evaluation.evaluate_trends(trend_ids=run_through(source, history + first))
    push.push_alerts(alert_ids=created)

    async def listen() -> list[dict]:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(push.alerts_group(personas.team.id), channel)
        again = await sync_to_async(evaluation.evaluate_trends)(
            trend_ids=await sync_to_async(run_through)(source, later)
        )
        assert again == []  # no new alert: the story's alert was updated
        batch = await layer.receive(channel)
        return batch["messages"]

    with mock.patch("django.db.transaction.on_commit", side_effect=lambda f, **_: f()):
        messages = async_to_sync(listen)()

    assert len(created) == 1
    assert [m["type"] for m in messages] == ["alert.updated"]
    assert messages[0]["seq"] == Alert.objects.get(id=created[0]).seq
    assert "#snowstorm" in messages[0]["alert"]["evidence"]["story"]["terms"]
    assert messages[0]["alert"]["updated_at"] is not None


def accelerating_flood() -> tuple[list[Envelope], list[Envelope]]:
    """``(posts up to an emerging #flood, the posts that confirm it)``: #flood is everyday
    vocabulary (3 posts in 10 a bucket); then it comes fast, early in its bucket:
    projected to the bucket's end it passes the test before its count does."""
    history = [
        envelope(
            "so much #flood here" if i < 3 else f"an ordinary day number {i}",
            minutes=b * 15 + i,
            author=f"h{b}-{i}",
        )
        for b in range(6)
        for i in range(10)
    ]
    early = [
        envelope("so much #flood here", minutes=90 + 0.5 + i * 0.2, author=f"e{i}")
        for i in range(6)
    ]
    later = [
        envelope("so much #flood here", minutes=90 + 5 + i * 0.2, author=f"l{i}") for i in range(14)
    ]
    return history + early, later


def test_an_accelerating_term_alerts_as_a_prediction_then_its_alert_is_confirmed() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team)
    emerging, later = accelerating_flood()

    created = evaluation.evaluate_trends(trend_ids=run_through(source, emerging))
    trend = Trend.objects.get(term="#flood")
    assert trend.predicted and trend.confirmed_at is None
    alert = Alert.objects.get(id__in=created)
    assert alert.title.startswith("Emerging (predicted): #flood")
    assert alert.evidence["story"]["predicted"] is True
    push.push_alerts(alert_ids=created)

    with (
        mock.patch("alerts.push.push_updates") as push_updates,
        mock.patch.object(pipeline, "hand_off", wraps=pipeline.hand_off) as hand_off,
    ):
        run_through(source, later)
        confirmed = list(
            Trend.objects.filter(term="#flood", confirmed_at__isnull=False).values_list(
                "id", flat=True
            )
        )
        with TestCase.captureOnCommitCallbacks(execute=True):
            updated = evaluation.confirm_trends(trend_ids=confirmed)

    alert.refresh_from_db()
    assert updated == [alert.id]
    assert alert.title.startswith("Trending: #flood")
    assert alert.evidence["story"]["predicted"] is False
    assert alert.updated_at is not None
    assert push_updates.call_args.kwargs == {"alert_ids": [alert.id]}
    # The trend stage handed the confirmation to the alerts stage's side task.
    assert mock.call("detect", task="confirmations", trend_ids=confirmed) in hand_off.call_args_list
    assert evaluation.confirm_trends(trend_ids=confirmed) == []  # nothing left to do


def test_a_confirmation_whose_message_was_lost_is_applied_by_the_alerts_sweeper() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team)
    emerging, later = accelerating_flood()
    [alert_id] = evaluation.evaluate_trends(trend_ids=run_through(source, emerging))
    run_through(source, later)  # confirmed; the confirmations task is never run
    assert Trend.objects.filter(term="#flood", confirmed_at__isnull=False).exists()
    assert Alert.objects.get(id=alert_id).evidence["story"]["predicted"] is True

    with TestCase.captureOnCommitCallbacks(execute=False):
        assert sweeps.sweep(older_than_s=120)["alerts_updated"] == 0  # too fresh
    Alert.objects.filter(id=alert_id).update(created_at=timezone.now() - timedelta(minutes=10))
    with TestCase.captureOnCommitCallbacks(execute=False):
        assert sweeps.sweep(older_than_s=120)["alerts_updated"] == 1

    alert = Alert.objects.get(id=alert_id)
    assert alert.title.startswith("Trending: #flood")
    assert alert.evidence["story"]["predicted"] is False
    with TestCase.captureOnCommitCallbacks(execute=False):
        assert sweeps.sweep(older_than_s=120)["alerts_updated"] == 0
