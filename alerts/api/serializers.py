"""Serializers of alerts and alert rules (the alert shape is also the WebSocket payload)."""

from __future__ import annotations

import math
from typing import Any

from rest_framework import serializers

from alerts import services
from alerts.models import Alert, AlertRule
from alerts.payload import alert_payload, latency_ms
from ingest.models import Source
from mlengine import facade
from teams.api.base import (
    INT_MAX,
    BoundedDateTimeField,
    StrictCharField,
    StrictModelSerializer,
    check_team_and_source,
    limit_to_owned_teams,
)
from teams.models import Team


class RuleRefSerializer(serializers.ModelSerializer[AlertRule]):
    class Meta:
        model = AlertRule
        fields = ["id", "name"]
        read_only_fields = fields


class UserRefSerializer(serializers.Serializer[Any]):
    """A user as an alert shows them."""

    id = serializers.IntegerField(read_only=True)
    username = serializers.CharField(read_only=True)


class ActivitySerializer(serializers.Serializer[Any]):
    """One lifecycle change (``alerts.payload.activity_payload``): ``user`` is null
    for the pipeline (``escalated``); ``action`` is ``acknowledge``, ``resolve``,
    ``reopen``, ``mark_noise``, ``assign``, ``snooze``, ``comment`` or ``escalated``;
    ``detail`` is the reason, comment, assignee id or snooze end, in words."""

    at = serializers.DateTimeField(read_only=True)
    user = UserRefSerializer(read_only=True, allow_null=True)
    action = serializers.CharField(read_only=True)
    detail = serializers.CharField(read_only=True)


class AlertSerializer(serializers.ModelSerializer[Alert]):
    rule = RuleRefSerializer(read_only=True)
    latency_ms = serializers.SerializerMethodField()
    assignee = UserRefSerializer(read_only=True, allow_null=True)
    activity = ActivitySerializer(many=True, read_only=True)

    class Meta:
        model = Alert
        fields = [
            "id",
            "team",
            "seq",
            "rule",
            "title",
            "severity",
            "trend",
            "anomaly",
            "event",
            "evidence",
            "event_received_at",
            "event_created_at",
            "created_at",
            "pushed_at",
            "updated_at",
            "latency_ms",
            "state",
            "noise_reason",
            "assignee",
            "snoozed_until",
            "activity",
        ]
        read_only_fields = fields

    def get_latency_ms(self, alert: Alert) -> float | None:
        """``pushed_at − event_received_at`` in milliseconds (None until pushed)."""
        return latency_ms(alert)

    def to_representation(self, instance: Alert) -> dict[str, Any]:
        """The shared alert shape (``alerts.payload``): the WebSocket sends the same."""
        return alert_payload(instance)


class MarkNoiseSerializer(serializers.Serializer[Any]):
    """Body of ``mark-noise/``: an optional ``reason``."""

    reason = StrictCharField(max_length=500, allow_blank=True, required=False, default="")


class AssignSerializer(serializers.Serializer[Any]):
    """Body of ``assign/``: ``user``, a member's id, or null to unassign."""

    user = serializers.IntegerField(allow_null=True, min_value=1, max_value=INT_MAX)


class SnoozeSerializer(serializers.Serializer[Any]):
    """Body of ``snooze/``: ``until``, ISO 8601, in the future."""

    until = BoundedDateTimeField()


class CommentSerializer(serializers.Serializer[Any]):
    """Body of ``comment/``: ``text``, not blank."""

    text = StrictCharField(max_length=5000, allow_blank=False)


class AlertSummarySerializer(serializers.Serializer[Any]):
    """Counts of the caller's alerts (after the list's filters): ``total``, by
    ``state`` (every state, 0 when none), by ``severity`` (every severity), and
    ``snoozed`` (snoozed until a time still to come)."""

    total = serializers.IntegerField()
    state = serializers.DictField(child=serializers.IntegerField())
    severity = serializers.DictField(child=serializers.IntegerField())
    snoozed = serializers.IntegerField()


class RuleStatsSerializer(serializers.Serializer[Any]):
    """A rule's figures over all its alerts: ``fired``, ``acknowledged`` (ever),
    ``resolved`` and ``noise`` (now in that state), ``noise_share`` (noise / fired, 0
    for none fired) and ``median_ack_s`` (median seconds from an alert's creation to
    its first acknowledgement; null when none was acknowledged)."""

    rule = serializers.IntegerField()
    fired = serializers.IntegerField()
    acknowledged = serializers.IntegerField()
    resolved = serializers.IntegerField()
    noise = serializers.IntegerField()
    noise_share = serializers.FloatField()
    median_ack_s = serializers.FloatField(allow_null=True)


class AlertRuleSerializer(StrictModelSerializer):
    """A rule; ``team`` and ``source`` must belong to a team the caller owns.

    ``min_events``, ``min_authors`` and ``min_peak`` are whole numbers from 1 to
    2³¹ − 1, ``min_score`` a finite number ≥ 0 (for a "viral_post" rule, the least
    P(viral): from 0.5 to 1, and required when it is created), ``cooldown_s`` whole
    seconds from 0 to 2³¹ − 1 (a PostgreSQL ``integer``), ``terms`` a list (empty:
    every term) of non-blank strings, ``kind`` and ``severity`` one of the model's
    choices. A refused value is a 400 with DRF's field errors."""

    team = serializers.PrimaryKeyRelatedField(queryset=Team.objects.none())
    source = serializers.PrimaryKeyRelatedField(  # type: ignore[assignment]
        queryset=Source.objects.none(), allow_null=True, required=False
    )
    terms = serializers.ListField(
        child=StrictCharField(max_length=200, allow_blank=False), required=False
    )
    min_score = serializers.FloatField(min_value=0, required=False)
    min_events = serializers.IntegerField(min_value=1, max_value=INT_MAX, required=False)
    min_authors = serializers.IntegerField(min_value=1, max_value=INT_MAX, required=False)
    min_peak = serializers.IntegerField(min_value=1, max_value=INT_MAX, required=False)
    cooldown_s = serializers.IntegerField(min_value=0, max_value=INT_MAX, required=False)

    class Meta:
        model = AlertRule
        fields = ["id", *AlertRule.EDITABLE_FIELDS, "created_at"]
        read_only_fields = ["id", "created_at"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit_to_owned_teams(self, source=Source.objects.all())

    def validate_min_score(self, value: float) -> float:
        if not math.isfinite(value):
            raise serializers.ValidationError("A valid number is required.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        check_team_and_source(attrs, self.instance, "rule")
        kind = attrs.get("kind", getattr(self.instance, "kind", AlertRule.Kind.NEW_TREND))
        if kind == AlertRule.Kind.VIRAL_POST:
            score = attrs.get("min_score", getattr(self.instance, "min_score", None))
            if score is None or not facade.VIRAL_ALERT_MIN_SCORE <= score <= 1:
                raise serializers.ValidationError(
                    {
                        "min_score": "a viral_post rule needs the least P(viral) to alert "
                        f"on, from {facade.VIRAL_ALERT_MIN_SCORE} to 1"
                    }
                )
        return attrs

    def create(self, validated_data: dict[str, Any]) -> AlertRule:
        return services.save_rule(rule=None, data=validated_data)

    def update(self, instance: AlertRule, validated_data: dict[str, Any]) -> AlertRule:
        return services.save_rule(rule=instance, data=validated_data)
