"""Endpoints of alerts (read) and alert rules (members read, owners write)."""

from __future__ import annotations

import django_filters
from django.db.models import QuerySet
from rest_framework import permissions, viewsets

from alerts.api.serializers import AlertRuleSerializer, AlertSerializer
from alerts.models import Alert, AlertRule
from teams.api.base import (
    DateTimeFilter,
    IntegerFilter,
    IsTeamOwnerOrReadOnly,
    NewestFirstCursorPagination,
    StrictFilterBackend,
    StrictFilterSet,
    StrictOrderingFilter,
    TeamScopedMixin,
    TeamScopedReadOnlyViewSet,
    in_callers_teams,
)
from teams.models import Team
from twiscope.hotcache import HotListMixin

PREDICTION_CHOICES = [("open", "open"), ("confirmed", "confirmed"), ("withdrawn", "withdrawn")]
"""Where a trend alert's prediction stands (``evidence.story.prediction``)."""

scoped_rules = in_callers_teams(AlertRule.objects.all(), "team")
scoped_teams = in_callers_teams(Team.objects.all(), "id")


class AlertFilter(StrictFilterSet):
    """``severity``, ``rule`` and ``team`` (ids, in scope), ``since``/``until``
    (created_at), ``after_seq`` (alerts after a sequence number: a whole number ≥ 0),
    ``prediction`` (a trend alert's prediction: ``open``, ``confirmed`` or ``withdrawn``)
    and ``hide_withdrawn`` (``true``: leave out predictions that did not materialise)."""

    rule = django_filters.ModelChoiceFilter(queryset=scoped_rules)
    prediction = django_filters.ChoiceFilter(
        field_name="evidence__story__prediction", choices=PREDICTION_CHOICES
    )
    hide_withdrawn = django_filters.BooleanFilter(method="filter_hide_withdrawn")
    team = django_filters.ModelChoiceFilter(queryset=scoped_teams)
    since = DateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = DateTimeFilter(field_name="created_at", lookup_expr="lt")
    after_seq = IntegerFilter(field_name="seq", lookup_expr="gt", min_value=0)

    class Meta:
        model = Alert
        fields = [
            "severity",
            "rule",
            "team",
            "since",
            "until",
            "after_seq",
            "prediction",
            "hide_withdrawn",
        ]

    def filter_hide_withdrawn(
        self, queryset: QuerySet[Alert], name: str, value: bool
    ) -> QuerySet[Alert]:
        """Leave out the alerts whose prediction was withdrawn (``value`` true)."""
        if not value:
            return queryset
        return queryset.exclude(evidence__story__prediction="withdrawn")


class AlertViewSet(HotListMixin, TeamScopedReadOnlyViewSet):
    """Alerts of the caller's teams, newest first (cursor pagination).

    ``ordering=seq`` lists them oldest first by sequence number instead: the catch-up
    of a client that missed pushes, ``?team=<id>&after_seq=<last seq held>&ordering=seq``,
    following ``next`` until it is null (pages of ``page_size``, 50 by default, up to
    500). Within a team ``seq`` is unique and an alert is visible only once every
    smaller ``seq`` of its team is (the sequence row is locked until commit), so the
    pages hold every alert after ``after_seq`` in order, each once. ``ordering`` also
    takes ``id`` and ``-seq``; the default is ``-id``. First pages come from the hot
    cache (``twiscope.hotcache``: ``alerts``).
    """

    hot_view = "alerts"
    hot_kinds = ("alerts",)

    queryset = Alert.objects.select_related("rule")
    serializer_class = AlertSerializer
    filterset_class = AlertFilter
    filter_backends = [StrictFilterBackend, StrictOrderingFilter]
    ordering_fields = ["id", "seq"]
    ordering = ["-id"]
    pagination_class = NewestFirstCursorPagination


class AlertRuleFilter(StrictFilterSet):
    """``team`` (id, in scope), ``enabled`` (``true``/``false``), ``kind``."""

    team = django_filters.ModelChoiceFilter(queryset=scoped_teams)

    class Meta:
        model = AlertRule
        fields = ["team", "enabled", "kind"]


class AlertRuleViewSet(TeamScopedMixin, viewsets.ModelViewSet[AlertRule]):
    """Alert rules of the caller's teams: members read, owners create and change."""

    queryset = AlertRule.objects.order_by("id")
    serializer_class = AlertRuleSerializer
    permission_classes = [permissions.IsAuthenticated, IsTeamOwnerOrReadOnly]
    filterset_class = AlertRuleFilter
