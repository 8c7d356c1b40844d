"""Serializers of trends."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import IntegrityError
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ingest.models import Source
from mlengine.anomalies.watches import normalise_terms, save_watch
from mlengine.facade import STORY_LABEL_TERMS
from mlengine.models import Anomaly, ModelVersion, Series, StreamClock, Trend, Watch
from teams.api.base import (
    StrictCharField,
    StrictModelSerializer,
    check_team_and_source,
    limit_to_owned_teams,
)
from teams.models import Team

WATCH_MAX_TERMS = 50
"""The most terms one watch may hold."""
NAME_TAKEN = "the team has a watch of this name"


class SourceRefSerializer(serializers.ModelSerializer[Source]):
    class Meta:
        model = Source
        fields = ["id", "name", "kind"]
        read_only_fields = fields


class TrendSerializer(serializers.ModelSerializer[Trend]):
    """A trend; ``story`` is its story's id (the story's first trend; null for a trend
    in no story), ``predicted`` whether it was first detected as emerging (a
    prediction) and ``confirmed`` whether its own count passed the test (detected so,
    or a prediction that came true)."""

    # A field named "source" shadows Field.source in the stubs only; DRF takes it.
    source = SourceRefSerializer(read_only=True)  # type: ignore[assignment]
    story = serializers.IntegerField(source="story_id", read_only=True, allow_null=True)
    confirmed = serializers.SerializerMethodField()

    class Meta:
        model = Trend
        fields = [
            "id",
            "source",
            "term",
            "bucket_start",
            "bucket_s",
            "events",
            "expected",
            "score",
            "authors_count",
            "velocity",
            "detected_at",
            "updated_at",
            "evidence_received_at",
            "evidence_created_at",
            "sample_event_ids",
            "story",
            "predicted",
            "confirmed",
        ]
        read_only_fields = fields

    def get_confirmed(self, trend: Trend) -> bool:
        """Whether its own count passed: not a prediction, or one that came true."""
        return not trend.predicted or trend.confirmed_at is not None


class StoryMemberSerializer(serializers.ModelSerializer[Trend]):
    """A member trend of a story: its term, bucket and count."""

    class Meta:
        model = Trend
        fields = ["id", "term", "bucket_start", "events", "score", "evidence_created_at"]
        read_only_fields = fields


class StorySerializer(serializers.ModelSerializer[Trend]):
    """A story (``mlengine.trends.stories``), read from its first trend with its members
    prefetched (``members``, in order of detection): ``id`` (its first trend's),
    ``source``, ``terms`` (the members' terms in order of detection), ``label`` (the
    ``STORY_LABEL_TERMS`` terms with the most posts), ``events`` (the members' posts
    summed: a post holding two member terms counts twice), ``forecast`` (the latest
    member's volume forecast, ``{}`` when none), ``started_at``/``updated_at`` (event
    time of the first and latest detection), ``predicted`` (a member was first detected
    as emerging) and ``confirmed`` (a member's own count passed the test)."""

    source = SourceRefSerializer(read_only=True)  # type: ignore[assignment]
    members = serializers.SerializerMethodField()
    terms = serializers.SerializerMethodField()
    label = serializers.SerializerMethodField()  # type: ignore[assignment]
    events = serializers.SerializerMethodField()
    forecast = serializers.SerializerMethodField()
    started_at = serializers.DateTimeField(source="evidence_created_at", read_only=True)
    updated_at = serializers.SerializerMethodField()
    predicted = serializers.SerializerMethodField()
    confirmed = serializers.SerializerMethodField()

    class Meta:
        model = Trend
        fields = [
            "id",
            "source",
            "terms",
            "label",
            "events",
            "forecast",
            "started_at",
            "updated_at",
            "predicted",
            "confirmed",
            "members",
        ]
        read_only_fields = fields

    @staticmethod
    def _members(story: Trend) -> list[Trend]:
        return sorted(story.members.all(), key=lambda m: (m.evidence_created_at, m.id))

    @extend_schema_field(StoryMemberSerializer(many=True))
    def get_members(self, story: Trend) -> list[dict[str, Any]]:
        return list(StoryMemberSerializer(self._members(story), many=True).data)

    def get_terms(self, story: Trend) -> list[str]:
        return list(dict.fromkeys(m.term for m in self._members(story)))

    def get_label(self, story: Trend) -> list[str]:
        ranked = sorted(self._members(story), key=lambda m: -m.events)
        return list(dict.fromkeys(m.term for m in ranked))[:STORY_LABEL_TERMS]

    def get_events(self, story: Trend) -> int:
        return sum(m.events for m in self._members(story))

    @extend_schema_field({"type": "object", "additionalProperties": True})
    def get_forecast(self, story: Trend) -> dict[str, Any]:
        members = self._members(story)
        return dict(members[-1].forecast or {}) if members else {}

    def get_updated_at(self, story: Trend) -> str | None:
        members = self._members(story)
        return members[-1].evidence_created_at.isoformat() if members else None

    def get_predicted(self, story: Trend) -> bool:
        return any(m.predicted for m in self._members(story))

    def get_confirmed(self, story: Trend) -> bool:
        return any(not m.predicted or m.confirmed_at is not None for m in self._members(story))


class StreamSerializer(serializers.ModelSerializer[StreamClock]):
    """A stream's clock, and how its predictions turned out: ``predictions`` is ``{"made",
    "confirmed", "withdrawn", "open", "confirmed_share"}`` (share of the resolved ones,
    confirmed / (confirmed + withdrawn); null before any resolved), from the queryset's
    annotations (``StreamViewSet``)."""

    source = SourceRefSerializer(read_only=True)  # type: ignore[assignment]
    predictions = serializers.SerializerMethodField()

    class Meta:
        model = StreamClock
        fields = [
            "source",
            "watermark",
            "bucket_s",
            "counted_events",
            "late_events",
            "advanced_at",
            "predictions",
        ]
        read_only_fields = fields

    def get_predictions(self, clock: StreamClock) -> dict[str, int | float | None]:
        made = getattr(clock, "predictions_made", 0) or 0
        confirmed = getattr(clock, "predictions_confirmed", 0) or 0
        withdrawn = getattr(clock, "predictions_withdrawn", 0) or 0
        resolved = confirmed + withdrawn
        return {
            "made": made,
            "confirmed": confirmed,
            "withdrawn": withdrawn,
            "open": made - resolved,
            "confirmed_share": round(confirmed / resolved, 4) if resolved else None,
        }


class ModelVersionSerializer(serializers.ModelSerializer[ModelVersion]):
    class Meta:
        model = ModelVersion
        fields = [
            "id",
            "task",
            "name",
            "version",
            "active",
            "metrics",
            "trained_on",
            "sha256",
            "created_at",
        ]
        read_only_fields = fields


class WatchRefSerializer(serializers.ModelSerializer[Watch]):
    class Meta:
        model = Watch
        fields = ["id", "name"]
        read_only_fields = fields


class AnomalySerializer(serializers.ModelSerializer[Anomaly]):
    """An anomaly: its series (``kind``, ``term``, and ``watch``: ``{id, name}`` for a
    watch series, null otherwise), window (event time, end exclusive),
    peak ``score`` (robust z), and ``value``/``expected``/``low``/``high`` at the peak
    (events per bucket, or a share in [0, 1] for ``negative_share``)."""

    source = SourceRefSerializer(read_only=True)  # type: ignore[assignment]
    kind = serializers.CharField(source="series.kind", read_only=True)
    term = serializers.CharField(source="series.term", read_only=True)
    watch = WatchRefSerializer(source="series.watch", read_only=True, allow_null=True)

    class Meta:
        model = Anomaly
        fields = [
            "id",
            "source",
            "kind",
            "term",
            "watch",
            "window_start",
            "window_end",
            "bucket_s",
            "peak_at",
            "score",
            "value",
            "expected",
            "low",
            "high",
            "closed",
            "evidence_created_at",
            "evidence_received_at",
            "detected_at",
        ]
        read_only_fields = fields


class SeriesPointSerializer(serializers.Serializer[dict[str, object]]):
    """One bucket of a series: ``start`` (event time), ``value``, ``expected``, the band
    ``low``..``high``, the robust ``score`` (null while warming up) and ``anomaly``
    (this bucket opened one)."""

    start = serializers.DateTimeField()
    value = serializers.FloatField(allow_null=True)
    expected = serializers.FloatField(allow_null=True)
    low = serializers.FloatField(allow_null=True)
    high = serializers.FloatField(allow_null=True)
    score = serializers.FloatField(allow_null=True)
    anomaly = serializers.BooleanField()


class SeriesWindowSerializer(serializers.Serializer[dict[str, object]]):
    """An anomaly window of the series."""

    id = serializers.IntegerField()
    window_start = serializers.DateTimeField()
    window_end = serializers.DateTimeField()
    score = serializers.FloatField()
    value = serializers.FloatField()
    closed = serializers.BooleanField()


class SeriesTermSerializer(serializers.Serializer[dict[str, object]]):
    """A term series of the source (for a picker): ``active`` while the term is watched."""

    term = serializers.CharField()
    active = serializers.BooleanField()


class SeriesWatchSerializer(serializers.Serializer[dict[str, object]]):
    """A watch with a series in the source (for a picker): ``active`` while the watch's
    series there is stepped (enabled, covering the source, its terms unchanged)."""

    id = serializers.IntegerField()
    name = serializers.CharField()
    active = serializers.BooleanField()


class SeriesSerializer(serializers.Serializer[dict[str, object]]):
    """``GET /api/series/``: the series' points in ``[since, until]`` (event time), its
    anomaly windows overlapping them, the source's term series and its watches'.
    ``watch`` is the series' watch (``{id, name}``; null unless ``kind=watch``) and
    ``watch_terms`` the terms that series counts."""

    source = SourceRefSerializer()  # type: ignore[assignment]
    kind = serializers.ChoiceField(choices=Series.Kind.choices)
    term = serializers.CharField()
    watch = WatchRefSerializer(allow_null=True)
    watch_terms = serializers.ListField(child=serializers.CharField())
    bucket_s = serializers.IntegerField()
    since = serializers.DateTimeField(allow_null=True)
    until = serializers.DateTimeField(allow_null=True)
    points = SeriesPointSerializer(many=True)
    anomalies = SeriesWindowSerializer(many=True)
    terms = SeriesTermSerializer(many=True)
    watches = SeriesWatchSerializer(many=True)


class WatchSerializer(StrictModelSerializer):
    """A watch; ``team`` must be a team the caller owns and ``source`` (null: every
    source of the team) one of that team's. ``terms``: 1 to ``WATCH_MAX_TERMS``
    non-blank strings of at most 200 characters (hashtags "#x", mentions "@x",
    cashtags "$X", keywords), stored normalised (``mlengine.anomalies.watches.normalise_terms``:
    lower case, cashtags upper case, duplicates dropped). ``name`` is unique in the
    team. A refused value is a 400 with DRF's field errors."""

    team = serializers.PrimaryKeyRelatedField(queryset=Team.objects.none())
    source = serializers.PrimaryKeyRelatedField(  # type: ignore[assignment]
        queryset=Source.objects.none(), allow_null=True, required=False
    )
    terms = serializers.ListField(
        child=StrictCharField(max_length=200, allow_blank=False),
        min_length=1,
        max_length=WATCH_MAX_TERMS,
    )

    class Meta:
        model = Watch
        fields = ["id", *Watch.EDITABLE_FIELDS, "created_at"]
        read_only_fields = ["id", "created_at"]
        validators: list[Any] = []  # the name's uniqueness is checked in validate()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit_to_owned_teams(self, source=Source.objects.all())

    def validate_terms(self, value: list[str]) -> list[str]:
        terms = normalise_terms(value)
        if not terms:
            raise serializers.ValidationError("at least one non-blank term is required")
        return terms

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        team = check_team_and_source(attrs, self.instance, "watch")
        name = attrs.get("name")
        if name is not None and team is not None:
            taken = Watch.objects.filter(team=team, name=name)
            if self.instance is not None:
                taken = taken.exclude(id=self.instance.id)
            if taken.exists():
                raise serializers.ValidationError({"name": NAME_TAKEN})
        cap = settings.ANOMALY_MAX_WATCHES
        if self.instance is None and team is not None and team.watches.count() >= cap:
            raise serializers.ValidationError(
                {"team": f"a team has at most {cap} watches (ANOMALY_MAX_WATCHES)"}
            )
        return attrs

    def create(self, validated_data: dict[str, Any]) -> Watch:
        try:
            return save_watch(watch=None, data=validated_data)
        except IntegrityError as exc:  # a concurrent watch took the name
            raise serializers.ValidationError({"name": NAME_TAKEN}) from exc

    def update(self, instance: Watch, validated_data: dict[str, Any]) -> Watch:
        try:
            return save_watch(watch=instance, data=validated_data)
        except IntegrityError as exc:
            raise serializers.ValidationError({"name": NAME_TAKEN}) from exc
