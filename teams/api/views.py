"""``/api/tokens/``: the caller's own API tokens.

- ``GET /api/tokens/``: the caller's tokens (name, prefix, created, expires, last
  used), newest first; never a secret.
- ``POST /api/tokens/`` ``{"name": "...", "expires": null | "<ISO 8601>"}``: 201 with the
  new token, its secret in ``token``, shown this once.
- ``GET /api/tokens/<id>/``, ``DELETE /api/tokens/<id>/``: one token; DELETE revokes it
  at once (204), for the API and any WebSocket opened with it.

Another user's token answers 404, as a token that does not exist (no IDOR): the
queryset is the caller's tokens only.
"""

from __future__ import annotations

from typing import Any, cast

from django.contrib.auth.models import AbstractBaseUser
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from teams import services
from teams.api.serializers import (
    ApiTokenCreatedSerializer,
    ApiTokenCreateSerializer,
    ApiTokenSerializer,
)
from teams.models import ApiToken
from teams.selectors import tokens_of


class ApiTokenViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet[ApiToken],
):
    """The caller's API tokens: list, create (the secret once), show, revoke."""

    serializer_class = ApiTokenSerializer
    queryset = ApiToken.objects.none()

    def get_queryset(self) -> Any:
        return tokens_of(self.request.user)

    @extend_schema(request=ApiTokenCreateSerializer, responses={201: ApiTokenCreatedSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Create a token for the caller; the answer holds its secret, once."""
        given = ApiTokenCreateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        try:
            token, secret = services.create_token(
                user=cast("AbstractBaseUser", request.user),  # IsAuthenticated: a user
                name=given.validated_data["name"],
                expires_at=given.validated_data.get("expires"),
            )
        except services.TokenError as exc:
            raise serializers.ValidationError({exc.field: [str(exc)]}) from None
        body = {**ApiTokenSerializer(token).data, "token": secret}
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: ApiToken) -> None:
        services.revoke_token(instance)
