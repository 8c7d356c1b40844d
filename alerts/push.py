"""The one module that sends WebSocket events (always after commit).

Contract, version 1 (``"v": 1``), on the group ``ws.<team id>.alerts``:

- ``{"type": "alert.created", "v": 1, "team": int, "seq": int, "alert": {...}}``: the
  alert as ``GET /api/alerts/`` returns it (``alerts.payload``), with ``pushed_at`` set.

- ``{"type": "alert.updated", "v": 1, "team": int, "seq": int, "alert": {...}}``: an
  alert sent before, changed (a new member joined its story: ``evidence["story"]``,
  ``title``, ``updated_at``; a lifecycle change: ``state``, ``assignee``,
  ``snoozed_until``, a new ``activity`` entry); ``seq`` is the alert's own, not a new
  one: the team's sequence counts alerts, so a gap always means a missed alert.

``seq`` is the team's alert sequence number, increasing per team over ``alert.created``
(consecutive, but a reserved number may go unused). The channel layer is at most once:
a client that reconnects, or sees a gap, fetches what it missed with
``GET /api/alerts/?team=<id>&after_seq=<last seq held>&ordering=seq``, page after page
(``alerts.consumers.AlertsConsumer`` has the connect order and the close codes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from alerts.models import Alert
from alerts.payload import alert_payload, with_payload_relations
from twiscope import hotcache

log = structlog.get_logger(__name__)

PROTOCOL_VERSION = 1


def alerts_group(team_id: int) -> str:
    """The channel-layer group of a team's alert stream (ASCII, as Channels requires)."""
    return f"ws.{team_id}.alerts"


def push_alerts(*, alert_ids: Sequence[int]) -> int:
    """Send each alert to its team's group and record ``pushed_at``; returns how many.

    Alerts already pushed are skipped (a redelivered push sends nothing twice, unless two
    pushes race, when a client may get one twice and drops the ``seq`` it has seen).
    Reads the alerts in one query, sends one channel-layer message per team holding its
    alerts in ``seq`` order (the consumer forwards each as its own ``alert.created``),
    and marks them pushed in one UPDATE.

    Raises:
        RuntimeError: ``CHANNEL_LAYERS`` is not configured.
    """
    alerts = list(
        with_payload_relations(
            Alert.objects.filter(id__in=list(alert_ids), pushed_at__isnull=True)
        ).order_by("team_id", "seq")
    )
    if not alerts:
        return 0
    teams = {alert.team_id for alert in alerts}
    hotcache.bump("alerts", teams)  # committed: the list shows them even if a send fails
    pushed_at = timezone.now()
    for alert in alerts:
        alert.pushed_at = pushed_at
    _send_by_team(alerts, "alert.created")
    Alert.objects.filter(id__in=[a.id for a in alerts], pushed_at__isnull=True).update(
        pushed_at=pushed_at
    )
    hotcache.bump("alerts", teams)  # pushed_at: the list's field and the stats' latency
    log.info("alerts.pushed", count=len(alerts))
    return len(alerts)


def push_updates(*, alert_ids: Sequence[int]) -> int:
    """Send ``alert.updated`` for each alert to its team's group; returns how many.

    Alerts not pushed yet are skipped: their ``alert.created``, still to come, carries
    the update. One channel-layer message per team, in ``seq`` order.

    Raises:
        RuntimeError: ``CHANNEL_LAYERS`` is not configured.
    """
    alerts = list(
        with_payload_relations(
            Alert.objects.filter(id__in=list(alert_ids), pushed_at__isnull=False)
        ).order_by("team_id", "seq")
    )
    if alerts:
        hotcache.bump("alerts", {alert.team_id for alert in alerts})
        _send_by_team(alerts, "alert.updated")
        log.info("alerts.updates_pushed", count=len(alerts))
    return len(alerts)


def _send_by_team(alerts: Sequence[Alert], kind: str) -> None:
    """One channel-layer message per team, holding its ``alerts`` (``seq`` order) as
    ``kind`` messages of the contract above."""
    by_team: dict[int, list[dict[str, Any]]] = {}
    for alert in alerts:
        by_team.setdefault(alert.team_id, []).append(
            {
                "type": kind,
                "v": PROTOCOL_VERSION,
                "team": alert.team_id,
                "seq": alert.seq,
                "alert": alert_payload(alert),
            }
        )
    async_to_sync(_send_all)(
        [
            (alerts_group(team_id), {"type": "alerts.batch", "messages": messages})
            for team_id, messages in by_team.items()
        ]
    )


async def _send_all(messages: list[tuple[str, dict[str, Any]]]) -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("CHANNEL_LAYERS is not configured")
    await asyncio.gather(*(layer.group_send(group, message) for group, message in messages))
