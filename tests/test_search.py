"""Full-text search of events (``ingest.search``): syntax, exact phrases, languages,
ordering, highlights, the default window, scope and bad input, through the REST API."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from ingest import persistence, search
from ingest.envelope import Envelope
from ingest.models import Event, Source
from tests.factories import (
    ORIGIN,
    api_key,
    commits_without_broker,
    envelope,
    make_personas,
    make_source,
)

pytestmark = pytest.mark.django_db

POSTS = {
    "jfk": "Flights delayed again at JFK, thanks a lot",
    "storm": "My flight was delayed by the storm",
    "delays": "Flight delays everywhere today",
    "crew": "The crew was great, smooth landing",
    "madrid": "Los vuelos están retrasados por la tormenta en Madrid, qué desastre",
    "luggage": "Lost my luggage, FLIGHTS DELAYED and no help <script>alert(1)</script>",
    "punct": "flights, delayed: the board says so",
}


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    return client


def store(source: Source, envelopes: list[Envelope]) -> list[int]:
    """Persist and enrich ``envelopes`` as the pipeline does (no trend stage)."""
    from mlengine.enrichment import stage as enrichment

    with commits_without_broker():
        key = persistence.stage_batch(source_id=source.id, envelopes=envelopes, watermark=None)
        ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids
        enrichment.enrich_events(event_ids=ids, source_id=source.id)
    return ids


@pytest.fixture
def world():
    personas = make_personas()
    source = make_source(personas.team)
    other = make_source(personas.other_team, name="theirs")
    names = list(POSTS)
    envelopes = [envelope(text, minutes=i) for i, text in enumerate(POSTS.values())]
    ids = dict(zip(names, store(source, envelopes), strict=True))
    store(other, [envelope("Flights delayed at the rivals hub, retrasados", minutes=3)])
    return personas, source, ids


def found(client: APIClient, **params) -> list[int]:
    response = client.get("/api/events/", {"page_size": 500, **params})
    assert response.status_code == 200, response.content
    return [row["id"] for row in response.json()["results"]]


def test_enrichment_writes_the_vector_with_the_detected_language(world) -> None:
    _personas, _source, ids = world
    madrid = Event.objects.get(id=ids["madrid"])

    assert madrid.lang == "es"
    assert "retras" in madrid.search_vector  # Spanish stem
    assert "retrasados" in madrid.search_vector  # and the word itself (simple)


def test_a_phrase_returns_exactly_the_posts_holding_it(world) -> None:
    personas, _source, ids = world
    mine = Event.objects.filter(source__team=personas.team)
    holding = {e.id for e in mine if "flights delayed" in e.text.lower()}

    result = found(client_for(personas.member), q='"flights delayed"')

    assert holding == {ids["jfk"], ids["luggage"]}
    assert sorted(result) == sorted(holding)


def test_a_word_matches_its_other_forms(world) -> None:
    personas, _source, ids = world

    result = found(client_for(personas.member), q="delayed")

    assert set(result) == {ids["jfk"], ids["storm"], ids["delays"], ids["luggage"], ids["punct"]}


def test_or_takes_either_word(world) -> None:
    personas, _source, ids = world

    assert set(found(client_for(personas.member), q="luggage OR crew")) == {
        ids["luggage"],
        ids["crew"],
    }


def test_minus_excludes_a_word_and_a_phrase(world) -> None:
    personas, _source, ids = world
    client = client_for(personas.member)

    assert set(found(client, q="delayed -storm -luggage")) == {
        ids["jfk"],
        ids["delays"],
        ids["punct"],
    }
    assert set(found(client, q='delayed -"flights delayed"')) == {
        ids["storm"],
        ids["delays"],
        ids["punct"],
    }


def test_a_prefix_matches_words_starting_with_it(world) -> None:
    personas, _source, ids = world
    client = client_for(personas.member)

    assert set(found(client, q="lugg*")) == {ids["luggage"]}
    assert set(found(client, q="fligh*")) == {
        ids["jfk"],
        ids["storm"],
        ids["delays"],
        ids["luggage"],
        ids["punct"],
    }


def test_a_spanish_post_matches_a_stemmed_spanish_query(world) -> None:
    personas, _source, ids = world

    assert found(client_for(personas.member), q="retrasado tormentas") == [ids["madrid"]]


def test_search_combines_with_the_other_filters(world) -> None:
    personas, source, ids = world
    client = client_for(personas.member)
    since = (ORIGIN + timedelta(minutes=2)).isoformat()

    assert set(found(client, q="delayed", since=since)) == {
        ids["delays"],
        ids["luggage"],
        ids["punct"],
    }
    assert found(client, q="delayed", lang="es") == []
    assert found(client, q="madrid", lang="es", source=source.id) == [ids["madrid"]]


def test_results_are_newest_first_or_by_rank(world) -> None:
    personas, source, _ids = world
    repeated = envelope("flights delayed, flights delayed, flights delayed", minutes=-9)
    [best] = store(source, [repeated])
    client = client_for(personas.member)

    by_time = found(client, q="flights delayed")
    by_rank = found(client, q="flights delayed", ordering="rank")
    ranked = client.get("/api/events/", {"q": "flights delayed", "ordering": "rank"}).json()

    assert by_time[-1] == best  # the oldest
    assert by_rank[0] == best
    assert sorted(by_rank) == sorted(by_time)
    assert "rank" not in ranked["results"][0]


def test_rank_ordering_pages_through_every_result_once(world) -> None:
    personas, _source, _ids = world
    client = client_for(personas.member)
    everything = found(client, q="fligh*", ordering="rank")
    seen: list[int] = []
    url: str | None = "/api/events/?q=fligh*&ordering=rank&page_size=2"

    while url:
        body = client.get(url).json()
        seen += [row["id"] for row in body["results"]]
        url = body["next"]

    assert seen == everything


def test_highlights_mark_the_matches_html_escaped(world) -> None:
    personas, _source, ids = world

    [row] = client_for(personas.member).get("/api/events/", {"q": "luggage"}).json()["results"]
    plain = client_for(personas.member).get("/api/events/").json()["results"]

    assert row["id"] == ids["luggage"]
    assert "<mark>luggage</mark>" in row["highlight"]
    assert "&lt;script&gt;" in row["highlight"]
    assert "<script>" not in row["highlight"]
    assert {r["highlight"] for r in plain} == {None}


def test_highlights_cost_one_query_for_the_page_whatever_the_result_size(world) -> None:
    personas, source, _ids = world
    store(source, [envelope(f"storm number {i} on the runway", minutes=10 + i) for i in range(60)])
    client = client_for(personas.member)
    # A token's first use in a minute also writes its last_used: not counted below.
    client.get("/api/events/", {"q": "storm", "page_size": 1})

    def queries(page_size: int) -> tuple[int, list[str]]:
        with CaptureQueriesContext(connection) as captured:
            body = client.get("/api/events/", {"q": "storm", "page_size": page_size}).json()
        headlines = [q["sql"] for q in captured.captured_queries if "ts_headline" in q["sql"]]
        assert len(body["results"]) == page_size
        return len(captured.captured_queries), headlines

    small, small_headlines = queries(3)
    large, large_headlines = queries(50)

    assert small == large
    assert len(small_headlines) == len(large_headlines) == 1
    assert large_headlines[0].count("ANY") == 1


def test_a_search_without_range_or_source_covers_the_default_window(world, settings) -> None:
    personas, source, _ids = world
    [old] = store(source, [envelope("delayed long ago", minutes=-60 * 24 * 40)])
    client = client_for(personas.member)

    assert old not in found(client, q="delayed")
    assert old in found(client, q="delayed", source=source.id)
    assert old in found(client, q="delayed", since=(ORIGIN - timedelta(days=50)).isoformat())
    settings.SEARCH_DEFAULT_WINDOW_DAYS = 60
    assert old in found(client, q="delayed")


def test_the_default_window_is_stated_in_the_schema(db) -> None:
    schema = APIClient().get("/api/schema/", {"format": "json"})
    parameters = schema.json()["paths"]["/api/events/"]["get"]["parameters"]
    by_name = {p["name"]: p for p in parameters}

    assert "last 30 days of event time" in by_name["q"]["description"]
    assert by_name["ordering"]["schema"]["enum"] == ["rank", "time"]


def test_a_future_dated_post_does_not_move_the_default_window(world) -> None:
    personas, source, ids = world
    store(source, [envelope("delayed from the future", minutes=60 * 24 * 365 * 90)])

    assert ids["jfk"] in found(client_for(personas.member), q="delayed")


def test_owner_and_member_find_the_same_and_the_outsider_nothing_of_theirs(world) -> None:
    personas, source, ids = world
    owner, member = client_for(personas.owner), client_for(personas.member)
    outsider = client_for(personas.outsider)

    assert found(owner, q="delayed") == found(member, q="delayed")
    theirs = found(outsider, q="delayed")
    assert len(theirs) == 1
    assert not set(theirs) & set(ids.values())
    assert outsider.get("/api/events/", {"q": "delayed", "source": source.id}).status_code == 400
    assert outsider.get(f"/api/events/{ids['jfk']}/", {"q": "delayed"}).status_code == 404
    assert found(member, q="rivals") == []


@pytest.mark.parametrize(
    "q",
    [
        '"flights delayed',
        'flights "',
        "\"'\\:*&|!()<-> OR",
        "fli*ght* 'x' \\ ",
        "OR OR delayed OR",
        "x" * 500,
        "é*",
    ],
)
def test_odd_but_valid_input_answers_200(world, q: str) -> None:
    personas, _source, _ids = world

    response = client_for(personas.member).get("/api/events/", {"q": q})

    assert response.status_code == 200, response.content


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"q": '- OR * "" --'}, "q"),
        ({"q": "-delayed"}, "q"),
        ({"q": "delayed " * 1300}, "q"),
        ({"q": "delayed\x00"}, "q"),
        ({"q": " ".join(f"w{i}" for i in range(40))}, "q"),
        ({"ordering": "rank"}, "ordering"),
        ({"q": "delayed", "ordering": "score"}, "ordering"),
        ({"q": "delayed", "ordering": "rank", "cursor": "cD1ub3RhbnVtYmVy"}, "cursor"),
    ],
)
def test_bad_input_is_a_field_error(world, params: dict[str, str], field: str) -> None:
    personas, _source, _ids = world

    response = client_for(personas.member).get("/api/events/", params)

    assert response.status_code == 400
    assert field in response.json()


def test_backfill_fills_the_vectors_of_events_enriched_before_search(world) -> None:
    personas, _source, ids = world
    Event.objects.update(search_vector=None)
    out = StringIO()

    call_command("backfill_search", "--batch", "3", stdout=out)

    assert "8 vectors written" in out.getvalue()
    assert found(client_for(personas.member), q="retrasado") == [ids["madrid"]]


def test_every_mapped_language_has_a_postgresql_configuration() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT cfgname FROM pg_ts_config")
        installed = {row[0] for row in cursor.fetchall()}

    assert set(search.LANGUAGE_CONFIGS.values()) <= installed
    assert search.config_for("pt-BR") == "portuguese"
    assert search.config_for("und") == "simple"


def test_the_parser_reads_web_search_syntax() -> None:
    query = search.parse('"power outage" storm OR flood -rain fli* -"no way"')

    assert query.groups == (
        (search.Term("phrase", "power outage"),),
        (search.Term("word", "storm"), search.Term("word", "flood")),
        (search.Term("word", "rain", negated=True),),
        (search.Term("prefix", "fli"),),
        (search.Term("phrase", "no way", negated=True),),
    )
