"""Filters of the trends and streams endpoints."""

from __future__ import annotations

from datetime import timedelta

import django_filters
from django.db.models import (
    DurationField,
    ExpressionWrapper,
    F,
    OuterRef,
    QuerySet,
    Subquery,
    Value,
)

from ingest.api.filters import scoped_sources
from mlengine.models import StreamClock, Trend
from teams.api.base import BooleanFilter, StrictFilterSet


class TrendFilter(StrictFilterSet):
    """``source`` (id), ``term``, ``since``/``until`` (bucket start, event time),
    ``min_score``, and ``current=true`` (``false``, the default, is no filter): only
    trends of each source's two latest trend buckets (what is trending now)."""

    source = django_filters.ModelChoiceFilter(queryset=scoped_sources)
    term = django_filters.CharFilter()
    since = django_filters.IsoDateTimeFilter(field_name="bucket_start", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="bucket_start", lookup_expr="lt")
    min_score = django_filters.NumberFilter(field_name="score", lookup_expr="gte")
    current = BooleanFilter(method="filter_current")

    class Meta:
        model = Trend
        fields = ["source", "term", "since", "until", "min_score", "current"]

    def filter_current(self, queryset: QuerySet[Trend], name: str, value: bool) -> QuerySet[Trend]:
        if not value:
            return queryset
        latest = (
            Trend.objects.filter(source_id=OuterRef("source_id"))
            .order_by("-bucket_start")
            .values("bucket_start")[:1]
        )
        return queryset.annotate(latest_bucket=Subquery(latest)).filter(
            bucket_start__gte=F("latest_bucket")
            - ExpressionWrapper(
                F("bucket_s") * Value(timedelta(seconds=1)), output_field=DurationField()
            )
        )


class StreamFilter(StrictFilterSet):
    """``source`` (id, in scope)."""

    source = django_filters.ModelChoiceFilter(queryset=scoped_sources)

    class Meta:
        model = StreamClock
        fields = ["source"]
