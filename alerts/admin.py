"""Admin of alert rules (editable, saved through ``alerts.services.save_rule``) and
alerts (read-only: they are the record of what fired and when it was pushed)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from alerts import services
from alerts.models import Alert, AlertRule
from teams.admin import ReadOnlyAdmin

RULE_FIELDS = AlertRule.EDITABLE_FIELDS


class AlertRuleForm(forms.ModelForm):
    class Meta:
        model = AlertRule
        fields = RULE_FIELDS

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        team, source = data.get("team"), data.get("source")
        if team is not None and source is not None and source.team_id != team.id:
            self.add_error("source", f'source "{source.name}" belongs to another team')
        for name in ("min_events", "min_authors", "min_peak"):
            if data.get(name) is not None and data[name] < 1:
                self.add_error(name, "must be at least 1")
        for name in ("min_score", "cooldown_s"):
            if data.get(name) is not None and data[name] < 0:
                self.add_error(name, "must be at least 0")
        return data


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    form = AlertRuleForm
    list_display = [
        "name",
        "team",
        "enabled",
        "severity",
        "source",
        "min_score",
        "min_events",
        "min_authors",
        "cooldown_s",
    ]
    list_filter = ["enabled", "severity", "team"]
    list_select_related = ["team", "source"]
    search_fields = ["name", "team__slug"]
    readonly_fields = ["created_at"]

    def save_model(self, request: HttpRequest, obj: AlertRule, form: Any, change: bool) -> None:
        """Through the rules service, like the API: a new rule from the form's fields,
        a changed one with just the fields that changed."""
        fields = RULE_FIELDS if not change else [f for f in form.changed_data if f in RULE_FIELDS]
        data = {name: form.cleaned_data[name] for name in fields}
        if not change:
            saved = services.save_rule(rule=None, data=data)
            obj.pk = saved.pk
            obj.created_at = saved.created_at
        elif data:
            services.save_rule(rule=obj, data=data)


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    list_display = ["seq", "team", "title", "severity", "rule", "created_at", "pushed_at"]
    list_filter = ["severity", "team", "rule"]
    list_select_related = ["team", "rule"]
    search_fields = ["title"]
    ordering = ["-id"]
