"""Idempotent writes: ``Idempotency-Key`` on every API POST and PATCH (issue 19, item 3)."""

from __future__ import annotations

import time

import pytest
from django.core.cache import cache
from django.test import override_settings
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from rest_framework.test import APIClient, APIRequestFactory

from alerts import delivery
from alerts.models import AlertRule
from mlengine.models import Watch
from teams.api import idempotency
from tests.factories import api_key, make_alerts, make_personas, make_rule, make_source
from twiscope.redis import get_redis

pytestmark = pytest.mark.django_db


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    return client


def send(client: APIClient, method: str, path: str, body: dict, key: str | None):
    headers = {} if key is None else {idempotency.HEADER: key}
    return getattr(client, method.lower())(path, body, format="json", headers=headers)


@pytest.fixture
def world():
    get_redis().flushdb()
    cache.clear()
    personas = make_personas()
    source = make_source(personas.team)
    make_rule(personas.team, name="everything")
    Watch.objects.create(team=personas.team, name="storms", terms=["#blizzard"])
    return personas, source


def rule_body(personas, name: str = "storms") -> dict:
    return {"team": personas.team.id, "name": name, "terms": ["#blizzard"], "min_score": 5}


def test_a_retried_post_creates_one_object_and_returns_the_first_response(world) -> None:
    personas, _ = world
    owner = client_for(personas.owner)

    first = send(owner, "POST", "/api/rules/", rule_body(personas), "k-1")
    retry = send(owner, "POST", "/api/rules/", rule_body(personas), "k-1")

    assert first.status_code == retry.status_code == 201
    assert retry.content == first.content
    assert retry["Content-Type"] == first["Content-Type"]
    assert retry[idempotency.REPLAYED_HEADER] == "true"
    assert idempotency.REPLAYED_HEADER not in first
    assert AlertRule.objects.filter(name="storms").count() == 1


def test_a_json_body_is_compared_by_value_not_by_its_spelling(world) -> None:
    personas, _ = world
    owner = client_for(personas.owner)
    body = rule_body(personas)

    first = send(owner, "POST", "/api/rules/", body, "k-2")
    retry = send(owner, "POST", "/api/rules/", dict(reversed(body.items())), "k-2")

    assert retry.status_code == 201
    assert retry.content == first.content


def test_the_same_key_with_another_body_is_a_422_and_writes_nothing(world) -> None:
    personas, _ = world
    owner = client_for(personas.owner)

    send(owner, "POST", "/api/rules/", rule_body(personas), "k-3")
    other = send(owner, "POST", "/api/rules/", rule_body(personas, "floods"), "k-3")
    elsewhere = send(owner, "POST", "/api/watches/", {"name": "w", "terms": ["x"]}, "k-3")

    assert other.status_code == elsewhere.status_code == 422
    assert list(other.json()) == [idempotency.HEADER]
    assert not AlertRule.objects.filter(name="floods").exists()
    assert not Watch.objects.filter(name="w").exists()


def test_without_a_key_a_retry_runs_again(world) -> None:
    personas, _ = world
    owner = client_for(personas.owner)

    send(owner, "POST", "/api/rules/", rule_body(personas, "a"), None)
    again = send(owner, "POST", "/api/rules/", rule_body(personas, "a"), None)

    assert again.status_code == 400  # the name is taken now: the write ran again
    assert idempotency.REPLAYED_HEADER not in again
    assert AlertRule.objects.filter(name="a").count() == 1


def test_keys_are_kept_per_token(world) -> None:
    personas, _ = world
    owner = client_for(personas.owner)
    session = APIClient()
    session.force_login(personas.owner)
    outsider = client_for(personas.outsider)

    by_token = send(owner, "POST", "/api/rules/", rule_body(personas), "shared")
    by_session = send(session, "POST", "/api/rules/", rule_body(personas, "other"), "shared")
    theirs = send(
        outsider,
        "POST",
        "/api/rules/",
        {**rule_body(personas), "team": personas.other_team.id},
        "shared",
    )

    assert (by_token.status_code, by_session.status_code, theirs.status_code) == (201, 201, 201)
    assert idempotency.REPLAYED_HEADER not in theirs
    assert AlertRule.objects.filter(team=personas.other_team, name="storms").count() == 1
    assert AlertRule.objects.filter(team=personas.team, name__in=["storms", "other"]).count() == 2


def test_a_members_refused_write_is_not_kept_but_a_bad_body_is(world) -> None:
    personas, _ = world
    member = client_for(personas.member)
    rule = AlertRule.objects.get(name="everything")

    refused = send(member, "PATCH", f"/api/rules/{rule.id}/", {"severity": "critical"}, "m-1")
    again = send(member, "PATCH", f"/api/rules/{rule.id}/", {"severity": "critical"}, "m-1")
    bad = send(member, "POST", "/api/rules/", rule_body(personas), "m-2")
    bad_again = send(member, "POST", "/api/rules/", rule_body(personas), "m-2")

    assert (refused.status_code, again.status_code) == (403, 403)
    assert idempotency.REPLAYED_HEADER not in again
    assert (bad.status_code, bad_again.status_code) == (400, 400)
    assert bad_again[idempotency.REPLAYED_HEADER] == "true"
    assert bad_again.json() == bad.json()


def test_the_outsider_cannot_replay_the_owners_response(world) -> None:
    personas, _ = world
    rule = AlertRule.objects.get(name="everything")
    path = f"/api/rules/{rule.id}/"

    mine = send(client_for(personas.owner), "PATCH", path, {"severity": "critical"}, "o-1")
    theirs = send(client_for(personas.outsider), "PATCH", path, {"severity": "critical"}, "o-1")

    assert mine.status_code == 200
    assert theirs.status_code == 404
    assert idempotency.REPLAYED_HEADER not in theirs


def test_a_key_is_kept_24_hours(world) -> None:
    personas, _ = world
    send(client_for(personas.owner), "POST", "/api/rules/", rule_body(personas), "ttl")

    keys = list(get_redis().scan_iter(match="*idempotency:*"))

    assert len(keys) == 1
    assert 24 * 3600 - 60 < get_redis().ttl(keys[0]) <= 24 * 3600


def test_after_it_expires_the_key_writes_again(world) -> None:
    personas, _ = world
    owner = client_for(personas.owner)

    with override_settings(IDEMPOTENCY_TTL_S=1):
        send(owner, "POST", "/api/rules/", rule_body(personas), "short")
        time.sleep(1.5)
        again = send(owner, "POST", "/api/rules/", rule_body(personas, "storms-2"), "short")

    assert again.status_code == 201
    assert idempotency.REPLAYED_HEADER not in again


def test_a_duplicate_while_the_first_runs_is_a_409(world) -> None:
    personas, _ = world
    token = api_key(personas.owner)
    body = rule_body(personas)
    # The state the first request leaves while its view runs: the key claimed, pending.
    first = APIRequestFactory().post("/api/rules/", body, format="json")
    cache.add(
        idempotency.record_key(personas.owner.pk, f"Token {token}", "busy"),
        {"state": "pending", "fingerprint": idempotency._fingerprint(first)},
    )

    second = send(client_for(personas.owner), "POST", "/api/rules/", body, "busy")

    assert second.status_code == 409
    assert second["Retry-After"] == "1"
    assert "detail" in second.json()
    assert not AlertRule.objects.filter(name="storms").exists()


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "naïve"])
def test_a_bad_key_is_a_400_on_the_header(world, key: str) -> None:
    personas, _ = world

    response = send(client_for(personas.owner), "POST", "/api/rules/", rule_body(personas), key)

    assert response.status_code == 400
    assert list(response.json()) == [idempotency.HEADER]
    assert not AlertRule.objects.filter(name="storms").exists()


def test_a_key_of_255_characters_is_taken(world) -> None:
    personas, _ = world

    response = send(
        client_for(personas.owner), "POST", "/api/rules/", rule_body(personas), "k" * 255
    )

    assert response.status_code == 201


def _write_endpoints() -> list[tuple[str, URLPattern]]:
    """Every (method, URL pattern) under ``/api/`` that takes a POST or a PATCH, DRF view
    or plain Django view."""

    def walk(patterns, prefix: str = ""):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns, prefix + str(pattern.pattern))
            else:
                yield prefix, pattern

    found = []
    for prefix, pattern in walk(get_resolver().url_patterns):
        callback = pattern.callback
        if not prefix.startswith("api/") or "format" in pattern.pattern.regex.groupindex:
            continue  # not the API, or the same views again with a format suffix
        actions = getattr(callback, "actions", None)
        view_class = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
        for method in ("POST", "PATCH"):
            takes = (
                method.lower() in actions
                if actions is not None
                else view_class is not None and hasattr(view_class, method.lower())
            )
            if takes:
                found.append((method, pattern))
    return found


def test_every_post_and_patch_of_the_api_honours_a_key(world) -> None:
    personas, source = world
    owner = client_for(personas.owner)
    owned = {"source": source.id, "alertrule": AlertRule.objects.get(name="everything").id}
    owned["watch"] = Watch.objects.get(name="storms").id
    (owned["alert"],) = make_alerts(personas.team, 1)  # its lifecycle transitions
    owned["channel"] = delivery.save_channel(
        channel=None,
        data={
            "team": personas.team,
            "kind": "email",
            "name": "desk",
            "config": {"to": ["desk@example.org"]},
        },
    )[0].id
    endpoints = _write_endpoints()
    honoured = set()

    for method, pattern in endpoints:
        if not idempotency.honours(getattr(pattern.callback, "cls", None)):
            continue
        basename = pattern.name.split("-", 1)[0]
        kwargs = {"pk": owned[basename]} if "pk" in pattern.pattern.regex.groupindex else {}
        path = reverse(pattern.name, kwargs=kwargs)
        key = f"{method}-{path}"

        first = send(owner, method, path, {"name": ""}, key)
        retry = send(owner, method, path, {"name": ""}, key)
        changed = send(owner, method, path, {"name": "else"}, key)

        assert (retry.status_code, retry.content) == (first.status_code, first.content), path
        assert retry[idempotency.REPLAYED_HEADER] == "true", path
        assert changed.status_code == 422, path
        honoured.add((method, pattern.name))

    assert {(m, p.name) for m, p in endpoints} - honoured == {("POST", "webhook")}
    assert {("POST", "alertrule-list"), ("PATCH", "source-detail")} <= honoured
    assert {("POST", "watch-list"), ("PATCH", "watch-detail")} <= honoured
    assert {("POST", "alert-acknowledge"), ("POST", "channel-test")} <= honoured


def test_the_schema_documents_the_header_on_every_keyed_write() -> None:
    paths = APIClient().get("/api/schema/?format=json").json()["paths"]

    writes = [
        (path, method, operation)
        for path, item in paths.items()
        for method, operation in item.items()
        if method in ("post", "patch")
    ]

    assert len(writes) >= 7
    for path, method, operation in writes:
        headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
        keyed = idempotency.HEADER in headers
        assert keyed == (operation["operationId"] != "ingest_webhook"), (path, method)
        assert ({"409", "422"} <= set(operation["responses"])) == keyed, (path, method)
