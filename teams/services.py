"""Writes of the teams app: teams, memberships, API tokens, and onboarding a user.

Onboarding (``onboard_user``) is what ``manage.py create_user`` does: one transaction
that creates or reuses the user, the team (when asked), the membership and, when asked
or when the user has none, a named API token (``ApiToken``: hashed at rest, so its
secret is returned once, here, and never again).

API tokens: ``create_token``, ``revoke_token`` and ``authenticate_token`` (what the
API's authentication class and the WebSocket handshake both call).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

import structlog
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.core.validators import validate_email, validate_slug
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from teams.models import ApiToken, Membership, Team
from teams.selectors import token_for_key
from twiscope.outage import DEPENDENCY_ERRORS

log = structlog.get_logger(__name__)

ROLES: tuple[str, ...] = tuple(Membership.Role.values)


class OnboardingError(ValueError):
    """The request cannot be carried out as given (unknown team, bad role, bad name);
    the message says what to change. Nothing was written."""


@dataclass(frozen=True)
class Onboarded:
    """What ``onboard_user`` did.

    ``membership``: ``"created"``, ``"updated"`` (its role changed from
    ``previous_role``) or ``"unchanged"``. ``token``: the secret of the API token
    created by this call (its only showing), or None when none was created;
    ``token_name`` its name; ``tokens``: how many tokens the user now holds.
    ``has_password``: whether the user can log in with a password (a new user cannot
    until one is set).
    """

    user: AbstractBaseUser
    team: Team
    role: str
    token: str | None
    token_name: str | None
    tokens: int
    user_created: bool
    team_created: bool
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
    token_name: str | None = None,
) -> Onboarded:
    """Put user ``username`` in team ``team_slug``, with an API token, in one transaction.

    - The user is created when missing, with an unusable password (set one with
      ``manage.py changepassword``); an existing user keeps their password.
    - ``email``, when given, is set on the user (new or existing).
    - ``create_team_name``: create the team (slug ``team_slug``, this name) when it
      does not exist; without it an unknown slug is an error.
    - ``role``: ``"owner"`` or ``"member"``. None means member for a new membership
      and the current role for an existing one; an explicit role different from the
      current one updates it (``Onboarded.membership == "updated"``).
    - ``token_name``: create an API token of this name (its secret is in the result,
      once). Without it, a user with no token gets one named ``DEFAULT_TOKEN_NAME``,
      and a user holding tokens gets none (a secret cannot be shown again).

    Raises:
        OnboardingError: unknown team, unknown role, invalid username, email, slug or
            token name, or the user holds ``API_TOKENS_PER_USER`` tokens already.
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

        secret: str | None = None
        if token_name is not None or not ApiToken.objects.filter(user_id=user.pk).exists():
            try:
                _token, secret = create_token(user=user, name=token_name or DEFAULT_TOKEN_NAME)
            except TokenError as exc:
                raise OnboardingError(str(exc)) from None
        held = ApiToken.objects.filter(user_id=user.pk).count()

    log.info(
        "teams.user_onboarded",
        user_id=user.pk,
        team_id=team.id,
        role=str(membership.role),
        user_created=user_created,
        team_created=team_created,
        membership=state,
        token_created=secret is not None,
    )
    return Onboarded(
        user=user,
        team=team,
        role=str(membership.role),
        token=secret,
        token_name=(token_name or DEFAULT_TOKEN_NAME) if secret is not None else None,
        tokens=held,
        user_created=user_created,
        team_created=team_created,
        membership=state,
        previous_role=previous_role,
        email_changed=email_changed,
        has_password=user.has_usable_password(),
    )


# --- API tokens -------------------------------------------------------------------------

DEFAULT_TOKEN_NAME: Final = "default"
"""The name of the token a user gets when onboarded without ``--token-name``."""
MAX_TOKEN_LIFETIME: Final = timedelta(days=3650)
"""The furthest expiry a token may be given."""


class TokenError(ValueError):
    """A token cannot be created as asked (blank or long name, expiry in the past or
    too far, too many tokens); the message says what to change. Nothing was written.

    ``field``: the input at fault, ``"name"`` or ``"expires"``, or
    ``"non_field_errors"`` (too many tokens), as DRF names a form's fields.
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


def token_group(token_id: int) -> str:
    """The channel-layer group of the WebSockets opened with token ``token_id``: its
    revocation closes them (``revoke_token``). ASCII, as every group name."""
    return f"ws.token.{token_id}"


def create_token(
    *, user: AbstractBaseUser, name: str, expires_at: datetime | None = None
) -> tuple[ApiToken, str]:
    """Create an API token named ``name`` for ``user``; returns ``(token, secret)``.

    The secret (``"tws_"`` + 64 hex digits, 256 random bits: django-rest-knox's
    ``AuthTokenManager.create``) is returned here only: the row holds its SHA-512
    digest and its first 15 characters. ``expires_at`` None: it never expires.

    Raises:
        TokenError: ``name`` blank or over 100 characters; ``expires_at`` not in the
            future or more than ``MAX_TOKEN_LIFETIME`` ahead; ``user`` already holds
            ``API_TOKENS_PER_USER`` tokens.
    """
    name = name.strip()
    max_name = ApiToken._meta.get_field("name").max_length or 100
    if not name or len(name) > max_name:
        raise TokenError(f"a token name must be 1 to {max_name} characters", field="name")
    now = timezone.now()
    lifetime: timedelta | None = None
    if expires_at is not None:
        lifetime = expires_at - now
        if lifetime <= timedelta(0) or lifetime > MAX_TOKEN_LIFETIME:
            raise TokenError(
                f"the expiry must be in the future and at most {MAX_TOKEN_LIFETIME.days} "
                "days ahead",
                field="expires",
            )
    if ApiToken.objects.filter(user_id=user.pk).count() >= settings.API_TOKENS_PER_USER:
        raise TokenError(
            f"a user may hold at most {settings.API_TOKENS_PER_USER} tokens: revoke one first",
            field="non_field_errors",
        )
    token, secret = ApiToken.objects.create(
        user=user, expiry=lifetime, prefix=settings.REST_KNOX["TOKEN_PREFIX"], name=name
    )
    log.info("teams.token_created", user_id=user.pk, token_id=token.id, expires=token.expiry)
    return token, secret


def revoke_token(token: ApiToken) -> None:
    """Revoke ``token``: its row is deleted, so the next request presenting it is
    refused (every request looks its token up), and after commit each WebSocket
    opened with it is closed (a ``token.revoked`` message to ``token_group``).

    Side effects: one DELETE; after commit, one channel-layer ``group_send``. Redis
    down then: logged (``teams.token_revoke_push_failed``); the token is revoked all
    the same, and its open sockets end at their next reconnect.
    """
    token_id, user_id = token.id, token.user_id
    token.delete()
    log.info("teams.token_revoked", user_id=user_id, token_id=token_id)
    transaction.on_commit(lambda: _close_token_sockets(token_id))


def _close_token_sockets(token_id: int) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(token_group(token_id), {"type": "token.revoked"})
    except DEPENDENCY_ERRORS as exc:
        log.warning("teams.token_revoke_push_failed", token_id=token_id, error=type(exc).__name__)


def authenticate_token(key: str, *, now: datetime | None = None) -> ApiToken | None:
    """The live token ``key`` opens, with its user loaded, or None (unknown, revoked,
    expired, or its user inactive).

    Side effect: records the use in ``last_used_at`` when the stored value is older
    than ``API_TOKEN_LAST_USED_EVERY_S`` (or empty): a conditional UPDATE, so a token
    is written at most once a minute however many requests and processes present it
    (the losers of a race match no row). Queries: one SELECT, plus that UPDATE.
    """
    token = token_for_key(key)
    now = timezone.now() if now is None else now
    if token is None or token.is_expired(now) or not token.user.is_active:
        return None
    every = timedelta(seconds=settings.API_TOKEN_LAST_USED_EVERY_S)
    if token.last_used_at is None or token.last_used_at <= now - every:
        ApiToken.objects.filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - every), pk=token.pk
        ).update(last_used_at=now)
        token.last_used_at = now
    return token
