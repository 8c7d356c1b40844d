"""Serializers of sources, events and dead letters."""

from __future__ import annotations

from rest_framework import serializers

from ingest.models import DeadLetter, Event, Source


class SourceSerializer(serializers.ModelSerializer[Source]):
    class Meta:
        model = Source
        fields = [
            "id",
            "team",
            "kind",
            "name",
            "enabled",
            "disabled_reason",
            "created_at",
            "input_watermark",
            "last_received_at",
            "events_total",
        ]
        read_only_fields = fields


class AuthorSerializer(serializers.Serializer[Event]):
    id = serializers.CharField(source="author_id")
    handle = serializers.CharField(source="author_handle")
    name = serializers.CharField(source="author_name")
    followers = serializers.IntegerField(source="author_followers", allow_null=True)


class EventSerializer(serializers.ModelSerializer[Event]):
    author = AuthorSerializer(source="*", read_only=True)

    class Meta:
        model = Event
        fields = [
            "id",
            "source",
            "external_id",
            "created_at",
            "received_at",
            "author",
            "text",
            "lang",
            "url",
            "reply_to",
            "repost_of",
            "quote_of",
            "metrics",
            "hashtags",
            "mentions",
            "cashtags",
            "urls",
            "keywords",
            "sentiment",
            "sentiment_label",
            "sentiment_scores",
            "sentiment_model",
            "emotion",
            "emotion_scores",
            "emotion_model",
            "offensive",
            "offensive_scores",
            "offensive_model",
            "enriched_at",
            "scored_at",
        ]
        read_only_fields = fields


class DeadLetterSerializer(serializers.ModelSerializer[DeadLetter]):
    class Meta:
        model = DeadLetter
        fields = ["id", "stage", "source", "reason", "payload", "created_at"]
        read_only_fields = fields
