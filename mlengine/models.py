"""Trend state: each stream's event-time clock, per-bucket term counts, and the trends
detected from them."""

from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.db import models

from ingest.models import Source

TOTAL_TERM = "*"
"""The reserved term that names a bucket's totals (``BucketCount.events``/``authors``)."""


class StreamClock(models.Model):
    """The trend stage's event-time clock of one source's stream.

    ``watermark``: every event of the source with an earlier event time has been
    counted, in event-time order; it only moves forward, and only the worker holding
    this row's lock moves it. ``bucket_s`` is the stream's trend bucket (seconds),
    fixed when the clock is created. ``late_events`` counts stored events that came
    after the watermark had passed their event time (left out of the counts).
    """

    source = models.OneToOneField(
        Source, on_delete=models.CASCADE, primary_key=True, related_name="+"
    )
    watermark = models.DateTimeField(null=True, blank=True)
    bucket_s = models.IntegerField()
    late_events = models.BigIntegerField(default=0)
    counted_events = models.BigIntegerField(default=0)
    advanced_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"clock of source {self.source_id} at {self.watermark}"


class BucketCount(models.Model):
    """The counts of one event-time bucket of a source's stream: one row per bucket.

    ``events`` and ``authors`` are the bucket's totals (``authors``: at most
    ``AUTHORS_CAP`` distinct author keys, enough to decide the distinct-author
    threshold; its length is the distinct-author count). ``terms`` maps each term seen in
    the bucket to ``[events, [author keys]]``, the authors capped the same way.

    One row per bucket rather than per term and bucket: most terms occur once in a
    bucket, so a row per term cost about five index upserts an event, the trend stage's
    largest cost (docs/benchmarks.md). A bucket's row is rewritten whole by the worker
    that holds the stream's clock lock.
    """

    AUTHORS_CAP = 200

    source = models.ForeignKey(Source, on_delete=models.CASCADE, related_name="+")
    bucket_start = models.DateTimeField()
    events = models.IntegerField(default=0)
    authors = ArrayField(models.CharField(max_length=128), default=list)
    terms = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["source", "bucket_start"], name="bucketcount_unique")
        ]

    def term_events(self, term: str) -> int:
        """Events of ``term`` in this bucket (0 when it has none)."""
        if term == TOTAL_TERM:
            return self.events
        counts = self.terms.get(term)
        return int(counts[0]) if counts else 0

    def __str__(self) -> str:
        return f"counts of source {self.source_id} at {self.bucket_start:%Y-%m-%d %H:%M}"


class Trend(models.Model):
    """A term whose count in an event-time bucket rose well above its baseline.

    Trends that surge together are one story (``mlengine.stories``): ``story`` is the
    story's first trend, whose alert the later members update; ``forecast`` is the
    story's volume forecast when this member joined.

    ``score`` is the deviation from the expected count in units of its Poisson
    standard deviation (see ``mlengine/trends.py``); ``velocity`` is the change in
    events per minute from the previous bucket. The evidence fields name the event whose
    arrival, in event-time order, first made the bucket-so-far cross the thresholds:
    ``evidence_created_at`` is the event time of the detection (the same at any replay
    speed), ``evidence_received_at`` its processing time (for alert latency). ``events``,
    ``authors_count`` and ``score`` grow as the bucket fills (score: the highest seen).
    """

    source = models.ForeignKey(Source, on_delete=models.CASCADE, related_name="trends")
    term = models.CharField(max_length=200)
    bucket_start = models.DateTimeField()
    bucket_s = models.IntegerField()
    events = models.IntegerField()
    expected = models.FloatField()
    score = models.FloatField()
    authors_count = models.IntegerField()
    velocity = models.FloatField()
    detected_at = models.DateTimeField(help_text="Processing time of first detection.")
    updated_at = models.DateTimeField()
    evidence_received_at = models.DateTimeField()
    evidence_created_at = models.DateTimeField()
    sample_event_ids = ArrayField(models.BigIntegerField(), default=list)
    story = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="members",
        help_text="The story's first trend (itself, for that one): mlengine.stories.",
    )
    forecast = models.JSONField(
        default=dict,
        db_default=models.Value({}, output_field=models.JSONField()),
        blank=True,
        help_text="The story's volume forecast at this trend (mlengine.forecast.Forecast).",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["source", "term", "bucket_start"], name="trend_unique")
        ]
        indexes = [
            models.Index(fields=["source", "-bucket_start"], name="trend_source_bucket"),
            models.Index(fields=["-detected_at"], name="trend_detected"),
        ]

    def __str__(self) -> str:
        return f"{self.term}@{self.bucket_start:%Y-%m-%d %H:%M}"


class ModelVersion(models.Model):
    """One trained classifier head (``mlengine.heads``): what it was trained on, how it
    measured, where its artefact is, and whether it is its task's active head.

    ``metrics`` are its scores on the evaluation split (``mlengine.heads.metrics``, plus
    the split's name and size); ``trained_on`` names the data folder, the splits and
    their sizes; ``artefact`` is the ``.npz`` path relative to ``settings.MODELS_DIR``.
    At most one version per task is active.
    """

    task = models.CharField(max_length=32)
    name = models.CharField(max_length=100)
    version = models.PositiveIntegerField()
    metrics = models.JSONField(default=dict)
    trained_on = models.JSONField(default=dict)
    artefact = models.CharField(max_length=300)
    sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    active = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task", "version"], name="modelversion_unique"),
            models.UniqueConstraint(
                fields=["task"], condition=models.Q(active=True), name="modelversion_one_active"
            ),
        ]
        ordering = ["task", "-version"]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}{' (active)' if self.active else ''}"
