"""Telegram channels through telethon: new posts fetched by message id.

Importing the package registers ``TelegramAdapter`` for source kind ``"telegram"``.
"""

from __future__ import annotations

from ingest.sources.telegram.adapter import TelegramAdapter

__all__ = ["TelegramAdapter"]
