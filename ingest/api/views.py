"""Read endpoints of sources, events and dead letters."""

from __future__ import annotations

from rest_framework.pagination import CursorPagination

from dashboard.api.base import TeamScopedReadOnlyViewSet
from ingest.api.filters import DeadLetterFilter, EventFilter
from ingest.api.serializers import DeadLetterSerializer, EventSerializer, SourceSerializer
from ingest.models import DeadLetter, Event, Source


class EventCursorPagination(CursorPagination):
    """Newest event time first; stable under concurrent inserts."""

    ordering = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class NewestFirstCursorPagination(CursorPagination):
    ordering = "-id"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class SourceViewSet(TeamScopedReadOnlyViewSet):
    """The caller's teams' sources, with their counters and watermark."""

    queryset = Source.objects.order_by("id")
    serializer_class = SourceSerializer
    filterset_fields = ["kind", "enabled"]


class EventViewSet(TeamScopedReadOnlyViewSet):
    """Stored events, newest event time first (cursor pagination)."""

    team_field = "source__team"
    queryset = Event.objects.all()
    serializer_class = EventSerializer
    filterset_class = EventFilter
    pagination_class = EventCursorPagination


class DeadLetterViewSet(TeamScopedReadOnlyViewSet):
    """Input the pipeline parked, with its reason and payload, newest first."""

    team_field = "source__team"
    queryset = DeadLetter.objects.all()
    serializer_class = DeadLetterSerializer
    filterset_class = DeadLetterFilter
    pagination_class = NewestFirstCursorPagination
