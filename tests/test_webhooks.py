"""Sources managed through the API (owners write, members read, credentials sealed) and
the signed webhook intake, end to end through a real Celery worker and PostgreSQL."""

from __future__ import annotations

import json
import time

import pytest
from cryptography.fernet import Fernet
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from ingest import credentials, webhooks
from ingest.models import Event, Source
from tests.factories import api_key, make_personas, make_source

pytestmark = pytest.mark.django_db(transaction=True)


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    return client


def item(n: int, **changes) -> dict:
    base = {
        "external_id": f"wh-{n}",
        "created_at": f"2026-11-30T10:{n % 60:02d}:00+00:00",
        "text": f"signed post number {n} #webhook",
        "author": {"id": f"a{n % 7}", "handle": f"sender{n % 7}", "followers": 10},
    }
    return {**base, **changes}


def post_signed(source_id: int, payload, *, secret: str, timestamp: int | None = None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sent = int(time.time()) if timestamp is None else timestamp
    return APIClient().post(
        f"/api/ingest/webhooks/{source_id}/",
        data=body,
        content_type="application/json",
        HTTP_X_TWISCOPE_TIMESTAMP=str(sent),
        HTTP_X_TWISCOPE_SIGNATURE=webhooks.sign(secret, sent, body),
    )


def stored_ids(source_id: int, expected: int, timeout_s: float = 30) -> list[str]:
    """External ids of the source's stored events, once there are ``expected``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ids = list(Event.objects.filter(source_id=source_id).values_list("external_id", flat=True))
        if len(ids) >= expected:
            return sorted(ids)
        time.sleep(0.1)
    raise AssertionError(f"fewer than {expected} events stored after {timeout_s} s")


@pytest.fixture
def personas():
    return make_personas()


def create_webhook(personas, name: str = "partner feed") -> dict:
    # No ``team``: the owner's only team.
    response = client_for(personas.owner).post(
        "/api/sources/", {"kind": "webhook", "name": name, "config": {}}, format="json"
    )
    assert response.status_code == 201, response.json()
    return response.json()


def test_a_webhook_source_shows_its_secret_once_and_stores_it_sealed(personas) -> None:
    created = create_webhook(personas)

    secret = created["secret"]
    assert created["team"] == personas.team.id
    assert len(secret) >= 40
    assert created["state"] == "running"
    listed = client_for(personas.member).get(f"/api/sources/{created['id']}/").json()
    assert "secret" not in listed and "credentials" not in listed
    stored = Source.objects.get(id=created["id"]).credentials
    assert secret not in stored
    assert credentials.unseal(stored) == {"secret": secret}


def test_members_read_owners_write_and_other_teams_see_nothing(personas) -> None:
    created = create_webhook(personas)
    member, outsider = client_for(personas.member), client_for(personas.outsider)

    refused = member.post(
        "/api/sources/",
        {"team": personas.team.id, "kind": "webhook", "name": "mine"},
        format="json",
    )
    assert refused.status_code == 400  # the member owns no team: not a valid choice
    assert refused.json()["team"]
    assert member.patch(f"/api/sources/{created['id']}/", {"enabled": False}).status_code == 403
    assert outsider.get(f"/api/sources/{created['id']}/").status_code == 404
    assert outsider.delete(f"/api/sources/{created['id']}/").status_code == 404
    into_theirs = outsider.post(
        "/api/sources/",
        {"team": personas.team.id, "kind": "webhook", "name": "sneaky"},
        format="json",
    )
    assert into_theirs.status_code == 400
    assert Source.objects.filter(name="sneaky").count() == 0
    no_team = member.post("/api/sources/", {"kind": "webhook", "name": "x"}, format="json")
    assert no_team.json() == {"team": ["you own no team"]}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"kind": "carrier-pigeon", "name": "x"}, "kind"),
        ({"kind": "replay", "name": "x"}, "kind"),  # made by manage.py replay only
        ({"kind": "webhook", "name": "x", "config": {"url": "http://example.org"}}, "config"),
        ({"kind": "webhook", "name": "x", "credentials": {"secret": "mine"}}, "credentials"),
        ({"kind": "webhook", "name": ""}, "name"),
        ({"kind": "webhook", "name": "x", "config": ["not", "an", "object"]}, "config"),
    ],
)
def test_a_bad_source_answers_400_naming_the_field(personas, payload, field) -> None:
    response = client_for(personas.owner).post(
        "/api/sources/", {"team": personas.team.id, **payload}, format="json"
    )

    assert response.status_code == 400
    assert field in response.json()


def test_a_second_source_of_the_same_name_is_refused(personas) -> None:
    create_webhook(personas, name="twin")
    response = client_for(personas.owner).post(
        "/api/sources/",
        {"team": personas.team.id, "kind": "webhook", "name": "twin"},
        format="json",
    )

    assert response.status_code == 400
    assert "name" in response.json()


def test_owners_edit_disable_and_delete_and_kind_is_fixed(personas) -> None:
    created = create_webhook(personas)
    owner = client_for(personas.owner)
    url = f"/api/sources/{created['id']}/"
    Source.objects.filter(id=created["id"]).update(
        last_error="401 from the sender", error_permanent=True
    )
    assert owner.get(url).json()["state"] == "failing"

    renamed = owner.patch(url, {"name": "partner feed (EU)"}, format="json")
    assert renamed.status_code == 200
    assert renamed.json()["name"] == "partner feed (EU)"
    assert renamed.json()["state"] == "running"  # editing clears the failure
    assert owner.patch(url, {"kind": "rss"}, format="json").status_code == 400
    assert owner.patch(url, {"enabled": False}, format="json").json()["state"] == "disabled"
    assert owner.delete(url).status_code == 204
    assert not Source.objects.filter(id=created["id"]).exists()


def test_a_signed_batch_keeps_its_valid_items_and_a_resend_is_duplicates(
    personas, celery_worker
) -> None:
    created = create_webhook(personas)
    source_id, secret = created["id"], created["secret"]
    batch = [
        item(1),
        item(2),
        {"text": "no id, no time"},
        item(3, created_at="2026-11-30T10:00:00"),  # no UTC offset
        item(4),
        "not an object",
    ]

    first = post_signed(source_id, batch, secret=secret)
    assert first.status_code == 202, first.json()
    assert first.json()["accepted"] == 3
    assert first.json()["duplicates"] == 0
    errors = first.json()["errors"]
    assert set(errors) == {"2", "3", "5"}
    assert "external_id" in errors["2"]
    assert "created_at" in errors["3"]
    assert stored_ids(source_id, 3) == ["wh-1", "wh-2", "wh-4"]

    again = post_signed(source_id, [item(1), item(2), item(4), item(5), item(5)], secret=secret)
    assert again.status_code == 202
    assert again.json() == {"accepted": 1, "duplicates": 4, "errors": {}}
    assert stored_ids(source_id, 4) == ["wh-1", "wh-2", "wh-4", "wh-5"]
    shown = client_for(personas.member).get(f"/api/sources/{source_id}/").json()
    assert shown["events_last_hour"] == 4
    listed = client_for(personas.member).get(f"/api/events/?source={source_id}").json()
    assert sorted(e["external_id"] for e in listed["results"]) == ["wh-1", "wh-2", "wh-4", "wh-5"]

    single = post_signed(source_id, item(6), secret=secret)  # one object, not a list
    assert single.json()["accepted"] == 1


def test_a_wrong_secret_a_stale_or_missing_signature_is_401(personas, clean_redis) -> None:
    created = create_webhook(personas)
    source_id, secret = created["id"], created["secret"]

    assert post_signed(source_id, [item(1)], secret="not-the-secret").status_code == 401
    stale = post_signed(source_id, [item(1)], secret=secret, timestamp=int(time.time()) - 301)
    assert stale.status_code == 401
    assert "300" in stale.json()["detail"]
    unsigned = APIClient().post(f"/api/ingest/webhooks/{source_id}/", [item(1)], format="json")
    assert unsigned.status_code == 401
    # The signature covers the exact bytes: a body changed after signing is refused.
    sent = int(time.time())
    body = json.dumps([item(1)]).encode()
    tampered = APIClient().post(
        f"/api/ingest/webhooks/{source_id}/",
        data=body.replace(b"signed post", b"forged post"),
        content_type="application/json",
        HTTP_X_TWISCOPE_TIMESTAMP=str(sent),
        HTTP_X_TWISCOPE_SIGNATURE=webhooks.sign(secret, sent, body),
    )
    assert tampered.status_code == 401
    assert Event.objects.count() == 0


def test_bad_bodies_and_unknown_sources(personas, clean_redis) -> None:
    created = create_webhook(personas)
    source_id, secret = created["id"], created["secret"]

    none_valid = post_signed(source_id, [{"text": "x"}, 42], secret=secret)
    assert none_valid.status_code == 400
    assert set(none_valid.json()["errors"]) == {"0", "1"}
    assert post_signed(source_id, b"{not json", secret=secret).status_code == 400
    assert post_signed(source_id, [], secret=secret).status_code == 400
    too_many = [item(n) for n in range(1001)]
    assert post_signed(source_id, too_many, secret=secret).status_code == 413
    huge = [item(1, text="x" * 1_100_000)]
    assert post_signed(source_id, huge, secret=secret).status_code == 413
    replay = make_source(personas.team, name="an archive")
    assert post_signed(replay.id, [item(1)], secret=secret).status_code == 404
    assert post_signed(999_999, [item(1)], secret=secret).status_code == 404
    Source.objects.filter(id=source_id).update(enabled=False)
    assert post_signed(source_id, [item(1)], secret=secret).status_code == 409
    assert Event.objects.count() == 0


def test_credentials_survive_a_key_rotation() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with override_settings(CREDENTIAL_KEYS=[old]):
        token = credentials.seal({"bearer_token": "AAAA-secret"})
    assert "AAAA-secret" not in token
    with override_settings(CREDENTIAL_KEYS=[new, old]):
        assert credentials.unseal(token) == {"bearer_token": "AAAA-secret"}
        rotated = credentials.rotate(token)
    with override_settings(CREDENTIAL_KEYS=[new]):
        assert credentials.unseal(rotated) == {"bearer_token": "AAAA-secret"}
        with pytest.raises(credentials.CredentialsError):
            credentials.unseal(token)


def test_the_webhook_is_in_the_openapi_schema(personas) -> None:
    schema = client_for(personas.member).get("/api/schema/?format=json").json()

    operation = schema["paths"]["/api/ingest/webhooks/{source_id}/"]["post"]
    headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
    assert headers == {"X-Twiscope-Timestamp", "X-Twiscope-Signature"}
    assert {"202", "400", "401", "413"} <= set(operation["responses"])


# --- fuzzing: whatever a sender posts, the endpoint answers, never a 5xx ---------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)
FIELDS = st.sampled_from(
    ["external_id", "created_at", "text", "author", "lang", "url", "metrics", "raw", "reply_to"]
)
NEAR_ENVELOPE = st.dictionaries(FIELDS, JSON, max_size=9).map(
    lambda item: {"external_id": "fz", "created_at": "2026-11-30T10:00:00+00:00", **item}
)
BODIES = st.one_of(
    JSON.map(lambda value: json.dumps(value).encode()),
    st.lists(NEAR_ENVELOPE, min_size=1, max_size=5).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)


@settings(
    max_examples=150,
    deadline=None,
    # The source is shared by the examples on purpose.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=BODIES, skew=st.sampled_from([0, 0, 0, -400, 400]), sign=st.booleans())
def test_fuzzed_webhook_requests_never_get_a_5xx(fuzz_source, body: bytes, skew, sign) -> None:
    source_id, secret = fuzz_source
    sent = int(time.time()) + skew
    response = APIClient().post(
        f"/api/ingest/webhooks/{source_id}/",
        data=body,
        content_type="application/json",
        HTTP_X_TWISCOPE_TIMESTAMP=str(sent),
        HTTP_X_TWISCOPE_SIGNATURE=webhooks.sign(secret if sign else "wrong", sent, body),
    )

    assert response.status_code in (202, 400, 401, 413), (response.status_code, body[:200])
    answer = response.json()
    if response.status_code == 202:
        assert answer["accepted"] + answer["duplicates"] >= 1
    elif response.status_code == 400:
        assert answer.get("errors") or answer.get("detail")


@pytest.fixture
def fuzz_source(personas, clean_redis) -> tuple[int, str]:
    """One webhook source for every fuzzed request of the test."""
    created = create_webhook(personas, name="fuzz target")
    return created["id"], created["secret"]
