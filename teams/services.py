"""Writes of the teams app: teams, memberships, and onboarding a user into a team.

Onboarding (``onboard_user``) is what ``manage.py create_user`` does: one transaction
that creates or reuses the user, the team (when asked), the membership and the user's
API token (Django REST framework's ``Token``, one per user).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import structlog
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.core.validators import validate_email, validate_slug
from django.db import transaction
from rest_framework.authtoken.models import Token

from teams.models import Membership, Team

log = structlog.get_logger(__name__)

ROLES: tuple[str, ...] = tuple(Membership.Role.values)


class OnboardingError(ValueError):
    """The request cannot be carried out as given (unknown team, bad role, bad name);
    the message says what to change. Nothing was written."""


@dataclass(frozen=True)
class Onboarded:
    """What ``onboard_user`` did.

    ``membership``: ``"created"``, ``"updated"`` (its role changed from
    ``previous_role``) or ``"unchanged"``. ``token`` is the user's API token key.
    ``has_password``: whether the user can log in with a password (a new user cannot
    until one is set).
    """

    user: AbstractBaseUser
    team: Team
    role: str
    token: str
    user_created: bool
    team_created: bool
    token_created: bool
    membership: Literal["created", "updated", "unchanged"]
    previous_role: str | None
    email_changed: bool
    has_password: bool


def create_team(*, slug: str, name: str) -> tuple[Team, bool]:
    """The team with ``slug``, created with ``name`` when there is none; returns
    ``(team, created)``. An existing team keeps its name.

    Raises:
        OnboardingError: ``slug`` is not a slug (letters, digits, ``-``, ``_``) or
            ``name`` is blank or longer than the field.
    """
    try:
        validate_slug(slug)
    except ValidationError:
        raise OnboardingError(
            f"{slug!r} is not a valid team slug: use letters, digits, '-' and '_'"
        ) from None
    name = name.strip()
    max_name = Team._meta.get_field("name").max_length or 100
    if not name or len(name) > max_name:
        raise OnboardingError(f"a team name must be 1 to {max_name} characters, not {name!r}")
    team, created = Team.objects.get_or_create(slug=slug, defaults={"name": name})
    if created:
        log.info("teams.team_created", team_id=team.id, slug=slug)
    return team, created


def onboard_user(
    *,
    username: str,
    team_slug: str,
    role: str | None = None,
    email: str | None = None,
    create_team_name: str | None = None,
) -> Onboarded:
    """Put user ``username`` in team ``team_slug`` with an API token, in one transaction.

    - The user is created when missing, with an unusable password (set one with
      ``manage.py changepassword``); an existing user keeps their password.
    - ``email``, when given, is set on the user (new or existing).
    - ``create_team_name``: create the team (slug ``team_slug``, this name) when it
      does not exist; without it an unknown slug is an error.
    - ``role``: ``"owner"`` or ``"member"``. None means member for a new membership
      and the current role for an existing one; an explicit role different from the
      current one updates it (``Onboarded.membership == "updated"``).
    - The user's token is created when missing, else reused.

    Raises:
        OnboardingError: unknown team, unknown role, invalid username, email or slug.
    """
    if role is not None and role not in ROLES:
        raise OnboardingError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    user_model = get_user_model()
    try:
        user_model.username_validator(username)
    except ValidationError as exc:
        raise OnboardingError(f"invalid username {username!r}: {' '.join(exc.messages)}") from None
    if email is not None:
        try:
            validate_email(email)
        except ValidationError:
            raise OnboardingError(f"invalid email address {email!r}") from None

    with transaction.atomic():
        if create_team_name is not None:
            team, team_created = create_team(slug=team_slug, name=create_team_name)
        else:
            found = Team.objects.filter(slug=team_slug).first()
            if found is None:
                known = ", ".join(Team.objects.order_by("slug").values_list("slug", flat=True))
                raise OnboardingError(
                    f"no team with slug {team_slug!r} (teams: {known or 'none'}); "
                    "pass --create-team NAME to create it"
                )
            team, team_created = found, False

        email_field = user_model.get_email_field_name()
        user = user_model.objects.filter(**{user_model.USERNAME_FIELD: username}).first()
        user_created = user is None
        email_changed = False
        if user is None:
            # No password: create_user makes it unusable until one is set.
            user = user_model.objects.create_user(
                **{user_model.USERNAME_FIELD: username, email_field: email or ""},
                password=None,
            )
            log.info("teams.user_created", user_id=user.pk)
        elif email is not None and getattr(user, email_field) != email:
            setattr(user, email_field, email)
            user.save(update_fields=[email_field])
            email_changed = True

        membership = Membership.objects.select_for_update().filter(user=user, team=team).first()
        previous_role: str | None = None
        state: Literal["created", "updated", "unchanged"]
        if membership is None:
            membership = Membership.objects.create(
                user=user, team=team, role=role or Membership.Role.MEMBER
            )
            state = "created"
        elif role is not None and membership.role != role:
            previous_role = membership.role
            membership.role = role
            membership.save(update_fields=["role"])
            state = "updated"
        else:
            state = "unchanged"

        token, token_created = Token.objects.get_or_create(user=user)

    log.info(
        "teams.user_onboarded",
        user_id=user.pk,
        team_id=team.id,
        role=str(membership.role),
        user_created=user_created,
        team_created=team_created,
        membership=state,
        token_created=token_created,
    )
    return Onboarded(
        user=user,
        team=team,
        role=str(membership.role),
        token=token.key,
        user_created=user_created,
        team_created=team_created,
        token_created=token_created,
        membership=state,
        previous_role=previous_role,
        email_changed=email_changed,
        has_password=user.has_usable_password(),
    )
