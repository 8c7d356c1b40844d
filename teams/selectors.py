"""Reads about who may see what, and the API tokens users hold."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet
from knox.crypto import hash_token

from teams.models import ApiToken, Membership, Team

MAX_PRESENTED_KEY_CHARS = 200
"""A presented key longer than this is refused unhashed (tokens are 68 characters)."""


def team_ids_for(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Membership, Any]:
    """A subquery of the ids of the teams ``user`` is a member of (empty if anonymous)."""
    if not user.is_authenticated:
        return Membership.objects.none().values("team_id")
    return Membership.objects.filter(user_id=user.pk).values("team_id")


def owned_team_ids_for(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Membership, Any]:
    """A subquery of the ids of the teams ``user`` owns."""
    return team_ids_for(user).filter(role=Membership.Role.OWNER)


def teams_for(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Team]:
    """The teams ``user`` is a member of."""
    return Team.objects.filter(id__in=team_ids_for(user))


def token_for_key(key: str) -> ApiToken | None:
    """The stored token whose digest is ``key``'s (with its user, one query), or None.

    ``key`` is what a client presents; it is hashed as django-rest-knox hashes it
    (``knox.crypto.hash_token``: SHA-512 by ``REST_KNOX``) and looked up by that digest
    (unique index). Expiry and the user's state are the caller's to judge
    (``teams.services.authenticate_token``). A key longer than 200 characters is no
    token: None, without hashing it.
    """
    if not key or len(key) > MAX_PRESENTED_KEY_CHARS:
        return None
    return ApiToken.objects.select_related("user").filter(digest=hash_token(key)).first()


def tokens_of(user: AbstractBaseUser | AnonymousUser) -> QuerySet[ApiToken]:
    """The API tokens ``user`` holds, newest first (none when anonymous)."""
    if not user.is_authenticated:
        return ApiToken.objects.none()
    return ApiToken.objects.filter(user_id=user.pk)
