"""The OpenAPI schema class (``REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]``): drf-spectacular's,
plus the error responses every operation can answer, in DRF's shapes.

- 400 ``ValidationError`` (field errors, ``{"<field or param>": ["<message>"]}``): on
  every operation (every endpoint refuses unknown query parameters, see
  ``teams.api.base``; bad values; bad body fields on writes);
- 401 ``Error`` (``{"detail": "<message>"}``): unless the view allows anonymous callers;
- 403 ``Error``: on writes (a member writing an owner's object, a session without CSRF);
- 404 ``Error``: on a path with an id (outside the caller's teams, or gone) and on
  page-numbered lists (a page past the last);
- the codes a view names in ``error_codes`` (``["404"]``: a lookup by query parameters);
- on every POST and PATCH that honours ``Idempotency-Key`` (``teams.api.idempotency``):
  the header as an optional parameter, 409 ``Error`` (the key's first request is still
  running) and 422 ``ValidationError`` (the key was used with another request).

An operation that declares a code itself (``extend_schema(responses=…)``) keeps its own.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.plumbing import ResolvedComponent, build_bearer_security_scheme_object
from drf_spectacular.utils import OpenApiParameter
from rest_framework import permissions
from rest_framework.pagination import PageNumberPagination

from teams.api import idempotency
from teams.api.filters import BIGINT_MAX

_ERROR = {
    "type": "object",
    "description": "DRF's error shape: one message.",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
_VALIDATION_ERROR = {
    "type": "object",
    "description": (
        "DRF's field errors: each refused field, body or query parameter, with its "
        "messages (a list; a nested field's, an object of its own by key or index); "
        'errors of no one field under "non_field_errors"; a body that could not be read '
        'at all, "detail" (a string).'
    ),
    "additionalProperties": {
        "anyOf": [
            {"type": "array", "items": {"type": "string"}},
            {"type": "object"},
            {"type": "string"},
        ]
    },
    "example": {"since": ["Enter a valid date/time."]},
}
_DESCRIPTIONS = {
    "400": "Bad or unknown query parameters, or bad body fields.",
    "401": "No credentials, or bad ones.",
    "403": "Authenticated, but not allowed to do this.",
    "404": "Not found in the caller's teams (or a page past the last).",
    "409": "A request with this Idempotency-Key is still running; retry later.",
    "422": "This Idempotency-Key was used with a different request.",
    "429": "Past this caller's rate limit for the request's scope (read, write, search, "
    "export); `Retry-After` says how many seconds until it resets.",
}


class AutoSchema(SpectacularAutoSchema):
    """drf-spectacular's ``AutoSchema`` documenting the error responses (module docstring)."""

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        # drf-spectacular has no public hook for responses common to every operation, so
        # this extends the (private) method that builds an operation's responses.
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        for code in self._error_codes():
            if code not in responses:
                component = self._error_component(code)
                responses[code] = {
                    "description": _DESCRIPTIONS[code],
                    "content": {"application/json": {"schema": component.ref}},
                }
        return responses

    def _resolve_path_parameters(self, variables: Any) -> list[dict[str, Any]]:
        # Ids in paths are positive 64-bit integers: anything else answers 404.
        parameters: list[dict[str, Any]] = super()._resolve_path_parameters(variables)
        for parameter in parameters:
            schema = parameter.get("schema", {})
            if schema.get("type") == "integer":
                schema.update(minimum=1, maximum=BIGINT_MAX)
        return parameters

    def _honours_idempotency_key(self) -> bool:
        return self.method in idempotency.METHODS and idempotency.honours(type(self.view))

    def get_override_parameters(self) -> list[Any]:
        parameters: list[Any] = list(super().get_override_parameters())
        if self._honours_idempotency_key():
            parameters.append(
                OpenApiParameter(
                    idempotency.HEADER,
                    str,
                    OpenApiParameter.HEADER,
                    required=False,
                    description="1 to 255 visible ASCII characters. A retry with the same "
                    "key and request within 24 h gets the first response again "
                    "(`Idempotent-Replayed: true`) and writes nothing; kept per token.",
                )
            )
        return parameters

    def _error_codes(self) -> list[str]:
        codes = ["400"]
        view = self.view
        if not all(
            issubclass(permission, permissions.AllowAny)
            for permission in getattr(view, "permission_classes", [])
        ):
            codes.append("401")
        if self.method not in permissions.SAFE_METHODS:
            codes.append("403")
        numbered = isinstance(self._get_paginator(), PageNumberPagination)
        if "{" in self.path or (numbered and self._is_list_view()):
            codes.append("404")
        if self._honours_idempotency_key():
            codes += ["409", "422"]
        # A view may name more (``error_codes = ["404"]``: a lookup by query parameters).
        codes += [code for code in getattr(view, "error_codes", ()) if code not in codes]
        if getattr(view, "throttle_classes", None):
            codes.append("429")  # teams/api/throttling.py
        return codes

    def _error_component(self, code: str) -> ResolvedComponent:
        name, schema = (
            ("ValidationError", _VALIDATION_ERROR) if code in ("400", "422") else ("Error", _ERROR)
        )
        component = ResolvedComponent(
            name=name, type=ResolvedComponent.SCHEMA, object=name, schema=schema
        )
        self.registry.register_on_missing(component)
        return component


class ApiTokenScheme(OpenApiAuthenticationExtension):
    """Documents ``teams.api.authentication.ApiTokenAuthentication`` as DRF's token
    scheme was (``tokenAuth``: ``Authorization: Token <token>``), so the schema's
    security is unchanged by hashing tokens. Registered by being defined (this module
    loads with ``DEFAULT_SCHEMA_CLASS``)."""

    target_class = "teams.api.authentication.ApiTokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        definition: dict[str, Any] = build_bearer_security_scheme_object(
            header_name="Authorization", token_prefix="Token"
        )
        return definition
