"""The replay adapter: a ``Source`` of kind ``"replay"`` reads an archive file.

The source's ``config`` is ``{"path": "<archive file>", "format": "<one of FORMATS>"}``;
``format`` is optional (detected from content when absent). Pacing in event time and
dead-lettering of bad rows belong to the ``replay`` management command; this adapter
only turns the file into envelopes, for callers that pull.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import structlog

from ingest.envelope import Envelope
from ingest.sources.base import SourceAdapter, SourceError
from ingest.sources.registry import register
from ingest.sources.replay.formats import ArchiveFormatError, read_archive
from ingest.sources.replay.rows import RowError

if TYPE_CHECKING:
    from ingest.models import Source

log = structlog.get_logger(__name__)


@register
class ReplayAdapter(SourceAdapter):
    """Envelopes from the archive named by ``source.config["path"]``, in file order.

    After ``fetch`` is exhausted, ``errors`` counts the skipped rows by category
    (``RowError.category``); each skipped row is logged as ``replay.row_skipped``.
    """

    kind: ClassVar[str] = "replay"

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.errors: Counter[str] = Counter()

    def fetch(self) -> Iterator[Envelope]:
        """Yield the archive's envelopes; count and log the rows that are not posts.

        Raises:
            SourceError: permanent when ``config["path"]`` is missing, the file is gone
                or unreadable, or its format cannot be told; temporary for other I/O
                errors.
        """
        config = self.source.config if isinstance(self.source.config, dict) else {}
        path_value = config.get("path")
        if not isinstance(path_value, str) or not path_value:
            raise SourceError("replay source has no config['path']", permanent=True)
        path = Path(path_value)
        try:
            items = read_archive(path, config.get("format") or None)
            for item in items:
                if isinstance(item, RowError):
                    self._skip(item)
                    continue
                yield item
        except (ArchiveFormatError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise SourceError(f"cannot replay {path}: {exc}", permanent=True) from exc
        except OSError as exc:
            raise SourceError(f"reading {path} failed: {exc}", permanent=False) from exc
        log.info(
            "replay.fetch_done",
            source_id=self.source.pk,
            path=str(path),
            skipped=sum(self.errors.values()),
        )

    def _skip(self, error: RowError) -> None:
        self.errors[error.category] += 1
        log.warning(
            "replay.row_skipped",
            source_id=self.source.pk,
            line=error.line,
            reason=error.reason,
        )
