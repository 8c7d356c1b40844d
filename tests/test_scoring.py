"""Every event labelled: VADER at enrich, the transformer heads in the inference pool,
newest first, with the VADER fallback past the lag; the API's label fields and filters,
the sentiment series and the scoring stats. A tiny head is trained on generated posts
(``tests.test_heads``) with the real encoder, on the CPU."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone

from ingest import persistence as ingest_persistence
from ingest.models import Event
from mlengine.inference import scoring
from tests.factories import (
    commits_without_broker,
    envelope,
    make_personas,
    make_source,
    run_through,
)
from tests.test_api import client_for
from tests.test_heads import write_generated_split
from twiscope import pipeline
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db

HEAD = "sentiment-minilm-logreg v1"


@pytest.fixture(autouse=True)
def fresh_state(settings, tmp_path: Path, monkeypatch) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Models in a temporary folder, an empty Redis, and no cached answer to "is a head
    active?" (``scoring.ACTIVE_CHECK_S``)."""
    settings.MODELS_DIR = tmp_path / "models"
    monkeypatch.setattr(scoring, "ACTIVE_CHECK_S", 0.0)
    get_redis().flushdb()
    yield


@pytest.fixture
def sentiment_head(tmp_path: Path) -> str:
    """A frozen-encoder sentiment head trained on generated airline posts."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_generated_split(folder, "train", 12)
    write_generated_split(folder, "val", 4, offset=3)
    call_command(
        "train",
        "sentiment",
        "--data",
        str(folder),
        "--method",
        "frozen",
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    return HEAD


def _posts(source, texts: list[str]) -> list[Event]:
    run_through(source, [envelope(text, minutes=i) for i, text in enumerate(texts)])
    return list(Event.objects.filter(source=source).order_by("created_at"))


TEXTS = [
    "love this wonderful crew",
    "awful rude staff lost my bag",
    "the flight departs at noon from gate 12",
]


def test_without_a_head_every_event_keeps_vaders_label_and_nothing_waits() -> None:
    source = make_source(make_personas().team)

    good, bad, plain = _posts(source, TEXTS)

    assert (good.sentiment_label, bad.sentiment_label, plain.sentiment_label) == (
        "positive",
        "negative",
        "neutral",
    )
    assert {e.sentiment_model for e in (good, bad, plain)} == {"vader"}
    assert good.sentiment_scores is None and good.scored_at is None
    assert get_redis().zcard(scoring.BACKLOG_KEY) == 0


def test_the_heads_relabel_new_events_with_probabilities_and_their_version(
    sentiment_head: str,
) -> None:
    source = make_source(make_personas().team)
    events = _posts(source, TEXTS)
    assert get_redis().zcard(scoring.BACKLOG_KEY) == len(TEXTS)

    run = scoring.score_backlog()

    assert run.scored == len(TEXTS) and run.fell_back == 0 and run.left == 0
    good, bad, _ = (Event.objects.get(id=e.id) for e in events)
    assert (good.sentiment_label, bad.sentiment_label) == ("positive", "negative")
    assert good.sentiment_model == sentiment_head and good.scored_at is not None
    assert set(good.sentiment_scores) == {"negative", "neutral", "positive"}
    assert sum(good.sentiment_scores.values()) == pytest.approx(1.0, abs=1e-3)
    assert good.sentiment == events[0].sentiment  # VADER's score stays as the fast path
    # No emotion or offensive head is trained: those columns stay empty.
    assert good.emotion == "" and good.emotion_scores is None and good.offensive_model == ""


def test_events_that_waited_past_the_lag_keep_vader_and_the_newest_go_first(
    sentiment_head: str, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    source = make_source(make_personas().team)
    events = _posts(source, [f"love this wonderful crew on flight {i}" for i in range(6)])
    # Inject lag: the first two were received 30 s ago, the rest spread over 4 s.
    now = timezone.now()
    received = {e.id: now - timedelta(seconds=30 if i < 2 else 5 - i) for i, e in enumerate(events)}
    for event_id, at in received.items():
        Event.objects.filter(id=event_id).update(received_at=at)
    get_redis().delete(scoring.BACKLOG_KEY)
    scoring.enqueue(list(received.items()))
    assert get_redis().zcard(scoring.BACKLOG_KEY) == 4  # the stale ones never wait
    batches: list[list[int]] = []
    real_score_events = scoring.score_events

    def recording(event_ids):  # type: ignore[no-untyped-def]
        batches.append(list(event_ids))
        return real_score_events(event_ids)

    monkeypatch.setattr(scoring, "score_events", recording)

    run = scoring.score_backlog(batch_size=2, lag_s=10)

    newest_first = sorted(received, key=received.__getitem__, reverse=True)
    assert batches == [newest_first[:2], newest_first[2:4]]
    assert run.scored == 4
    labelled = dict(Event.objects.filter(source=source).values_list("id", "sentiment_model"))
    assert [labelled[e.id] for e in events] == ["vader", "vader"] + [sentiment_head] * 4
    assert scoring.scoring_stats([source.team_id]).fell_back_1m == 2


def test_events_past_the_lag_while_waiting_fall_back_at_scoring_time(
    sentiment_head: str,
) -> None:
    source = make_source(make_personas().team)
    events = _posts(source, TEXTS)
    # They were fresh when enqueued; the worker reaches them only after the lag.
    get_redis().zadd(scoring.BACKLOG_KEY, {str(e.id): time.time() - 60 for e in events})

    run = scoring.score_backlog(lag_s=10)

    assert run.scored == 0 and run.fell_back == len(TEXTS)
    assert set(Event.objects.values_list("sentiment_model", flat=True)) == {"vader"}


def test_a_gone_event_is_skipped_and_the_rest_labelled(sentiment_head: str) -> None:
    source = make_source(make_personas().team)
    first, *rest = _posts(source, TEXTS)
    Event.objects.filter(id=first.id).delete()

    assert scoring.score_backlog().scored == len(rest)
    assert set(Event.objects.values_list("sentiment_model", flat=True)) == {sentiment_head}


def test_the_api_carries_the_labels_and_filters_by_them(sentiment_head: str) -> None:
    personas = make_personas()
    source = make_source(personas.team)
    _posts(source, TEXTS)
    scoring.score_backlog()
    client = client_for(personas.member)

    positive = client.get("/api/events/", {"sentiment": "positive"}).json()["results"]
    bad_label = client.get("/api/events/", {"sentiment": "happy", "emotion": "joyful"})

    assert [e["text"] for e in positive] == [TEXTS[0]]
    assert positive[0]["sentiment_model"] == sentiment_head
    assert set(positive[0]["sentiment_scores"]) == {"negative", "neutral", "positive"}
    assert positive[0]["emotion"] == "" and positive[0]["scored_at"] is not None
    assert bad_label.status_code == 400
    assert set(bad_label.json()) >= {"sentiment", "emotion"}
    assert client.get("/api/events/", {"offensive": "offensive"}).json()["results"] == []


def test_the_sentiment_series_counts_labels_per_bucket_in_scope(sentiment_head: str) -> None:
    personas = make_personas()
    source = make_source(personas.team)
    theirs = make_source(personas.other_team, name="theirs")
    events = _posts(source, TEXTS)
    _posts(theirs, ["hate this awful delay"] * 4)
    scoring.score_backlog()
    client = client_for(personas.member)

    series = client.get("/api/sentiment/").json()
    refused = client.get("/api/sentiment/", {"source": theirs.id})
    unknown = client.get("/api/sentiment/", {"bucket": 60})

    assert series["bucket_s"] == 900  # 24 h in at most 96 buckets
    totals = {
        label: sum(b[label] for b in series["buckets"])
        for label in ("negative", "neutral", "positive")
    }
    assert totals == {"negative": 1, "neutral": 1, "positive": 1}  # never the other team's
    assert sum(b["by_transformer"] for b in series["buckets"]) == 3
    assert datetime.fromisoformat(series["until"]) > events[-1].created_at
    assert refused.status_code == 400 and "source" in refused.json()
    assert unknown.status_code == 400 and "bucket" in unknown.json()


def test_stats_report_the_transformers_share_and_the_backlog(sentiment_head: str) -> None:
    personas = make_personas()
    source = make_source(personas.team)
    _posts(source, TEXTS)
    client = client_for(personas.member)

    before = client.get("/api/stats/").json()["scoring"]
    scoring.score_backlog()
    after = client.get("/api/stats/").json()["scoring"]

    assert before["backlog"] == 3 and before["lag_s"] >= 0 and before["transformer_share"] == 0
    assert after["backlog"] == 0 and after["transformer_share"] == 1.0
    assert after["active_heads"] == {"sentiment": sentiment_head}
    assert after["fallback_after_s"] == 10.0


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_through_real_workers_enriched_events_are_labelled_by_the_inference_queue(
    sentiment_head: str, celery_worker
) -> None:  # type: ignore[no-untyped-def]
    source = make_source(make_personas().team)
    envelopes = [envelope(text, minutes=i) for i, text in enumerate(TEXTS * 4)]

    ingest_persistence.enqueue_envelopes(
        source=source, envelopes=envelopes, watermark=envelopes[-1].created_at
    )

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if Event.objects.filter(source=source, scored_at__isnull=False).count() == len(envelopes):
            break
        time.sleep(0.2)
    labels = list(Event.objects.filter(source=source).values_list("text", "sentiment_model"))
    assert len(labels) == len(envelopes)
    assert {model for _, model in labels} == {sentiment_head}
    assert get_redis().zcard(scoring.BACKLOG_KEY) == 0


def test_a_scoring_task_lost_before_it_started_holds_the_next_back_only_for_the_lag(
    sentiment_head: str, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.SCORING_LAG_S = 2.0
    source = make_source(make_personas().team)
    # The enrich stage's hand-off sends a scoring task, which is lost: the broker here is
    # a mock.
    events = _posts(source, TEXTS)

    with commits_without_broker() as send_task:
        scoring.enqueue([(event.id, timezone.now()) for event in events])
    coalesced = send_task.call_count
    time.sleep(2.1)
    with commits_without_broker() as send_task:
        scoring.enqueue([(event.id, timezone.now()) for event in events])

    assert coalesced == 0  # the lost one still counts as waiting...
    assert send_task.call_count == 1  # ...but only for the lag


def test_the_inference_process_leaves_the_cpu_to_the_pipeline() -> None:
    code = (
        "import os; from mlengine.inference import scoring; print(scoring.yield_cpu());"
        " print(os.sched_getscheduler(0) == os.SCHED_IDLE)"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "twiscope.settings"}
    done = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )

    assert done.stdout.split() == ["SCHED_IDLE", "True"]


def test_on_a_cpu_the_heads_wait_while_the_pipeline_is_busy(
    sentiment_head: str, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    source = make_source(make_personas().team)
    _posts(source, TEXTS)
    monkeypatch.setattr(pipeline, "is_busy", lambda **_: True)

    busy = scoring.score_backlog(lag_s=0.3, budget_s=5, idle_only=True)

    assert busy.scored == 0 and busy.fell_back == len(TEXTS) and busy.paused_s > 0
    assert set(Event.objects.values_list("sentiment_model", flat=True)) == {"vader"}
    # A GPU worker (idle_only off) does not wait.
    Event.objects.update(received_at=timezone.now())
    scoring.enqueue(list(Event.objects.values_list("id", "received_at")))
    assert scoring.score_backlog(idle_only=False).scored == len(TEXTS)


def test_the_pipeline_is_busy_while_it_has_more_in_hand_than_it_takes_at_once() -> None:
    with commits_without_broker():
        pipeline.send("enrich", items=[7, 8], event_ids=[7, 8], source_id=1)
    light = pipeline.is_busy(events=3)
    with commits_without_broker():
        pipeline.send("enrich", items=[9], event_ids=[9], source_id=1)
    loaded = pipeline.is_busy(events=3)
    pipeline.mark_done("enrich", [7, 8, 9])

    assert not light and loaded and not pipeline.is_busy(events=3)


def test_a_burst_of_events_pauses_the_heads(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SCORING_PAUSE_ABOVE_EPS = 100
    from ingest.counters import EVENTS_RATE_ALL
    from twiscope.redis import add_to_rate

    add_to_rate(EVENTS_RATE_ALL, 150)
    calm = scoring.in_burst()
    add_to_rate(EVENTS_RATE_ALL, 100)

    assert not calm and scoring.in_burst()
