"""Alert rules, the alerts they fire, the per-term cooldown claims, each team's alert
sequence, the record of which trends, anomalies and scored posts were evaluated, and
delivery beyond the page: channels, deliveries and their attempts."""

from __future__ import annotations

from typing import Any, ClassVar

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models

from ingest.models import Source
from teams.models import Team

ANOMALY_MIN_PEAK = 5
"""The default least value at an anomaly's peak for an "anomaly" rule to fire on a count
series: posts in the peak 5-minute bucket. A quiet series (expected 0 to 1 a bucket) sees
2 posts in a bucket about 26 times a day at 0.5 a bucket (Poisson), 5 about once in 20
days; 5 is also the trend detector's least events per term (``TRENDS_MIN_EVENTS``)."""


class Severity(models.TextChoices):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class AlertRule(models.Model):
    """When a team wants to be told: a new trend passing these thresholds (``new_trend``),
    or an anomaly of a series passing ``min_score`` (``anomaly``: ``source`` and
    ``terms`` filter its series; ``min_peak`` is the least value at the anomaly's peak
    for a count series, posts in its peak 5-minute bucket (post volume, term, watch; not
    the negative share), 5 by default so that a spike of a post or two is no alert unless
    the rule lowers it; ``min_events``, ``min_authors`` and ``cooldown_s`` do not apply,
    the detector's refractory day per series stands for a cooldown), or a
    post likely to go viral (``viral_post``: ``min_score`` is the least P(viral), 0.5 to
    1, of the virality model's score at posting time; ``source`` and ``terms`` filter the
    post (its hashtags, mentions, cashtags, keywords); ``cooldown_s`` is per author;
    ``min_events`` and ``min_authors`` do not apply).

    ``cooldown_s`` is in event time: a term that alerted does not alert again for the
    same rule until its trend bucket starts at least this long after the last one, so
    a replayed archive alerts exactly as the live stream would have.
    """

    class Kind(models.TextChoices):
        NEW_TREND = "new_trend", "New trend"
        ANOMALY = "anomaly", "Anomaly"
        VIRAL_POST = "viral_post", "Viral post"

    EDITABLE_FIELDS: ClassVar[list[str]] = [
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
        "min_peak",
    ]
    """What a team's owner sets (the API and the admin)."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="alert_rules")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=32, choices=Kind.choices, default=Kind.NEW_TREND)
    enabled = models.BooleanField(default=True)
    severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.INFO)
    source = models.ForeignKey(
        Source, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    terms = ArrayField(models.CharField(max_length=200), default=list, blank=True)
    min_score = models.FloatField(default=0.0)
    min_events = models.IntegerField(default=1)
    min_authors = models.IntegerField(default=1)
    cooldown_s = models.IntegerField(default=6 * 3600)
    min_peak = models.IntegerField(default=ANOMALY_MIN_PEAK)
    channels: models.ManyToManyField[Channel, Any] = models.ManyToManyField(
        "Channel",
        blank=True,
        related_name="rules",
        help_text="Where the rule's alerts are delivered (channels of the rule's team).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="rule_unique_name")]

    def __str__(self) -> str:
        return self.name


class RuleTermClaim(models.Model):
    """The last trend bucket a rule alerted on for a term of a source: the cooldown's
    claim row (trends are per source, so is their cooldown).

    Firing is claimed with a conditional UPDATE on this row; only the worker whose
    UPDATE changed exactly one row creates the alert.
    """

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="+")
    source = models.ForeignKey(Source, on_delete=models.CASCADE, related_name="+")
    term = models.CharField(max_length=200)
    last_bucket_start = models.DateTimeField(null=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["rule", "source", "term"], name="ruletermclaim_unique")
        ]


class Alert(models.Model):
    """A fired rule, persisted before it is pushed. A trend alert is its story's: later
    members of the story (``mlengine.stories``) update it (``updated_at``, the story in
    ``evidence["story"]``) rather than fire alerts of their own. ``story_id`` is the
    story's id as ``mlengine.facade.TrendView.story_id`` gave it at firing: the alerts
    stage finds a story's alerts by it, never through the trend's row. A rule alerts on a
    story once (``alert_unique_story``).

    Latency fields: ``event_received_at`` (processing time of the event that completed
    the evidence), ``created_at`` (row written), ``pushed_at`` (sent to the channel
    layer). ``seq`` is the team's alert sequence number.

    Lifecycle (``alerts.lifecycle``): ``state`` (``open``, ``acknowledged``, ``resolved``,
    ``noise`` with ``noise_reason``), ``assignee`` (a member of the team, or None),
    ``snoozed_until`` (None, or the time until which it is snoozed); ``acknowledged_at``
    is the first acknowledgement (per-rule figures); ``rest_story_events`` and
    ``rest_forecast_peak`` are the story's posts and forecast peak (posts per bucket)
    when it was last resolved or snoozed, against which the pipeline re-opens it.
    """

    class State(models.TextChoices):
        OPEN = "open"
        ACKNOWLEDGED = "acknowledged"
        RESOLVED = "resolved"
        NOISE = "noise"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="alerts")
    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="alerts")
    # By name, not by import: apps reach mlengine's code only through its facade.
    trend = models.ForeignKey(
        "mlengine.Trend", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    anomaly = models.ForeignKey(
        "mlengine.Anomaly", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    event = models.ForeignKey(
        "ingest.Event",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The post of a viral_post alert.",
    )
    story_id = models.BigIntegerField(
        null=True,
        blank=True,
        db_index=True,
        help_text=(
            "The story of a trend alert (its first trend's id), copied from the trend "
            "when the alert fired: a plain value, not a key (a trend's story never changes)."
        ),
    )
    seq = models.BigIntegerField()
    title = models.CharField(max_length=300)
    severity = models.CharField(max_length=10, choices=Severity.choices)
    evidence = models.JSONField(default=dict)
    explanation = models.JSONField(
        null=True,
        blank=True,
        help_text=(
            "Why it fired (alerts.explain): measure, value, baseline, threshold, score, "
            "window, series, top terms and authors, evidence posts. Null on alerts "
            "fired before explanations existed."
        ),
    )
    event_received_at = models.DateTimeField()
    event_created_at = models.DateTimeField()
    created_at = models.DateTimeField()
    pushed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(
        null=True, blank=True, help_text="Last time a new member of its story updated it."
    )
    state = models.CharField(
        max_length=16, choices=State.choices, default=State.OPEN, db_default=State.OPEN
    )
    noise_reason = models.CharField(max_length=500, blank=True, default="", db_default="")
    assignee = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    snoozed_until = models.DateTimeField(null=True, blank=True)
    acknowledged_at = models.DateTimeField(
        null=True, blank=True, help_text="When it was first acknowledged."
    )
    rest_story_events = models.IntegerField(
        null=True, blank=True, help_text="Its story's posts when last resolved or snoozed."
    )
    rest_forecast_peak = models.FloatField(
        null=True,
        blank=True,
        help_text="Its story's forecast peak (posts per bucket) when last resolved or snoozed.",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["rule", "trend"], name="alert_unique_trend"),
            models.UniqueConstraint(fields=["rule", "anomaly"], name="alert_unique_anomaly"),
            models.UniqueConstraint(fields=["rule", "event"], name="alert_unique_event"),
            models.UniqueConstraint(fields=["team", "seq"], name="alert_unique_seq"),
            # A rule alerts on a story once: the later members join that alert.
            models.UniqueConstraint(
                fields=["rule", "story_id"],
                condition=models.Q(story_id__isnull=False),
                name="alert_unique_story",
            ),
        ]
        indexes = [
            models.Index(fields=["team", "-id"], name="alert_team_recent"),
            models.Index(fields=["team", "state"], name="alert_team_state"),
        ]

    def __str__(self) -> str:
        return self.title


class AlertActivity(models.Model):
    """One change of an alert's lifecycle, in order (``at``, then ``id``): who (``user``;
    None for the pipeline), what (``action``: a transition's name, or ``escalated`` when
    its story re-opened it) and ``detail`` (the reason, the comment, the assignee or the
    snooze's end, in words)."""

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="activity")
    at = models.DateTimeField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    action = models.CharField(max_length=32)
    detail = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["alert", "at", "id"], name="alertactivity_order")]

    def __str__(self) -> str:
        return f"{self.action} on alert {self.alert_id}"


class AlertSequence(models.Model):
    """The last sequence number given to an alert of a team: the per-team counter that
    lets a dashboard notice a dropped WebSocket message (``alert.created`` ``seq``)."""

    team = models.OneToOneField(Team, on_delete=models.CASCADE, primary_key=True, related_name="+")
    last_seq = models.BigIntegerField(default=0)


class TrendCheck(models.Model):
    """A trend the alert rules were evaluated on, once: its row is the evaluation's
    claim (a redelivered task finds it and does nothing), and a trend without one after
    a while is swept."""

    trend = models.OneToOneField(
        "mlengine.Trend", on_delete=models.CASCADE, primary_key=True, related_name="+"
    )
    checked_at = models.DateTimeField()


class AnomalyCheck(models.Model):
    """An anomaly the alert rules were evaluated on, once (as ``TrendCheck`` for trends):
    the evaluation's claim, and what the sweeper looks for."""

    anomaly = models.OneToOneField(
        "mlengine.Anomaly", on_delete=models.CASCADE, primary_key=True, related_name="+"
    )
    checked_at = models.DateTimeField()


class ViralCheck(models.Model):
    """A post the "viral_post" rules were evaluated on, once (as ``TrendCheck`` for
    trends): the evaluation's claim, so a redelivered or re-sent task alerts nothing
    twice."""

    event = models.OneToOneField(
        "ingest.Event", on_delete=models.CASCADE, primary_key=True, related_name="+"
    )
    checked_at = models.DateTimeField()


class Channel(models.Model):
    """Where a team's alerts go beyond the page: a signed ``webhook``, a ``slack``
    incoming webhook or ``email``.

    ``config`` holds what may be shown: a webhook's ``url``, an email's ``to`` (a list
    of addresses), and ``events``, the alert events the channel wants
    (``alert.created``, ``alert.updated``; ``["alert.created"]`` by default).
    ``credentials`` is a Fernet token (``ingest.credentials``) sealing the secrets: a
    webhook's signing ``secret`` (``whsec_`` + base64), a Slack ``webhook_url``; never
    shown or returned. ``enabled`` false stops delivery (a 410 Gone from the receiver
    sets it, with ``disabled_reason``). ``consecutive_failures`` counts failed tries
    since the last success; with ``last_error``/``last_error_at`` it gives the
    channel's health (``alerts.delivery.channel_health``).
    """

    class Kind(models.TextChoices):
        WEBHOOK = "webhook"
        SLACK = "slack"
        EMAIL = "email"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="channels")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=100)
    config = models.JSONField(default=dict, blank=True)
    credentials = models.TextField(blank=True, default="")
    enabled = models.BooleanField(default=True)
    disabled_reason = models.TextField(blank=True, default="")
    consecutive_failures = models.IntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    last_error_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="channel_unique_name")]

    def __str__(self) -> str:
        return self.name


class Delivery(models.Model):
    """One alert event (``alert.created`` or ``alert.updated``) to one channel, tried
    until delivered, given up (``failed``) or dropped (``skipped``: the channel was
    disabled before it went out).

    ``webhook_id`` is the Standard Webhooks message id, the same on every try.
    ``next_attempt_at`` is when the next try is due; a worker claims a try by moving it
    forward by a lease in one conditional UPDATE (``alerts.delivery.deliver``), so a
    redelivered task does nothing and the sweeper re-sends only tries due and not
    claimed. An ``alert.created`` delivery is unique per (alert, channel).
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"
        SKIPPED = "skipped"

    class Event(models.TextChoices):
        CREATED = "alert.created"
        UPDATED = "alert.updated"

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.ForeignKey(Channel, on_delete=models.CASCADE, related_name="deliveries")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    event = models.CharField(max_length=20, choices=Event.choices)
    webhook_id = models.CharField(max_length=64, unique=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.IntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["alert", "channel"],
                condition=models.Q(event="alert.created"),
                name="delivery_unique_created",
            )
        ]
        indexes = [
            models.Index(fields=["team", "-id"], name="delivery_team_recent"),
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(status="pending"),
                name="delivery_due",
            ),
        ]


class DeliveryAttempt(models.Model):
    """One try of a delivery: when (``at``), its ``outcome`` (``delivered``, ``retry``:
    a temporary failure, tried again later; ``failed``: permanent or the last try),
    the receiver's HTTP ``http_status`` (None for email or no answer), ``latency_ms``
    (the call's wall time) and ``error`` ("" on success)."""

    class Outcome(models.TextChoices):
        DELIVERED = "delivered"
        RETRY = "retry"
        FAILED = "failed"

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempt_log")
    at = models.DateTimeField()
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    http_status = models.IntegerField(null=True, blank=True)
    latency_ms = models.FloatField()
    error = models.TextField(blank=True, default="")
