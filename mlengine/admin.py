"""Admin of the trend stage's state, read-only: each stream's event-time clock and the
trends detected. Only the trend stage writes them."""

from __future__ import annotations

from django.contrib import admin

from mlengine.models import StreamClock, Trend
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
