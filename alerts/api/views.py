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

from alerts import delivery, lifecycle, selectors
from alerts.api.serializers import (
    AlertRuleSerializer,
    AlertSerializer,
    AlertSummarySerializer,
    AssignSerializer,
    ChannelSerializer,
    ChannelTestSerializer,
    CommentSerializer,
    DeliverySerializer,
    MarkNoiseSerializer,
    RuleStatsSerializer,
    SnoozeSerializer,
)
from alerts.models import Alert, AlertRule, Channel, Delivery, DeliveryAttempt
from alerts.payload import with_payload_relations
from teams.api.base import (
    INT_MAX,
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
scoped_alerts = in_callers_teams(Alert.objects.all(), "team")
scoped_channels = in_callers_teams(Channel.objects.all(), "team")


class AssigneeField(django_filters.fields.forms.CharField):
    """``me`` or a user's id (a whole number ≥ 1)."""

    def clean(self, value: Any) -> Any:
        value = super().clean(value)
        if value in (None, "", "me"):
            return value
        if not value.isdigit() or not 0 < int(value) <= INT_MAX:
            raise django_filters.fields.forms.ValidationError("Enter me or a user id.")
        return int(value)


class AssigneeFilter(django_filters.CharFilter):
    field_class = AssigneeField


class AlertFilter(StrictFilterSet):
    """``severity``, ``rule`` and ``team`` (ids, in scope), ``since``/``until``
    (created_at: the created-at range), ``after_seq`` (alerts after a sequence number:
    a whole number ≥ 0), ``prediction`` (a trend alert's prediction: ``open``,
    ``confirmed`` or ``withdrawn``), ``hide_withdrawn`` (``true``: leave out predictions
    that did not materialise), ``state`` (``open``, ``acknowledged``, ``resolved``,
    ``noise``), ``assignee`` (a user id, or ``me``), ``watch`` (the watch of an anomaly
    alert's series: id), ``source`` (the source of the alert's trend, anomaly or post:
    id) and ``q`` (case-insensitive substring of the title or of the terms: the trend's
    term, the story's terms, the anomaly's series term)."""

    rule = django_filters.ModelChoiceFilter(queryset=scoped_rules)
    state = django_filters.ChoiceFilter(choices=Alert.State.choices)
    assignee = AssigneeFilter(method="filter_assignee")
    watch = IntegerFilter(field_name="anomaly__series__watch", min_value=1)
    source = IntegerFilter(method="filter_source", min_value=1)
    q = django_filters.CharFilter(method="filter_q", max_length=200)
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
            "state",
            "assignee",
            "watch",
            "source",
            "q",
        ]

    def filter_assignee(self, queryset: QuerySet[Alert], name: str, value: Any) -> QuerySet[Alert]:
        """Alerts assigned to ``value`` (a user id, or ``me``: the caller)."""
        if value == "me":
            return queryset.filter(assignee_id=self.request.user.pk)
        return queryset.filter(assignee_id=value)

    def filter_source(self, queryset: QuerySet[Alert], name: str, value: int) -> QuerySet[Alert]:
        """Alerts whose trend, anomaly or post is of the source ``value``."""
        return queryset.filter(
            Q(trend__source_id=value) | Q(anomaly__source_id=value) | Q(event__source_id=value)
        )

    def filter_q(self, queryset: QuerySet[Alert], name: str, value: str) -> QuerySet[Alert]:
        """Title or terms holding ``value`` (ILIKE; a sequential scan of the team's
        alerts, fine at a desk's thousands)."""
        return queryset.filter(
            Q(title__icontains=value)
            | Q(evidence__term__icontains=value)
            | Q(evidence__story__terms__icontains=value)
            | Q(evidence__series__term__icontains=value)
        )

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

    queryset = with_payload_relations(Alert.objects.all())
    serializer_class = AlertSerializer
    filterset_class = AlertFilter
    filter_backends = [StrictFilterBackend, StrictOrderingFilter]
    ordering_fields = ["id", "seq"]
    ordering = ["-id"]
    pagination_class = NewestFirstCursorPagination

    def _change(self, body: type[serializers.Serializer[Any]] | None, request: Request) -> Response:
        """Run the lifecycle ``action`` of this request on the alert (404 outside the
        caller's teams); answer the alert, or 400 with the body's or the refusal's field
        error."""
        alert = self.get_object()
        data: dict[str, Any] = {}
        if body is not None:
            parsed = body(data=request.data)
            parsed.is_valid(raise_exception=True)
            data = dict(parsed.validated_data)
        change = lifecycle.Change(
            action=self.action,
            reason=data.get("reason", ""),
            assignee_id=data.get("user"),
            until=data.get("until"),
            text=data.get("text", ""),
        )
        try:
            lifecycle.apply(alert_id=alert.id, user=request.user, change=change)
        except lifecycle.TransitionRefused as refused:
            raise serializers.ValidationError({refused.field: [refused.message]}) from None
        fresh = with_payload_relations(Alert.objects.filter(id=alert.id)).get()
        return Response(AlertSerializer(fresh).data)

    @extend_schema(request=None, responses={200: AlertSerializer, 400: OpenApiResponse()})
    @action(detail=True, methods=["post"], filterset_class=None)
    def acknowledge(self, request: Request, pk: str | None = None) -> Response:
        """Acknowledge an open alert (any member of its team)."""
        return self._change(None, request)

    @extend_schema(request=None, responses={200: AlertSerializer, 400: OpenApiResponse()})
    @action(detail=True, methods=["post"], filterset_class=None)
    def resolve(self, request: Request, pk: str | None = None) -> Response:
        """Resolve an open or acknowledged alert; its story's size is recorded, and
        the pipeline re-opens it if the story keeps growing."""
        return self._change(None, request)

    @extend_schema(request=None, responses={200: AlertSerializer, 400: OpenApiResponse()})
    @action(detail=True, methods=["post"], filterset_class=None)
    def reopen(self, request: Request, pk: str | None = None) -> Response:
        """Re-open an acknowledged, resolved or noise alert (unsnoozed)."""
        return self._change(None, request)

    @extend_schema(
        request=MarkNoiseSerializer, responses={200: AlertSerializer, 400: OpenApiResponse()}
    )
    @action(detail=True, methods=["post"], url_path="mark-noise", filterset_class=None)
    def mark_noise(self, request: Request, pk: str | None = None) -> Response:
        """Mark an open or acknowledged alert as noise (a false positive), with an
        optional ``reason``."""
        return self._change(MarkNoiseSerializer, request)

    @extend_schema(
        request=AssignSerializer, responses={200: AlertSerializer, 400: OpenApiResponse()}
    )
    @action(detail=True, methods=["post"], filterset_class=None)
    def assign(self, request: Request, pk: str | None = None) -> Response:
        """Assign the alert to ``user``, a member of its team (anyone else: 400 on
        ``user``), or unassign it (null)."""
        return self._change(AssignSerializer, request)

    @extend_schema(
        request=SnoozeSerializer, responses={200: AlertSerializer, 400: OpenApiResponse()}
    )
    @action(detail=True, methods=["post"], filterset_class=None)
    def snooze(self, request: Request, pk: str | None = None) -> Response:
        """Snooze an open or acknowledged alert ``until`` a time to come (a past one:
        400 on ``until``); the pipeline wakes it if its story keeps growing."""
        return self._change(SnoozeSerializer, request)

    @extend_schema(
        request=CommentSerializer, responses={200: AlertSerializer, 400: OpenApiResponse()}
    )
    @action(detail=True, methods=["post"], filterset_class=None)
    def comment(self, request: Request, pk: str | None = None) -> Response:
        """Add a comment (``text``) to the alert's activity."""
        return self._change(CommentSerializer, request)

    @extend_schema(responses=AlertSummarySerializer)
    @action(detail=False, methods=["get"], pagination_class=None)
    def summary(self, request: Request) -> Response:
        """Counts of the caller's teams' alerts per state and per severity, after the
        same filters as the list (``team``, ``since``…)."""
        counts = selectors.alert_summary(self.filter_queryset(self.get_queryset()))
        return Response(AlertSummarySerializer(counts).data)


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

    @extend_schema(responses=RuleStatsSerializer, filters=False)
    @action(detail=True, methods=["get"], filterset_class=None)
    def stats(self, request: Request, pk: str | None = None) -> Response:
        """The rule's figures: alerts fired, acknowledged, resolved, the share marked
        noise and the median seconds to acknowledge (one SQL aggregate)."""
        rule = self.get_object()
        return Response(RuleStatsSerializer(selectors.rule_stats(rule.id)).data)


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
