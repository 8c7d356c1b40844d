"""Trend state: each stream's event-time clock, per-bucket term counts, and the trends
detected from them."""

from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.db import models

from ingest.models import Source
from teams.models import Team

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

    Trends that surge together are one story (``mlengine.trends.stories``): ``story`` is the
    story's first trend, whose alert the later members update; ``forecast`` is the
    story's volume forecast when this member joined.

    ``score`` is the deviation from the expected count in units of its Poisson
    standard deviation (see ``mlengine/trends/detector.py``); ``velocity`` is the change in
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
    predicted = models.BooleanField(
        default=False,
        db_default=False,
        help_text="First detected as emerging: its projected count passed, not yet its count.",
    )
    confirmed_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Event time at which a predicted trend's count passed the test itself.",
    )
    forecast = models.JSONField(
        default=dict,
        db_default=models.Value({}, output_field=models.JSONField()),
        blank=True,
        help_text="The story's volume forecast at this trend (mlengine.forecast.Forecast).",
    )
    projected = models.FloatField(
        null=True,
        blank=True,
        help_text="A prediction's bucket count projected to the bucket's end, at detection.",
    )
    withdrawn_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Event time at which a prediction's bucket closed without confirming it.",
    )
    always_on = models.BooleanField(
        default=False,
        db_default=False,
        help_text="The term was in at least TRENDS_ALWAYS_ON_SHARE of its baseline's posts.",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["source", "term", "bucket_start"], name="trend_unique")
        ]
        indexes = [
            models.Index(fields=["source", "-bucket_start"], name="trend_source_bucket"),
            models.Index(
                fields=["source", "bucket_start"],
                name="trend_open_prediction",
                condition=models.Q(
                    predicted=True, confirmed_at__isnull=True, withdrawn_at__isnull=True
                ),
            ),
            models.Index(fields=["-detected_at"], name="trend_detected"),
        ]

    def __str__(self) -> str:
        return f"{self.term}@{self.bucket_start:%Y-%m-%d %H:%M}"


class ModelVersion(models.Model):
    """One trained classifier head (``mlengine.inference.heads``): what it was trained on, how it
    measured, where its artefact is, and whether it is its task's active head.

    ``metrics`` are its scores on the evaluation split (``mlengine.inference.heads.metrics``, plus
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


class Watch(models.Model):
    """A team's watch: a set of terms whose joint volume the anomaly stage follows.

    ``terms``: at least one hashtag ("#flood"), mention ("@x"), cashtag ("$TSLA") or
    keyword, normalised as events' ``hashtags``/``mentions``/``cashtags``/``keywords``
    are (``mlengine.enrichment.text.normalise_term``: lower case, cashtags upper case),
    de-duplicated. ``source``: the one source it covers, or null for every source of the
    team. An enabled watch has one ``Series`` (kind ``watch``) per source it covers:
    the events per bucket holding any of its terms. Written through
    ``mlengine.anomalies.watches.save_watch``/``delete_watch``.
    """

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="watches")
    name = models.CharField(max_length=100)
    terms = ArrayField(models.CharField(max_length=200))
    source = models.ForeignKey(
        Source,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="watches",
        help_text="The source it covers; empty: every source of the team.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    EDITABLE_FIELDS = ["team", "name", "terms", "source", "enabled"]

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="watch_unique_name")]
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name


class Series(models.Model):
    """One series the anomaly stage watches (``mlengine.anomalies.stage``): a source's
    event volume, its negative-sentiment share, the volume of one of its active terms,
    or the volume of one of its team's watches (``watch``: events holding any of
    ``watch_terms``, the watch's terms, sorted, when the series started).

    Every series of a source advances together, one 5-minute event-time bucket at a time
    (``bucket_s``); ``last_bucket`` is the start of the last bucket stepped (the source's
    cursor is its volume series'). ``state`` is the detector's state of this series
    (``mlengine.anomalies.detector.Detector.state`` rows, as a compressed ``.npz``); a term series
    that is no longer active (no trend of its term in the last 24 h of event time) is
    retired: ``active`` false, ``state`` null, its points kept until their retention.
    A watch series is retired when its watch is disabled or no longer covers the source,
    and when the watch's terms change (a new series starts for the new terms: the old
    history counted other posts); deleting the watch deletes its series (CASCADE: their
    anomalies go too, the alerts keep their title and evidence).
    """

    class Kind(models.TextChoices):
        VOLUME = "volume", "Volume"
        NEGATIVE_SHARE = "negative_share", "Negative share"
        TERM = "term", "Term volume"
        WATCH = "watch", "Watch volume"

    source = models.ForeignKey(Source, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    term = models.CharField(max_length=200, blank=True, default="")
    watch = models.ForeignKey(
        Watch, null=True, blank=True, on_delete=models.CASCADE, related_name="series"
    )
    watch_terms = ArrayField(
        models.CharField(max_length=200),
        default=list,
        blank=True,
        help_text="A watch series' terms (sorted): what it counts.",
    )
    bucket_s = models.IntegerField()
    active = models.BooleanField(default=True)
    first_bucket = models.DateTimeField(help_text="Event time: start of its first bucket.")
    last_bucket = models.DateTimeField(help_text="Event time: start of its last bucket stepped.")
    state = models.BinaryField(null=True, blank=True)
    created_at = models.DateTimeField(help_text="Processing time.")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["source", "kind", "term"],
                condition=~models.Q(kind="watch"),
                name="series_unique",
            ),
            models.UniqueConstraint(
                fields=["source", "watch", "watch_terms"],
                condition=models.Q(watch__isnull=False),
                name="series_watch_unique",
            ),
        ]

    def __str__(self) -> str:
        label = self.term or (f"watch {self.watch_id}" if self.watch_id else "")
        return f"{self.kind}{':' + label if label else ''} of source {self.source_id}"


class SeriesPoint(models.Model):
    """One bucket of a series as the detector saw it: ``value`` (events, or a share in
    [0, 1]; null for a share with no labelled event), the ``expected`` value and the
    band ``low``..``high`` (null until a baseline exists), the robust ``score`` (null
    while warming up), and whether the bucket opened an anomaly. Pruned after
    ``ANOMALY_RETENTION_S`` of event time behind the series' source."""

    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="points")
    bucket_start = models.DateTimeField()
    value = models.FloatField(null=True)
    expected = models.FloatField(null=True)
    low = models.FloatField(null=True)
    high = models.FloatField(null=True)
    score = models.FloatField(null=True)
    anomaly = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["series", "bucket_start"], name="seriespoint_unique")
        ]

    def __str__(self) -> str:
        return f"{self.series_id}@{self.bucket_start:%Y-%m-%d %H:%M}"


class Anomaly(models.Model):
    """A window of event time in which a series rose above its expected band.

    Opened by the detector's 0/1 decision on a bucket (``window_start``), extended while
    the score stays at or above the threshold, closed (``closed``) at the first bucket
    below it; ``window_end`` is exclusive. ``score`` is the peak robust z-score and
    ``value``/``expected``/``low``/``high`` are the series' at the peak bucket
    (``peak_at``). ``evidence_created_at`` is the event time of detection (the end of
    the opening bucket), ``evidence_received_at`` the latest processing time of that
    bucket's events (for alert latency), ``detected_at`` when the row was written.
    """

    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="anomalies")
    source = models.ForeignKey(Source, on_delete=models.CASCADE, related_name="anomalies")
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    bucket_s = models.IntegerField()
    peak_at = models.DateTimeField()
    score = models.FloatField()
    value = models.FloatField()
    expected = models.FloatField(null=True)
    low = models.FloatField(null=True)
    high = models.FloatField(null=True)
    closed = models.BooleanField(default=False)
    evidence_created_at = models.DateTimeField()
    evidence_received_at = models.DateTimeField()
    detected_at = models.DateTimeField(help_text="Processing time of detection.")
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["series", "window_start"], name="anomaly_unique")
        ]
        indexes = [
            models.Index(fields=["source", "-window_start"], name="anomaly_source_window"),
            models.Index(fields=["-detected_at"], name="anomaly_detected"),
        ]

    def __str__(self) -> str:
        return f"anomaly of {self.series_id}@{self.window_start:%Y-%m-%d %H:%M}"
