"""Dead letters in every stage: a failing batch is bisected so its good items go on, an
item that fails alone ``DEAD_LETTER_MAX_ATTEMPTS`` times is parked (and the stream's
watermark stops waiting for it), ``manage.py requeue`` re-drives it, and
``/api/dead-letters/`` lists them per team. Real PostgreSQL and Redis; the stages run as
plain calls, their on-commit hand-offs captured (``commits_without_broker``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from typing import Any
from unittest import mock

import pytest
from django.core.management import call_command
from django.db import OperationalError
from django.utils import timezone
from rest_framework.test import APIClient

from alerts import tasks as alert_tasks
from alerts.models import TrendCheck
from ingest import persistence
from ingest import selectors as ingest_selectors
from ingest.envelope import Envelope
from ingest.models import DeadLetter, Event, Source
from mlengine.enrichment import stage as enrichment
from mlengine.enrichment.text import enrich_text
from mlengine.models import StreamClock, Trend
from mlengine.trends import scan
from mlengine.trends import stage as trend_stage
from tests.factories import (
    ORIGIN,
    api_key,
    burst,
    commits_without_broker,
    envelope,
    make_personas,
    make_rule,
    make_source,
    make_team,
    quiet_history,
    run_through,
)
from twiscope import guard, pipeline
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db

POISON = "the poison pill that breaks the enricher #blizzard"


@pytest.fixture(autouse=True)
def _empty_redis() -> None:
    get_redis().flushdb()


def _failing_on(text: str) -> Callable[[str], Any]:
    def enrich(value: str) -> Any:
        if value == text:
            raise ValueError("cannot enrich this text")
        return enrich_text(value)

    return enrich


def poisoned(text: str = POISON) -> Any:
    """Make the enrich stage raise on ``text`` (and only on it)."""
    return mock.patch("mlengine.enrichment.stage.enrich_text", _failing_on(text))


def store(source: Source, envelopes: list[Envelope], watermark: Any = None) -> list[int]:
    """Persist ``envelopes`` as the ingest stage does; return the new event ids."""
    with commits_without_broker():
        key = persistence.stage_batch(source_id=source.id, envelopes=envelopes, watermark=watermark)
        return persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids


def redeliver_swept() -> list[int]:
    """What the enrich sweeper re-sends (its stuck, unenriched events), run through the
    stage as the re-sent tasks would be; returns the ids it enriched."""
    enriched: list[int] = []
    with commits_without_broker() as send_task:
        enrichment.sweep_unenriched(older_than_s=0)
    for call in send_task.call_args_list:
        with commits_without_broker():
            enriched += enrichment.enrich_events(**call.kwargs["kwargs"])
    return enriched


def sent(send_task: mock.MagicMock, name: str) -> list[dict[str, Any]]:
    return [c.kwargs["kwargs"] for c in send_task.call_args_list if c.args[0] == name]


# --- the guard ----------------------------------------------------------------------


def test_a_failing_batch_is_bisected_and_only_the_poison_item_is_left() -> None:
    calls: list[list[int]] = []

    def work(batch: list[int]) -> list[int]:
        calls.append(batch)
        if 7 in batch:
            raise ValueError("seven is poison")
        return [item * 10 for item in batch]

    outcome = guard.run_guarded("enrich", "numbers", list(range(16)), work, park=mock.Mock())

    assert sorted(outcome.results) == [i * 10 for i in range(16) if i != 7]
    assert [(f.item, f.attempts, f.summary) for f in outcome.failed] == [
        (7, 1, "ValueError: seven is poison")
    ]
    assert outcome.parked == []
    assert len(calls) == 9  # the batch, then two halves at each of 4 levels


def test_an_item_is_parked_once_on_its_third_failing_delivery() -> None:
    park = mock.Mock()

    def work(batch: list[int]) -> list[int]:
        raise KeyError("always")

    deliveries = [guard.run_guarded("alerts", "trends", [41], work, park=park) for _ in range(4)]

    assert [[f.attempts for f in o.failed] for o in deliveries] == [[1], [2], [], [1]]
    assert [f.item for f in deliveries[2].parked] == [41]
    park.assert_called_once_with(deliveries[2].parked)
    assert guard.attempts("alerts", "trends", 41) == 1


def test_the_attempt_cap_is_a_setting(settings) -> None:
    settings.DEAD_LETTER_MAX_ATTEMPTS = 1

    def work(batch: list[int]) -> list[int]:
        raise KeyError("always")

    outcome = guard.run_guarded("alerts", "trends", [5], work, park=mock.Mock())

    assert [f.item for f in outcome.parked] == [5]


def test_a_transient_error_propagates_and_counts_no_attempt() -> None:
    def work(batch: list[int]) -> list[int]:
        raise OperationalError("server closed the connection unexpectedly")

    with pytest.raises(OperationalError):
        guard.run_guarded("enrich", "events", [1, 2, 3], work, park=mock.Mock())

    assert [guard.attempts("enrich", "events", i) for i in (1, 2, 3)] == [0, 0, 0]


# --- enrich ---------------------------------------------------------------------------


def test_one_poison_event_leaves_the_rest_of_its_batch_enriched() -> None:
    source = make_source(make_team("desk"))
    texts = [f"ordinary post number {i}" for i in range(9)] + [POISON]
    ids = store(source, [envelope(t, minutes=i) for i, t in enumerate(texts)])

    with poisoned(), commits_without_broker():
        enriched = enrichment.enrich_events(event_ids=ids, source_id=source.id)

    assert len(enriched) == 9
    assert Event.objects.filter(enriched_at__isnull=True).get().text == POISON
    assert not DeadLetter.objects.exists()


def test_an_event_failing_three_deliveries_is_parked_and_the_watermark_moves_past_it() -> None:
    source = make_source(make_team("desk"))
    ids = store(
        source,
        [envelope("before", minutes=0), envelope(POISON, minutes=1), envelope("after", minutes=2)],
        watermark=ORIGIN + timedelta(minutes=5),
    )
    poison = Event.objects.get(text=POISON)

    with poisoned():
        with commits_without_broker():
            enrichment.enrich_events(event_ids=ids, source_id=source.id)
        pinned = ingest_selectors.input_low_watermark(source.id)
        redeliver_swept()
        redeliver_swept()

    letter = DeadLetter.objects.get()
    poison.refresh_from_db()
    assert pinned == poison.created_at
    assert ingest_selectors.input_low_watermark(source.id) == ORIGIN + timedelta(minutes=5)
    assert poison.parked_at is not None
    assert (letter.stage, letter.source_id, letter.attempts) == ("enrich", source.id, 3)
    assert letter.key == f"enrich:events:{poison.id}"
    assert "ValueError: cannot enrich this text" in letter.reason
    assert "ValueError: cannot enrich this text" in letter.error
    assert letter.payload["event"]["external_id"] == poison.external_id
    assert letter.payload["event"]["text"] == POISON
    assert redeliver_swept() == []


# --- detect ---------------------------------------------------------------------------


def _breaking_count(source_id: int) -> Callable[[list[scan.Stream]], None]:
    real = scan.count_streams

    def count(streams: list[scan.Stream]) -> None:
        if any(stream.source_id == source_id for stream in streams):
            raise ZeroDivisionError("the detector cannot count this stream")
        real(streams)

    return count


def _declared(source: Source, texts: list[str]) -> None:
    ids = store(
        source,
        [envelope(t, minutes=i) for i, t in enumerate(texts)],
        watermark=ORIGIN + timedelta(hours=1),
    )
    with commits_without_broker():
        enrichment.enrich_events(event_ids=ids)


def test_a_stream_that_cannot_be_counted_is_parked_and_the_others_go_on() -> None:
    team = make_team("desk")
    bad, good = make_source(team, "bad"), make_source(team, "good")
    _declared(bad, ["a post", "another post"])
    _declared(good, ["a post", "another post", "a third"])
    patch = mock.patch("mlengine.trends.stage.count_streams", _breaking_count(bad.id))

    with patch, commits_without_broker():
        for _ in range(3):
            trend_stage.advance_stream(source_id=bad.id)
        trend_stage.advance_stream(source_id=good.id)

    letter = DeadLetter.objects.get()
    assert (letter.stage, letter.source_id, letter.attempts) == ("detect", bad.id, 3)
    assert "ZeroDivisionError" in letter.reason
    assert letter.payload["resend"]["kwargs"] == {"source_id": bad.id}
    assert StreamClock.objects.get(source=good).counted_events == 3
    assert ingest_selectors.parked_sources("detect") == {bad.id}
    assert not StreamClock.objects.filter(source=bad, counted_events__gt=0).exists()


def test_a_requeued_stream_resumes_where_it_stopped() -> None:
    team = make_team("desk")
    bad = make_source(team, "bad")
    _declared(bad, ["a post", "another post"])
    with (
        mock.patch("mlengine.trends.stage.count_streams", _breaking_count(bad.id)),
        commits_without_broker(),
    ):
        for _ in range(3):
            trend_stage.advance_stream(source_id=bad.id)

    with commits_without_broker() as send_task:
        call_command("requeue", "--stage", "detect", "--yes", stdout=StringIO())
    for kwargs in sent(send_task, "detect.advance_stream"):
        with commits_without_broker():
            trend_stage.advance_stream(**kwargs)

    assert StreamClock.objects.get(source=bad).counted_events == 2
    assert DeadLetter.objects.get().requeued_at is not None
    assert ingest_selectors.parked_sources("detect") == set()


# --- alerts ---------------------------------------------------------------------------


def _blizzard_trends(source: Source) -> list[int]:
    return run_through(source, quiet_history(6) + burst("#blizzard", count=12, minutes=91))


def test_a_poison_trend_is_parked_by_the_alert_task_and_the_other_trends_alert() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team, name="everything")
    trend_ids = _blizzard_trends(source) + _blizzard_trends(make_source(personas.team, "two"))
    poison = trend_ids[0]
    from alerts import evaluation

    real = evaluation.evaluate_trends

    def evaluate(*, trend_ids: list[int]) -> list[int]:
        if poison in trend_ids:
            raise RuntimeError("this trend breaks the rules engine")
        return real(trend_ids=trend_ids)

    with (
        mock.patch("alerts.evaluation.evaluate_trends", evaluate),
        mock.patch("alerts.push.push_alerts"),
        commits_without_broker(),
    ):
        for _ in range(4):
            alert_tasks.evaluate_trends(trend_ids=trend_ids)

    letter = DeadLetter.objects.get()
    assert (letter.stage, letter.key, letter.source_id) == (
        "alerts",
        f"alerts:trends:{poison}",
        source.id,
    )
    assert letter.payload["resend"] == {"task": None, "kwarg": "trend_ids", "kwargs": {}}
    assert set(TrendCheck.objects.values_list("trend_id", flat=True)) == set(trend_ids) - {poison}


# --- requeue ----------------------------------------------------------------------------


@pytest.fixture
def parked_event() -> Event:
    source = make_source(make_team("desk"))
    ids = store(source, [envelope(POISON)], watermark=ORIGIN + timedelta(minutes=5))
    with poisoned():
        for _ in range(3):
            with commits_without_broker():
                enrichment.enrich_events(event_ids=ids, source_id=source.id)
    return Event.objects.get(id=ids[0])


def test_requeue_without_yes_lists_and_changes_nothing(parked_event: Event) -> None:
    out = StringIO()

    with commits_without_broker() as send_task:
        call_command("requeue", "--stage", "enrich", stdout=out)

    assert "1 dead letters would be requeued (dry run: add --yes)" in out.getvalue()
    assert "cannot enrich this text" in out.getvalue()
    assert send_task.call_count == 0
    assert DeadLetter.objects.get().requeued_at is None


def test_requeue_filters_by_stage_source_reason_and_ids(parked_event: Event) -> None:
    letter = DeadLetter.objects.get()

    def selected(*args: str) -> str:
        out = StringIO()
        call_command("requeue", *args, stdout=out)
        return out.getvalue().splitlines()[-1]

    assert selected("--stage", "alerts").startswith("0 ")
    assert selected("--source", str(parked_event.source_id + 1000)).startswith("0 ")
    assert selected("--reason", "CANNOT ENRICH").startswith("1 ")
    assert selected("--reason", "timeout").startswith("0 ")
    assert selected("--ids", f"{letter.id},{letter.id + 1}").startswith("1 ")


def test_a_requeued_event_is_unparked_and_enriched_once_the_fault_is_gone(
    parked_event: Event,
) -> None:
    with commits_without_broker() as send_task:
        call_command("requeue", "--yes", stdout=StringIO())
    tasks = sent(send_task, "enrich.enrich_events")
    with commits_without_broker():
        enriched = [i for kwargs in tasks for i in enrichment.enrich_events(**kwargs)]

    letter = DeadLetter.objects.get()
    parked_event.refresh_from_db()
    assert tasks == [{"event_ids": [parked_event.id], "source_id": parked_event.source_id}]
    assert enriched == [parked_event.id]
    assert parked_event.parked_at is None
    assert parked_event.enriched_at is not None
    assert (letter.requeues, letter.requeued_at is not None) == (1, True)


def test_an_item_parked_again_after_a_requeue_reopens_its_dead_letter(
    parked_event: Event,
) -> None:
    with commits_without_broker():
        call_command("requeue", "--yes", stdout=StringIO())
    with poisoned():
        for _ in range(3):
            with commits_without_broker():
                enrichment.enrich_events(event_ids=[parked_event.id])

    letter = DeadLetter.objects.get()
    assert (letter.requeues, letter.requeued_at, letter.attempts) == (1, None, 3)


# --- the API ----------------------------------------------------------------------------


def client_for(user: Any) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    return client


@pytest.fixture
def many_letters() -> tuple[Any, Source, Source]:
    personas = make_personas()
    ours, theirs = make_source(personas.team), make_source(personas.other_team, "theirs")
    from ingest import services

    for source, count in ((ours, 120), (theirs, 5)):
        for stage in ("enrich", "alerts"):
            services.park_items(
                stage=stage,
                items=[
                    services.ParkedItem(
                        key=f"{stage}:test:{source.id}:{i}",
                        source_id=source.id,
                        reason="it broke",
                        error="ValueError: it broke",
                        attempts=3,
                        payload={"scope": "test", "item": i},
                    )
                    for i in range(count)
                ],
            )
    return personas, ours, theirs


def test_dead_letters_are_listed_per_stage_for_the_callers_teams_only(many_letters) -> None:
    personas, ours, theirs = many_letters
    client = client_for(personas.member)

    enrich = client.get("/api/dead-letters/", {"stage": "enrich", "page_size": 500}).json()
    outsider = client_for(personas.outsider).get("/api/dead-letters/", {"page_size": 500}).json()
    foreign = client.get("/api/dead-letters/", {"source": theirs.id})

    assert len(enrich["results"]) == 120
    assert {(r["stage"], r["source"]) for r in enrich["results"]} == {("enrich", ours.id)}
    assert enrich["results"][0]["attempts"] == 3
    assert enrich["results"][0]["error"] == "ValueError: it broke"
    assert enrich["results"][0]["requeued_at"] is None
    assert {r["source"] for r in outsider["results"]} == {theirs.id}
    assert foreign.status_code == 400


def test_the_dead_letter_list_keeps_its_query_budget_over_many_rows(
    many_letters, django_assert_max_num_queries
) -> None:
    personas, _, _ = many_letters
    client = client_for(personas.member)

    with django_assert_max_num_queries(4):
        response = client.get("/api/dead-letters/", {"page_size": 500, "open": "true"})

    assert len(response.json()["results"]) == 240


def test_the_dead_letter_endpoint_is_read_only(many_letters) -> None:
    personas, _, _ = many_letters
    client = client_for(personas.owner)
    letter = DeadLetter.objects.filter(source__team=personas.team).first()

    assert client.post("/api/dead-letters/", {}).status_code == 405
    assert client.delete(f"/api/dead-letters/{letter.id}/").status_code == 405


def test_the_dead_letter_endpoint_is_in_the_schema() -> None:
    user = make_personas().member
    schema = client_for(user).get("/api/schema/", {"format": "json"}).json()

    parameters = {p["name"] for p in schema["paths"]["/api/dead-letters/"]["get"]["parameters"]}
    assert {"stage", "source", "open"} <= parameters


# --- a 10,000-event replay with one poison event -------------------------------------


def _archive() -> tuple[list[Envelope], Envelope]:
    """10,000 posts over a day (a quiet background and two bursts), sorted by event
    time, and the poison one: a #blizzard post inside the #blizzard burst."""
    posts = (
        quiet_history(96, per_bucket=90)
        + burst("#blizzard", count=700, minutes=600)
        + burst("#flood", count=659, minutes=1000)
    )
    poison = envelope(POISON, minutes=603)
    posts = sorted([*posts, poison], key=lambda e: (e.created_at, e.external_id))
    assert len(posts) == 10_000
    return posts, poison


def _trends(source: Source) -> list[tuple[Any, ...]]:
    return list(
        Trend.objects.filter(source=source)
        .order_by("term", "bucket_start")
        .values_list("term", "bucket_start", "events", "authors_count", "evidence_created_at")
    )


def test_a_poison_event_in_a_10000_event_replay_is_parked_and_the_trends_are_unchanged() -> None:
    team = make_team("desk")
    posts, poison = _archive()
    clean, dirty = make_source(team, "clean"), make_source(team, "dirty")
    run_through(clean, [p for p in posts if p is not poison], batch_size=500)

    with poisoned():
        run_through(dirty, posts, batch_size=500)
        stalled = StreamClock.objects.get(source=dirty).watermark
        redeliver_swept()
        redeliver_swept()
    with commits_without_broker():
        for _ in range(3):  # at most MAX_EVENTS_PER_ADVANCE (5,000) events an advance
            trend_stage.advance_stream(source_id=dirty.id)

    letter = DeadLetter.objects.get()
    assert stalled == poison.created_at
    assert Event.objects.filter(source=dirty, enriched_at__isnull=False).count() == 9_999
    assert (letter.stage, letter.payload["event"]["external_id"]) == ("enrich", poison.external_id)
    assert StreamClock.objects.get(source=dirty).counted_events == 9_999
    assert _trends(dirty) == _trends(clean)
    assert len(_trends(dirty)) >= 2

    with commits_without_broker() as send_task:
        call_command("requeue", "--source", str(dirty.id), "--yes", stdout=StringIO())
    for kwargs in sent(send_task, "enrich.enrich_events"):
        with commits_without_broker():
            enrichment.enrich_events(**kwargs)
    trend_stage.count_late_events(source_ids=[dirty.id])

    clock = StreamClock.objects.get(source=dirty)
    assert Event.objects.filter(source=dirty, enriched_at__isnull=False).count() == 10_000
    assert (clock.counted_events, clock.late_events) == (9_999, 1)
    assert _trends(dirty) == _trends(clean)
    assert timezone.now() > DeadLetter.objects.get().requeued_at


# --- through a real Celery worker --------------------------------------------------------


def _wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_parks_a_poison_event_on_the_sweepers_third_delivery(celery_worker) -> None:
    source = make_source(make_team("desk"))
    posts = sorted([*quiet_history(4), envelope(POISON, minutes=20)], key=lambda e: e.created_at)

    with poisoned():
        persistence.enqueue_envelopes(
            source=source, envelopes=posts, watermark=posts[-1].created_at
        )
        persistence.end_of_stream(source=source, event_time=posts[-1].created_at)
        _wait_for(
            lambda: Event.objects.filter(source=source, enriched_at__isnull=False).count() == 40,
            "40 events enriched",
        )
        poison = Event.objects.get(text=POISON)
        for delivery in (2, 3):
            _wait_for(lambda: pipeline.queue_depth("enrich") == 0, "the enrich queue empty")
            enrichment.sweep_unenriched(older_than_s=0)
            _wait_for(
                lambda n=delivery: (
                    DeadLetter.objects.exists()
                    or guard.attempts("enrich", "events", poison.id) == n
                ),
                f"delivery {delivery} done",
            )
        _wait_for(
            lambda: StreamClock.objects.filter(source=source, counted_events=40).exists(),
            "the stream counted past the poison event",
        )

    letter = DeadLetter.objects.get()
    assert (letter.stage, letter.attempts, letter.source_id) == ("enrich", 3, source.id)
    assert Event.objects.get(id=poison.id).parked_at is not None


# --- detect: the anomaly stage ---------------------------------------------------------------


def test_a_source_whose_anomaly_series_cannot_step_is_parked_and_the_others_step() -> None:
    from mlengine.anomalies import stage as anomaly_stage
    from mlengine.models import Series

    team = make_team("desk")
    bad, good = make_source(team, "bad"), make_source(team, "good")
    for source in (bad, good):
        run_through(source, [envelope(f"post {i}", minutes=i * 5) for i in range(48)])
    real = ingest_selectors.bucket_totals

    def totals(source_id: int, **kwargs: Any) -> Any:
        if source_id == bad.id:
            raise ArithmeticError("this source's buckets cannot be summed")
        return real(source_id, **kwargs)

    with mock.patch.object(ingest_selectors, "bucket_totals", totals), commits_without_broker():
        runs = [anomaly_stage.advance_anomalies(max_buckets=10) for _ in range(4)]

    letter = DeadLetter.objects.get()
    assert [run.buckets for run in runs] == [10, 10, 10, 10]
    assert (letter.key, letter.source_id, letter.attempts) == (
        f"detect:anomalies:{bad.id}",
        bad.id,
        3,
    )
    assert ingest_selectors.parked_sources("detect", scope="anomalies") == {bad.id}
    assert ingest_selectors.parked_sources("detect") == set()
    assert not Series.objects.filter(source=bad).exists()
