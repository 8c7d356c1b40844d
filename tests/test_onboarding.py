"""``manage.py create_user``: a user in a team with an API token, without a shell.

The write is ``teams.services.onboard_user``; these tests run the command as an
operator would and read the rows it left.
"""

from __future__ import annotations

import io
import logging

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from teams.models import ApiToken, Membership, Team
from tests.factories import api_key, make_team, make_user

pytestmark = pytest.mark.django_db


def create_user(*args: str) -> list[str]:
    """Run the command; return its stdout lines."""
    out = io.StringIO()
    call_command("create_user", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue().splitlines()


@pytest.fixture
def team() -> Team:
    return make_team("newsroom")


def test_it_creates_the_user_the_membership_and_a_token_and_prints_the_token_last(
    team: Team,
) -> None:
    lines = create_user("ana", "--team", "newsroom", "--email", "ana@example.com")
    user = get_user_model().objects.get(username="ana")

    token = ApiToken.objects.get(user=user)
    assert lines[-1].startswith("tws_") and lines[-1][:15] == token.token_key
    assert token.name == "default"
    assert Membership.objects.get(user=user, team=team).role == "member"
    assert user.email == "ana@example.com"
    assert "created user ana" in lines
    assert 'added ana to team "Newsroom" (newsroom) as member' in lines


def test_its_output_is_the_human_lines_only_no_log_records(
    team: Team, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        lines = create_user("ana", "--team", "newsroom", "--create-team", "Newsroom")

    assert caplog.records == []
    assert lines[:2] == ["created user ana", 'added ana to team "Newsroom" (newsroom) as member']
    assert logging.getLogger("teams").isEnabledFor(logging.INFO)  # silenced only while it ran


def test_verbosity_2_shows_the_log_records_too(
    team: Team, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        create_user("ana", "--team", "newsroom", "--verbosity", "2")

    assert "teams.user_created" in caplog.text


def test_a_new_user_has_no_password_and_is_told_how_to_set_one(team: Team) -> None:
    lines = create_user("ana", "--team", "newsroom")

    assert not get_user_model().objects.get(username="ana").has_usable_password()
    assert any("python manage.py changepassword ana" in line for line in lines)


def test_the_printed_token_opens_the_api_for_the_team(team: Team) -> None:
    token = create_user("ana", "--team", "newsroom", "--role", "owner")[-1]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")

    response = client.get("/api/rules/")

    assert response.status_code == 200


def test_running_it_again_changes_nothing_and_prints_no_token(team: Team) -> None:
    first = create_user("ana", "--team", "newsroom", "--role", "owner")

    second = create_user("ana", "--team", "newsroom")

    assert first[-1].startswith("tws_") and first[-1] not in "\n".join(second)
    assert 'ana is already owner in team "Newsroom" (newsroom)' in second
    assert "found user ana" in second
    assert get_user_model().objects.filter(username="ana").count() == 1
    assert Membership.objects.get().role == "owner"
    assert ApiToken.objects.count() == 1


def test_an_existing_user_keeps_their_password_and_token(team: Team) -> None:
    user = make_user("olga")

    lines = create_user("olga", "--team", "newsroom")
    user.refresh_from_db()

    assert lines[-1].startswith("olga holds 1 API token(s)")
    assert user.check_password("pw-olga")
    assert not any("changepassword" in line for line in lines)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    assert client.get("/api/alerts/").status_code == 200


def test_token_name_creates_a_named_token_each_time_and_prints_it_last(team: Team) -> None:
    make_user("olga")

    first = create_user("olga", "--team", "newsroom", "--token-name", "ci")
    second = create_user("olga", "--team", "newsroom", "--token-name", "grafana")

    assert first[-1] != second[-1]
    names = set(ApiToken.objects.filter(user__username="olga").values_list("name", flat=True))
    assert names == {"tests", "ci", "grafana"}
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {second[-1]}")
    assert client.get("/api/tokens/").status_code == 200


def test_tokens_list_shows_no_secret_and_tokens_revoke_ends_a_token(team: Team) -> None:
    key = create_user("ana", "--team", "newsroom", "--token-name", "ci")[-1]
    token = ApiToken.objects.get(user__username="ana")
    out = io.StringIO()

    call_command("tokens", "list", "ana", stdout=out)
    call_command("tokens", "revoke", str(token.id), stdout=out)

    listing = out.getvalue()
    assert f"{token.id}\tana\tci\t{token.token_key}…" in listing and key not in listing
    assert f"revoked token {token.id} (ci)" in listing
    assert not ApiToken.objects.exists()
    with pytest.raises(CommandError, match="no token with id 999999"):
        call_command("tokens", "revoke", "999999", stdout=out)


def test_a_different_role_updates_the_membership_and_says_so(team: Team) -> None:
    create_user("ana", "--team", "newsroom")

    lines = create_user("ana", "--team", "newsroom", "--role", "owner")

    assert 'changed the role of ana in team "Newsroom" (newsroom) from member to owner' in lines
    assert Membership.objects.get().role == "owner"


def test_it_creates_the_team_when_asked(db: None) -> None:
    lines = create_user("ana", "--team", "desk", "--create-team", "News Desk", "--role", "owner")

    assert Team.objects.get(slug="desk").name == "News Desk"
    assert Membership.objects.get(team__slug="desk").role == "owner"
    assert any(line.startswith('created team "News Desk" (desk)') for line in lines)


def test_an_existing_team_is_reused_by_create_team(team: Team) -> None:
    create_user("ana", "--team", "newsroom", "--create-team", "Another Name")

    assert Team.objects.get().name == "Newsroom"


def test_it_refuses_an_unknown_team_and_names_the_known_ones(team: Team) -> None:
    with pytest.raises(CommandError, match=r"no team with slug 'ghost' \(teams: newsroom\)"):
        create_user("ana", "--team", "ghost")

    assert not get_user_model().objects.filter(username="ana").exists()


def test_it_refuses_an_unknown_role(team: Team) -> None:
    with pytest.raises(CommandError, match="--role"):
        create_user("ana", "--team", "newsroom", "--role", "admin")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ana smith", "--team", "newsroom"), "invalid username"),
        (("ana", "--team", "newsroom", "--email", "not-an-address"), "invalid email"),
        (("ana", "--team", "news room", "--create-team", "News"), "not a valid team slug"),
    ],
)
def test_it_refuses_bad_names_and_writes_nothing(
    team: Team, args: tuple[str, ...], message: str
) -> None:
    with pytest.raises(CommandError, match=message):
        create_user(*args)

    assert not get_user_model().objects.exists()
    assert Team.objects.count() == 1


def test_it_needs_a_team(db: None) -> None:
    with pytest.raises(CommandError, match="--team"):
        create_user("ana")
