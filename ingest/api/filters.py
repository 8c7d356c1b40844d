"""Filters of the events endpoint. Every id the client sends is resolved in scope."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import django_filters
from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Max, Q, QuerySet
from django.utils import timezone
from rest_framework.exceptions import ValidationError

from ingest import search
from ingest.models import DeadLetter, Event, Source
from ingest.selectors import newest_event_time
from teams.api.base import (
    BooleanFilter,
    DateTimeFilter,
    NumberFilter,
    StrictFilterSet,
    in_callers_teams,
)
from teams.selectors import team_ids_for


def term_q(term: str) -> Q:
    """Events carrying ``term`` in the entity list its prefix names (#, @, $, keyword)."""
    field = {"#": "hashtags", "@": "mentions", "$": "cashtags"}.get(term[:1], "keywords")
    return Q(**{f"{field}__contains": [term]})


scoped_sources = in_callers_teams(Source.objects.all(), "team")


SENTIMENT_LABELS = [("negative", "negative"), ("neutral", "neutral"), ("positive", "positive")]
EMOTION_LABELS = [(v, v) for v in ("anger", "joy", "optimism", "sadness")]
OFFENSIVE_LABELS = [("not-offensive", "not-offensive"), ("offensive", "offensive")]


class SearchQueryField(forms.CharField):
    """``q``: web-search syntax, cleaned into an ``ingest.search.SearchQuery`` (None when
    blank). A NUL character, more than ``MAX_QUERY_CHARS`` characters, or nothing to look
    for is a field error (400)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", search.MAX_QUERY_CHARS)
        super().__init__(**kwargs)

    def clean(self, value: Any) -> search.SearchQuery | None:
        text = super().clean(value)
        if not text:
            return None
        try:
            return search.parse(text)
        except search.SearchSyntaxError as exc:
            raise DjangoValidationError(str(exc), code="invalid") from None


class SearchQueryFilter(django_filters.Filter):
    """``q``, read by ``SearchQueryField``; applied by ``EventFilter.filter_queryset``."""

    field_class = SearchQueryField


SEARCH_HELP = (
    'Full-text search, web-search syntax: words (all required), "a quoted phrase" (the '
    'text holds it exactly, ignoring case), OR between two terms, -word or -"phrase" to '
    'exclude, word* for a prefix. Words match every form ("delays" finds "delayed") '
    "in the post's detected language. At most {chars} characters and {terms} terms. "
    "Without since, until or source, a search covers the last {days} days of event time "
    "(SEARCH_DEFAULT_WINDOW_DAYS) up to the newest event of your sources. Results carry "
    "`highlight`."
)


class EventFilter(StrictFilterSet):
    """``source`` (id), ``since``/``until`` (event time, ISO 8601), ``q`` (full-text
    search, ``ingest.search``; ``ordering`` ``time`` or ``rank``), ``lang``, ``term`` (a
    hashtag, mention, cashtag or keyword), and
    the labels: ``sentiment`` (negative, neutral, positive: whichever model gave it,
    see ``sentiment_model``), ``emotion`` (anger, joy, optimism, sadness) and
    ``offensive`` (not-offensive, offensive). An unknown label is a 400.
    ``min_virality`` (0 to 1): events whose virality score is at least that (events
    without a score are left out); anything else is a 400.
    The posts behind a trend: ``GET /api/trends/<id>/events/``."""

    source = django_filters.ModelChoiceFilter(queryset=scoped_sources)
    since = DateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = DateTimeFilter(field_name="created_at", lookup_expr="lt")
    q = SearchQueryFilter(
        method="filter_nothing",
        label=SEARCH_HELP.format(
            chars=search.MAX_QUERY_CHARS,
            terms=search.MAX_TERMS,
            days=settings.SEARCH_DEFAULT_WINDOW_DAYS,
        ),
    )
    ordering = django_filters.ChoiceFilter(
        choices=[("time", "time"), ("rank", "rank")],
        method="filter_nothing",
        label="With q: time (default: newest event time first) or rank (best match first: "
        "PostgreSQL's ts_rank_cd, then newest).",
    )
    lang = django_filters.CharFilter()
    term = django_filters.CharFilter(method="filter_term")
    sentiment = django_filters.ChoiceFilter(field_name="sentiment_label", choices=SENTIMENT_LABELS)
    emotion = django_filters.ChoiceFilter(choices=EMOTION_LABELS)
    offensive = django_filters.ChoiceFilter(choices=OFFENSIVE_LABELS)
    min_virality = NumberFilter(
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
            "ordering",
        ]

    def filter_nothing(self, queryset: QuerySet[Event], name: str, value: Any) -> QuerySet[Event]:
        """``q`` and ``ordering`` act together, after every other filter
        (``filter_queryset``)."""
        return queryset

    def filter_queryset(self, queryset: QuerySet[Event]) -> QuerySet[Event]:
        """Every filter, then the search: ``q`` through ``ingest.search.backend()``,
        inside the default window when neither a time bound nor a source is given, and
        ranked when ``ordering=rank``.

        Raises:
            ValidationError: ``{"ordering": [...]}`` for ``ordering=rank`` without ``q``.
        """
        queryset = super().filter_queryset(queryset)
        data = self.form.cleaned_data
        query: search.SearchQuery | None = data.get("q")
        ordering = data.get("ordering") or "time"
        if query is None:
            if ordering == "rank":
                raise ValidationError({"ordering": ["rank orders a search: give q as well."]})
            return queryset
        if not any(data.get(name) for name in ("since", "until", "source")):
            queryset = queryset.filter(created_at__gte=self.default_since(queryset))
        return search.backend().search(queryset, query, by_rank=ordering == "rank")

    def default_since(self, queryset: QuerySet[Event]) -> Any:
        """The start of the default search window: ``SEARCH_DEFAULT_WINDOW_DAYS`` before
        the newest event time of the caller's sources that is not in the future (now, if
        they have none). A live platform's window is the last 30 days; a replayed
        archive's, its last 30 days. Without a caller (``manage.py export`` from a
        shell, scoped by its own options), the newest such event of ``queryset``."""
        now = timezone.now()
        user = getattr(self.request, "user", None)
        if user is not None:
            newest = newest_event_time(team_ids_for(user), not_after=now)
        else:
            newest = queryset.filter(created_at__lte=now).aggregate(newest=Max("created_at"))[
                "newest"
            ]
        return (newest or now) - timedelta(days=settings.SEARCH_DEFAULT_WINDOW_DAYS)

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
