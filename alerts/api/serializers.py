"""Serializers of alerts, alert rules (the alert shape is also the WebSocket payload),
delivery channels and deliveries."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import validate_email
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.relations import PKOnlyObject

from alerts import delivery, services
from alerts.models import Alert, AlertRule, Channel, Delivery, DeliveryAttempt
from alerts.payload import alert_payload, latency_ms
from ingest.models import Source
from ingest.sources.http import UnsafeURL, check_url
from mlengine import facade
from teams.api.base import (
    INT_MAX,
    BoundedDateTimeField,
    StrictCharField,
    StrictModelSerializer,
    check_team_and_source,
    limit_to_owned_teams,
    refuse_changes,
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


class ExplanationWindowSerializer(serializers.Serializer[Any]):
    """An explanation's window in event time: ``start`` and ``end`` (ISO 8601, UTC)."""

    start = serializers.DateTimeField(read_only=True)
    end = serializers.DateTimeField(read_only=True)


class ExplanationPointSerializer(serializers.Serializer[Any]):
    """One bucket of an explanation's series: its start ``t`` (ISO 8601, UTC), the
    measure's ``value`` and ``baseline`` (null where the bucket has nothing to measure,
    e.g. a share with no labelled post, or no baseline yet)."""

    t = serializers.DateTimeField(read_only=True)
    value = serializers.FloatField(read_only=True, allow_null=True)
    baseline = serializers.FloatField(read_only=True, allow_null=True)


class ExplanationTermSerializer(serializers.Serializer[Any]):
    """A term of the window's posts and how many of them hold it."""

    term = serializers.CharField(read_only=True)
    count = serializers.IntegerField(read_only=True)


class ExplanationAuthorSerializer(serializers.Serializer[Any]):
    """An author of the window's posts: ``handle`` ("@handle", else the name or id),
    ``posts`` and ``share`` of the window's posts (0–1)."""

    handle = serializers.CharField(read_only=True)
    posts = serializers.IntegerField(read_only=True)
    share = serializers.FloatField(read_only=True)


class ExplanationPostSerializer(serializers.Serializer[Any]):
    """An evidence post: ``event`` (its id in ``/api/events/``), ``text``, ``author``,
    ``created_at`` (event time) and ``why`` it was picked."""

    event = serializers.IntegerField(read_only=True)
    text = serializers.CharField(read_only=True)
    author = serializers.CharField(read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    why = serializers.ChoiceField(choices=["first", "most_engaged", "latest"], read_only=True)


class ExplanationBandSerializer(serializers.Serializer[Any]):
    """An anomaly's band at its peak: ``low`` and ``high`` (null before a baseline)."""

    low = serializers.FloatField(read_only=True, allow_null=True)
    high = serializers.FloatField(read_only=True, allow_null=True)


class ExplanationSerializer(serializers.Serializer[Any]):
    """Why an alert fired (``alerts.explain``), computed in the pipeline when it fired
    and when its story or anomaly changed. ``value``, ``baseline`` and ``threshold``
    share the unit of ``measure`` (posts per bucket, a share 0–1, or P(viral));
    ``so_far`` and ``projected`` only on a prediction, ``band`` only on an anomaly."""

    measure = serializers.CharField(read_only=True)
    value = serializers.FloatField(read_only=True)
    baseline = serializers.FloatField(read_only=True, allow_null=True)
    threshold = serializers.FloatField(read_only=True, allow_null=True)
    so_far = serializers.IntegerField(read_only=True, required=False)
    projected = serializers.FloatField(read_only=True, required=False)
    band = ExplanationBandSerializer(read_only=True, required=False)
    score = serializers.FloatField(read_only=True)
    score_kind = serializers.ChoiceField(choices=["σ", "robust z", "P(viral)"], read_only=True)
    window = ExplanationWindowSerializer(read_only=True)
    series = ExplanationPointSerializer(many=True, read_only=True)
    top_terms = ExplanationTermSerializer(many=True, read_only=True)
    top_authors = ExplanationAuthorSerializer(many=True, read_only=True)
    evidence = ExplanationPostSerializer(many=True, read_only=True)


class AlertSerializer(serializers.ModelSerializer[Alert]):
    rule = RuleRefSerializer(read_only=True)
    explanation = ExplanationSerializer(read_only=True, allow_null=True)
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
            "explanation",
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


class ChannelIdsField(serializers.ManyRelatedField):
    """A rule's channel ids: read from the ``channel_ids`` annotation when the queryset
    has it (one query for a whole page of rules), else from the relation."""

    def get_attribute(self, instance: Any) -> Any:
        ids = getattr(instance, "channel_ids", None)
        if ids is None:
            return super().get_attribute(instance)
        return [PKOnlyObject(pk=channel_id) for channel_id in ids]


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
    channels = ChannelIdsField(
        child_relation=serializers.PrimaryKeyRelatedField(queryset=Channel.objects.none()),
        required=False,
        help_text="Ids of the channels the rule's alerts are delivered to (channels of "
        "the rule's team).",
    )

    class Meta:
        model = AlertRule
        fields = ["id", *AlertRule.EDITABLE_FIELDS, "channels", "created_at"]
        read_only_fields = ["id", "created_at"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit_to_owned_teams(self, source=Source.objects.all())
        request = self.context.get("request")
        if request is not None:
            owned = self.fields["team"].queryset  # type: ignore[attr-defined]
            self.fields["channels"].child_relation.queryset = Channel.objects.filter(  # type: ignore[attr-defined]
                team__in=owned
            )

    def validate_min_score(self, value: float) -> float:
        if not math.isfinite(value):
            raise serializers.ValidationError("A valid number is required.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        team = check_team_and_source(attrs, self.instance, "rule")
        channels = attrs.get("channels") or []
        if team is not None and any(channel.team_id != team.id for channel in channels):
            raise serializers.ValidationError({"channels": "must belong to the rule's team"})
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


def _mask(value: str) -> str:
    """A secret as the API shows it: a URL's scheme and host, or a secret's ``whsec_``
    prefix, then ``…`` and its last four characters."""
    if not value:
        return ""
    parts = urlsplit(value)
    head = f"{parts.scheme}://{parts.netloc}/" if parts.scheme and parts.netloc else ""
    if value.startswith("whsec_"):
        head = "whsec_"
    return f"{head}…{value[-4:]}"


CONFIG_KEYS = {
    Channel.Kind.WEBHOOK: {"url", "events"},
    Channel.Kind.SLACK: {"webhook_url", "events"},
    Channel.Kind.EMAIL: {"to", "events"},
}
MAX_RECIPIENTS = 50


class ChannelHealthSerializer(serializers.Serializer[Any]):
    """A channel's health (``alerts.delivery.channel_health``)."""

    status = serializers.ChoiceField(choices=["ok", "failing", "disabled"])
    last_error = serializers.CharField()
    last_error_at = serializers.DateTimeField(allow_null=True)
    last_success_at = serializers.DateTimeField(allow_null=True)
    consecutive_failures = serializers.IntegerField()


class ChannelSerializer(StrictModelSerializer):
    """A delivery channel of a team the caller owns (``team`` and ``kind`` are fixed
    once created).

    ``config`` by ``kind``: ``webhook``: ``{"url"}`` (http or https); ``slack``:
    ``{"webhook_url"}`` (a Slack incoming webhook, https); ``email``: ``{"to": [1 to 50
    addresses]}``. Each may add ``events``: the alert events it wants, a non-empty
    subset of ``alert.created`` and ``alert.updated`` (``["alert.created"]`` when
    absent). A URL must reach a public address (``SOURCES_ALLOW_PRIVATE_URLS`` lifts
    that). Unknown keys are a 400. The Slack URL is a credential: sealed, and shown
    masked (``https://hooks.slack.com/…abcd``), as is a webhook's signing secret
    (``secret``, in the create response only, in full). ``health`` says whether its
    deliveries arrive."""

    team = serializers.PrimaryKeyRelatedField(queryset=Team.objects.none())
    kind = serializers.ChoiceField(choices=Channel.Kind.choices)
    config = serializers.DictField()
    health = serializers.SerializerMethodField()
    masked_secret = serializers.SerializerMethodField(
        help_text="The channel's secret, masked: a webhook's signing secret or a Slack "
        "URL (never returned in full)."
    )

    class Meta:
        model = Channel
        fields = [
            "id",
            "team",
            "kind",
            "name",
            "config",
            "enabled",
            "disabled_reason",
            "health",
            "masked_secret",
            "created_at",
        ]
        read_only_fields = ["id", "disabled_reason", "created_at"]
        validators: list[Any] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit_to_owned_teams(self)

    @extend_schema_field(ChannelHealthSerializer)
    def get_health(self, channel: Channel) -> dict[str, Any]:
        return delivery.channel_health(channel)

    def get_masked_secret(self, channel: Channel) -> str:
        secrets = delivery.channel_secrets(channel)
        return _mask(str(secrets.get("secret") or secrets.get("webhook_url") or ""))

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.instance is not None:
            refuse_changes(attrs, self.instance, "team", "kind")
            kind = self.instance.kind
        else:
            kind = attrs["kind"]
        if "config" in attrs:
            attrs["config"], attrs["secrets"] = self._config(
                kind, attrs["config"], creating=self.instance is None
            )
        elif self.instance is None:
            raise serializers.ValidationError({"config": "This field is required."})
        return attrs

    def _config(
        self, kind: str, config: dict[str, Any], *, creating: bool
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The config to store and the secrets to seal, or field errors on ``config``."""
        unknown = set(config) - CONFIG_KEYS[Channel.Kind(kind)]
        if unknown:
            raise serializers.ValidationError(
                {"config": f"unknown keys for a {kind} channel: {', '.join(sorted(unknown))}"}
            )
        stored: dict[str, Any] = {}
        secrets: dict[str, Any] = {}
        if "events" in config:
            events = config["events"]
            if (
                not isinstance(events, list)
                or not events
                or any(event not in delivery.EVENTS for event in events)
                or len(set(events)) != len(events)
            ):
                raise serializers.ValidationError(
                    {"config": "events: a non-empty list of alert.created, alert.updated"}
                )
            stored["events"] = events
        if kind == Channel.Kind.WEBHOOK:
            stored["url"] = self._url(config.get("url"), "url")
        elif kind == Channel.Kind.SLACK:
            if "webhook_url" in config or creating:
                secrets["webhook_url"] = self._url(config.get("webhook_url"), "webhook_url")
        else:
            stored["to"] = self._recipients(config.get("to"))
        return stored, secrets

    @staticmethod
    def _url(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value or len(value) > 2000:
            raise serializers.ValidationError({"config": f"{key}: a URL is required"})
        try:
            check_url(value)
        except UnsafeURL as exc:
            raise serializers.ValidationError({"config": f"{key}: {exc}"}) from None
        return value

    @staticmethod
    def _recipients(value: Any) -> list[str]:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_RECIPIENTS:
            raise serializers.ValidationError(
                {"config": f"to: a list of 1 to {MAX_RECIPIENTS} email addresses"}
            )
        for address in value:
            try:
                if not isinstance(address, str):
                    raise DjangoValidationError("not a string")
                validate_email(address)
            except DjangoValidationError:
                raise serializers.ValidationError(
                    {"config": f"to: {address!r} is not an email address"}
                ) from None
        return list(value)


class ChannelTestSerializer(serializers.Serializer[Any]):
    """What a test message came to: ``ok``, the receiver's ``http_status`` (null for
    email, or with no answer), ``latency_ms`` and ``error`` ("" when ok)."""

    ok = serializers.BooleanField()
    http_status = serializers.IntegerField(allow_null=True)
    latency_ms = serializers.FloatField()
    error = serializers.CharField(allow_blank=True)


class DeliveryAttemptSerializer(serializers.ModelSerializer[DeliveryAttempt]):
    """One try: ``at``, ``outcome`` (``delivered``, ``retry``, ``failed``),
    ``http_status`` (null for email or no answer), ``latency_ms``, ``error``."""

    class Meta:
        model = DeliveryAttempt
        fields = ["at", "outcome", "http_status", "latency_ms", "error"]
        read_only_fields = fields


class DeliverySerializer(serializers.ModelSerializer[Delivery]):
    """A delivery of an alert event to a channel with its tries, oldest first.
    ``webhook_id`` is the ``webhook-id`` header of every try; ``next_attempt_at`` is
    when a pending delivery is tried next."""

    attempt_log = DeliveryAttemptSerializer(many=True, read_only=True)

    class Meta:
        model = Delivery
        fields = [
            "id",
            "alert",
            "channel",
            "team",
            "event",
            "webhook_id",
            "status",
            "attempts",
            "next_attempt_at",
            "last_error",
            "created_at",
            "delivered_at",
            "attempt_log",
        ]
        read_only_fields = fields
