"""What the API answers to what it cannot serve: unknown and bad query parameters,
bad pagination, the error responses in the OpenAPI schema, and over-long request lines
(at the ASGI level, and on a real daphne, as ``make run`` runs it)."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import pytest
from channels.testing import HttpCommunicator
from rest_framework.test import APIClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.typing import Origin

from alerts.models import AlertRule
from ingest import services as ingest_services
from ingest.models import Source
from mlengine.models import Trend
from tests.factories import api_key, fire_blizzard_alerts, make_personas, make_rule, make_source
from twiscope.asgi import application
from twiscope.redis import get_redis
from twiscope.server import MAX_REQUEST_TARGET_BYTES

REPO = Path(__file__).resolve().parents[1]

LIST_ENDPOINTS = [
    "/api/events/",
    "/api/trends/",
    "/api/alerts/",
    "/api/rules/",
    "/api/sources/",
    "/api/dead-letters/",
    "/api/streams/",
    "/api/trends/{trend}/events/",
]
CURSOR_ENDPOINTS = [
    "/api/events/",
    "/api/alerts/",
    "/api/dead-letters/",
    "/api/trends/{trend}/events/",
]
NUMBERED_ENDPOINTS = ["/api/trends/", "/api/rules/", "/api/sources/", "/api/streams/"]


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    return client


@pytest.fixture
def world(db):
    """The member's team with a source, trends, alerts and dead letters; the rivals with a
    source and a rule of their own. Returns (client of the member, personas, trend id)."""
    get_redis().flushdb()
    personas = make_personas()
    fire_blizzard_alerts(personas.team)
    source = Source.objects.get(team=personas.team)
    ingest_services.record_dead_letters(
        stage="replay", source=source, items=[(f"bad row {i}", {"line": i}) for i in range(3)]
    )
    make_source(personas.other_team, name="theirs")
    make_rule(personas.other_team, name="theirs")
    trend = Trend.objects.filter(source=source).order_by("id").first()
    assert trend is not None
    return client_for(personas.member), personas, trend.id


def _cursor(position: str) -> str:
    """A cursor in DRF's encoding holding ``position``: well-formed, not one we handed out."""
    return b64encode(urlencode({"p": position}).encode()).decode()


# --- Unknown and bad query parameters --------------------------------------------------


@pytest.mark.parametrize("path", LIST_ENDPOINTS)
def test_an_unknown_query_parameter_answers_400_naming_it(world, path: str) -> None:
    client, _, trend = world

    response = client.get(path.format(trend=trend), {"colour": "blue"})

    assert response.status_code == 400
    assert list(response.json()) == ["colour"]
    assert "Unknown query parameter" in response.json()["colour"][0]


@pytest.mark.parametrize("path", LIST_ENDPOINTS)
def test_the_paginators_and_format_parameters_are_understood(world, path: str) -> None:
    client, _, trend = world

    response = client.get(path.format(trend=trend), {"page_size": 1, "format": "json"})

    assert response.status_code == 200, response.json()
    assert len(response.json()["results"]) == 1


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/trends/", {"current": "maybe"}),
        ("/api/trends/", {"current": "True"}),
        ("/api/trends/", {"min_score": "lots"}),
        ("/api/trends/", {"since": "yesterday"}),
        ("/api/trends/", {"ordering": "-password"}),
        ("/api/trends/", {"ordering": "score,"}),
        ("/api/alerts/", {"after_seq": "0.0"}),
        ("/api/alerts/", {"after_seq": "-1"}),
        ("/api/alerts/", {"after_seq": "1e3"}),
        ("/api/alerts/", {"after_seq": "99999999999999999999"}),
        ("/api/alerts/", {"severity": "apocalypse"}),
        ("/api/alerts/", {"until": "soon"}),
        ("/api/rules/", {"enabled": "maybe"}),
        ("/api/rules/", {"kind": "gut_feeling"}),
        ("/api/sources/", {"enabled": "yes"}),
        ("/api/sources/", {"kind": "carrier-pigeon"}),
        ("/api/dead-letters/", {"stage": "limbo"}),
        ("/api/events/", {"since": "last tuesday"}),
        ("/api/events/", {"source": "abc"}),
        ("/api/events/", {"source": "99999999999999999999"}),
    ],
)
def test_a_bad_filter_value_answers_400_with_its_field_error(world, path: str, params) -> None:
    client, _, _ = world

    response = client.get(path, params)

    assert response.status_code == 400
    assert set(response.json()) == set(params)


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/api/events/", "source"),
        ("/api/trends/", "source"),
        ("/api/dead-letters/", "source"),
        ("/api/streams/", "source"),
        ("/api/alerts/", "team"),
        ("/api/rules/", "team"),
    ],
)
def test_another_teams_id_in_a_filter_is_not_a_valid_choice(world, path: str, param: str) -> None:
    client, personas, _ = world
    theirs = {
        "source": Source.objects.get(team=personas.other_team).id,
        "team": personas.other_team.id,
    }[param]

    response = client.get(path, {param: theirs})

    assert response.status_code == 400
    assert "valid choice" in response.json()[param][0]


def test_another_teams_rule_in_the_alerts_filter_is_not_a_valid_choice(world) -> None:
    client, _, _ = world
    theirs = AlertRule.objects.get(name="theirs")

    response = client.get("/api/alerts/", {"rule": theirs.id})

    assert response.status_code == 400 and "rule" in response.json()


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/trends/", {"current": "true", "ordering": "-score,events"}),
        ("/api/trends/", {"current": "false", "min_score": "0.5"}),
        ("/api/alerts/", {"after_seq": "0", "severity": "info"}),
        ("/api/rules/", {"enabled": "true", "kind": "new_trend"}),
        ("/api/sources/", {"enabled": "true", "kind": "replay"}),
        ("/api/dead-letters/", {"stage": "replay"}),
    ],
)
def test_good_filter_values_answer_200(world, path: str, params) -> None:
    client, _, _ = world

    response = client.get(path, params)

    assert response.status_code == 200, response.json()
    assert len(response.json()["results"]) >= 1


def test_after_seq_returns_only_later_alerts(world) -> None:
    client, _, _ = world

    everything = client.get("/api/alerts/").json()["results"]
    later = client.get("/api/alerts/", {"after_seq": "1"}).json()["results"]

    assert len(everything) >= 2
    assert sorted(a["seq"] for a in later) == list(range(2, len(everything) + 1))


# --- Pagination -------------------------------------------------------------------------


@pytest.mark.parametrize("path", LIST_ENDPOINTS)
@pytest.mark.parametrize("page_size", ["0", "-1", "501", "1.5", "ten", "²"])
def test_a_page_size_out_of_range_answers_400_never_clamped(world, path, page_size) -> None:
    client, _, trend = world

    response = client.get(path.format(trend=trend), {"page_size": page_size})

    assert response.status_code == 400
    assert list(response.json()) == ["page_size"]


@pytest.mark.parametrize("path", CURSOR_ENDPOINTS)
@pytest.mark.parametrize(
    "cursor", ["garbage", "%%%", _cursor("not-a-position"), b64encode(b"o=many").decode()]
)
def test_a_cursor_we_did_not_hand_out_answers_400_not_404(world, path, cursor) -> None:
    client, _, trend = world

    response = client.get(path.format(trend=trend), {"cursor": cursor})

    assert response.status_code == 400
    assert response.json() == {"cursor": ["Invalid cursor"]}


@pytest.mark.parametrize("path", CURSOR_ENDPOINTS)
def test_the_next_cursor_we_hand_out_is_understood(world, path) -> None:
    client, _, trend = world

    first = client.get(path.format(trend=trend), {"page_size": 1}).json()
    second = client.get(first["next"])

    assert second.status_code == 200
    assert second.json()["results"][0]["id"] != first["results"][0]["id"]


@pytest.mark.parametrize("path", NUMBERED_ENDPOINTS)
@pytest.mark.parametrize("page", ["0", "-2", "first", "1.0"])
def test_a_malformed_page_number_answers_400(world, path, page) -> None:
    client, _, _ = world

    response = client.get(path, {"page": page})

    assert response.status_code == 400
    assert list(response.json()) == ["page"]


@pytest.mark.parametrize("path", NUMBERED_ENDPOINTS)
def test_a_page_past_the_last_answers_404_and_last_is_understood(world, path) -> None:
    client, _, _ = world

    assert client.get(path, {"page": "999"}).status_code == 404
    assert client.get(path, {"page": "last"}).status_code == 200
    assert client.get(path, {"page": "1"}).status_code == 200


@pytest.mark.parametrize(
    ("path", "param"),
    [(path, "cursor") for path in CURSOR_ENDPOINTS]
    + [(path, "page") for path in NUMBERED_ENDPOINTS],
)
def test_an_empty_pagination_parameter_is_taken_as_absent(world, path, param) -> None:
    client, _, trend = world

    response = client.get(path.format(trend=trend), {param: "", "page_size": ""})

    assert response.status_code == 200, response.json()


def test_a_bad_query_parameter_on_a_detail_route_answers_400(world) -> None:
    client, _, trend = world

    assert client.get(f"/api/trends/{trend}/", {"colour": "blue"}).status_code == 400
    assert client.get(f"/api/trends/{trend}/", {"format": "json"}).status_code == 200


# --- OpenAPI ----------------------------------------------------------------------------


@pytest.fixture
def schema(db) -> dict:
    response = APIClient().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


@pytest.mark.parametrize(
    ("path", "method", "codes"),
    [
        ("/api/events/", "get", {"200", "400", "401", "429"}),
        ("/api/events/{id}/", "get", {"200", "400", "401", "404", "429"}),
        ("/api/trends/", "get", {"200", "400", "401", "404", "429"}),
        ("/api/trends/{id}/events/", "get", {"200", "400", "401", "404", "429"}),
        ("/api/streams/", "get", {"200", "400", "401", "404", "429"}),
        ("/api/alerts/", "get", {"200", "400", "401", "429"}),
        # 409 and 422: an Idempotency-Key in flight, or reused (teams/api/idempotency.py);
        # 429: past the caller's rate limit (teams/api/throttling.py), on every operation.
        ("/api/rules/", "post", {"201", "400", "401", "403", "409", "422", "429"}),
        ("/api/rules/{id}/", "patch", {"200", "400", "401", "403", "404", "409", "422", "429"}),
        ("/api/rules/{id}/", "delete", {"204", "400", "401", "403", "404", "429"}),
        # Unknown query parameters are a 400 here too.
        ("/api/stats/", "get", {"200", "400", "401", "429"}),
    ],
)
def test_the_schema_documents_every_error_an_operation_can_answer(
    schema, path: str, method: str, codes: set[str]
) -> None:
    assert set(schema["paths"][path][method]["responses"]) == codes


def test_the_schema_documents_errors_in_drfs_shapes(schema) -> None:
    rule_errors = schema["paths"]["/api/rules/{id}/"]["patch"]["responses"]
    components = schema["components"]["schemas"]

    assert rule_errors["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ValidationError"
    }
    assert rule_errors["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert components["Error"]["properties"] == {"detail": {"type": "string"}}
    # Messages as a list; a nested field's (config, a list's items) as an object; a body
    # that could not be read at all, "detail" as a string.
    assert components["ValidationError"]["additionalProperties"] == {
        "anyOf": [
            {"type": "array", "items": {"type": "string"}},
            {"type": "object"},
            {"type": "string"},
        ]
    }


def test_the_schema_documents_the_new_endpoints_and_not_the_old_filter(schema) -> None:
    event_params = {p["name"] for p in schema["paths"]["/api/events/"]["get"]["parameters"]}
    trend_event_params = {
        p["name"] for p in schema["paths"]["/api/trends/{id}/events/"]["get"]["parameters"]
    }

    assert "/api/streams/" in schema["paths"]
    assert "trend" not in event_params and {"since", "term", "cursor"} <= event_params
    assert trend_event_params == {"id", "cursor", "page_size"}


# --- Over-long request lines ------------------------------------------------------------


def _target_of(length: int) -> str:
    prefix = "/api/events/?q="
    return prefix + "a" * (length - len(prefix))


async def test_a_request_target_over_8_kib_answers_414_before_django() -> None:
    communicator = HttpCommunicator(application, "GET", _target_of(MAX_REQUEST_TARGET_BYTES + 1))

    response = await communicator.get_response()

    assert response["status"] == 414
    assert b'"detail"' in response["body"]


async def test_a_request_target_of_exactly_8_kib_reaches_the_api() -> None:
    communicator = HttpCommunicator(
        application, "GET", _target_of(MAX_REQUEST_TARGET_BYTES), headers=[(b"host", b"127.0.0.1")]
    )

    response = await communicator.get_response()

    assert response["status"] == 401  # the API's answer to an anonymous caller


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_daphne() -> Iterator[int]:
    """daphne serving ``twiscope.asgi:application`` on a free port, as ``make run`` runs
    it (``daphne -b 127.0.0.1 -p $PORT twiscope.asgi:application``); yields the port."""
    port = _free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "twiscope.settings_test"}
    command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(
        [*command, "twiscope.asgi:application"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "daphne exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "daphne did not start"
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def daphne_port() -> Iterator[int]:
    with running_daphne() as port:
        yield port


def _get(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", target, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.parametrize("length", [16 * 1024 + 1, 64 * 1024])
def test_daphne_answers_a_request_line_over_its_16_kib_limit_with_414(daphne_port, length) -> None:
    status, body = _get(daphne_port, _target_of(length))

    assert status == 414 and body == b"URI Too Long\n"


@pytest.mark.slow
def test_daphne_answers_a_request_target_over_8_kib_with_414(daphne_port) -> None:
    status, body = _get(daphne_port, _target_of(MAX_REQUEST_TARGET_BYTES + 1))

    assert status == 414 and b"detail" in body


@pytest.mark.slow
def test_daphne_answers_a_header_line_over_16_kib_with_431(daphne_port) -> None:
    status, _ = _get(daphne_port, "/api/events/", {"X-Padding": "p" * (16 * 1024 + 1)})

    assert status == 431


@pytest.mark.slow
def test_daphne_serves_a_request_target_under_the_limit(daphne_port) -> None:
    status, _ = _get(daphne_port, _target_of(MAX_REQUEST_TARGET_BYTES))

    assert status == 401


@pytest.mark.slow
def test_daphne_closes_an_unauthenticated_socket_with_4401_not_http_403(daphne_port) -> None:
    url = f"ws://127.0.0.1:{daphne_port}/ws/alerts/"
    with connect(url, proxy=None) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=5)

    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


@pytest.mark.slow
def test_daphne_closes_a_session_socket_from_a_foreign_origin_with_4403(daphne_port) -> None:
    with (
        connect(
            f"ws://127.0.0.1:{daphne_port}/ws/alerts/",
            origin=Origin("https://evil.example"),
            additional_headers={"Cookie": "sessionid=stolen"},
            proxy=None,
        ) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(timeout=5)

    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
