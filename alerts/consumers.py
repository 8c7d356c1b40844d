"""WebSocket consumer of the alert stream: authenticate, authorise, translate."""

from __future__ import annotations

from typing import Any

import structlog
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from alerts.push import PROTOCOL_VERSION, alerts_group
from alerts.selectors import team_sequences
from teams.models import Team
from teams.services import token_group
from teams.ws_auth import (
    CLOSE_ORIGIN_REFUSED,
    CLOSE_UNAUTHENTICATED,
    CLOSE_UNAVAILABLE,
    SUBPROTOCOL,
    UNAVAILABLE_ERRORS,
    close_unavailable,
    offered_subprotocols,
    release_connections,
)

log = structlog.get_logger(__name__)


@database_sync_to_async
def _team_ids(user_id: int) -> list[int]:
    return list(Team.objects.filter(memberships__user_id=user_id).values_list("id", flat=True))


@database_sync_to_async
def _team_seqs(team_ids: list[int]) -> dict[int, int]:
    return team_sequences(team_ids)


class AlertsConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/alerts/``: pushes ``alert.created`` for every team the user belongs to.

    On connect it joins each team's group, then reads the teams' sequences, then sends
    ``{"type": "hello", "v": 1, "teams": {"<team id>": last_seq}}`` so the client knows
    where each sequence stands. In that order no alert is lost: one committed before
    the read is counted in ``last_seq`` (the client fetches it over REST,
    ``GET /api/alerts/?team=<id>&after_seq=<seq>&ordering=seq``), one committed after
    it is pushed to the group already joined. The price is a possible duplicate: an
    alert pushed between the join and the read may reach the socket before ``hello``,
    with a ``seq`` ≤ the hello's; the client de-duplicates by ``seq`` per team (and by
    alert id), so it ignores an ``alert.created`` whose ``seq`` it already holds.

    Close codes (the socket is always accepted first: closing before the accept would
    reach the client as a bare HTTP 403, its code lost):

    - 4401 (``CLOSE_UNAUTHENTICATED``): no valid credentials, or the token the socket
      was opened with has been revoked (it joins that token's group, and
      ``token.revoked`` closes it);
    - 4403 (``CLOSE_ORIGIN_REFUSED``): a session cookie from an origin that is not
      allowed (see ``teams.ws_auth``);
    - 4503 (``CLOSE_UNAVAILABLE``): the database or Redis is down (an error of
      ``teams.ws_auth.UNAVAILABLE_ERRORS`` while connecting, or Redis lost while
      connected): retry with backoff, then catch up over REST.

    Messages from the client are ignored, whatever they hold: JSON, text that is not
    JSON, or binary frames (logged at debug, ``ws.alerts.frame_ignored``); the socket
    stays open.
    """

    groups: list[str]
    _accepted: bool = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the consumer; a dependency outage (``UNAVAILABLE_ERRORS``) from the
        connect handler or the channel layer closes the socket with 4503 instead of
        failing the handshake with an HTTP 500 (or an open socket with 1011)."""
        try:
            await super().__call__(scope, receive, send)
        except UNAVAILABLE_ERRORS as exc:
            log.warning(
                "ws.alerts.unavailable",
                error=type(exc).__name__,
                detail=str(exc)[:200],
                accepted=self._accepted,
                close_code=CLOSE_UNAVAILABLE,
            )
            await self._leave_groups()
            await release_connections()
            await close_unavailable(send, accepted=self._accepted)

    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        """Accept, selecting ``twiscope.v1`` when the client offered it (a browser that
        offered subprotocols fails a handshake answered without one)."""
        if subprotocol is None and SUBPROTOCOL in offered_subprotocols(self.scope):
            subprotocol = SUBPROTOCOL
        await super().accept(subprotocol, headers)
        self._accepted = True

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.accept()
            refused = self.scope.get("auth") == "origin-refused"
            await self.close(code=CLOSE_ORIGIN_REFUSED if refused else CLOSE_UNAUTHENTICATED)
            return
        team_ids = await _team_ids(user.id)
        self.groups = [alerts_group(team_id) for team_id in team_ids]
        token_id = self.scope.get("token_id")
        if token_id is not None:
            self.groups.append(token_group(token_id))
        # Join first, read second: see the class docstring.
        for group in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
        seqs = await _team_seqs(team_ids)
        await self.accept()
        await self.send_json(
            {
                "type": "hello",
                "v": PROTOCOL_VERSION,
                "teams": {str(team_id): seq for team_id, seq in seqs.items()},
            }
        )

    async def disconnect(self, code: int) -> None:
        await self._leave_groups()

    async def _leave_groups(self) -> None:
        """Leave the groups joined; with Redis down there is nothing to leave (the
        channel layer expires a dead channel's membership by itself)."""
        for group in getattr(self, "groups", []):
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except UNAVAILABLE_ERRORS as exc:
                log.info("ws.alerts.group_discard_failed", group=group, error=type(exc).__name__)
                return

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        """Clients only listen: every frame is ignored. A frame that is not JSON text
        (binary, empty, or unparseable) is logged at debug and dropped, never closing
        the socket (the base class would raise and close it with 1011)."""
        if text_data:
            try:
                content = await self.decode_json(text_data)
            except ValueError as exc:
                log.debug(
                    "ws.alerts.frame_ignored",
                    reason="not_json",
                    size=len(text_data),
                    error=str(exc),
                )
                return
            await self.receive_json(content, **kwargs)
            return
        log.debug(
            "ws.alerts.frame_ignored",
            reason="binary" if bytes_data is not None else "empty",
            size=len(bytes_data or b""),
        )

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Clients only listen; anything they send is ignored."""

    async def token_revoked(self, event: dict[str, Any]) -> None:
        """The token this socket was opened with was revoked: close with 4401."""
        await self.close(code=CLOSE_UNAUTHENTICATED)

    async def alert_created(self, event: dict[str, Any]) -> None:
        """Forward an ``alert.created`` group message to the socket."""
        await self.send_json(event["message"])

    async def alerts_batch(self, event: dict[str, Any]) -> None:
        """Forward each ``alert.created`` of a team's batch, in ``seq`` order, as its own
        WebSocket message (the push sends one channel-layer message per team and batch)."""
        for message in event["messages"]:
            await self.send_json(message)
