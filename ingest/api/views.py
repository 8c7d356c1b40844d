"""Read endpoints of sources, events and dead letters."""

from __future__ import annotations

from ingest.api.filters import DeadLetterFilter, EventFilter
from ingest.api.serializers import DeadLetterSerializer, EventSerializer, SourceSerializer
from ingest.models import DeadLetter, Event, Source
from teams.api.base import (
    NewestFirstCursorPagination,
    StrictCursorPagination,
    TeamScopedReadOnlyViewSet,
)


class EventCursorPagination(StrictCursorPagination):
    """Newest event time first, 50 a page (``page_size`` 1 to 500); stable under
    concurrent inserts."""

    ordering = ("-created_at", "-id")


class SourceViewSet(TeamScopedReadOnlyViewSet):
    """The caller's teams' sources, with their counters and declared input watermark."""

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
