"""API tokens: named, hashed at rest, revocable, optionally expiring, last use shown.

``/api/tokens/`` is the caller's own tokens (owner, member and outsider each see theirs
only: another's is a 404); the database holds a digest, never the secret; DRF's old
plaintext keys are carried over by migration ``teams.0003`` and keep working.
"""

from __future__ import annotations

import hashlib
import importlib
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from teams import services
from teams.models import ApiToken
from tests.factories import Personas, api_key, as_user, make_personas, token_client

pytestmark = pytest.mark.django_db

migration = importlib.import_module("teams.migrations.0003_hash_plaintext_tokens")


@pytest.fixture
def personas(clean_redis: None) -> Personas:
    return make_personas()


def test_a_created_token_is_shown_once_and_opens_the_api(personas: Personas) -> None:
    owner = as_user(personas.owner)

    created = owner.post("/api/tokens/", {"name": "grafana"}, format="json")
    listed = owner.get("/api/tokens/").json()["results"]

    body = created.json()
    assert created.status_code == 201
    assert body["token"].startswith("tws_") and len(body["token"]) == 68
    assert body["prefix"] == body["token"][:15] and body["name"] == "grafana"
    assert body["expires"] is None and body["last_used"] is None
    assert [t["name"] for t in listed] == ["grafana", "tests"]
    assert all("token" not in t and "digest" not in t for t in listed)
    assert token_client(body["token"]).get("/api/alerts/").status_code == 200


def test_the_database_holds_a_digest_never_the_secret(personas: Personas) -> None:
    key = as_user(personas.member).post("/api/tokens/", {"name": "ci"}, format="json")
    secret = key.json()["token"]

    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM teams_apitoken")
        stored = " ".join(str(value) for row in cursor.fetchall() for value in row)

    assert secret not in stored
    assert hashlib.sha512(secret.encode()).hexdigest() in stored


@pytest.mark.parametrize("persona", ["member", "outsider"])
def test_a_user_can_neither_see_nor_revoke_anothers_token(personas: Personas, persona: str) -> None:
    owners = ApiToken.objects.get(user=personas.owner)
    other = as_user(getattr(personas, persona))

    listed = other.get("/api/tokens/").json()["results"]
    shown = other.get(f"/api/tokens/{owners.id}/")
    revoked = other.delete(f"/api/tokens/{owners.id}/")

    assert owners.id not in [t["id"] for t in listed]
    assert shown.status_code == 404 and revoked.status_code == 404
    assert ApiToken.objects.filter(pk=owners.pk).exists()


def test_revoking_a_token_refuses_it_at_once(personas: Personas) -> None:
    owner = as_user(personas.owner)
    made = owner.post("/api/tokens/", {"name": "short-lived"}, format="json").json()
    other = token_client(made["token"])
    assert other.get("/api/alerts/").status_code == 200

    revoked = owner.delete(f"/api/tokens/{made['id']}/")

    assert revoked.status_code == 204
    assert other.get("/api/alerts/").status_code == 401
    assert owner.get("/api/alerts/").status_code == 200


def test_a_token_can_revoke_itself(personas: Personas) -> None:
    me = ApiToken.objects.get(user=personas.member)

    assert as_user(personas.member).delete(f"/api/tokens/{me.id}/").status_code == 204
    assert as_user(personas.member).get("/api/tokens/").status_code == 401


def test_an_expiring_token_works_until_it_expires_and_is_then_refused(
    personas: Personas,
) -> None:
    expires = timezone.now() + timedelta(days=7)
    made = (
        as_user(personas.owner)
        .post("/api/tokens/", {"name": "week", "expires": expires.isoformat()}, format="json")
        .json()
    )
    client = token_client(made["token"])
    assert made["expires"] is not None
    assert client.get("/api/alerts/").status_code == 200

    ApiToken.objects.filter(pk=made["id"]).update(expiry=timezone.now() - timedelta(seconds=1))

    assert client.get("/api/alerts/").status_code == 401
    assert ApiToken.objects.filter(pk=made["id"]).exists()  # still listed, until revoked


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "past", "expires": "2000-01-01T00:00:00Z"}, "expires"),
        ({"name": "far", "expires": "9999-01-01T00:00:00Z"}, "expires"),
    ],
)
def test_a_bad_name_or_expiry_is_a_field_error(
    personas: Personas, body: dict[str, str], field: str
) -> None:
    response = as_user(personas.owner).post("/api/tokens/", body, format="json")

    assert response.status_code == 400 and field in response.json()


def test_last_used_is_written_at_most_once_a_minute(
    personas: Personas, django_assert_num_queries: Any
) -> None:
    token = ApiToken.objects.get(user=personas.member)
    start = timezone.now()

    first = services.authenticate_token(api_key(personas.member), now=start)
    with django_assert_num_queries(1):  # the lookup, no UPDATE
        services.authenticate_token(api_key(personas.member), now=start + timedelta(seconds=59))
    services.authenticate_token(api_key(personas.member), now=start + timedelta(seconds=61))

    token.refresh_from_db()
    assert first is not None and token.last_used_at == start + timedelta(seconds=61)


def test_the_list_shows_last_used(personas: Personas) -> None:
    client = as_user(personas.member)
    client.get("/api/alerts/")

    listed = client.get("/api/tokens/").json()["results"]

    assert listed[0]["last_used"] is not None


def test_an_inactive_users_token_is_refused(personas: Personas) -> None:
    personas.member.is_active = False
    personas.member.save(update_fields=["is_active"])

    assert as_user(personas.member).get("/api/alerts/").status_code == 401


# --- The old plaintext keys -------------------------------------------------------------


@pytest.fixture
def old_token_table() -> None:
    """``authtoken_token`` as rest_framework.authtoken left it (on a new database the
    app is gone and so is its table)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS authtoken_token (key varchar(40) PRIMARY KEY, "
            "created timestamptz NOT NULL, user_id integer NOT NULL UNIQUE)"
        )


def test_an_old_plaintext_key_keeps_working_after_the_migration_and_is_gone_from_the_db(
    personas: Personas, old_token_table: None
) -> None:
    old_key = "9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b"
    created = timezone.now() - timedelta(days=300)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO authtoken_token (key, created, user_id) VALUES (%s, %s, %s)",
            [old_key, created, personas.outsider.pk],
        )

    from django.apps import apps

    with connection.schema_editor() as editor:
        carried = migration.hash_plaintext_tokens(apps, editor)
        again = migration.hash_plaintext_tokens(apps, editor)

    token = ApiToken.objects.get(name=migration.MIGRATED_NAME)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM authtoken_token")
        left = cursor.fetchone()[0]
    assert (carried, again, left) == (1, 0, 0)
    assert token.user_id == personas.outsider.pk and token.created == created
    assert token.token_key == old_key[:15] and old_key not in token.digest
    assert token_client(old_key).get("/api/alerts/").status_code == 200


def test_the_admin_lists_tokens_without_secrets_and_adds_none(personas: Personas) -> None:
    from django.contrib.auth import get_user_model

    admin_user = get_user_model().objects.create_superuser("root", password="pw-root-123")
    client = Client()
    client.force_login(admin_user)
    token = ApiToken.objects.get(user=personas.owner)

    page = client.get(reverse("admin:teams_apitoken_changelist")).content.decode()
    detail = client.get(reverse("admin:teams_apitoken_change", args=[token.id])).content.decode()

    assert token.token_key in page and token.digest not in page + detail
    assert api_key(personas.owner) not in page + detail
    assert client.get(reverse("admin:teams_apitoken_add")).status_code == 403
