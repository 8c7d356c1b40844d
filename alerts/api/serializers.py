"""Serializers of alerts and alert rules (the alert shape is also the WebSocket payload)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from alerts import services
from alerts.models import Alert, AlertRule
from dashboard.models import Team
from dashboard.selectors import owned_team_ids_for
from ingest.models import Source


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
            "evidence",
            "event_received_at",
            "event_created_at",
            "created_at",
            "pushed_at",
            "latency_ms",
        ]
        read_only_fields = fields

    def get_latency_ms(self, alert: Alert) -> float | None:
        """``pushed_at − event_received_at`` in milliseconds (None until pushed)."""
        if alert.pushed_at is None:
            return None
        return round((alert.pushed_at - alert.event_received_at).total_seconds() * 1000, 1)


class AlertRuleSerializer(serializers.ModelSerializer[AlertRule]):
    """A rule; ``team`` and ``source`` must belong to a team the caller owns."""

    team = serializers.PrimaryKeyRelatedField(queryset=Team.objects.none())
    source = serializers.PrimaryKeyRelatedField(  # type: ignore[assignment]
        queryset=Source.objects.none(), allow_null=True, required=False
    )

    class Meta:
        model = AlertRule
        fields = [
            "id",
            "team",
            "name",
            "kind",
            "enabled",
            "severity",
            "source",
            "terms",
            "min_score",
            "min_events",
            "min_authors",
            "cooldown_s",
            "created_at",
        ]
        read_only_fields = ["id", "created_at"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        request = self.context.get("request")
        if request is not None:
            owned = owned_team_ids_for(request.user)
            # Only the caller's own teams (and their sources) are valid choices.
            self.fields["team"].queryset = Team.objects.filter(id__in=owned)  # type: ignore[attr-defined]
            self.fields["source"].queryset = Source.objects.filter(team_id__in=owned)  # type: ignore[attr-defined]

    def validate_min_score(self, value: float) -> float:
        if value < 0:
            raise serializers.ValidationError("must be zero or more")
        return value

    def validate_cooldown_s(self, value: int) -> int:
        if value < 0:
            raise serializers.ValidationError("must be zero or more seconds")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        team = attrs.get("team") or getattr(self.instance, "team", None)
        source = attrs.get("source")
        if source is not None and team is not None and source.team_id != team.id:
            raise serializers.ValidationError({"source": "must belong to the rule's team"})
        if self.instance is not None and "team" in attrs and attrs["team"] != self.instance.team:
            raise serializers.ValidationError({"team": "a rule cannot move to another team"})
        return attrs

    def create(self, validated_data: dict[str, Any]) -> AlertRule:
        return services.save_rule(rule=None, data=validated_data)

    def update(self, instance: AlertRule, validated_data: dict[str, Any]) -> AlertRule:
        return services.save_rule(rule=instance, data=validated_data)
