"""The API's base classes: every queryset is scoped to the caller's teams (no IDOR).

Also the one import point of the API's shared pieces: the strict filters
(``teams/api/filters.py``: unknown or bad query parameters answer 400), the
pagination classes (``teams/api/pagination.py``) and the serializers' tenancy helpers
(``teams/api/serializers.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db.models import Model, QuerySet
from rest_framework import permissions, viewsets
from rest_framework.request import Request
from rest_framework.views import APIView

from teams.api.filters import (
    BIGINT_MAX,
    INT_MAX,
    BooleanFilter,
    DateTimeFilter,
    IntegerFilter,
    NumberFilter,
    StrictFilterBackend,
    StrictFilterSet,
    StrictOrderingFilter,
    in_callers_teams,
    refuse_unknown_query_params,
)
from teams.api.pagination import (
    NewestFirstCursorPagination,
    NumberedPagination,
    StrictCursorPagination,
)
from teams.api.serializers import (
    BoundedDateTimeField,
    StrictCharField,
    StrictModelSerializer,
    check_team_and_source,
    limit_to_owned_teams,
    refuse_changes,
)
from teams.selectors import owned_team_ids_for, team_ids_for

__all__ = [
    "BIGINT_MAX",
    "INT_MAX",
    "BooleanFilter",
    "BoundedDateTimeField",
    "DateTimeFilter",
    "IntegerFilter",
    "IsTeamOwnerOrReadOnly",
    "NewestFirstCursorPagination",
    "NumberFilter",
    "NumberedPagination",
    "StrictCharField",
    "StrictCursorPagination",
    "StrictFilterBackend",
    "StrictFilterSet",
    "StrictModelSerializer",
    "StrictOrderingFilter",
    "TeamScopedMixin",
    "TeamScopedReadOnlyViewSet",
    "check_team_and_source",
    "in_callers_teams",
    "limit_to_owned_teams",
    "refuse_changes",
    "refuse_unknown_query_params",
]


class TeamScopedMixin:
    """Scopes ``queryset`` to rows whose ``team_field`` is one of the caller's teams.

    Lookups by an id the client sent (``/api/x/<id>/``, filter values) go through this
    scope, so another team's id answers 404, never its data.
    """

    team_field: ClassVar[str] = "team"

    def get_queryset(self) -> QuerySet[Any]:
        queryset = super().get_queryset()  # type: ignore[misc]
        return queryset.filter(**{f"{self.team_field}__in": team_ids_for(self.request.user)})  # type: ignore[attr-defined]


class TeamScopedReadOnlyViewSet(TeamScopedMixin, viewsets.ReadOnlyModelViewSet[Any]):
    """A read-only viewset over the caller's teams' rows."""


class IsTeamOwnerOrReadOnly(permissions.BasePermission):
    """Members read; only owners of the object's team write."""

    def has_object_permission(self, request: Request, view: APIView, obj: Model) -> bool:
        if request.method in permissions.SAFE_METHODS:
            return True
        team_id = getattr(obj, "team_id", None)
        if not isinstance(team_id, int):
            return False
        return owned_team_ids_for(request.user).filter(team_id=team_id).exists()
