"""Serializers of trends."""

from __future__ import annotations

from rest_framework import serializers

from ingest.models import Source
from mlengine.models import ModelVersion, StreamClock, Trend


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
