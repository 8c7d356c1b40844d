"""No input makes the API fail or work without bound: numbers and dates are refused at
the edge with field errors, ranges are capped whichever ends are given, events dated too
far ahead are refused at every way in, every error under /api/ is JSON, no server path
is shown, and a hypothesis run of extreme values over every endpoint gets no 5xx."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from ingest import persistence
from ingest.api.serializers import DeadLetterSerializer
from ingest.envelope import Envelope, EnvelopeError
from ingest.models import DeadLetter, Event, Source
from tests.factories import make_personas, make_rule, make_source
from tests.test_api_errors import LIST_ENDPOINTS, client_for
from tests.test_webhooks import create_webhook, post_signed

pytestmark = pytest.mark.django_db


@pytest.fixture
def personas():
    return make_personas()


@pytest.fixture
def owner(personas) -> APIClient:
    return client_for(personas.owner)


@pytest.fixture
def member(personas) -> APIClient:
    return client_for(personas.member)


def one_event(source: Source, created_at: datetime, external_id: str = "e1") -> None:
    Event.objects.create(
        source=source,
        external_id=external_id,
        created_at=created_at,
        received_at=datetime.now(UTC),
        text="a post",
        sentiment_label="neutral",
    )


@pytest.mark.parametrize("field", ["min_events", "min_authors", "min_peak", "cooldown_s"])
@pytest.mark.parametrize("value", [2**31, 2**63, 10**30])
def test_a_rule_integer_past_the_column_is_a_field_error(personas, owner, field, value) -> None:
    response = owner.post(
        "/api/rules/", {"name": "big", "team": personas.team.id, field: value}, format="json"
    )

    assert response.status_code == 400
    assert list(response.json()) == [field]


def test_a_rule_integer_at_the_column_limit_is_stored(personas, owner) -> None:
    response = owner.post(
        "/api/rules/",
        {"name": "edge", "team": personas.team.id, "cooldown_s": 2**31 - 1},
        format="json",
    )

    assert response.status_code == 201, response.json()


@pytest.mark.parametrize("path", ["/api/watches/", "/api/rules/"])
@pytest.mark.parametrize("term", [123, 1.5, True, None, ["x"], {"a": 1}])
def test_terms_are_strings_only(personas, owner, path, term) -> None:
    response = owner.post(
        path, {"name": "w", "team": personas.team.id, "terms": [term]}, format="json"
    )

    assert response.status_code == 400
    assert "terms" in response.json()


@pytest.mark.parametrize("endpoint", ["/api/sentiment/", "/api/series/?source=1&kind=volume&"])
@pytest.mark.parametrize(
    "moment",
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59-14:00",
        "1899-12-31T23:59:59Z",
    ],
)
@pytest.mark.parametrize("end", ["since", "until"])
def test_a_date_outside_the_range_is_a_field_error(member, endpoint, moment, end) -> None:
    glue = "" if endpoint.endswith("&") else "?"
    response = member.get(f"{endpoint}{glue}{end}={moment.replace('+', '%2B')}")

    assert response.status_code == 400
    assert end in response.json()


@pytest.mark.parametrize(
    "path", ["/api/events/", "/api/trends/", "/api/alerts/", "/api/anomalies/"]
)
@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
def test_list_filters_refuse_dates_outside_the_range(member, path, moment) -> None:
    response = member.get(path, {"since": moment})

    assert response.status_code == 400
    assert list(response.json()) == ["since"]


@pytest.mark.parametrize("value", ["1e999999", "1e-999999", "99999999999999999999", "NaN"])
def test_decimal_filters_are_bounded(member, value) -> None:
    response = member.get("/api/trends/", {"min_score": value})

    assert response.status_code == 400
    assert list(response.json()) == ["min_score"]


def test_the_sentiment_cap_holds_with_since_alone(personas, member) -> None:
    source = make_source(personas.team)
    one_event(source, datetime(2026, 11, 30, tzinfo=UTC))

    response = member.get("/api/sentiment/", {"since": "1900-01-01T00:00:00Z", "bucket_s": 86400})

    assert response.status_code == 400
    assert "At most 2000 buckets" in response.json()["bucket_s"][0]


def test_the_sentiment_cap_holds_with_until_alone(personas, member) -> None:
    make_source(personas.team)
    response = member.get("/api/sentiment/", {"until": "2999-01-01T00:00:00Z", "bucket_s": 60})

    # since defaults to 24 h before until: 1,440 buckets, under the cap.
    assert response.status_code == 200
    assert len(response.json()["buckets"]) == 1440


def test_the_sentiment_cap_names_since_when_the_bucket_is_the_default(personas, member) -> None:
    source = make_source(personas.team)
    one_event(source, datetime(2026, 11, 30, tzinfo=UTC))

    response = member.get("/api/sentiment/", {"since": "1900-01-01T00:00:00Z"})

    assert response.status_code == 400
    assert list(response.json()) == ["since"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/nothing-here/",
        "/api/rules/abc/",
        "/api/rules/99999999999999999999/",
        "/api/rules/-1/",
        "/api/ingest/webhooks/abc/",
        "/api/ingest/webhooks/-1/",
        "/api/trends/abc/events/",
    ],
)
def test_every_404_under_api_is_json(member, path) -> None:
    response = member.get(path)

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert "detail" in response.json()


def test_a_405_is_json(member) -> None:
    response = member.put("/api/stats/", {}, format="json")

    assert response.status_code == 405
    assert response["Content-Type"] == "application/json"


def test_a_server_error_under_api_is_json(member, monkeypatch) -> None:
    from dashboard import selectors

    def boom(user):
        raise RuntimeError("a bug")

    monkeypatch.setattr(selectors, "stats_for", boom)
    member.raise_request_exception = False

    response = member.get("/api/stats/")

    assert response.status_code == 500
    assert response.json() == {"detail": "A server error occurred."}


def test_pages_outside_api_keep_their_html_404(member) -> None:
    response = member.get("/no-such-page/")

    assert response.status_code == 404
    assert "json" not in response["Content-Type"]


def test_stats_refuses_unknown_parameters(member) -> None:
    response = member.get("/api/stats/", {"source": 1})

    assert response.status_code == 400
    assert list(response.json()) == ["source"]


def test_a_replay_sources_archive_shows_as_its_file_name(personas, member) -> None:
    Source.objects.create(
        team=personas.team,
        kind=Source.Kind.REPLAY,
        name="archive",
        config={"path": "/srv/data/private/2015_airline.csv", "format": "csv"},
        last_error="cannot replay /srv/data/private/2015_airline.csv: gone",
    )

    body = json.dumps(member.get("/api/sources/").json())

    assert "/srv" not in body
    assert "2015_airline.csv" in body


def test_a_dead_letter_shows_no_server_path(personas) -> None:
    source = make_source(personas.team)
    letter = DeadLetter.objects.create(
        stage=DeadLetter.Stage.REPLAY,
        source=source,
        reason="bad row",
        error='  File "/srv/app/ingest/persistence.py", line 3, in f\n'
        '  File "/opt/venv/lib/python3.11/site-packages/django/db/x.py", line 9\n',
        payload={"path": "/srv/data/private/a.csv", "line": 3},
    )

    data = DeadLetterSerializer(letter).data

    assert "/srv" not in json.dumps(data) and "/opt" not in json.dumps(data)
    assert 'File "ingest/persistence.py"' in data["error"]
    assert 'File "django/db/x.py"' in data["error"]
    assert data["payload"]["path"] == "a.csv"


# -- event times too far ahead ------------------------------------------------------


def envelope_json(created_at: datetime | str) -> dict:
    moment = created_at if isinstance(created_at, str) else created_at.isoformat()
    return {"external_id": "x1", "created_at": moment, "text": "hi"}


@pytest.mark.parametrize(
    "moment",
    ["2099-01-01T00:00:00+00:00", "0001-01-01T00:00:00+01:00", "1899-01-01T00:00:00+00:00"],
)
def test_an_envelope_outside_event_time_bounds_is_refused(moment) -> None:
    with pytest.raises(EnvelopeError, match=r"^created_at: "):
        Envelope.from_json(envelope_json(moment))


def test_an_envelope_within_the_future_allowance_is_taken() -> None:
    soon = datetime.now(UTC) + timedelta(hours=23)

    assert Envelope.from_json(envelope_json(soon)).created_at == soon


@override_settings(EVENT_MAX_FUTURE_S=0)
def test_the_future_allowance_is_a_setting() -> None:
    with pytest.raises(EnvelopeError, match="EVENT_MAX_FUTURE_S"):
        Envelope.from_json(envelope_json(datetime.now(UTC) + timedelta(minutes=5)))


@pytest.mark.django_db(transaction=True)
def test_a_webhook_post_dated_2099_is_a_field_error(personas) -> None:
    hook = create_webhook(personas)

    response = post_signed(
        hook["id"], [envelope_json("2099-01-01T00:00:00+00:00")], secret=hook["secret"]
    )

    assert response.status_code == 400
    assert list(response.json()["errors"]["0"]) == ["created_at"]
    assert not Event.objects.filter(source_id=hook["id"]).exists()


def test_the_pipeline_parks_an_event_dated_too_far_ahead(personas) -> None:
    # A live adapter builds its envelopes itself; the persist stage validates them.
    source = make_source(personas.team)
    now = datetime.now(UTC)
    ahead = Envelope(external_id="ahead", created_at=datetime(2099, 1, 1, tzinfo=UTC), text="x")
    fine = Envelope(external_id="fine", created_at=now, text="y")
    key = persistence.stage_batch(source_id=source.id, envelopes=[ahead, fine])

    persistence.persist_batch(batch_key=key, source_id=source.id)

    assert list(Event.objects.filter(source=source).values_list("external_id", flat=True)) == [
        "fine"
    ]
    letter = DeadLetter.objects.get(source=source)
    assert letter.reason.startswith("invalid envelope: created_at: more than 86400 s")
    assert letter.payload["external_id"] == "ahead"


# -- extreme values on every endpoint -------------------------------------------------

EXTREMES = st.one_of(
    st.sampled_from(
        [
            str(2**63),
            str(-(2**63) - 1),
            str(2**31),
            "0",
            "-1",
            "1e999999",
            "NaN",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59-14:00",
            "0001-01-01",
            "x" * 10_000,
            "a\x00b",
            "",
            "last",
        ]
    ),
    st.text(max_size=40),
)
GET_PATHS = [
    *(path for path in LIST_ENDPOINTS if "{" not in path),
    "/api/events/export/",
    "/api/anomalies/",
    "/api/models/",
    "/api/watches/",
    "/api/stats/",
    "/api/sentiment/",
    "/api/series/",
]
PARAMS = [
    "since",
    "until",
    "source",
    "page",
    "page_size",
    "cursor",
    "q",
    "min_score",
    "min_virality",
    "after_seq",
    "bucket_s",
    "kind",
    "term",
    "watch",
    "team",
    "rule",
    "format",
    "ordering",
]


@pytest.fixture
def fuzz_team():
    personas = make_personas()
    source = make_source(personas.team)
    one_event(source, datetime(2026, 11, 30, tzinfo=UTC))
    make_rule(personas.team)
    return personas, source


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(GET_PATHS),
    params=st.dictionaries(st.sampled_from(PARAMS), EXTREMES, max_size=3),
)
def test_extreme_query_values_never_get_a_5xx(fuzz_team, path, params) -> None:
    personas, _source = fuzz_team
    client = client_for(personas.member)
    client.raise_request_exception = False

    response = client.get(path, params)

    assert response.status_code < 500, (path, params, response.content[:300])
    assert "json" in response["Content-Type"] or response.status_code == 200


RULE_FIELDS = ["min_events", "min_authors", "min_peak", "cooldown_s", "min_score", "name"]
BODY_VALUES = st.one_of(
    st.sampled_from([2**63, -(2**63), 2**31, 10**400, 1e308, "x" * 10_000, "a\x00b", None]),
    st.integers(),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(["/api/rules/", "/api/watches/", "/api/sources/"]),
    body=st.dictionaries(
        st.sampled_from([*RULE_FIELDS, "terms", "kind", "config", "source", "team"]),
        BODY_VALUES,
        max_size=4,
    ),
)
def test_extreme_bodies_never_get_a_5xx(fuzz_team, path, body) -> None:
    personas, _source = fuzz_team
    client = client_for(personas.owner)
    client.raise_request_exception = False
    body = {"name": "fuzz", "team": personas.team.id, **body}

    response = client.post(path, body, format="json")

    assert response.status_code < 500, (path, body, response.content[:300])
    assert "json" in response["Content-Type"]
