"""The alert as clients see it: one shape for ``GET /api/alerts/`` and the WebSocket."""

from __future__ import annotations

from typing import Any

from alerts.models import Alert


def latency_ms(alert: Alert) -> float | None:
    """``pushed_at − event_received_at`` in milliseconds (None until pushed)."""
    if alert.pushed_at is None:
        return None
    return round((alert.pushed_at - alert.event_received_at).total_seconds() * 1000, 1)


def alert_payload(alert: Alert) -> dict[str, Any]:
    """The JSON-safe dict of ``alert`` (``rule`` must be loaded, e.g. ``select_related``).

    Keys: ``id``, ``team``, ``seq``, ``rule`` (``{"id", "name"}``), ``title``,
    ``severity``, ``trend`` (id or None), ``anomaly`` (id or None), ``event`` (the post
    of a "viral_post" alert: id or None), ``evidence``, ``event_received_at``,
    ``event_created_at``, ``created_at``, ``pushed_at``, ``updated_at`` (ISO 8601, UTC,
    or None) and ``latency_ms``.
    """

    def iso(value: Any) -> str | None:
        return value.isoformat().replace("+00:00", "Z") if value is not None else None

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
        "event_received_at": iso(alert.event_received_at),
        "event_created_at": iso(alert.event_created_at),
        "created_at": iso(alert.created_at),
        "pushed_at": iso(alert.pushed_at),
        "updated_at": iso(alert.updated_at),
        "latency_ms": latency_ms(alert),
    }
