"""Endpoints of trends, the posts behind each, the streams' event-time clocks, the
anomalies and their series (read), and watches (members read, owners write)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import Count, F, IntegerField, OuterRef, QuerySet, Subquery
from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ingest.api.filters import term_q
from ingest.api.serializers import EventSerializer
from ingest.api.views import EventCursorPagination
from ingest.models import Event
from mlengine.anomalies.watches import delete_watch
from mlengine.api.filters import (
    AnomalyFilter,
    ModelVersionFilter,
    StoryFilter,
    StreamFilter,
    TrendFilter,
    WatchFilter,
)
from mlengine.api.serializers import (
    AnomalySerializer,
    ModelVersionSerializer,
    SeriesSerializer,
    SourceRefSerializer,
    StorySerializer,
    StreamSerializer,
    TrendSerializer,
    WatchRefSerializer,
    WatchSerializer,
)
from mlengine.models import (
    Anomaly,
    ModelVersion,
    Series,
    SeriesPoint,
    StreamClock,
    Trend,
    Watch,
)
from teams.api.base import (
    BIGINT_MAX,
    BoundedDateTimeField,
    IsTeamOwnerOrReadOnly,
    NumberedPagination,
    StrictCharField,
    StrictFilterBackend,
    StrictOrderingFilter,
    TeamScopedMixin,
    TeamScopedReadOnlyViewSet,
    refuse_unknown_query_params,
)
from teams.selectors import team_ids_for
from twiscope.hotcache import HotListMixin


class TrendViewSet(HotListMixin, TeamScopedReadOnlyViewSet):
    """Detected trends, newest detection first; ``ordering`` by score, events, time.
    First pages come from the hot cache (``twiscope.hotcache``: ``trends``)."""

    hot_view = "trends"
    hot_kinds = ("trends",)

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


class StoryViewSet(TeamScopedReadOnlyViewSet):
    """Stories (trends that surged together), newest first by first detection (event
    time); each read from its first trend with its members (one prefetch per page)."""

    team_field = "source__team"
    queryset = (
        Trend.objects.filter(story_id=F("id")).select_related("source").prefetch_related("members")
    )
    serializer_class = StorySerializer
    filterset_class = StoryFilter
    filter_backends = [StrictFilterBackend, StrictOrderingFilter]
    ordering_fields = ["evidence_created_at", "id"]
    ordering = ["-evidence_created_at", "-id"]
    pagination_class = NumberedPagination


class StreamViewSet(TeamScopedReadOnlyViewSet):
    """Each source's event-time clock: its watermark (every earlier event is counted),
    trend bucket, counted and late events. Shows where a replay is in event time."""

    team_field = "source__team"
    queryset = StreamClock.objects.select_related("source").order_by("source_id")
    serializer_class = StreamSerializer

    def get_queryset(self) -> QuerySet[StreamClock]:
        """The clocks in scope, each annotated with its stream's predictions: made,
        confirmed and withdrawn (three correlated counts on the trend table's
        ``trend_source_bucket`` index; no join)."""
        predictions = Trend.objects.filter(source_id=OuterRef("source_id"), predicted=True)

        def count(rows: QuerySet[Trend]) -> Subquery:
            return Subquery(
                rows.order_by().values("source_id").annotate(n=Count("id")).values("n")[:1],
                output_field=IntegerField(),
            )

        return (
            super()
            .get_queryset()
            .annotate(
                predictions_made=count(predictions),
                predictions_confirmed=count(predictions.filter(confirmed_at__isnull=False)),
                predictions_withdrawn=count(
                    predictions.filter(confirmed_at__isnull=True, withdrawn_at__isnull=False)
                ),
            )
        )

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


class AnomalyViewSet(TeamScopedReadOnlyViewSet):
    """Anomalies of the caller's teams' series (``mlengine.anomalies.stage``), newest
    window first; ``ordering`` by score, window start or detection time."""

    team_field = "source__team"
    queryset = Anomaly.objects.select_related("source", "series__watch")
    serializer_class = AnomalySerializer
    filterset_class = AnomalyFilter
    filter_backends = [StrictFilterBackend, StrictOrderingFilter]
    ordering_fields = ["score", "window_start", "detected_at"]
    ordering = ["-window_start", "-id"]
    pagination_class = NumberedPagination


MAX_SERIES_POINTS = 7 * 288
"""The most points one ``GET /api/series/`` returns (a week of 5-minute buckets)."""


class WatchViewSet(TeamScopedMixin, viewsets.ModelViewSet[Watch]):
    """Watches of the caller's teams: members read, owners create, change and delete.
    Another team's watch is a 404. Each enabled watch gets a series of kind ``watch`` in
    every source it covers (``mlengine.anomalies.stage``)."""

    queryset = Watch.objects.order_by("id")
    serializer_class = WatchSerializer
    permission_classes = [permissions.IsAuthenticated, IsTeamOwnerOrReadOnly]
    filterset_class = WatchFilter

    def perform_destroy(self, instance: Watch) -> None:
        delete_watch(watch=instance)


class SeriesQuery(serializers.Serializer[dict[str, Any]]):
    """The query of ``GET /api/series/``. ``term`` is required with ``kind=term`` only,
    ``watch`` with ``kind=watch`` only; ``until`` defaults to the end of the series'
    last bucket, ``since`` to 24 h before ``until`` (event time, ISO 8601)."""

    source = serializers.IntegerField(  # type: ignore[assignment]
        min_value=1, max_value=BIGINT_MAX, help_text="Source id (one of your teams')."
    )
    kind = serializers.ChoiceField(choices=Series.Kind.choices)
    term = StrictCharField(required=False, allow_blank=False, max_length=200)
    watch = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=BIGINT_MAX,
        help_text="Watch id (one of your teams'), kind=watch.",
    )
    since = BoundedDateTimeField(required=False, help_text="Event time, ISO 8601.")
    until = BoundedDateTimeField(required=False, help_text="Event time, ISO 8601.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["kind"] == Series.Kind.TERM and not attrs.get("term"):
            raise serializers.ValidationError({"term": ["Required with kind=term."]})
        if attrs["kind"] != Series.Kind.TERM and attrs.get("term"):
            raise serializers.ValidationError({"term": ["Only with kind=term."]})
        if attrs["kind"] == Series.Kind.WATCH and not attrs.get("watch"):
            raise serializers.ValidationError({"watch": ["Required with kind=watch."]})
        if attrs["kind"] != Series.Kind.WATCH and attrs.get("watch"):
            raise serializers.ValidationError({"watch": ["Only with kind=watch."]})
        since, until = attrs.get("since"), attrs.get("until")
        if since and until and since >= until:
            raise serializers.ValidationError({"until": ["Must be after since."]})
        return attrs


class SeriesView(APIView):
    """One series of a source with its expected band and anomaly windows."""

    error_codes = ["404"]  # a series that is not (yet) there, or not the caller's

    @extend_schema(parameters=[SeriesQuery], responses=SeriesSerializer)
    def get(self, request: Request) -> Response:
        """The series' points in the window (at most ``MAX_SERIES_POINTS``: 400 past
        it), its anomalies overlapping the window, the source's term series and the
        watches with a series there. 404 when the source (or the watch) is not one of
        your teams' or has no such series (yet). A watch's series is its active one in
        the source, else its latest (the watch's terms changed, or it was disabled)."""
        query = SeriesQuery(data=request.query_params)
        refuse_unknown_query_params(request, query.fields)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        series = (
            Series.objects.select_related("source", "watch")
            .filter(
                source_id=params["source"],
                source__team_id__in=team_ids_for(request.user),
                kind=params["kind"],
                term=params.get("term", ""),
                watch_id=params.get("watch"),
            )
            .order_by("-active", "-id")
            .first()
        )
        if series is None:
            raise Http404("No such series.")
        bucket = timedelta(seconds=series.bucket_s)
        until = params.get("until") or series.last_bucket + bucket
        since = params.get("since") or until - timedelta(days=1)
        if (until - since) / bucket > MAX_SERIES_POINTS:
            raise serializers.ValidationError(
                {"since": [f"At most {MAX_SERIES_POINTS} buckets: choose a shorter window."]}
            )
        points = [
            {
                "start": p.bucket_start,
                "value": p.value,
                "expected": p.expected,
                "low": p.low,
                "high": p.high,
                "score": p.score,
                "anomaly": p.anomaly,
            }
            for p in SeriesPoint.objects.filter(
                series=series, bucket_start__gte=since, bucket_start__lt=until
            ).order_by("bucket_start")
        ]
        windows = list(
            Anomaly.objects.filter(
                series=series, window_start__lt=until, window_end__gt=since
            ).order_by("window_start")
        )
        terms = Series.objects.filter(source_id=series.source_id, kind=Series.Kind.TERM).order_by(
            "-active", "term"
        )
        watches: dict[int, dict[str, Any]] = {}
        for watch_id, name, active in (
            Series.objects.filter(source_id=series.source_id, kind=Series.Kind.WATCH)
            .order_by("watch__name", "watch_id")
            .values_list("watch_id", "watch__name", "active")
        ):
            seen = watches.setdefault(watch_id, {"id": watch_id, "name": name, "active": False})
            seen["active"] = seen["active"] or active
        return Response(
            {
                "source": SourceRefSerializer(series.source).data,
                "kind": series.kind,
                "term": series.term,
                "watch": WatchRefSerializer(series.watch).data if series.watch else None,
                "watch_terms": list(series.watch_terms),
                "bucket_s": series.bucket_s,
                "since": since,
                "until": until,
                "points": points,
                "anomalies": [
                    {
                        "id": a.id,
                        "window_start": a.window_start,
                        "window_end": a.window_end,
                        "score": a.score,
                        "value": a.value,
                        "closed": a.closed,
                    }
                    for a in windows
                ],
                "terms": [{"term": t.term, "active": t.active} for t in terms],
                "watches": sorted(watches.values(), key=lambda w: (not w["active"], w["name"])),
            }
        )
