"""The one module that sends WebSocket events (always after commit).

Contract, version 1 (``"v": 1``), on the group ``ws.<team id>.alerts``:

- ``{"type": "alert.created", "v": 1, "team": int, "seq": int, "alert": {...}}``: the
  alert as ``GET /api/alerts/`` returns it, with ``pushed_at`` set.

``seq`` is the team's alert sequence number, consecutive per team. The channel layer
is at most once: a client that sees a gap reloads ``GET /api/alerts/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from alerts.models import Alert

log = structlog.get_logger(__name__)

PROTOCOL_VERSION = 1


def alerts_group(team_id: int) -> str:
    """The channel-layer group of a team's alert stream (ASCII, as Channels requires)."""
    return f"ws.{team_id}.alerts"


def push_alerts(*, alert_ids: Sequence[int]) -> int:
    """Send each alert to its team's group and record ``pushed_at``; returns how many.

    Alerts already pushed are skipped (a redelivered push sends nothing twice).
    """
    from alerts.api.serializers import AlertSerializer

    alerts = list(
        Alert.objects.filter(id__in=alert_ids, pushed_at__isnull=True)
        .select_related("rule")
        .order_by("team_id", "seq")
    )
    if not alerts:
        return 0
    messages: list[tuple[str, dict[str, Any]]] = []
    for alert in alerts:
        alert.pushed_at = timezone.now()
        payload = AlertSerializer(alert).data
        messages.append(
            (
                alerts_group(alert.team_id),
                {
                    "type": "alert.created",
                    "message": {
                        "type": "alert.created",
                        "v": PROTOCOL_VERSION,
                        "team": alert.team_id,
                        "seq": alert.seq,
                        "alert": payload,
                    },
                },
            )
        )
    async_to_sync(_send_all)(messages)
    for alert in alerts:
        Alert.objects.filter(id=alert.id, pushed_at__isnull=True).update(pushed_at=alert.pushed_at)
    log.info("alerts.pushed", count=len(alerts))
    return len(alerts)


async def _send_all(messages: list[tuple[str, dict[str, Any]]]) -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("CHANNEL_LAYERS is not configured")
    for group, message in messages:
        await layer.group_send(group, message)
