"""Read endpoints of trends, the posts behind each, and the streams' event-time clocks."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from ingest.api.filters import term_q
from ingest.api.serializers import EventSerializer
from ingest.api.views import EventCursorPagination
from ingest.models import Event
from mlengine.api.filters import ModelVersionFilter, StreamFilter, TrendFilter
from mlengine.api.serializers import ModelVersionSerializer, StreamSerializer, TrendSerializer
from mlengine.models import ModelVersion, StreamClock, Trend
from teams.api.base import (
    NumberedPagination,
    StrictFilterBackend,
    StrictOrderingFilter,
    TeamScopedReadOnlyViewSet,
)


class TrendViewSet(TeamScopedReadOnlyViewSet):
    """Detected trends, newest detection first; ``ordering`` by score, events, time."""

    team_field = "source__team"
    queryset = Trend.objects.select_related("source")
    serializer_class = TrendSerializer
    filterset_class = TrendFilter
    filter_backends = [StrictFilterBackend, StrictOrderingFilter]
    ordering_fields = ["score", "events", "detected_at", "bucket_start", "velocity"]
    ordering = ["-detected_at", "-id"]
    pagination_class = NumberedPagination

    @extend_schema(responses=EventSerializer(many=True), filters=False)
    @action(
        detail=True,
        methods=["get"],
        filterset_class=None,
        filter_backends=[StrictFilterBackend],
        pagination_class=EventCursorPagination,
    )
    def events(self, request: Request, pk: str | None = None) -> Response:
        """The posts behind the trend: its source's events carrying its term in its
        bucket, newest event time first (cursor pagination). 404 outside your teams;
        400 for any query parameter but ``cursor``, ``page_size`` and ``format``."""
        trend = self.get_object()  # runs StrictFilterBackend: the query parameter check
        queryset: QuerySet[Event] = Event.objects.filter(
            term_q(trend.term),
            source_id=trend.source_id,
            created_at__gte=trend.bucket_start,
            created_at__lt=trend.bucket_start + timedelta(seconds=trend.bucket_s),
        )
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(EventSerializer(page, many=True).data)


class StreamViewSet(TeamScopedReadOnlyViewSet):
    """Each source's event-time clock: its watermark (every earlier event is counted),
    trend bucket, counted and late events. Shows where a replay is in event time."""

    team_field = "source__team"
    queryset = StreamClock.objects.select_related("source").order_by("source_id")
    serializer_class = StreamSerializer
    filterset_class = StreamFilter
    pagination_class = NumberedPagination


class ModelVersionViewSet(viewsets.ReadOnlyModelViewSet[ModelVersion]):
    """The trained classifier heads, every version, newest first per task: their
    metrics on the evaluation split, the data they were trained on, and which is active
    (``manage.py train``). Models serve every team: any signed-in user may read them;
    nobody writes them through the API."""

    queryset = ModelVersion.objects.order_by("task", "-version")
    serializer_class = ModelVersionSerializer
    filterset_class = ModelVersionFilter
    pagination_class = NumberedPagination
