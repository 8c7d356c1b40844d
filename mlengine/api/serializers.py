"""Serializers of trends."""

from __future__ import annotations

from rest_framework import serializers

from ingest.models import Source
from mlengine.models import Anomaly, ModelVersion, Series, StreamClock, Trend


class SourceRefSerializer(serializers.ModelSerializer[Source]):
    class Meta:
        model = Source
        fields = ["id", "name", "kind"]
        read_only_fields = fields


class TrendSerializer(serializers.ModelSerializer[Trend]):
    # A field named "source" shadows Field.source in the stubs only; DRF takes it.
    source = SourceRefSerializer(read_only=True)  # type: ignore[assignment]

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
        ]
        read_only_fields = fields


class StreamSerializer(serializers.ModelSerializer[StreamClock]):
    source = SourceRefSerializer(read_only=True)  # type: ignore[assignment]

    class Meta:
        model = StreamClock
        fields = ["source", "watermark", "bucket_s", "counted_events", "late_events", "advanced_at"]
        read_only_fields = fields


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


class AnomalySerializer(serializers.ModelSerializer[Anomaly]):
    """An anomaly: its series (``kind``, ``term``), window (event time, end exclusive),
    peak ``score`` (robust z), and ``value``/``expected``/``low``/``high`` at the peak
    (events per bucket, or a share in [0, 1] for ``negative_share``)."""

    source = SourceRefSerializer(read_only=True)  # type: ignore[assignment]
    kind = serializers.CharField(source="series.kind", read_only=True)
    term = serializers.CharField(source="series.term", read_only=True)

    class Meta:
        model = Anomaly
        fields = [
            "id",
            "source",
            "kind",
            "term",
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


class SeriesSerializer(serializers.Serializer[dict[str, object]]):
    """``GET /api/series/``: the series' points in ``[since, until]`` (event time), its
    anomaly windows overlapping them, and the source's term series."""

    source = SourceRefSerializer()  # type: ignore[assignment]
    kind = serializers.ChoiceField(choices=Series.Kind.choices)
    term = serializers.CharField()
    bucket_s = serializers.IntegerField()
    since = serializers.DateTimeField(allow_null=True)
    until = serializers.DateTimeField(allow_null=True)
    points = SeriesPointSerializer(many=True)
    anomalies = SeriesWindowSerializer(many=True)
    terms = SeriesTermSerializer(many=True)
