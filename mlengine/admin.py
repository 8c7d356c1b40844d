"""Admin of the trend stage's state and the trained heads, read-only: each stream's
event-time clock, the trends detected, the model versions (only their stages write
them); and the teams' watches, editable, saved through ``mlengine.anomalies.watches``."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from mlengine.anomalies import watches
from mlengine.models import ModelVersion, StreamClock, Trend, Watch
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


class WatchForm(forms.ModelForm):
    class Meta:
        model = Watch
        fields = Watch.EDITABLE_FIELDS

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        team, source = data.get("team"), data.get("source")
        if team is not None and source is not None and source.team_id != team.id:
            self.add_error("source", f'source "{source.name}" belongs to another team')
        if "terms" in data and not watches.normalise_terms(data["terms"] or []):
            self.add_error("terms", "at least one non-blank term is required")
        return data


@admin.register(Watch)
class WatchAdmin(admin.ModelAdmin):
    """Watches, saved and deleted through ``mlengine.anomalies.watches`` like the API's."""

    form = WatchForm
    list_display = ["name", "team", "source", "enabled", "created_at"]
    list_filter = ["enabled", "team"]
    list_select_related = ["team", "source"]
    search_fields = ["name", "team__slug"]
    readonly_fields = ["created_at"]

    def save_model(self, request: HttpRequest, obj: Watch, form: Any, change: bool) -> None:
        """A new watch from the form's fields, a changed one with the fields that changed."""
        fields = (
            Watch.EDITABLE_FIELDS
            if not change
            else [f for f in form.changed_data if f in Watch.EDITABLE_FIELDS]
        )
        data = {name: form.cleaned_data[name] for name in fields}
        if not change:
            saved = watches.save_watch(watch=None, data=data)
            obj.pk = saved.pk
            obj.created_at = saved.created_at
        elif data:
            watches.save_watch(watch=obj, data=data)

    def delete_model(self, request: HttpRequest, obj: Watch) -> None:
        watches.delete_watch(watch=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Watch]) -> None:
        for watch in queryset:
            watches.delete_watch(watch=watch)
