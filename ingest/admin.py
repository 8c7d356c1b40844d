"""Admin of sources (editable, secrets never shown), events and dead letters (read-only).

A source's ``config`` may hold credentials (an API token, a webhook signing secret):
every value under a key that names one (see ``SECRET_WORDS``) is shown masked, and a
masked value left as it is keeps the stored secret when the form is saved. Events and
dead letters are the pipeline's record: the admin may read them, never add, change or
delete them.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from ingest.models import DeadLetter, Event, Source
from teams.admin import ReadOnlyAdmin

MASK = "********"
SECRET_WORDS = ("secret", "token", "password", "passwd", "key", "hash", "credential", "auth")
"""A ``config`` key containing any of these (case-insensitive) holds a secret."""
TEXT_PREVIEW = 80


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in SECRET_WORDS)


def masked(value: Any) -> Any:
    """``value`` (a source config) with every secret value replaced by ``MASK``."""
    if isinstance(value, dict):
        return {
            k: (MASK if is_secret_key(str(k)) and v not in (None, "") else masked(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def unmasked(submitted: Any, stored: Any) -> Any:
    """``submitted`` with every value still equal to ``MASK`` under a secret key put back
    to the ``stored`` one (so saving a form does not overwrite a secret with the mask)."""
    if isinstance(submitted, dict):
        old = stored if isinstance(stored, dict) else {}
        return {
            k: (
                old[k]
                if v == MASK and is_secret_key(str(k)) and k in old
                else unmasked(v, old.get(k))
            )
            for k, v in submitted.items()
        }
    if isinstance(submitted, list):
        old_list = stored if isinstance(stored, list) else []
        return [
            unmasked(v, old_list[i] if i < len(old_list) else None) for i, v in enumerate(submitted)
        ]
    return submitted


class MaskedJSONField(forms.JSONField):
    """Shows a config with its secrets masked (the form restores them on save)."""

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, str):
            # A re-displayed submission (already masked, or the user's raw text).
            return value
        return json.dumps(masked(value), ensure_ascii=False, indent=2, sort_keys=True)


class SourceForm(forms.ModelForm):
    config = MaskedJSONField(
        required=False,
        help_text=f"JSON. Secret values are shown as {MASK}: leave them so to keep them, "
        "or type a new value to replace them.",
    )

    class Meta:
        model = Source
        fields = ["team", "kind", "name", "config", "enabled", "disabled_reason"]

    def clean_config(self) -> Any:
        config = self.cleaned_data.get("config")
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise forms.ValidationError("the config must be a JSON object")
        return unmasked(config, self.instance.config if self.instance.pk else {})


@admin.register(Source)
class SourceAdmin(admin.ModelAdmin):
    form = SourceForm
    list_display = [
        "name",
        "kind",
        "team",
        "enabled",
        "events_total",
        "input_watermark",
        "last_received_at",
    ]
    list_filter = ["kind", "enabled", "team"]
    list_select_related = ["team"]
    search_fields = ["name"]
    # ``credentials`` is not a field of the form: sealed, never shown.
    readonly_fields = [
        "created_at",
        "input_watermark",
        "last_received_at",
        "events_total",
        "last_error",
        "error_permanent",
        "last_error_at",
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Source | None = None) -> Any:
        fields = list(super().get_readonly_fields(request, obj))
        # A source's team and kind are its identity once it has events.
        return [*fields, "team", "kind"] if obj is not None else fields


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "source",
        "external_id",
        "created_at",
        "received_at",
        "author_handle",
        "lang",
        "preview",
        "enriched",
    ]
    list_filter = ["source", "lang", ("enriched_at", admin.EmptyFieldListFilter)]
    list_select_related = ["source"]
    search_fields = ["external_id", "text"]
    ordering = ["-id"]
    # The events table is the largest: no exact count of every match on each page.
    show_full_result_count = False

    @admin.display(description="text")
    def preview(self, event: Event) -> str:
        text = event.text.replace("\n", " ")
        return text if len(text) <= TEXT_PREVIEW else text[: TEXT_PREVIEW - 1] + "…"

    @admin.display(description="enriched", boolean=True)
    def enriched(self, event: Event) -> bool:
        return event.enriched_at is not None


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = ["id", "stage", "source", "reason", "attempts", "created_at", "requeued_at"]
    list_filter = ["stage", "source", ("requeued_at", admin.EmptyFieldListFilter)]
    list_select_related = ["source"]
    search_fields = ["reason", "key"]
    ordering = ["-id"]
