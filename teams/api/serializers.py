"""Tenancy helpers of the API's serializers: a write names only the caller's teams, and
the objects it links belong to the same team (no IDOR). Also the serializers of the
caller's own API tokens (``/api/tokens/``).

Generic over the apps: they read a team id (``team_id``) off the objects and take the
querysets to limit from the caller, so ``teams`` imports no project app.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.db.models import QuerySet
from rest_framework import serializers

from teams.api.filters import check_datetime_range
from teams.models import ApiToken, Team
from teams.selectors import owned_team_ids_for


class StrictCharField(serializers.CharField):
    """A string field taking JSON strings only: DRF's ``CharField`` turns ``123`` and
    ``1.5`` into ``"123"`` and ``"1.5"``; this refuses them (``"Not a valid string."``).
    NUL characters are refused as in DRF's."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class BoundedDateTimeField(serializers.DateTimeField):
    """DRF's ``DateTimeField`` in ``[DATETIME_MIN, DATETIME_MAX)``
    (``teams.api.filters``); outside it, a field error."""

    def to_internal_value(self, value: Any) -> datetime:
        try:
            parsed = super().to_internal_value(value)
        except OverflowError:
            raise serializers.ValidationError("Datetime value out of range.") from None
        try:
            check_datetime_range(parsed)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from None
        return parsed


class StrictModelSerializer(serializers.ModelSerializer[Any]):
    """A ``ModelSerializer`` whose generated text fields take strings only
    (``StrictCharField``) and whose date-times are bounded (``BoundedDateTimeField``)."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
        models.SlugField: StrictCharField,
        models.DateTimeField: BoundedDateTimeField,
    }


def limit_to_owned_teams(
    serializer: serializers.Serializer[Any], **team_scoped: QuerySet[Any]
) -> None:
    """Make the caller's owned teams the only valid choices of ``serializer``'s ``team``
    field and, for each field named in ``team_scoped`` that it has, the rows of the
    given queryset whose ``team_id`` is one of them (e.g. ``source=Source.objects.all()``):
    another team's id is then a 400 on the field, never an object of that team (no IDOR).
    Call it from the serializer's ``__init__``; does nothing without a request in its
    context."""
    request = serializer.context.get("request")
    if request is None:
        return
    owned = owned_team_ids_for(request.user)
    serializer.fields["team"].queryset = Team.objects.filter(id__in=owned)  # type: ignore[attr-defined]
    for name, queryset in team_scoped.items():
        if name in serializer.fields:
            serializer.fields[name].queryset = queryset.filter(team_id__in=owned)  # type: ignore[attr-defined]


def refuse_changes(attrs: dict[str, Any], instance: Any, *names: str) -> None:
    """Refuse, as field errors, a change of any of ``names`` (fields fixed once an
    object is created, e.g. ``team`` and ``kind``) on an update of ``instance``.

    Raises:
        serializers.ValidationError: ``{name: "cannot change once created"}``.
    """
    for name in names:
        if name in attrs and attrs[name] != getattr(instance, name):
            raise serializers.ValidationError({name: "cannot change once created"})


def check_team_and_source(attrs: dict[str, Any], instance: Any, noun: str) -> Team | None:
    """The team of a validated object that belongs to a team and may name a source of it
    (an alert rule, a watch): refuses moving ``instance`` to another team and a source
    (any object with a ``team_id``) of another team, as field errors
    (``serializers.ValidationError``). ``noun`` names the object in the messages.
    Returns the team (None when neither says one)."""
    team: Team | None = attrs.get("team") or getattr(instance, "team", None)
    if instance is not None and "team" in attrs and attrs["team"] != instance.team:
        raise serializers.ValidationError({"team": f"a {noun} cannot move to another team"})
    source = attrs.get("source")
    if source is not None and team is not None and source.team_id != team.id:
        raise serializers.ValidationError({"source": f"must belong to the {noun}'s team"})
    return team


class ApiTokenSerializer(serializers.ModelSerializer[ApiToken]):
    """A token as its owner sees it: never its secret nor its digest.

    ``prefix``: the token's first 15 characters (to tell tokens apart); ``expires``:
    None when it never expires; ``last_used``: to the minute (written at most once a
    minute), None when never used.
    """

    prefix = serializers.CharField(source="token_key", read_only=True)
    expires = serializers.DateTimeField(source="expiry", read_only=True, allow_null=True)
    last_used = serializers.DateTimeField(source="last_used_at", read_only=True, allow_null=True)

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created", "expires", "last_used"]
        read_only_fields = ["id", "created"]


class ApiTokenCreateSerializer(serializers.Serializer[Any]):
    """``POST /api/tokens/``: a name and, optionally, when it expires."""

    name = serializers.CharField(max_length=100)
    expires = serializers.DateTimeField(
        required=False,
        allow_null=True,
        help_text="When the token stops working (at most 3650 days ahead); omitted or null: never.",
    )


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    """The answer to a create: the token, with its secret, shown this once."""

    token = serializers.CharField(
        read_only=True, help_text="The secret: send it as `Authorization: Token <token>`."
    )

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "token"]
