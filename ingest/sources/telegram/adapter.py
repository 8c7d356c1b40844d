"""The Telegram adapter: a ``Source`` of kind ``"telegram"`` polls public channels with
telethon (MTProto, as a user session or a bot).

``config``: ``{"channels": ["bbcrussian", "@rian_ru", ...], "poll_interval_s":
<15..3600, default 60>}``. ``credentials``: ``{"api_id": <int>, "api_hash": "...",
"session": "<telethon StringSession>"}`` or, instead of ``session``, ``"bot_token"``
(a bot reads only channels it was added to).

Each poll connects, and for each channel asks for the messages after the last id it
stored (``cursor["last_ids"][channel]``; the first poll of a channel takes its newest
``FIRST_POLL_MESSAGES``), oldest first, up to ``MAX_MESSAGES`` a channel a poll. A
restart resumes from those ids: nothing lost, nothing stored twice. Errors (telethon's):
a revoked or unregistered session, a deactivated account, a private or unknown channel
are permanent; FloodWait is temporary and waits the seconds Telegram asks; a connection
failure is temporary.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import structlog
from telethon import TelegramClient, errors
from telethon.sessions import StringSession

from ingest import credentials
from ingest.envelope import MAX_TEXT_CHARS, Author, Envelope, clean_text
from ingest.sources.base import Poll, PollingAdapter, SourceError
from ingest.sources.registry import register

log = structlog.get_logger(__name__)

DEFAULT_POLL_INTERVAL_S = 60
MIN_POLL_INTERVAL_S = 15
MAX_POLL_INTERVAL_S = 3600
MAX_CHANNELS = 50
FIRST_POLL_MESSAGES = 20
MAX_MESSAGES = 500
PERMANENT = (
    errors.AuthKeyUnregisteredError,
    errors.SessionRevokedError,
    errors.UserDeactivatedError,
    errors.UserDeactivatedBanError,
    errors.ChannelPrivateError,
    errors.UsernameNotOccupiedError,
)


def channel_key(name: str) -> str:
    """A channel's name as configured, normalised: no ``@``, no ``t.me/`` prefix."""
    name = name.strip().removeprefix("https://").removeprefix("t.me/").lstrip("@")
    return name


def session_from(value: str) -> StringSession:
    """A telethon ``StringSession`` from its saved string (``""``: a new, empty one).

    Raises:
        SourceError: permanent, the string is not a saved session.
    """
    try:
        return StringSession(value or None)
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        raise SourceError(
            f"the session string is not a telethon session: {exc}", permanent=True
        ) from None


def message_envelope(message: Any, channel: str) -> Envelope:
    """A telethon ``Message`` of ``channel`` as an envelope: ``external_id`` is
    ``"<channel>:<message id>"``; views and forwards become metrics."""
    text = clean_text(str(message.message or ""))[:MAX_TEXT_CHARS]
    reply = getattr(message, "reply_to", None)
    reply_id = getattr(reply, "reply_to_msg_id", None)
    metrics = {
        name: int(value)
        for name, value in (("views", message.views), ("forwards", message.forwards))
        if isinstance(value, int) and value >= 0
    }
    handle = channel if not channel.lstrip("-").isdigit() else ""
    return Envelope(
        external_id=f"{channel}:{message.id}",
        created_at=message.date,
        text=text,
        author=Author(id=channel, handle=handle, name=str(message.post_author or "")[:256]),
        url=f"https://t.me/{handle}/{message.id}" if handle else "",
        reply_to=f"{channel}:{reply_id}" if reply_id else "",
        metrics=metrics,
        raw={"channel": channel, "message_id": message.id, "grouped_id": message.grouped_id},
    )


def telegram_error(exc: BaseException) -> SourceError | None:
    """A telethon failure as a ``SourceError`` (see the module docstring), or None when
    it is not one of Telegram's."""
    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, errors.FloodWaitError):
        return SourceError(
            f"Telegram asks to wait {exc.seconds} s (FloodWait)",
            permanent=False,
            retry_after_s=float(exc.seconds),
        )
    if isinstance(exc, PERMANENT):
        return SourceError(f"Telegram refused: {exc}", permanent=True)
    if isinstance(exc, (TimeoutError, ConnectionError, OSError)):
        return SourceError(f"reaching Telegram: {exc}", permanent=False)
    return None


async def open_client(client_class: Any, secret: dict[str, Any]) -> Any:
    """A connected, authorised telethon client for the sealed ``secret`` (a user
    session, or a bot token signed in on a new session).

    Raises:
        SourceError: permanent, when the session is not authorised; telethon's errors
            as they come (``telegram_error`` maps them).
    """
    client = client_class(
        session_from(str(secret.get("session") or "")),
        int(secret.get("api_id") or 0),
        str(secret.get("api_hash") or ""),
    )
    await client.connect()
    try:
        if secret.get("bot_token") and not await client.is_user_authorized():
            await client.sign_in(bot_token=str(secret["bot_token"]))
        if not await client.is_user_authorized():
            raise SourceError(
                "the Telegram session is not authorised (revoked or never signed in)",
                permanent=True,
            )
    except BaseException:
        await client.disconnect()
        raise
    return client


async def read_new(
    client: Any, channels: list[str], last_ids: dict[str, int]
) -> tuple[list[Envelope], dict[str, int]]:
    """Each channel's messages after ``last_ids[channel]`` (its newest
    ``FIRST_POLL_MESSAGES`` when it has none), oldest first, at most ``MAX_MESSAGES`` a
    channel; returns them as envelopes and the ids to resume from.

    Raises:
        SourceError: permanent, a channel that does not exist; telethon's errors as they
            come.
    """
    last_ids = dict(last_ids)
    envelopes: list[Envelope] = []
    for name in channels:
        channel = channel_key(str(name))
        last = int(last_ids.get(channel) or 0)
        try:
            messages = await client.get_messages(
                channel, limit=MAX_MESSAGES if last else FIRST_POLL_MESSAGES, min_id=last
            )
        except ValueError as exc:  # telethon: no such username
            raise SourceError(f"channel {channel!r}: {exc}", permanent=True) from None
        for message in sorted(messages, key=lambda m: m.id):
            if not getattr(message, "message", None) or message.date is None:
                continue  # service messages, media without a caption
            envelopes.append(message_envelope(message, channel))
        if messages:
            last_ids[channel] = max(last, *(m.id for m in messages))
    return envelopes, last_ids


@register
class TelegramAdapter(PollingAdapter):
    """Polls ``source.config["channels"]`` (see the module docstring)."""

    kind: ClassVar[str] = "telegram"
    default_poll_interval_s: ClassVar[int] = DEFAULT_POLL_INTERVAL_S
    client_class: ClassVar[Any] = TelegramClient
    """The telethon client class (tests put a fake here)."""

    def poll(self) -> Poll:
        """Fetch each channel's new messages once.

        Raises:
            SourceError: see the module docstring (``retry_after_s`` on FloodWait).
        """
        secret = credentials.unseal(self.source.credentials)
        try:
            return asyncio.run(self._poll(secret))
        except Exception as exc:
            failure = telegram_error(exc)
            if failure is None:
                raise
            raise failure from None

    async def _poll(self, secret: dict[str, Any]) -> Poll:
        client = await open_client(self.client_class, secret)
        try:
            last_ids = dict((self.source.cursor or {}).get("last_ids") or {})
            channels = list(self.source.config.get("channels") or [])
            envelopes, last_ids = await read_new(client, channels, last_ids)
            return Poll(envelopes=envelopes, cursor={"last_ids": last_ids})
        finally:
            await client.disconnect()
