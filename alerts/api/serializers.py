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


class AlertSerializer(serializers.ModelSerializer[Alert]):
    rule = RuleRefSerializer(read_only=True)
    latency_ms = serializers.SerializerMethodField()

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
        ]
        read_only_fields = fields

    def get_latency_ms(self, alert: Alert) -> float | None:
        """``pushed_at − event_received_at`` in milliseconds (None until pushed)."""
        return latency_ms(alert)

    def to_representation(self, instance: Alert) -> dict[str, Any]:
        """The shared alert shape (``alerts.payload``): the WebSocket sends the same."""
        return alert_payload(instance)


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
