"""Reads about who may see what."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from teams.models import Membership, Team


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
