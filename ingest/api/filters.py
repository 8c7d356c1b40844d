"""Filters of the events endpoint. Every id the client sends is resolved in scope."""

from __future__ import annotations

from datetime import timedelta

import django_filters
from django.db.models import Q, QuerySet

from dashboard.api.base import in_callers_teams
from ingest.models import DeadLetter, Event, Source
from mlengine.models import Trend


def term_q(term: str) -> Q:
    """Events carrying ``term`` in the entity list its prefix names (#, @, $, keyword)."""
    field = {"#": "hashtags", "@": "mentions", "$": "cashtags"}.get(term[:1], "keywords")
    return Q(**{f"{field}__contains": [term]})


scoped_sources = in_callers_teams(Source.objects.all(), "team")
scoped_trends = in_callers_teams(Trend.objects.all(), "source__team")


class EventFilter(django_filters.FilterSet):
    """``source`` (id), ``since``/``until`` (event time, ISO 8601), ``q`` (text contains,
    case-insensitive), ``lang``, ``term`` (a hashtag, mention, cashtag or keyword) and
    ``trend`` (id: the posts behind that trend)."""

    source = django_filters.ModelChoiceFilter(queryset=scoped_sources)
    since = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    q = django_filters.CharFilter(field_name="text", lookup_expr="icontains")
    lang = django_filters.CharFilter()
    term = django_filters.CharFilter(method="filter_term")
    trend = django_filters.ModelChoiceFilter(queryset=scoped_trends, method="filter_trend")

    class Meta:
        model = Event
        fields = ["source", "since", "until", "q", "lang", "term", "trend"]

    def filter_term(self, queryset: QuerySet[Event], name: str, value: str) -> QuerySet[Event]:
        return queryset.filter(term_q(value.lower() if value[:1] in "#@" else value))

    def filter_trend(self, queryset: QuerySet[Event], name: str, value: Trend) -> QuerySet[Event]:
        return queryset.filter(
            term_q(value.term),
            source_id=value.source_id,
            created_at__gte=value.bucket_start,
            created_at__lt=value.bucket_start + timedelta(seconds=value.bucket_s),
        )


class DeadLetterFilter(django_filters.FilterSet):
    """``stage`` and ``source`` (id, in scope)."""

    source = django_filters.ModelChoiceFilter(queryset=scoped_sources)

    class Meta:
        model = DeadLetter
        fields = ["stage", "source"]
