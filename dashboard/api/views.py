"""Pipeline statistics endpoint."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from dashboard import selectors
from ingest.models import Source
from teams.api.base import BoundedDateTimeField, refuse_unknown_query_params
from teams.selectors import team_ids_for

_Latency = inline_serializer(
    "AlertLatency",
    {
        "p50": serializers.FloatField(allow_null=True),
        "p95": serializers.FloatField(allow_null=True),
        "p99": serializers.FloatField(allow_null=True),
        "n": serializers.IntegerField(),
    },
)

_Scoring = inline_serializer(
    "ScoringStats",
    {
        "transformer_share": serializers.FloatField(
            allow_null=True,
            help_text="Events labelled by the transformer heads in the last 60 s over"
            " events stored in the last 60 s (null: none stored).",
        ),
        "backlog": serializers.IntegerField(help_text="Events waiting for the heads."),
        "lag_s": serializers.FloatField(help_text="Seconds the oldest waiting event has waited."),
        "fallback_after_s": serializers.FloatField(
            help_text="Past this wait an event keeps its VADER label."
        ),
        "fell_back_1m": serializers.IntegerField(
            help_text="Events that kept their VADER label for want of time, last 60 s."
        ),
        "active_heads": serializers.DictField(
            child=serializers.CharField(), help_text='"name vN" of the active head by task.'
        ),
    },
)


class _Queue(serializers.Serializer[dict[str, Any]]):
    """One queue of ``twiscope.queues``, in flow order, with its messages waiting."""

    name = serializers.CharField()
    work = serializers.CharField(help_text="What runs on the queue.")
    waiting = serializers.IntegerField(help_text="Messages waiting in the broker.")


class StatsView(APIView):
    """Live pipeline numbers for the caller's teams (see ``dashboard.selectors.stats_for``)."""

    @extend_schema(
        responses=inline_serializer(
            "Stats",
            {
                "events_total": serializers.IntegerField(),
                "events_per_s": serializers.FloatField(),
                "queue_lag": serializers.DictField(child=serializers.IntegerField()),
                "queues": serializers.ListField(child=_Queue()),
                "alert_latency_ms": _Latency,
                "dead_letters_total": serializers.IntegerField(),
                "sources_total": serializers.IntegerField(),
                "scoring": _Scoring,
            },
        )
    )
    def get(self, request: Request) -> Response:
        """The numbers; any query parameter is a 400 (it takes none but ``format``)."""
        refuse_unknown_query_params(request, ())
        return Response(selectors.stats_for(request.user))


class SentimentQuery(serializers.Serializer[dict[str, Any]]):
    """The query of ``GET /api/sentiment/``; a source outside the caller's teams is an
    invalid choice (400), never another team's data."""

    since = BoundedDateTimeField(required=False, help_text="Event time, ISO 8601.")
    until = BoundedDateTimeField(required=False, help_text="Event time, ISO 8601.")
    bucket_s = serializers.ChoiceField(
        choices=selectors.SERIES_BUCKETS, required=False, help_text="Bucket, in seconds."
    )

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        """The declared fields plus ``source``, chosen among the caller's teams' sources
        (none without a request: the schema generator's instance)."""
        fields = super().get_fields()
        request = self.context.get("request")
        scoped = (
            Source.objects.filter(team_id__in=team_ids_for(request.user))
            if request is not None
            else Source.objects.none()
        )
        fields["source"] = serializers.PrimaryKeyRelatedField(
            queryset=scoped, required=False, help_text="One source (default: all)."
        )
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since, until = attrs.get("since"), attrs.get("until")
        if since and until and since >= until:
            raise serializers.ValidationError({"until": ["Must be after since."]})
        return attrs


_SentimentBucket = inline_serializer(
    "SentimentBucket",
    many=True,
    fields={
        "start": serializers.DateTimeField(),
        "negative": serializers.IntegerField(),
        "neutral": serializers.IntegerField(),
        "positive": serializers.IntegerField(),
        "by_transformer": serializers.IntegerField(
            help_text="Of these events, how many the transformer heads labelled (the rest: VADER)."
        ),
    },
)


class SentimentView(APIView):
    """Sentiment over event time for the caller's teams: events per bucket and label."""

    @extend_schema(
        parameters=[SentimentQuery],
        responses=inline_serializer(
            "SentimentSeries",
            {
                "since": serializers.DateTimeField(allow_null=True),
                "until": serializers.DateTimeField(allow_null=True),
                "bucket_s": serializers.IntegerField(allow_null=True),
                "buckets": _SentimentBucket,
            },
        ),
    )
    def get(self, request: Request) -> Response:
        """``until`` defaults to the latest event's time, ``since`` to 24 h before it, the
        bucket to at most 96 per window (``dashboard.selectors.sentiment_series``). A
        window of more than ``selectors.MAX_BUCKETS`` buckets, once its missing ends are
        filled in, is a 400 (on ``bucket_s`` when given, else on ``since``)."""
        query = SentimentQuery(data=request.query_params, context={"request": request})
        refuse_unknown_query_params(request, query.fields)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        source = params.get("source")
        if source is not None:
            source_ids = [source.id]
        else:
            source_ids = list(
                Source.objects.filter(team_id__in=team_ids_for(request.user)).values_list(
                    "id", flat=True
                )
            )
        try:
            series = selectors.sentiment_series(
                source_ids,
                since=params.get("since"),
                until=params.get("until"),
                bucket_s=params.get("bucket_s"),
            )
        except selectors.TooManyBuckets as exc:
            field = "bucket_s" if params.get("bucket_s") else "since"
            raise serializers.ValidationError({field: [str(exc)]}) from None
        if series is None:
            return Response({"since": None, "until": None, "bucket_s": None, "buckets": []})
        return Response(
            {
                "since": series.since,
                "until": series.until,
                "bucket_s": series.bucket_s,
                "buckets": [
                    {"start": b.start, **b.counts, "by_transformer": b.by_transformer}
                    for b in series.buckets
                ],
            }
        )
