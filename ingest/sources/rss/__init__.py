"""RSS 2.0, RSS 1.0 (RDF) and Atom feeds, polled with conditional GET.

Importing the package registers ``RssAdapter`` for source kind ``"rss"``.
"""

from __future__ import annotations

from ingest.sources.rss.adapter import RssAdapter

__all__ = ["RssAdapter"]
