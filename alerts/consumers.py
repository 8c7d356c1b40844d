"""WebSocket consumer of the alert stream: authenticate, authorise, translate."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from alerts.push import PROTOCOL_VERSION, alerts_group
from alerts.selectors import team_sequences
from teams.models import Team
from teams.ws_auth import CLOSE_ORIGIN_REFUSED, CLOSE_UNAUTHENTICATED


@database_sync_to_async
def _team_seqs(user_id: int) -> dict[int, int]:
    return team_sequences(
        list(Team.objects.filter(memberships__user_id=user_id).values_list("id", flat=True))
    )


class AlertsConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/alerts/``: pushes ``alert.created`` for every team the user belongs to.

    On connect it sends ``{"type": "hello", "v": 1, "teams": {"<team id>": last_seq}}``
    so the client knows where each sequence stands. A socket without valid credentials
    is accepted, then closed with code 4401; one offering a session cookie from an
    origin that is not allowed (see ``teams.ws_auth``) with 4403. (Closing before the
    accept would reach the client as a bare HTTP 403, its code lost.) Messages from the
    client are ignored.
    """

    groups: list[str]

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.accept()
            refused = self.scope.get("auth") == "origin-refused"
            await self.close(code=CLOSE_ORIGIN_REFUSED if refused else CLOSE_UNAUTHENTICATED)
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

    async def alerts_batch(self, event: dict[str, Any]) -> None:
        """Forward each ``alert.created`` of a team's batch, in ``seq`` order, as its own
        WebSocket message (the push sends one channel-layer message per team and batch)."""
        for message in event["messages"]:
            await self.send_json(message)
