"""X (Twitter) through tweepy and the v2 API: recent search, polled with since_id.

Importing the package registers ``XAdapter`` for source kind ``"x"``.
"""

from __future__ import annotations

from ingest.sources.x.adapter import XAdapter

__all__ = ["XAdapter"]
