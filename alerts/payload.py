"""The alert as clients see it: one shape for ``GET /api/alerts/`` and the WebSocket."""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch, QuerySet

from alerts.models import Alert, AlertActivity


def latency_ms(alert: Alert) -> float | None:
    """``pushed_at − event_received_at`` in milliseconds (None until pushed)."""
    if alert.pushed_at is None:
        return None
    return round((alert.pushed_at - alert.event_received_at).total_seconds() * 1000, 1)


def with_payload_relations(alerts: QuerySet[Alert]) -> QuerySet[Alert]:
    """``alerts`` with what ``alert_payload`` reads loaded: the rule and the assignee
    (joined) and the activity with its users (one more query for the whole page)."""
    return alerts.select_related("rule", "assignee").prefetch_related(
        Prefetch("activity", queryset=AlertActivity.objects.select_related("user"))
    )


def activity_payload(entry: AlertActivity) -> dict[str, Any]:
    """``{"at": ISO 8601 UTC, "user": {"id", "username"} or None (the pipeline),
    "action", "detail"}`` (``user`` loaded, e.g. ``select_related``)."""
    user = entry.user
    return {
        "at": iso(entry.at),
        "user": None if user is None else {"id": user.pk, "username": user.get_username()},
        "action": entry.action,
        "detail": entry.detail,
    }


def iso(value: Any) -> str | None:
    """ISO 8601 in UTC with a ``Z`` (None stays None)."""
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def alert_payload(alert: Alert) -> dict[str, Any]:
    """The JSON-safe dict of ``alert`` (``rule`` must be loaded, e.g. ``select_related``).

    Keys: ``id``, ``team``, ``seq``, ``rule`` (``{"id", "name"}``), ``title``,
    ``severity``, ``trend`` (id or None), ``anomaly`` (id or None), ``event`` (the post
    of a "viral_post" alert: id or None), ``evidence``, ``explanation`` (why it fired,
    ``alerts.explain``; None on alerts older than explanations), ``event_received_at``,
    ``event_created_at``, ``created_at``, ``pushed_at``, ``updated_at`` (ISO 8601, UTC,
    or None), ``latency_ms``, and its lifecycle: ``state``, ``noise_reason``,
    ``assignee`` (``{"id", "username"}`` or None), ``snoozed_until`` and ``activity``
    (``activity_payload`` each, oldest first). Load them with ``with_payload_relations``
    (else one query per alert for each).
    """
    assignee = alert.assignee
    return {
        "id": alert.id,
        "team": alert.team_id,
        "seq": alert.seq,
        "rule": {"id": alert.rule_id, "name": alert.rule.name},
        "title": alert.title,
        "severity": alert.severity,
        "trend": alert.trend_id,
        "anomaly": alert.anomaly_id,
        "event": alert.event_id,
        "evidence": alert.evidence,
        "explanation": alert.explanation,
        "event_received_at": iso(alert.event_received_at),
        "event_created_at": iso(alert.event_created_at),
        "created_at": iso(alert.created_at),
        "pushed_at": iso(alert.pushed_at),
        "updated_at": iso(alert.updated_at),
        "latency_ms": latency_ms(alert),
        "state": alert.state,
        "noise_reason": alert.noise_reason,
        "assignee": None
        if assignee is None
        else {"id": assignee.pk, "username": assignee.get_username()},
        "snoozed_until": iso(alert.snoozed_until),
        "activity": [activity_payload(entry) for entry in alert.activity.all()],
    }
