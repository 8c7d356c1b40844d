"""The web side of a dependency outage: JSON 503 with ``Retry-After`` instead of an HTML
500, from views and from middleware, and ``/health/`` naming what is down.

The outages are real, not mocked: the database connection is pointed at a port nothing
listens on (every query then fails to connect, as while PostgreSQL restarts), and the
process's Redis client at another (as while Redis restarts). Both are put back after
each test. The whole platform under a killed server is ``tests/test_outage_platform.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, cast

import pytest
import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client, override_settings
from rest_framework.test import APIClient

from devtools.base import free_port
from tests.factories import api_key, make_personas
from twiscope import outage
from twiscope.outage import DependencyUnavailableMiddleware, dependency_down, wait_out
from twiscope.redis import get_redis

if TYPE_CHECKING:
    from django.contrib.auth.models import User

pytestmark = pytest.mark.django_db(transaction=True)


class ReadsTheUserMiddleware:
    """A middleware that reads the session's user before the view, as a login check
    does: with the database down, it is the middleware that fails."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not request.user.is_authenticated:
            return HttpResponse("login first", status=401)
        return self.get_response(request)


@pytest.fixture
def database_down() -> Iterator[Callable[[], None]]:
    """The default connection points at a closed port until the test ends, or until
    it calls the function this yields (the database is back)."""
    port = connection.settings_dict["PORT"]

    def back() -> None:
        connection.close()
        connection.settings_dict["PORT"] = port

    connection.close()
    connection.settings_dict["PORT"] = str(free_port())
    try:
        yield back
    finally:
        back()


@pytest.fixture
def redis_down() -> Iterator[None]:
    """This process's Redis client (``get_redis``) points at a closed port."""
    get_redis.cache_clear()
    with override_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/15"):
        try:
            yield
        finally:
            get_redis.cache_clear()


def _assert_unavailable(response: HttpResponse, dependency: str) -> None:
    assert response.status_code == 503
    assert response["Content-Type"] == "application/json"
    assert response["Retry-After"] == str(outage.RETRY_AFTER_S)
    body = response.json()  # type: ignore[attr-defined]
    assert body["unavailable"] == dependency
    assert dependency in body["detail"]


@pytest.fixture
def client() -> APIClient:
    """A client with the owner persona's API token."""
    personas = make_personas()
    client = APIClient()
    owner = cast("User", personas.owner)
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(owner)}")
    return client


def test_an_api_call_while_the_database_is_down_answers_json_503(
    client: APIClient, database_down: Callable[[], None]
) -> None:
    response = client.get("/api/alerts/")

    _assert_unavailable(response, "database")


@override_settings(DEBUG=True)
def test_with_debug_on_it_is_still_a_503_not_the_debug_page(
    database_down: Callable[[], None],
) -> None:
    response = APIClient().get("/api/sources/", HTTP_AUTHORIZATION="Token abc")

    _assert_unavailable(response, "database")


def test_a_middleware_that_fails_on_the_database_gives_a_503_too(
    request: pytest.FixtureRequest,
) -> None:
    personas = make_personas()
    # As a server does: Django's test client would re-raise what a middleware raised.
    client = APIClient(raise_request_exception=False)
    client.force_login(cast("User", personas.owner))
    request.getfixturevalue("database_down")

    with override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, f"{__name__}.ReadsTheUserMiddleware"]):
        response = client.get("/api/alerts/")

    _assert_unavailable(response, "database")


def test_an_api_call_that_needs_redis_while_it_is_down_answers_json_503(
    client: APIClient, redis_down: None
) -> None:
    response = client.get("/api/stats/")

    _assert_unavailable(response, "redis")


def test_other_errors_stay_errors() -> None:
    def fails(request: HttpRequest) -> HttpResponse:
        return HttpResponse("boom", status=500)

    middleware = DependencyUnavailableMiddleware(fails)
    response = middleware(HttpRequest())

    assert response.status_code == 500
    assert middleware.process_exception(HttpRequest(), ValueError("bad")) is None


@pytest.mark.parametrize("path", ["/static/dashboard/app.js", "/static/dashboard/app.css"])
def test_the_dashboards_files_pass_the_middleware_as_file_responses(path: str) -> None:
    # whitenoise answers a FileResponse (a stream, not an HttpResponse) from behind this
    # middleware; a stricter type check once turned every static file into a 500.
    response = Client().get(path)

    assert response.status_code == 200
    assert response.streaming
    assert len(b"".join(response.streaming_content)) > 1000  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_the_dashboards_files_pass_the_middleware_under_asgi_too() -> None:
    response = await AsyncClient().get("/static/dashboard/app.js")

    assert response.status_code == 200


def test_the_health_endpoint_says_ok_when_everything_answers() -> None:
    response = APIClient().get("/health/")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "redis": "ok"}


def test_the_health_endpoint_names_the_database_when_it_is_down(
    database_down: Callable[[], None],
) -> None:
    response = APIClient().get("/health/")

    assert response.status_code == 503
    assert response["Retry-After"] == str(outage.RETRY_AFTER_S)
    assert response.json()["down"] == ["database"]
    assert response.json()["database"].startswith("down: ")
    assert response.json()["redis"] == "ok"


def test_the_health_endpoint_names_redis_when_it_is_down(redis_down: None) -> None:
    response = APIClient().get("/health/")

    assert response.status_code == 503
    assert response.json()["down"] == ["redis"]
    assert response.json()["database"] == "ok"


def test_dependency_errors_are_told_apart_through_their_causes() -> None:
    try:
        try:
            raise redis.exceptions.ConnectionError("refused")
        except redis.exceptions.ConnectionError as exc:
            raise RuntimeError("while staging") from exc
    except RuntimeError as wrapped:
        outer = wrapped

    assert dependency_down(outer) == "redis"
    assert dependency_down(ValueError("bad")) is None


def test_wait_out_retries_a_dependency_error_until_it_succeeds(
    database_down: Callable[[], None],
) -> None:
    """The first two tries meet the closed port; then the database is back."""
    calls: list[int] = []
    waits: list[str] = []

    def query() -> int:
        calls.append(1)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 7")
            return int(cursor.fetchone()[0])

    # The database comes back after the second failure.
    after_failure = [lambda: None, database_down]

    def on_wait(dependency: str, exc: BaseException, delay_s: float) -> None:
        waits.append(dependency)
        after_failure[len(waits) - 1]()

    assert wait_out(query, what="test", on_wait=on_wait, sleep=lambda s: None) == 7
    assert (len(calls), waits) == (3, ["database", "database"])


def test_wait_out_gives_up_when_told_to() -> None:
    def broker_down() -> None:
        raise redis.exceptions.ConnectionError("refused")

    with pytest.raises(redis.exceptions.ConnectionError):
        wait_out(broker_down, what="test", give_up_after_s=0, sleep=lambda s: None)
