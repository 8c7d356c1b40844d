"""Endpoints of alerts (read), alert rules and delivery channels (members read,
owners write) and deliveries (read)."""

from __future__ import annotations

from typing import Any

import django_filters
from django.contrib.postgres.aggregates import ArrayAgg
from django.db import IntegrityError
from django.db.models import Prefetch, Q, QuerySet, Value
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from alerts import delivery
from alerts.api.serializers import (
    AlertRuleSerializer,
    AlertSerializer,
    ChannelSerializer,
    ChannelTestSerializer,
    DeliverySerializer,
)
from alerts.models import Alert, AlertRule, Channel, Delivery, DeliveryAttempt
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

PREDICTION_CHOICES = [("open", "open"), ("confirmed", "confirmed"), ("withdrawn", "withdrawn")]
"""Where a trend alert's prediction stands (``evidence.story.prediction``)."""

scoped_rules = in_callers_teams(AlertRule.objects.all(), "team")
scoped_teams = in_callers_teams(Team.objects.all(), "id")
scoped_alerts = in_callers_teams(Alert.objects.all(), "team")
scoped_channels = in_callers_teams(Channel.objects.all(), "team")


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


class AlertViewSet(TeamScopedReadOnlyViewSet):
    """Alerts of the caller's teams, newest first (cursor pagination).

    ``ordering=seq`` lists them oldest first by sequence number instead: the catch-up
    of a client that missed pushes, ``?team=<id>&after_seq=<last seq held>&ordering=seq``,
    following ``next`` until it is null (pages of ``page_size``, 50 by default, up to
    500). Within a team ``seq`` is unique and an alert is visible only once every
    smaller ``seq`` of its team is (the sequence row is locked until commit), so the
    pages hold every alert after ``after_seq`` in order, each once. ``ordering`` also
    takes ``id`` and ``-seq``; the default is ``-id``.
    """

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

    queryset = AlertRule.objects.annotate(
        channel_ids=ArrayAgg(
            "channels__id",
            filter=Q(channels__isnull=False),
            default=Value([]),
            order_by="channels__id",
        )
    ).order_by("id")
    serializer_class = AlertRuleSerializer
    permission_classes = [permissions.IsAuthenticated, IsTeamOwnerOrReadOnly]
    filterset_class = AlertRuleFilter


NAME_TAKEN = {"name": "the team already has a channel of this name"}


class ChannelFilter(StrictFilterSet):
    """``team`` (id, in scope), ``kind``, ``enabled`` (``true``/``false``)."""

    team = django_filters.ModelChoiceFilter(queryset=scoped_teams)

    class Meta:
        model = Channel
        fields = ["team", "kind", "enabled"]


class ChannelViewSet(TeamScopedMixin, viewsets.ModelViewSet[Channel]):
    """Delivery channels of the caller's teams (signed webhooks, Slack, email): members
    read, owners create, change, delete and test them. Another team's channel is a
    404."""

    queryset = Channel.objects.order_by("id")
    serializer_class = ChannelSerializer
    permission_classes = [permissions.IsAuthenticated, IsTeamOwnerOrReadOnly]
    filterset_class = ChannelFilter

    @extend_schema(
        responses={
            201: OpenApiResponse(
                ChannelSerializer,
                description="The channel; a webhook channel's also carries `secret`, its "
                "Standard Webhooks signing secret (`whsec_` + base64), shown this once.",
            )
        }
    )
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        secrets = data.pop("secrets", {})
        try:
            channel, secret = delivery.save_channel(channel=None, data=data, secrets=secrets)
        except IntegrityError:
            raise serializers.ValidationError(NAME_TAKEN) from None
        body = dict(self.get_serializer(channel).data)
        if secret is not None:
            body["secret"] = secret
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_update(self, serializer: Any) -> None:
        data = dict(serializer.validated_data)
        secrets = data.pop("secrets", {})
        try:
            serializer.instance, _ = delivery.save_channel(
                channel=serializer.instance, data=data, secrets=secrets
            )
        except IntegrityError:
            raise serializers.ValidationError(NAME_TAKEN) from None

    @extend_schema(
        request=None,
        responses={200: ChannelTestSerializer},
        description="Send a test message to the channel now and answer with what came "
        "of it (the receiver's answer, within `DELIVERY_TEST_TIMEOUT_S`); owners only. "
        "The test is not a delivery: not in the log, no retry, no change of health.",
    )
    @action(detail=True, methods=["post"], url_path="test")
    def test(self, request: Request, pk: str | None = None) -> Response:
        channel = self.get_object()
        sent = delivery.send_test(channel=channel)
        body = {
            "ok": sent.ok,
            "http_status": sent.http_status,
            "latency_ms": sent.latency_ms,
            "error": sent.error,
        }
        return Response(ChannelTestSerializer(body).data)


class DeliveryFilter(StrictFilterSet):
    """``alert`` and ``channel`` (ids, in scope), ``status``, ``event``."""

    alert = django_filters.ModelChoiceFilter(queryset=scoped_alerts)
    channel = django_filters.ModelChoiceFilter(queryset=scoped_channels)

    class Meta:
        model = Delivery
        fields = ["alert", "channel", "status", "event"]


class DeliveryViewSet(TeamScopedReadOnlyViewSet):
    """Deliveries of the caller's teams' alerts to their channels, newest first (cursor
    pagination), each with its tries (time, outcome, HTTP status, latency, error)."""

    queryset = Delivery.objects.prefetch_related(
        Prefetch("attempt_log", queryset=DeliveryAttempt.objects.order_by("id"))
    )
    serializer_class = DeliverySerializer
    filterset_class = DeliveryFilter
    pagination_class = NewestFirstCursorPagination
