"""``manage.py bootstrap_demo``, which every ``make run`` runs: the demo login is made
once and then left alone.

The analyst logs in on the dashboard (a real session), ``make run`` is started again,
and the session must still be good; a password changed with ``changepassword`` must
stay changed, and the banner must not show the old one.
"""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from teams.models import Membership, Team

pytestmark = pytest.mark.django_db


def bootstrap(run_dir: Path) -> dict[str, Any]:
    """Run the command as ``make run`` does; return its last stdout line's JSON."""
    out = io.StringIO()
    call_command("bootstrap_demo", "--run-dir", str(run_dir), stdout=out)
    result: dict[str, Any] = json.loads(out.getvalue().splitlines()[-1])
    return result


def _log_in(client: Client, password: str) -> None:
    response = client.post(reverse("login"), {"username": "demo", "password": password})
    assert response.status_code == 302, response.content.decode()[:500]


def _dashboard_status(client: Client) -> int:
    return client.get(reverse("dashboard:home")).status_code


def test_the_first_run_creates_the_demo_login_the_team_and_the_token_files(
    tmp_path: Path,
) -> None:
    first = bootstrap(tmp_path)
    password = (tmp_path / "demo-password").read_text().strip()
    team = Team.objects.get(slug="demo")

    assert first["username"] == "demo" and first["team"] == "demo"
    assert first["password"] == password
    assert (tmp_path / "api-token").read_text().strip() == first["token"]
    assert stat.S_IMODE((tmp_path / "demo-password").stat().st_mode) == 0o600
    assert Membership.objects.get(team=team, user__username="demo").role == "owner"
    assert get_user_model().objects.get(username="demo").check_password(password)


def test_a_second_run_keeps_the_analyst_logged_in(tmp_path: Path, client: Client) -> None:
    first = bootstrap(tmp_path)
    _log_in(client, first["password"])
    hashed = get_user_model().objects.get(username="demo").password

    second = bootstrap(tmp_path)

    assert get_user_model().objects.get(username="demo").password == hashed
    assert _dashboard_status(client) == 200
    assert second == first


def test_a_changed_password_stays_changed_and_is_not_announced(
    tmp_path: Path, client: Client
) -> None:
    bootstrap(tmp_path)
    user = get_user_model().objects.get(username="demo")
    user.set_password("chosen-by-the-analyst-42")
    user.save()
    _log_in(client, "chosen-by-the-analyst-42")

    again = bootstrap(tmp_path)

    assert again["password"] is None
    assert get_user_model().objects.get(username="demo").check_password("chosen-by-the-analyst-42")
    assert _dashboard_status(client) == 200


def test_a_demo_user_without_a_usable_password_gets_the_kept_one(tmp_path: Path) -> None:
    get_user_model().objects.create_user("demo")  # e.g. made by `create_user demo`

    result = bootstrap(tmp_path)

    assert result["password"] == (tmp_path / "demo-password").read_text().strip()
    assert get_user_model().objects.get(username="demo").check_password(result["password"])


def test_a_revoked_demo_token_is_replaced_and_the_file_holds_a_working_one(
    tmp_path: Path,
) -> None:
    from rest_framework.test import APIClient

    from teams.models import ApiToken

    first = bootstrap(tmp_path)
    ApiToken.objects.filter(user__username="demo").delete()

    second = bootstrap(tmp_path)

    assert second["token"] != first["token"]
    assert (tmp_path / "api-token").read_text().strip() == second["token"]
    assert stat.S_IMODE((tmp_path / "api-token").stat().st_mode) == 0o600
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {second['token']}")
    assert client.get("/api/alerts/").status_code == 200
    assert ApiToken.objects.filter(user__username="demo").count() == 1
