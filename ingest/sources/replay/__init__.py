"""Archive replay: a file of recorded posts, replayed as a source in event time.

Importing the package registers ``ReplayAdapter`` for source kind ``"replay"``.
"""

from __future__ import annotations

from ingest.sources.replay.adapter import ReplayAdapter

__all__ = ["ReplayAdapter"]
