"""Virality on every event: the ml pool scores it with the active virality model from
the author's earlier events of the same source (``mlengine.inference.scoring.score_virality``,
``ingest.virality_reads.virality_inputs``); the events API shows and filters it. A tiny
model is trained on a generated CSV (``tests.test_virality``) with the real encoder."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from ingest import services as ingest_services
from ingest.envelope import Author, Envelope
from ingest.models import Event
from mlengine.inference import scoring
from mlengine.inference.virality_features import Post
from mlengine.inference.virality_model import active_model, score_posts
from mlengine.models import ModelVersion
from tests.factories import ORIGIN, make_personas, make_source, run_through
from tests.test_api import client_for
from tests.test_virality import _write_csv
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db

MODEL = "virality-hgb v1"


@pytest.fixture(autouse=True)
def fresh_state(settings, tmp_path: Path, monkeypatch) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Models in a temporary folder, an empty Redis, a lag no test run reaches, and no
    cached answer to "is a model active?"."""
    settings.MODELS_DIR = tmp_path / "models"
    settings.SCORING_LAG_S = 3600.0
    monkeypatch.setattr(scoring, "ACTIVE_CHECK_S", 0.0)
    get_redis().flushdb()
    yield


@pytest.fixture
def virality_model(tmp_path: Path) -> str:
    """A virality model trained on a generated account (``tests.test_virality``)."""
    data = _write_csv(tmp_path / "posts.csv", n=300)
    call_command(
        "train", "virality", "--data", str(data), stdout=io.StringIO(), stderr=io.StringIO()
    )
    return MODEL


def _posts(author: str, n: int, *, start_h: float = 0.0, seed: int = 1) -> list[Envelope]:
    """``n`` posts of ``author`` every 6 hours from ``ORIGIN + start_h``, with repost and
    like counts; two in five are loud announcements."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        loud = i % 5 in (0, 2)
        reposts = rng.randint(300, 500) if loud else rng.randint(80, 120)
        text = (
            f"BIG ANNOUNCEMENT tomorrow!!! #Huge #Win Iowa {author} {i}"
            if loud
            else f"Thank you Ohio for a lovely evening, {author} number {i}."
        )
        out.append(
            Envelope(
                external_id=f"{author}-{i}",
                created_at=ORIGIN + timedelta(hours=start_h + 6 * i),
                text=text,
                author=Author(id=f"id-{author}", handle=author),
                metrics={"reposts": reposts, "likes": 3 * reposts},
            )
        )
    return out


def _expected(envelopes: list[Envelope], post: Envelope) -> float | None:
    """``score_posts`` on ``post`` with ``envelopes`` as its author's posts."""

    def as_post(e: Envelope, counts: bool) -> Post:
        return Post(
            author="a",
            created_at=e.created_at,
            text=e.text,
            retweet_count=e.metrics["reposts"] if counts else None,
            favorite_count=e.metrics["likes"] if counts else None,
            key=e.external_id,
        )

    history = [as_post(e, True) for e in envelopes]
    [score] = score_posts(active_model(), [as_post(post, False)], {"a": history})
    return score.score


def _scores(source) -> dict[str, tuple[float | None, str]]:  # type: ignore[no-untyped-def]
    return {
        e.external_id: (e.virality_score, e.virality_model)
        for e in Event.objects.filter(source=source)
    }


def test_events_with_100_earlier_posts_of_their_author_get_a_score_and_others_none(
    virality_model: str,
) -> None:
    source = make_source(make_personas().team)
    veteran = _posts("veteran", 104)
    newcomer = _posts("newcomer", 100, start_h=1, seed=2)  # its last has 99 predecessors
    run_through(source, sorted(veteran + newcomer, key=lambda e: e.created_at))

    run = scoring.score_backlog(idle_only=False)

    scores = _scores(source)
    assert run.left == 0 and run.fell_back == 0
    scored = {k: v for k, v in scores.items() if v[0] is not None}
    assert set(scored) == {f"veteran-{i}" for i in range(100, 104)}
    for i in range(100, 104):
        score, model = scores[f"veteran-{i}"]
        assert model == virality_model and score is not None and 0.0 <= score <= 1.0
        assert score == pytest.approx(_expected(veteran, veteran[i]), abs=2e-3)
    assert scores["newcomer-99"] == (None, "")
    assert scores["veteran-99"] == (None, "")
    # The API says null for the rest, never a made-up score.
    assert {v for k, v in scores.items() if k not in scored} == {(None, "")}


def test_history_is_one_query_per_batch_and_counts_only_the_same_source(
    virality_model: str,
) -> None:
    personas = make_personas()
    source, other = make_source(personas.team), make_source(personas.team, name="other")
    run_through(other, _posts("veteran", 100))  # the same author elsewhere: not history
    run_through(source, _posts("veteran", 60, start_h=600 * 6))
    ids = list(Event.objects.filter(source=source).values_list("id", flat=True))

    with CaptureQueriesContext(connection) as queries:
        scoring.score_events(ids)

    assert sum("LATERAL" in q["sql"] for q in queries.captured_queries) == 1
    assert not Event.objects.filter(virality_score__isnull=False).exists()


def test_without_an_active_virality_model_every_score_stays_null(virality_model: str) -> None:
    ModelVersion.objects.filter(task="virality").update(active=False)
    source = make_source(make_personas().team)
    run_through(source, _posts("veteran", 104))
    ids = list(Event.objects.filter(source=source).values_list("id", flat=True))

    assert get_redis().zcard(scoring.BACKLOG_KEY) == 0  # nothing active: nothing waits
    assert scoring.score_events(ids) == 0
    assert set(_scores(source).values()) == {(None, "")}


def test_only_strictly_earlier_events_count_as_predecessors(virality_model: str) -> None:
    source = make_source(make_personas().team)
    run_through(source, _posts("veteran", 101))
    scoring.score_backlog(idle_only=False)
    scored = Event.objects.get(source=source, external_id="veteran-100")
    short = Event.objects.get(source=source, external_id="veteran-99")  # 99 predecessors
    before = scored.virality_score
    assert before is not None and short.virality_score is None

    def add(external_id: str, at: datetime) -> None:
        run_through(
            source,
            [
                Envelope(
                    external_id=external_id,
                    created_at=at,
                    text="HUGE!!! #Win",
                    author=Author(id="id-veteran", handle="veteran"),
                    metrics={"reposts": 10**6, "likes": 10**6},
                )
            ],
        )

    add("later", scored.created_at + timedelta(hours=1))
    add("same-time", scored.created_at)
    add("same-time-as-short", short.created_at)
    scoring.score_events([scored.id, short.id])
    assert Event.objects.get(id=scored.id).virality_score == before
    assert Event.objects.get(id=short.id).virality_score is None

    add("earlier", short.created_at - timedelta(minutes=1))
    scoring.score_events([short.id])
    assert Event.objects.get(id=short.id).virality_score is not None


def test_the_events_api_shows_virality_and_filters_by_min_virality() -> None:
    personas = make_personas()
    source = make_source(personas.team)
    run_through(source, _posts("veteran", 3))
    low, high, unscored = Event.objects.filter(source=source).order_by("created_at")
    ingest_services.save_labels(
        [
            {"id": low.id, "virality_score": 0.2, "virality_model": MODEL},
            {"id": high.id, "virality_score": 0.82, "virality_model": MODEL},
        ]
    )
    client = client_for(personas.member)

    every = client.get("/api/events/", {"source": source.id}).json()["results"]
    hot = client.get("/api/events/", {"min_virality": "0.5"}).json()["results"]
    scored = client.get("/api/events/", {"min_virality": "0"}).json()["results"]

    by_id = {e["id"]: (e["virality_score"], e["virality_model"]) for e in every}
    assert by_id == {low.id: (0.2, MODEL), high.id: (0.82, MODEL), unscored.id: (None, "")}
    assert [e["id"] for e in hot] == [high.id]
    assert {e["id"] for e in scored} == {low.id, high.id}
    for bad in ("abc", "2", "-0.1", "nan"):
        response = client.get("/api/events/", {"min_virality": bad})
        assert response.status_code == 400 and "min_virality" in response.json()
