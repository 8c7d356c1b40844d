"""Filters of the events endpoint. Every id the client sends is resolved in scope."""

from __future__ import annotations

import django_filters
from django.db.models import Q, QuerySet

from ingest.models import DeadLetter, Event, Source
from teams.api.base import BooleanFilter, StrictFilterSet, in_callers_teams


def term_q(term: str) -> Q:
    """Events carrying ``term`` in the entity list its prefix names (#, @, $, keyword)."""
    field = {"#": "hashtags", "@": "mentions", "$": "cashtags"}.get(term[:1], "keywords")
    return Q(**{f"{field}__contains": [term]})


scoped_sources = in_callers_teams(Source.objects.all(), "team")


SENTIMENT_LABELS = [("negative", "negative"), ("neutral", "neutral"), ("positive", "positive")]
EMOTION_LABELS = [(v, v) for v in ("anger", "joy", "optimism", "sadness")]
OFFENSIVE_LABELS = [("not-offensive", "not-offensive"), ("offensive", "offensive")]


class EventFilter(StrictFilterSet):
    """``source`` (id), ``since``/``until`` (event time, ISO 8601), ``q`` (text contains,
    case-insensitive), ``lang``, ``term`` (a hashtag, mention, cashtag or keyword), and
    the labels: ``sentiment`` (negative, neutral, positive: whichever model gave it,
    see ``sentiment_model``), ``emotion`` (anger, joy, optimism, sadness) and
    ``offensive`` (not-offensive, offensive). An unknown label is a 400.
    ``min_virality`` (0 to 1): events whose virality score is at least that (events
    without a score are left out); anything else is a 400.
    The posts behind a trend: ``GET /api/trends/<id>/events/``."""

    source = django_filters.ModelChoiceFilter(queryset=scoped_sources)
    since = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    q = django_filters.CharFilter(field_name="text", lookup_expr="icontains")
    lang = django_filters.CharFilter()
    term = django_filters.CharFilter(method="filter_term")
    sentiment = django_filters.ChoiceFilter(field_name="sentiment_label", choices=SENTIMENT_LABELS)
    emotion = django_filters.ChoiceFilter(choices=EMOTION_LABELS)
    offensive = django_filters.ChoiceFilter(choices=OFFENSIVE_LABELS)
    min_virality = django_filters.NumberFilter(
        field_name="virality_score",
        lookup_expr="gte",
        min_value=0,
        max_value=1,
        label="Virality score at least this (0 to 1); unscored events are left out.",
    )

    class Meta:
        model = Event
        fields = [
            "source",
            "since",
            "until",
            "q",
            "lang",
            "term",
            "sentiment",
            "emotion",
            "offensive",
            "min_virality",
        ]

    def filter_term(self, queryset: QuerySet[Event], name: str, value: str) -> QuerySet[Event]:
        return queryset.filter(term_q(value.lower() if value[:1] in "#@" else value))


class DeadLetterFilter(StrictFilterSet):
    """``stage`` (a pipeline stage), ``source`` (id, in scope) and ``open`` (true: still
    parked; false: requeued)."""

    source = django_filters.ModelChoiceFilter(queryset=scoped_sources)
    open = BooleanFilter(
        field_name="requeued_at", lookup_expr="isnull", label="Still parked (not requeued)."
    )

    class Meta:
        model = DeadLetter
        fields = ["stage", "source"]
