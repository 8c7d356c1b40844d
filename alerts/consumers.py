"""WebSocket consumer of the alert stream: authenticate, authorise, translate."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from alerts.push import PROTOCOL_VERSION, alerts_group
from dashboard.models import Team

CLOSE_UNAUTHENTICATED = 4401


@database_sync_to_async
def _team_seqs(user_id: int) -> dict[int, int]:
    return dict(Team.objects.filter(memberships__user_id=user_id).values_list("id", "alert_seq"))


class AlertsConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/alerts/``: pushes ``alert.created`` for every team the user belongs to.

    On connect it sends ``{"type": "hello", "v": 1, "teams": {"<team id>": last_seq}}``
    so the client knows where each sequence stands. Unauthenticated sockets are
    closed with code 4401. Messages from the client are ignored.
    """

    groups: list[str]

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        seqs = await _team_seqs(user.id)
        self.groups = [alerts_group(team_id) for team_id in seqs]
        for group in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self.send_json(
            {
                "type": "hello",
                "v": PROTOCOL_VERSION,
                "teams": {str(team_id): seq for team_id, seq in seqs.items()},
            }
        )

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Clients only listen; anything they send is ignored."""

    async def alert_created(self, event: dict[str, Any]) -> None:
        """Forward an ``alert.created`` group message to the socket."""
        await self.send_json(event["message"])
