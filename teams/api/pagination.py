"""The pagination classes every list endpoint uses: 50 a page, ``page_size`` 1 to 500.

A bad ``page_size`` (not a whole number from 1 to the maximum: never clamped), ``page``
(not a whole number from 1, or ``last``) or ``cursor`` (not one this API handed out)
answers 400 with DRF's field errors; an empty one is taken as absent, as django-filter
takes an empty filter. A ``page`` past the last one answers 404 (DRF's "Invalid
page."). Named in settings: must not import DRF's views or viewsets.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.core.exceptions import FieldDoesNotExist
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Field, Model, QuerySet
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination, PageNumberPagination
from rest_framework.request import Request

if TYPE_CHECKING:
    from rest_framework.views import APIView

_PAGE_NUMBER = re.compile(r"[0-9]{1,9}")


class _StrictPageSize:
    """``page_size``: a whole number from 1 to ``max_page_size``, else a 400; empty is
    absent (the default size), as with filters."""

    page_size: int
    max_page_size: int
    page_size_query_param: str

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        if not raw:
            return self.page_size
        if not _PAGE_NUMBER.fullmatch(raw) or not 1 <= int(raw) <= self.max_page_size:
            raise ValidationError(
                {
                    self.page_size_query_param: [
                        f"Must be a whole number from 1 to {self.max_page_size}."
                    ]
                }
            )
        return int(raw)

    def get_schema_operation_parameters(self, view: APIView) -> list[dict[str, Any]]:
        parameters: list[dict[str, Any]] = super().get_schema_operation_parameters(view)  # type: ignore[misc]
        for parameter in parameters:
            if parameter["name"] == getattr(self, "page_query_param", None):
                # ``last`` is taken too; the schema states the numbers.
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": 999_999_999}
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": self.max_page_size,
                    "default": self.page_size,
                }
        return parameters


class StrictCursorPagination(_StrictPageSize, CursorPagination):
    """Cursor pagination whose bad ``cursor`` (undecodable, or a position that is not a
    value of the ordering field) answers 400 ``{"cursor": ["Invalid cursor"]}``, not
    DRF's 404 or a 500 from the database."""

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500
    _model: type[Model] | None = None

    def paginate_queryset(
        self, queryset: QuerySet[Any] | Sequence[Any], request: Request, view: APIView | None = None
    ) -> list[Any] | None:
        self._model = getattr(queryset, "model", None)
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request: Request) -> Any:
        encoded = request.query_params.get(self.cursor_query_param)
        if encoded:
            try:
                # DRF's own decoding skips characters outside base64, reading "%%%" as
                # an empty cursor (the first page).
                b64decode(encoded.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise self._invalid() from None
        try:
            cursor = super().decode_cursor(request)
        except NotFound:
            raise self._invalid() from None
        if cursor is not None and cursor.position is not None and self._model is not None:
            name = str(self.ordering[0]).lstrip("-")
            try:
                field = self._model._meta.get_field(name)
            except FieldDoesNotExist:
                field = None  # an annotation: nothing to check the position against
            if isinstance(field, Field):
                try:
                    field.to_python(cursor.position)
                except DjangoValidationError:
                    raise self._invalid() from None
        return cursor

    def _invalid(self) -> ValidationError:
        return ValidationError({self.cursor_query_param: [str(self.invalid_cursor_message)]})


class NewestFirstCursorPagination(StrictCursorPagination):
    """Newest row first (by id), 50 a page, ``page_size`` 1 to 500; stable under
    concurrent inserts."""

    ordering = "-id"


class NumberedPagination(_StrictPageSize, PageNumberPagination):
    """Pages of 50 (``page_size`` 1 to 500) for bounded, re-orderable lists. ``page`` is a
    whole number from 1 (or ``last``; empty is the first), else a 400; past the last
    page, 404."""

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def paginate_queryset(
        self, queryset: QuerySet[Any] | Sequence[Any], request: Request, view: APIView | None = None
    ) -> list[Any] | None:
        raw = request.query_params.get(self.page_query_param)
        if (
            raw
            and raw not in self.last_page_strings
            and (not _PAGE_NUMBER.fullmatch(raw) or int(raw) < 1)
        ):
            raise ValidationError(
                {self.page_query_param: ["Must be a whole number from 1, or last."]}
            )
        return super().paginate_queryset(queryset, request, view)
