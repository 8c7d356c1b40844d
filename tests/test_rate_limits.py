"""Rate limits: per caller and scope (read, write, search, export), one throttle for
every view, IETF RateLimit headers, JSON 429s with Retry-After; login throttling; the
production security settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client, override_settings
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory
from rest_framework.views import APIView

from teams.api.throttling import ApiRateThrottle, scope_for
from tests.factories import Personas, as_user, make_personas, token_client
from twiscope import ratelimit

pytestmark = pytest.mark.django_db


@pytest.fixture
def personas(clean_redis: None) -> Personas:
    return make_personas()


# --- Every endpoint, its scope ----------------------------------------------------------


def _routes(patterns: list[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from _routes(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern), entry.callback


def _api_routes() -> list[tuple[str, Any]]:
    return [
        (route, callback)
        for route, callback in _routes(get_resolver().url_patterns)
        if isinstance(getattr(callback, "cls", None), type) and issubclass(callback.cls, APIView)
    ]


def _expected(method: str, action: str | None, query: dict[str, str]) -> str:
    if action == "export":
        return "export"
    if method not in ("GET", "HEAD", "OPTIONS"):
        return "write"
    return "search" if query.get("q") else "read"


def test_the_url_map_has_api_views_and_every_one_is_throttled_by_the_one_class() -> None:
    routes = _api_routes()

    assert len(routes) > 20
    unthrottled = [r for r, cb in routes if list(cb.cls.throttle_classes) != [ApiRateThrottle]]
    assert unthrottled == []


def test_every_endpoint_and_method_spends_the_expected_scope() -> None:
    factory = APIRequestFactory()
    seen: dict[str, set[str]] = {}
    for route, callback in _api_routes():
        actions: dict[str, str] = getattr(callback, "actions", None) or {
            m: m for m in callback.cls.http_method_names if hasattr(callback.cls, m)
        }
        for method, action in actions.items():
            for query in ({}, {"q": "flight"}):
                path = "/x/?q=flight" if query else "/x/"
                request = Request(getattr(factory, method)(path))
                view = callback.cls(**getattr(callback, "initkwargs", {}))
                view.action = action
                scope = scope_for(request, view)
                assert scope == _expected(method.upper(), action, query), (route, method, query)
                seen.setdefault(scope, set()).add(route)

    assert set(seen) == {"read", "write", "search", "export"}
    assert any("export" in route for route in seen["export"])


# --- Counting, headers, 429 -------------------------------------------------------------


@override_settings(API_RATE_READ="3/min")
def test_a_caller_past_the_read_limit_gets_a_json_429_with_retry_after(
    personas: Personas,
) -> None:
    client = as_user(personas.member)

    answers = [client.get("/api/alerts/") for _ in range(4)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a["RateLimit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert all(a["RateLimit-Limit"] == "3" for a in answers)
    assert all(1 <= int(a["RateLimit-Reset"]) <= 60 for a in answers)
    refused = answers[-1]
    assert refused["Content-Type"] == "application/json"
    assert "throttled" in refused.json()["detail"]
    assert 1 <= int(refused["Retry-After"]) <= 60


@override_settings(API_RATE_READ="2/min", API_RATE_SEARCH="5/min")
def test_search_has_its_own_budget_and_each_token_its_own(personas: Personas) -> None:
    from teams import services

    client = as_user(personas.member)
    _token, second_key = services.create_token(user=personas.member, name="second")
    second = token_client(second_key)

    reads = [client.get("/api/alerts/").status_code for _ in range(3)]
    search = client.get("/api/events/", {"q": "storm"})
    other_token = second.get("/api/alerts/")

    assert reads == [200, 200, 429]
    assert search.status_code == 200 and search["RateLimit-Limit"] == "5"
    assert other_token.status_code == 200 and other_token["RateLimit-Remaining"] == "1"


@override_settings(API_RATE_WRITE="1/min", API_RATE_READ="100/min")
def test_writes_have_their_own_budget(personas: Personas) -> None:
    client = as_user(personas.owner)

    first = client.post("/api/tokens/", {"name": "a"}, format="json")
    second = client.post("/api/tokens/", {"name": "b"}, format="json")
    read = client.get("/api/tokens/")

    assert (first.status_code, second.status_code, read.status_code) == (201, 429, 200)
    assert read["RateLimit-Limit"] == "100"


@override_settings(API_RATE_EXPORT="1/min")
def test_exports_have_their_own_budget(personas: Personas) -> None:
    client = as_user(personas.member)

    first = client.get("/api/events/export/", {"format": "csv"})
    b"".join(first.streaming_content)
    second = client.get("/api/events/export/", {"format": "csv"})

    assert (first.status_code, second.status_code) == (200, 429)
    assert first["RateLimit-Limit"] == "1"


def test_a_request_refused_for_bad_credentials_spends_nothing(personas: Personas) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token nope")

    response = client.get("/api/alerts/")

    assert response.status_code == 401 and "RateLimit-Limit" not in response


def test_concurrent_hits_are_each_counted_once(clean_redis: None) -> None:
    rate = ratelimit.Rate(limit=10_000, window_s=3600)
    now = 1_700_000_000.0

    def hammer() -> None:
        for _ in range(50):
            ratelimit.hit("test:concurrent", rate, now=now)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert ratelimit.peek("test:concurrent", rate, now=now).count == 400


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("1000/min", ratelimit.Rate(1000, 60)),
        ("10/s", ratelimit.Rate(10, 1)),
        ("5000/hour", ratelimit.Rate(5000, 3600)),
        ("100/day", ratelimit.Rate(100, 86400)),
        ("10/15min", ratelimit.Rate(10, 900)),
    ],
)
def test_rates_are_drfs_strings_with_an_optional_multiple(text: str, rate: ratelimit.Rate) -> None:
    assert ratelimit.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "10", "ten/min", "0/min", "10/0m", "10/week"])
def test_a_malformed_rate_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ratelimit.parse_rate(text)


# --- Login ------------------------------------------------------------------------------


def _login(client: Client, username: str, password: str, ip: str = "10.0.0.1") -> Any:
    return client.post(
        reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip
    )


@override_settings(LOGIN_RATE_USERNAME="3/15min", LOGIN_RATE_IP="100/15min")
def test_after_too_many_failures_even_the_right_password_is_refused_with_429(
    personas: Personas,
) -> None:
    client = Client()
    failures = [_login(client, "olga", "wrong").status_code for _ in range(3)]

    refused = _login(client, "olga", "pw-olga")
    other_user = _login(Client(), "mika", "pw-mika")

    assert failures == [200, 200, 200]
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert "Too many failed logins" in refused.content.decode()
    assert other_user.status_code == 302


@override_settings(LOGIN_RATE_USERNAME="100/15min", LOGIN_RATE_IP="3/15min")
def test_one_address_failing_on_many_usernames_is_throttled(personas: Personas) -> None:
    client = Client()
    for name in ("a", "b", "c"):
        _login(client, name, "wrong", ip="10.9.9.9")

    from_there = _login(client, "olga", "pw-olga", ip="10.9.9.9")
    from_elsewhere = _login(Client(), "olga", "pw-olga", ip="10.1.1.1")

    assert from_there.status_code == 429 and from_elsewhere.status_code == 302


@override_settings(LOGIN_RATE_USERNAME="3/15min", LOGIN_RATE_IP="100/15min")
def test_a_successful_login_clears_its_usernames_failures(personas: Personas) -> None:
    client = Client()
    _login(client, "olga", "wrong")
    _login(client, "olga", "wrong")
    assert _login(client, "olga", "pw-olga").status_code == 302

    again = [_login(Client(), "olga", "wrong").status_code for _ in range(2)]

    assert again == [200, 200] and _login(Client(), "olga", "pw-olga").status_code == 302


@override_settings(LOGIN_RATE_USERNAME="2/15min", LOGIN_RATE_IP="100/15min")
def test_the_admin_login_is_throttled_too(personas: Personas) -> None:
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_superuser("root", password="pw-root-123")
    client = Client()
    for _ in range(2):
        client.post(reverse("admin:login"), {"username": "root", "password": "wrong"})

    response = client.post(reverse("admin:login"), {"username": "root", "password": "pw-root-123"})

    assert response.status_code == 200  # the form again: not logged in
    assert "_auth_user_id" not in client.session


# --- Production settings ----------------------------------------------------------------


def test_check_deploy_passes_in_a_production_configured_environment() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SECURE_"))},
        "DJANGO_SETTINGS_MODULE": "twiscope.settings",
        "TWISCOPE_ENV": "production",
        "SECRET_KEY": "a-production-secret-key-of-more-than-fifty-characters-7f3b9c2e1d",
        "TWISCOPE_CREDENTIAL_KEYS": "fgkM0nvC2zbtQ6cKOS0kD7RzfCnwaVl8n0v9i0pRkZ8=",
        "ALLOWED_HOSTS": "twiscope.example.com",
        "SECURE_HSTS_PRELOAD": "true",
        "TRUSTED_PROXY_HOPS": "1",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_the_production_settings_hold_hsts_secure_cookies_and_the_proxy_header() -> None:
    code = (
        "from django.conf import settings as s; "
        "print(s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_SSL_REDIRECT,"
        " s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_PROXY_SSL_HEADER)"
    )
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SECURE_"))},
        "DJANGO_SETTINGS_MODULE": "twiscope.settings",
        "TWISCOPE_ENV": "production",
        "SECRET_KEY": "a-production-secret-key-of-more-than-fifty-characters-7f3b9c2e1d",
        "TWISCOPE_CREDENTIAL_KEYS": "fgkM0nvC2zbtQ6cKOS0kD7RzfCnwaVl8n0v9i0pRkZ8=",
    }

    def read(**extra: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", f"import django; django.setup(); {code}"],
            env={**base, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()

    assert read() == "31536000 True True True True None"
    assert read(TRUSTED_PROXY_HOPS="1").endswith("('HTTP_X_FORWARDED_PROTO', 'https')")
    assert read(SECURE_SSL_REDIRECT="false", SECURE_HSTS_SECONDS="0").startswith("0 True False")
