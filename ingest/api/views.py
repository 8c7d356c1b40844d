"""Endpoints of sources (members read, owners write), events and dead letters (read),
and the signed webhook intake."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.handlers.asgi import ASGIRequest
from django.db import IntegrityError
from django.http import StreamingHttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ingest import credentials, exporting, search, webhooks
from ingest.api.filters import DeadLetterFilter, EventFilter
from ingest.api.serializers import (
    DeadLetterSerializer,
    EventSerializer,
    SourceSerializer,
    WebhookDeliverySerializer,
    WebhookEnvelopeSerializer,
)
from ingest.models import DeadLetter, Event, Source
from ingest.services import create_source, update_source
from teams.api.base import (
    IsTeamOwnerOrReadOnly,
    NewestFirstCursorPagination,
    StrictCursorPagination,
    TeamScopedMixin,
    TeamScopedReadOnlyViewSet,
)

RANK_KEY = "rank_key"


class EventCursorPagination(StrictCursorPagination):
    """Newest event time first, 50 a page (``page_size`` 1 to 500); stable under
    concurrent inserts. A search ordered by rank (the queryset carries ``rank_key``,
    ``ingest.search.SearchBackend.search`` by rank) pages on that unique key instead."""

    ordering: Any = ("-created_at", "-id")

    def get_ordering(self, request: Request, queryset: Any, view: Any) -> Any:
        if RANK_KEY in getattr(getattr(queryset, "query", None), "annotations", {}):
            return (f"-{RANK_KEY}",)
        return type(self).ordering

    def decode_cursor(self, request: Request) -> Any:
        cursor = super().decode_cursor(request)
        if (
            cursor is not None
            and cursor.position is not None
            and self.ordering[0].endswith(RANK_KEY)
        ):
            try:
                search.RANK_KEY_FIELD.to_python(cursor.position)
            except DjangoValidationError:
                raise self._invalid() from None
        return cursor


class SourceViewSet(TeamScopedMixin, viewsets.ModelViewSet[Source]):
    """The caller's teams' sources, with their health, counters and declared input
    watermark: members read, owners create, edit, enable, disable and delete."""

    queryset = Source.objects.order_by("id")
    serializer_class = SourceSerializer
    permission_classes = [permissions.IsAuthenticated, IsTeamOwnerOrReadOnly]
    filterset_fields = ["kind", "enabled"]

    @extend_schema(
        responses={
            201: OpenApiResponse(
                SourceSerializer,
                description="The source; a webhook source's also carries `secret`, its "
                "signing secret, shown this once.",
            )
        }
    )
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            source, secret = create_source(
                team=data["team"],
                kind=data["kind"],
                name=data["name"],
                config=data["config"],
                credentials=data.get("credentials"),
                enabled=data.get("enabled", True),
            )
        except IntegrityError:
            raise serializers.ValidationError(
                {"name": "the team already has a source of this name"}
            ) from None
        body = dict(self.get_serializer(source).data)
        if secret is not None:
            body["secret"] = secret
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_update(self, serializer: Any) -> None:
        try:
            update_source(serializer.instance, dict(serializer.validated_data))
        except IntegrityError:
            raise serializers.ValidationError(
                {"name": "the team already has a source of this name"}
            ) from None


class RawBodyParser(BaseParser):
    """Leaves the body to the view: a webhook's signature covers its exact bytes."""

    media_type = "*/*"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        return None


class WebhookView(APIView):
    """``POST /api/ingest/webhooks/<source id>/``: events from a signed sender
    (``ingest.webhooks``). Not a session or token endpoint: the signature is the
    authentication, so a source's id alone opens nothing."""

    authentication_classes: list[Any] = []
    permission_classes = [permissions.AllowAny]
    parser_classes = [RawBodyParser]

    @extend_schema(
        operation_id="ingest_webhook",
        request=WebhookEnvelopeSerializer(many=True),
        parameters=[
            OpenApiParameter(
                webhooks.TIMESTAMP_HEADER,
                str,
                OpenApiParameter.HEADER,
                required=True,
                description="Unix seconds when the request was signed (within 300 s of now).",
            ),
            OpenApiParameter(
                webhooks.SIGNATURE_HEADER,
                str,
                OpenApiParameter.HEADER,
                required=True,
                description="`sha256=` and the hex HMAC-SHA256, keyed with the source's "
                "secret, of `<timestamp>.<raw body>`.",
            ),
        ],
        responses={
            202: WebhookDeliverySerializer,
            400: OpenApiResponse(
                WebhookDeliverySerializer,
                description="No item was valid (or the body is not JSON): `errors` by index.",
            ),
            401: OpenApiResponse(description="Missing, wrong or stale signature."),
            404: OpenApiResponse(description="No webhook source has this id."),
            409: OpenApiResponse(description="The source is disabled."),
            413: OpenApiResponse(description="Body over 1 MB, or over 1,000 events."),
        },
        description="One envelope (an object) or a batch (a list of up to 1,000). "
        "Valid items are kept even when others are refused (202); idempotent by "
        "`external_id`.",
    )
    def post(self, request: Request, source_id: int) -> Response:
        source = Source.objects.filter(id=source_id, kind=Source.Kind.WEBHOOK).first()
        if source is None:
            return Response({"detail": "no such webhook source"}, status=404)
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        if declared > settings.WEBHOOK_MAX_BYTES:
            return Response({"detail": "the body is over 1 MB"}, status=413)
        body = request.body
        if len(body) > settings.WEBHOOK_MAX_BYTES:
            return Response({"detail": "the body is over 1 MB"}, status=413)
        try:
            secret = credentials.unseal(source.credentials).get("secret", "")
            if not secret:
                raise webhooks.SignatureError("this source has no signing secret")
            webhooks.verify(
                secret,
                request.headers.get(webhooks.TIMESTAMP_HEADER),
                request.headers.get(webhooks.SIGNATURE_HEADER),
                body,
            )
        except (webhooks.SignatureError, credentials.CredentialsError) as exc:
            return Response({"detail": str(exc)}, status=401)
        if not source.enabled:
            return Response({"detail": "this source is disabled"}, status=409)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Response({"detail": f"the body is not JSON: {exc}"}, status=400)
        items = payload if isinstance(payload, list) else [payload]
        if not items:
            return Response({"detail": "the batch is empty"}, status=400)
        if len(items) > settings.WEBHOOK_MAX_EVENTS:
            return Response(
                {"detail": f"a batch holds at most {settings.WEBHOOK_MAX_EVENTS} events"},
                status=413,
            )
        delivery = webhooks.deliver(source, items)
        body_out = {
            "accepted": delivery.accepted,
            "duplicates": delivery.duplicates,
            "errors": delivery.errors,
        }
        ok = delivery.accepted or delivery.duplicates
        return Response(body_out, status=202 if ok else 400)


class ExportQuerySerializer(serializers.Serializer[Any]):
    """The export's own query parameter (its filters are the events list's)."""

    format = serializers.ChoiceField(
        choices=exporting.FORMATS,
        help_text="`csv` (a header row, then one row per event) or `jsonl` (JSON Lines: "
        "one event object per line).",
    )


class JSONErrorsNegotiation(DefaultContentNegotiation):
    """Renders with the view's first renderer whatever ``format`` says: the export reads
    ``format`` itself, and answers its errors in JSON."""

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type


async def _async_body(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` pulled one at a time on the request's sync thread (where its database
    connection and cursor live). Django's ASGI handler would read a sync iterator whole
    into a list before sending a byte."""

    def pull() -> bytes | None:
        return next(chunks, None)

    def close() -> None:
        getattr(chunks, "close", lambda: None)()

    try:
        while (chunk := await sync_to_async(pull, thread_sensitive=True)()) is not None:
            yield chunk
    finally:
        await sync_to_async(close, thread_sensitive=True)()


def _streamed(request: Request, chunks: Iterator[bytes]) -> Iterable[bytes] | AsyncIterator[bytes]:
    """``chunks`` as a ``StreamingHttpResponse`` body that the server streams one chunk
    at a time: async under ASGI (daphne), as is under WSGI and the test client."""
    if isinstance(request._request, ASGIRequest):
        return _async_body(chunks)
    return chunks


class EventViewSet(TeamScopedReadOnlyViewSet):
    """Stored events, newest event time first (cursor pagination), and their export;
    ``q`` searches them (``EventFilter``), and each result of a search's page carries its
    ``highlight``."""

    team_field = "source__team"
    queryset = Event.objects.defer("search_vector")
    serializer_class = EventSerializer
    filterset_class = EventFilter
    pagination_class = EventCursorPagination

    @extend_schema(
        operation_id="events_export",
        parameters=[ExportQuerySerializer],
        filters=True,
        responses={
            (200, "text/csv"): OpenApiResponse(
                OpenApiTypes.STR,
                description="A header row, then one row per event; `author` flattened "
                "into `author_id`, `author_handle`, `author_name`, `author_followers`; "
                "lists and objects as JSON text; null as an empty cell.",
            ),
            (200, "application/jsonl"): OpenApiResponse(
                OpenApiTypes.STR,
                description="One event object per line, with the fields of the events "
                "list's items.",
            ),
        },
        description="Every event the filters select (the events list's filters), newest "
        "event time first, streamed in constant memory from a server-side cursor, as a "
        "download (`Content-Disposition: attachment`). Scoped to your teams' sources: "
        "another team's `source` is a 400, as on the list. An unknown or missing "
        "`format` is a 400 on `format`.",
    )
    @action(
        detail=False,
        methods=["get"],
        url_path="export",
        pagination_class=None,
        renderer_classes=[JSONRenderer],
        content_negotiation_class=JSONErrorsNegotiation,
    )
    def export(self, request: Request) -> StreamingHttpResponse:
        """``GET /api/events/export/?format=csv|jsonl&<events filters>``: the download."""
        params = ExportQuerySerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        fmt: str = params.validated_data["format"]
        queryset = self.filter_queryset(self.get_queryset())
        chunks = (data for data, _rows in exporting.export_chunks(queryset, fmt))
        response = StreamingHttpResponse(
            _streamed(request, chunks), content_type=exporting.CONTENT_TYPES[fmt]
        )
        filename = exporting.export_filename(fmt, timezone.now())
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response


class DeadLetterViewSet(TeamScopedReadOnlyViewSet):
    """Input the pipeline parked, with its reason, error, attempts and payload, newest
    first: the caller's teams' sources' only (a dead letter of no source is an
    operator's, seen with ``manage.py requeue``). Read-only: requeue with the command."""

    team_field = "source__team"
    queryset = DeadLetter.objects.all()
    serializer_class = DeadLetterSerializer
    filterset_class = DeadLetterFilter
    pagination_class = NewestFirstCursorPagination
