"""Query parameters of the API: every one is either understood or refused.

``StrictFilterBackend`` (``REST_FRAMEWORK["DEFAULT_FILTER_BACKENDS"]``) makes a list or
detail request answer 400 with DRF's field errors, ``{"<param>": ["<message>"]}``, for

- a parameter the endpoint does not take (its filters, its paginator's ``cursor`` /
  ``page`` / ``page_size``, ``ordering`` where it orders, and ``format``);
- a value its filter refuses: booleans are exactly ``true`` or ``false``, whole numbers
  are digits only (``0.0`` is refused), ids must be in the caller's teams.

Bad ``cursor``, ``page`` and ``page_size`` values are the paginators' to refuse
(``teams/api/pagination.py``). This module is named in settings, so it must not import
DRF's views or viewsets (they read those settings when imported).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import django_filters
from django import forms
from django.core.exceptions import ImproperlyConfigured
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Model, QuerySet
from django_filters.rest_framework import DjangoFilterBackend
from django_filters.rest_framework import FilterSet as DrfFilterSet
from rest_framework.exceptions import ValidationError
from rest_framework.filters import BaseFilterBackend, OrderingFilter, SearchFilter
from rest_framework.pagination import BasePagination
from rest_framework.request import Request
from rest_framework.settings import api_settings

from teams.selectors import team_ids_for

if TYPE_CHECKING:
    from rest_framework.views import APIView

ModelT = TypeVar("ModelT", bound=Model)

BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
"""The largest value of an ``IntegerField`` column (PostgreSQL ``integer``)."""
_INTEGER = re.compile(r"-?[0-9]{1,19}")

DATETIME_MIN = datetime(1900, 1, 1, tzinfo=UTC)
"""The earliest date-time the API takes, in a filter or a body (inclusive)."""
DATETIME_MAX = datetime(3000, 1, 1, tzinfo=UTC)
"""The date-time the API's date-times must be before: every window arithmetic (a day,
a week, a bucket either side) stays far inside Python's and PostgreSQL's ranges."""
DATETIME_RANGE_MESSAGE = (
    f"Must be from {DATETIME_MIN.isoformat()} to before {DATETIME_MAX.isoformat()}."
)
NUMBER_MAX_DIGITS = 30
NUMBER_DECIMAL_PLACES = 15
NUMBER_ABS_MAX = 10**15
"""A decimal query parameter (``min_score``…): at most this in magnitude, 15 decimal
places and 30 digits, so that PostgreSQL never sees a number it cannot compare with a
``double precision`` column."""


def check_datetime_range(value: datetime) -> None:
    """Raise Django's ``ValidationError`` (code ``out_of_range``) unless ``value``
    (timezone-aware) is in ``[DATETIME_MIN, DATETIME_MAX)``."""
    try:
        inside = DATETIME_MIN <= value < DATETIME_MAX
    except OverflowError:  # an offset that takes year 1 or 9999 past Python's range
        inside = False
    if not inside:
        raise DjangoValidationError(DATETIME_RANGE_MESSAGE, code="out_of_range")


def in_callers_teams(
    queryset: QuerySet[ModelT], team_field: str
) -> Callable[[Request | None], QuerySet[ModelT]]:
    """A ``queryset=`` callable for django-filter choice filters: only rows of the
    caller's teams are valid choices, so an id from another team is a 400 "not a valid
    choice" exactly like an id that does not exist."""

    def choices(request: Request | None) -> QuerySet[ModelT]:
        if request is None:
            return queryset.none()
        return queryset.filter(**{f"{team_field}__in": team_ids_for(request.user)})

    return choices


class TrueFalseField(forms.Field):
    """A query-string boolean: exactly ``true`` or ``false`` (absent or empty: no
    filter). Django's and django-filter's boolean fields read anything else as
    "unknown" and silently drop the filter."""

    default_error_messages = {"invalid": "Must be true or false."}

    def to_python(self, value: Any) -> bool | None:
        if value in self.empty_values:
            return None
        if value == "true":
            return True
        if value == "false":
            return False
        raise DjangoValidationError(self.error_messages["invalid"], code="invalid")


class IntegerQueryField(forms.IntegerField):
    """A query-string integer: an optional minus sign and digits only. Django's
    ``IntegerField`` takes ``0.0`` and ``1.`` as 0 and 1; this refuses them, and
    anything outside a 64-bit integer."""

    default_error_messages = {"invalid": "Enter a whole number."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validators.extend([MinValueValidator(-BIGINT_MAX), MaxValueValidator(BIGINT_MAX)])

    def to_python(self, value: Any) -> int | None:
        if value in self.empty_values:
            return None
        if not _INTEGER.fullmatch(str(value)):
            raise DjangoValidationError(self.error_messages["invalid"], code="invalid")
        return int(value)


class BoundedIsoDateTimeField(django_filters.fields.IsoDateTimeField):
    """An ISO 8601 query date-time in ``[DATETIME_MIN, DATETIME_MAX)``; outside it, or
    out of Python's range once its offset is applied, a field error (400)."""

    default_error_messages = {"invalid": "Enter a valid date/time."}

    def strptime(self, value: str, format: str) -> datetime:
        try:
            return super().strptime(value, format)
        except OverflowError:
            raise ValueError(value) from None

    def clean(self, value: Any) -> datetime | None:
        try:
            cleaned: datetime | None = super().clean(value)
        except OverflowError:
            raise DjangoValidationError(DATETIME_RANGE_MESSAGE, code="out_of_range") from None
        if cleaned is not None:
            check_datetime_range(cleaned)
        return cleaned


class BoundedDecimalField(forms.DecimalField):
    """A decimal query parameter with at most ``NUMBER_MAX_DIGITS`` digits,
    ``NUMBER_DECIMAL_PLACES`` decimal places and a magnitude of ``NUMBER_ABS_MAX``
    (``1e999999`` would reach the database as a literal it cannot compare)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_digits", NUMBER_MAX_DIGITS)
        kwargs.setdefault("decimal_places", NUMBER_DECIMAL_PLACES)
        super().__init__(**kwargs)
        self.validators.extend(
            [MinValueValidator(-NUMBER_ABS_MAX), MaxValueValidator(NUMBER_ABS_MAX)]
        )


class DateTimeFilter(django_filters.IsoDateTimeFilter):
    """An ISO 8601 date-time filter bounded to ``[DATETIME_MIN, DATETIME_MAX)``."""

    field_class = BoundedIsoDateTimeField


class NumberFilter(django_filters.NumberFilter):
    """A decimal filter bounded in digits and magnitude (``BoundedDecimalField``)."""

    field_class = BoundedDecimalField


class BooleanFilter(django_filters.BooleanFilter):
    """A boolean filter taking exactly ``true`` or ``false``; anything else is a 400."""

    field_class = TrueFalseField


class IntegerFilter(django_filters.NumberFilter):
    """A whole-number filter (``min_value=0`` for "a whole number ≥ 0")."""

    field_class = IntegerQueryField


_STRICT_DEFAULTS: dict[type[models.Field[Any, Any]], dict[str, Any]] = {
    models.BooleanField: {"filter_class": BooleanFilter},
    models.IntegerField: {"filter_class": IntegerFilter},
    models.BigIntegerField: {"filter_class": IntegerFilter},
    models.SmallIntegerField: {"filter_class": IntegerFilter},
    models.PositiveIntegerField: {"filter_class": IntegerFilter},
    models.PositiveSmallIntegerField: {"filter_class": IntegerFilter},
    models.PositiveBigIntegerField: {"filter_class": IntegerFilter},
    models.AutoField: {"filter_class": IntegerFilter},
    models.BigAutoField: {"filter_class": IntegerFilter},
    models.DateTimeField: {"filter_class": DateTimeFilter},
    models.FloatField: {"filter_class": NumberFilter},
    models.DecimalField: {"filter_class": NumberFilter},
}


class StrictFilterSet(DrfFilterSet):
    """The base of every API filterset: strict booleans and integers for generated
    filters, and no generated filter on a relation (its choices would be every row of
    every team: declare it with ``in_callers_teams`` instead)."""

    FILTER_DEFAULTS = {**DrfFilterSet.FILTER_DEFAULTS, **_STRICT_DEFAULTS}

    @classmethod
    def filter_for_field(
        cls, field: models.Field[Any, Any], field_name: str, lookup_expr: str | None = None
    ) -> django_filters.Filter:
        if field.is_relation:
            raise ImproperlyConfigured(
                f"{cls.__name__}: declare the {field_name!r} filter with "
                "ModelChoiceFilter(queryset=in_callers_teams(...)), not generated"
            )
        return super().filter_for_field(field, field_name, lookup_expr)


def _filter_query_names(name: str, filter_: django_filters.Filter) -> list[str]:
    suffixes = getattr(filter_.field_class.widget, "suffixes", None)
    if suffixes:
        return [f"{name}_{suffix}" if suffix else name for suffix in suffixes]
    return [name]


class StrictFilterBackend(DjangoFilterBackend):
    """django-filter's backend, refusing what it would silently ignore.

    Before filtering, every query parameter must be one the endpoint takes (see the
    module docstring), else ``ValidationError({"<param>": ["Unknown query parameter…"]})``.
    Then the filterset's own errors are raised as DRF field errors. A view's filterset
    must derive from ``StrictFilterSet``.
    """

    filterset_base = StrictFilterSet

    def get_filterset_class(
        self, view: APIView, queryset: QuerySet[Any] | None = None
    ) -> type[django_filters.FilterSet] | None:
        filterset_class: type[django_filters.FilterSet] | None = super().get_filterset_class(
            view, queryset
        )
        if filterset_class is not None and not issubclass(filterset_class, StrictFilterSet):
            raise ImproperlyConfigured(
                f"{filterset_class.__name__} must derive from teams.api.filters.StrictFilterSet"
            )
        return filterset_class

    def filter_queryset(self, request: Request, queryset: QuerySet[Any], view: APIView) -> Any:
        refuse_unknown_query_params(request, allowed_query_params(view, queryset))
        return super().filter_queryset(request, queryset, view)


def refuse_unknown_query_params(request: Request, allowed: Iterable[str]) -> None:
    """Raise ``ValidationError({"<param>": ["Unknown query parameter; this endpoint
    takes: …"]})`` for each query parameter of ``request`` not in ``allowed``
    (``format``, DRF's format override, is always allowed)."""
    takes = set(allowed)
    if api_settings.URL_FORMAT_OVERRIDE:
        takes.add(api_settings.URL_FORMAT_OVERRIDE)
    unknown = sorted(set(request.query_params) - takes)
    if unknown:
        listed = ", ".join(sorted(takes)) or "none"
        raise ValidationError(
            {name: [f"Unknown query parameter; this endpoint takes: {listed}."] for name in unknown}
        )


def allowed_query_params(view: APIView, queryset: QuerySet[Any]) -> set[str]:
    """The query parameters ``view`` understands: ``format``, its paginator's, its
    filter backends' (filters, ``ordering``, ``search``)."""
    allowed = {api_settings.URL_FORMAT_OVERRIDE} if api_settings.URL_FORMAT_OVERRIDE else set()
    allowed |= set(paginator_query_params(getattr(view, "paginator", None)))
    for backend_class in getattr(view, "filter_backends", []):
        backend: BaseFilterBackend = backend_class()
        if isinstance(backend, DjangoFilterBackend):
            filterset_class = backend.get_filterset_class(view, queryset)
            if filterset_class is not None:
                for name, filter_ in filterset_class.base_filters.items():
                    allowed.update(_filter_query_names(name, filter_))
        elif isinstance(backend, OrderingFilter):
            allowed.add(backend.ordering_param)
        elif isinstance(backend, SearchFilter):
            allowed.add(backend.search_param)
    return allowed


def paginator_query_params(paginator: BasePagination | None) -> Iterable[str]:
    """The query parameters a DRF paginator reads (``cursor``, ``page``, ``page_size``…)."""
    for attr in (
        "cursor_query_param",
        "page_query_param",
        "page_size_query_param",
        "limit_query_param",
        "offset_query_param",
    ):
        value = getattr(paginator, attr, None)
        if value:
            yield value


class StrictOrderingFilter(OrderingFilter):
    """``ordering=<field>[,-<field>…]`` over ``ordering_fields``; an unknown field is a
    400 (DRF's filter silently falls back to the default ordering)."""

    def get_ordering(self, request: Request, queryset: QuerySet[Any], view: APIView) -> Any:
        params = request.query_params.get(self.ordering_param)
        if params:
            fields = [param.strip() for param in params.split(",")]
            valid = self.remove_invalid_fields(queryset, fields, view, request)
            invalid = [field for field in fields if field not in valid]
            if invalid:
                choices = ", ".join(
                    sorted(name for name, _ in self.get_valid_fields(queryset, view))
                )
                raise ValidationError(
                    {
                        self.ordering_param: [
                            f"Cannot order by {', '.join(map(repr, invalid))}; "
                            f"choose from {choices} (prefix - for descending)."
                        ]
                    }
                )
            return valid
        return self.get_default_ordering(view)
