"""Sources, the events they deliver (the envelope of DESIGN.md), the batches accepted
and not yet stored (staged), and the dead letters.

Event time (``Event.created_at``: when it was posted at the source) and processing
time (``Event.received_at``: when Twiscope accepted it) are separate fields and are
never mixed.
"""

from __future__ import annotations

import uuid

from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVectorField
from django.db import models
from django.db.models import Func, Value
from django.db.models.functions import Coalesce, Lower, NullIf

from teams.models import Team

AUTHOR_KEY = Coalesce(
    NullIf("author_id", Value("")),
    Func(
        Lower(NullIf("author_handle", Value(""))),
        template="('@' || %(expressions)s)",
        output_field=models.CharField(),
    ),
)
"""Who posted an event, as ``ingest.envelope.Author.key`` says it: the author id, else
"@" and the lower-cased handle; NULL when the source tells neither. Raw SQL that must
use the virality history index spells it ``AUTHOR_KEY_SQL``."""
AUTHOR_KEY_SQL = "COALESCE(NULLIF({t}.author_id, ''), '@' || lower(NULLIF({t}.author_handle, '')))"


class Source(models.Model):
    """One stream of posts: an X query, a Telegram channel, a feed, a webhook, a replay.

    ``input_watermark`` is the source's own promise about event time: every event it
    will deliver from now on has ``created_at >= input_watermark``. A replay (sorted by
    event time) declares the last event time it staged; a live source declares
    processing time minus its allowed lateness. The trend stage combines it with the
    work still in the pipeline into the stream's watermark (``mlengine``).
    ``last_received_at`` only moves forward.

    ``credentials`` is a Fernet token (``ingest.credentials``), never shown or returned.
    ``last_error`` / ``error_permanent`` / ``last_error_at`` record the latest failure to
    deliver: a permanent one (bad credentials, a feed gone) stops the source until it
    is edited.
    """

    class Kind(models.TextChoices):
        X = "x"
        TELEGRAM = "telegram"
        RSS = "rss"
        WEBHOOK = "webhook"
        REPLAY = "replay"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="sources")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=100)
    config = models.JSONField(default=dict, blank=True)
    enabled = models.BooleanField(default=True)
    disabled_reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    input_watermark = models.DateTimeField(null=True, blank=True)
    last_received_at = models.DateTimeField(null=True, blank=True)
    events_total = models.BigIntegerField(default=0)
    credentials = models.TextField(blank=True, default="", db_default="")
    last_error = models.TextField(blank=True, default="", db_default="")
    error_permanent = models.BooleanField(default=False, db_default=False)
    last_error_at = models.DateTimeField(null=True, blank=True)
    cursor = models.JSONField(
        default=dict,
        blank=True,
        db_default={},
        help_text="Where the adapter resumes (a feed's ETag and Last-Modified, its "
        "backoff), kept by the adapter.",
    )
    last_polled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="source_unique_name")]

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


class Event(models.Model):
    """One post, in the canonical envelope, plus its enrichment.

    Unique on ``(source, external_id)``: inserts are conflict-ignore, so a redelivered
    batch stores nothing twice. ``enriched_at`` is set once, by the enrich stage's
    conditional UPDATE (through ``ingest.services.save_enrichments``), which also labels
    the sentiment from VADER's score (``sentiment_model`` "vader"). The ml pool's
    transformer heads then relabel it (``ingest.services.save_labels``; ``scored_at``),
    unless it waited longer than their lag: the VADER label stays, recorded as such.
    No label column is indexed, so relabelling can be a heap-only (HOT) update, but
    only where the row's page has room: on a bench database, 11,487 of 518,879 event
    updates were (docs/models.md). ``search_vector`` is written by the same enrich
    UPDATE and never by the relabelling, which so stays free to be HOT.
    """

    source = models.ForeignKey(Source, on_delete=models.CASCADE, related_name="events")
    external_id = models.CharField(max_length=128)
    created_at = models.DateTimeField(help_text="Event time: when it was posted, UTC.")
    received_at = models.DateTimeField(help_text="Processing time: when accepted, UTC.")
    author_id = models.CharField(max_length=128, blank=True, default="")
    author_handle = models.CharField(max_length=128, blank=True, default="")
    author_name = models.CharField(max_length=256, blank=True, default="")
    author_followers = models.IntegerField(null=True, blank=True)
    text = models.TextField(blank=True, default="")
    lang = models.CharField(max_length=16, blank=True, default="")
    url = models.TextField(blank=True, default="")
    reply_to = models.CharField(max_length=128, blank=True, default="")
    repost_of = models.CharField(max_length=128, blank=True, default="")
    quote_of = models.CharField(max_length=128, blank=True, default="")
    metrics = models.JSONField(default=dict, blank=True)
    raw = models.JSONField(default=dict, blank=True)
    # Enrichment (enrich stage).
    hashtags = ArrayField(models.CharField(max_length=200), default=list, blank=True)
    mentions = ArrayField(models.CharField(max_length=200), default=list, blank=True)
    cashtags = ArrayField(models.CharField(max_length=200), default=list, blank=True)
    urls = ArrayField(models.TextField(), default=list, blank=True)
    keywords = ArrayField(models.CharField(max_length=200), default=list, blank=True)
    sentiment = models.FloatField(null=True, blank=True, help_text="VADER compound, -1..1")
    enriched_at = models.DateTimeField(null=True, blank=True)
    # Labels (enrich stage: VADER's; then the ml pool's transformer heads, when it
    # reaches the event within its lag). Written through ingest.services.
    sentiment_label = models.CharField(max_length=16, blank=True, default="", db_default="")
    sentiment_scores = models.JSONField(
        null=True, blank=True, help_text="Probability per label (null from VADER)."
    )
    sentiment_model = models.CharField(
        max_length=120,
        blank=True,
        default="",
        db_default="",
        help_text='"name vN" of the head that labelled it, or "vader".',
    )
    emotion = models.CharField(max_length=16, blank=True, default="", db_default="")
    emotion_scores = models.JSONField(null=True, blank=True)
    emotion_model = models.CharField(max_length=120, blank=True, default="", db_default="")
    offensive = models.CharField(max_length=16, blank=True, default="", db_default="")
    offensive_scores = models.JSONField(null=True, blank=True)
    offensive_model = models.CharField(max_length=120, blank=True, default="", db_default="")
    scored_at = models.DateTimeField(
        null=True, blank=True, help_text="When the transformer heads labelled it."
    )
    # Virality at posting time (the ml pool, with the heads): null when not scored.
    virality_score = models.FloatField(
        null=True,
        blank=True,
        help_text="P(viral) in [0, 1] at posting time, from the author's earlier posts of the "
        "same source; null: no active virality model, fewer than 100 earlier posts with "
        "a repost count, or the ml pool did not reach it within its lag.",
    )
    virality_model = models.CharField(
        max_length=120,
        blank=True,
        default="",
        db_default="",
        help_text='"name vN" of the virality model that scored it ("" when not scored).',
    )
    search_vector = SearchVectorField(
        null=True,
        blank=True,
        editable=False,
        help_text="Full-text search: the text under the `simple` configuration, then under "
        "its language's (ingest.search); set by the enrich stage, null until then.",
    )
    parked_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the enrich stage parked it as a dead letter (it failed "
        "DEAD_LETTER_MAX_ATTEMPTS times): the stream's watermark no longer waits for it and "
        "the trend and anomaly counts leave it out; null once requeued.",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["source", "external_id"], name="event_unique_external_id"
            )
        ]
        indexes = [
            models.Index(fields=["source", "-created_at"], name="event_source_time"),
            models.Index(fields=["-created_at"], name="event_time"),
            # Events waiting for the enrich stage: the stream's low watermark reads its
            # earliest event time, the sweeper its oldest. Few rows, and the only index
            # the enrich UPDATE must leave (every index costs each insert and update).
            models.Index(
                fields=["source", "created_at"],
                name="event_unenriched_time",
                condition=models.Q(enriched_at__isnull=True),
            ),
            # An author's latest posts with a repost count (the virality history,
            # ``ingest.virality_reads.virality_inputs``): without it each lookup walks the
            # source's whole past. Only rows with counts (not RSS, Telegram, most webhooks).
            models.Index(
                "source",
                AUTHOR_KEY,
                "created_at",
                name="event_author_reposts_time",
                condition=models.Q(metrics__has_key="reposts"),
            ),
            # Full-text search (ingest.search): built CONCURRENTLY by its migration.
            GinIndex(fields=["search_vector"], name="event_search"),
        ]

    def __str__(self) -> str:
        return f"{self.source_id}/{self.external_id}"


class DeadLetter(models.Model):
    """Input the pipeline could not take, kept with its reason and raw payload.

    A dead letter never stops the rest of its batch; an operator can inspect and
    re-drive it (``manage.py requeue``). ``key`` makes parking idempotent.

    Stages after ingest (enrich, detect, alerts) park an item that failed alone
    ``attempts`` times (``twiscope.guard``): ``key`` is ``<stage>:<scope>:<item>``,
    ``error`` the exception's type, message and last frames, and ``payload`` the item
    (an event's envelope, a stream step, a trend id) with ``resend``, the task that
    takes it again. Requeueing sets ``requeued_at`` and counts ``requeues``; the row
    stays as the audit trail, and parking the same item again reopens it
    (``requeued_at`` back to null). A dead letter with ``requeued_at`` null is open.
    """

    class Stage(models.TextChoices):
        REPLAY = "replay"
        SOURCE = "source"
        INGEST = "ingest"
        ENRICH = "enrich"
        DETECT = "detect"
        ALERTS = "alerts"

    stage = models.CharField(max_length=16, choices=Stage.choices)
    source = models.ForeignKey(
        Source, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.TextField()
    payload = models.JSONField(default=dict, blank=True)
    key = models.CharField(
        max_length=200,
        null=True,
        blank=True,
        help_text="Where the item came from (a staged batch key and index): a redelivered"
        " batch adds no second dead letter.",
    )
    error = models.TextField(
        blank=True, default="", db_default="", help_text="Exception type, message, last frames."
    )
    attempts = models.PositiveIntegerField(
        default=0, db_default=0, help_text="Times the item failed alone before it was parked."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    requeued_at = models.DateTimeField(
        null=True, blank=True, help_text="When it was last re-driven (null: still parked)."
    )
    requeues = models.PositiveIntegerField(
        default=0, db_default=0, help_text="How many times it was re-driven."
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["key"], name="deadletter_unique_key")]
        indexes = [
            models.Index(fields=["-created_at"], name="deadletter_time"),
            # The open dead letters of a stage (parked streams, parked alert items).
            models.Index(
                fields=["stage", "source"],
                name="deadletter_open",
                condition=models.Q(requeued_at__isnull=True),
            ),
        ]


class StagedBatch(models.Model):
    """A raw batch Twiscope accepted and has not yet stored as events: the ingest
    stage's staging table (an outbox in PostgreSQL, the system of record).

    Written, and committed, before a webhook answers 202 and before a source moves its
    cursor past the batch (``ingest.persistence.stage_batch``); deleted by the very
    transaction that stores its events (``ingest.persistence.persist_batch``), so a
    batch is either staged or stored, never neither, whatever process or server dies.

    ``key`` names the batch in the persist task's kwargs (``batch_key``) and in the
    pipeline's dispatch records; ``received_at`` is its processing time (when Twiscope
    accepted it, also the sweeper's measure of age); ``watermark`` the source's promise
    that every later event has an event time at or after it (None: none made);
    ``earliest_event_at`` the least event time of its items (None for an empty batch),
    which holds the stream's watermark back until the batch is stored; ``items`` its
    envelopes as one JSON array, each as ``Envelope.to_json`` gives it. ``items`` is
    text, not jsonb: jsonb refuses ``\u0000``, which a source's raw payload may hold
    (the persist stage dead-letters such an item; staging must not refuse the batch),
    and a staged batch is written once and read once, never queried inside.
    """

    key = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    source = models.ForeignKey(Source, on_delete=models.CASCADE, related_name="+")
    received_at = models.DateTimeField()
    watermark = models.DateTimeField(null=True, blank=True)
    earliest_event_at = models.DateTimeField(null=True, blank=True)
    items = models.TextField(default="[]", blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["source", "earliest_event_at"], name="stagedbatch_source_time"),
            models.Index(fields=["received_at"], name="stagedbatch_received"),
        ]

    def __str__(self) -> str:
        return f"{self.source_id}/{self.key}"
