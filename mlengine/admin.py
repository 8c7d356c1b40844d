"""Admin of the trend stage's state and the trained heads, read-only: each stream's
event-time clock, the trends detected, the model versions. Only their stages write them."""

from __future__ import annotations

from django.contrib import admin

from mlengine.models import ModelVersion, StreamClock, Trend
from teams.admin import ReadOnlyAdmin


@admin.register(StreamClock)
class StreamClockAdmin(ReadOnlyAdmin):
    list_display = [
        "source",
        "watermark",
        "bucket_s",
        "counted_events",
        "late_events",
        "advanced_at",
    ]
    list_select_related = ["source"]
    search_fields = ["source__name"]


@admin.register(Trend)
class TrendAdmin(ReadOnlyAdmin):
    list_display = [
        "term",
        "source",
        "bucket_start",
        "events",
        "expected",
        "score",
        "authors_count",
        "detected_at",
    ]
    list_filter = ["source"]
    list_select_related = ["source"]
    search_fields = ["term"]
    ordering = ["-detected_at", "-id"]


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    """Trained heads; ``manage.py train`` registers and promotes them."""

    list_display = ["name", "task", "version", "active", "created_at"]
    list_filter = ["task", "active"]
    ordering = ["task", "-version"]
