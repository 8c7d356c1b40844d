"""What every source adapter shares: the base class and the one error type it raises.

An adapter turns one ``Source`` row into a stream of canonical ``Envelope`` objects
(``ingest/envelope.py``). Adapters live in ``ingest/sources/<kind>/`` and are found by
kind through ``ingest.sources.registry``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ingest.envelope import Envelope

if TYPE_CHECKING:
    from ingest.models import Source


class SourceError(Exception):
    """A source could not deliver.

    ``permanent`` says whether trying again can help: True for bad credentials, a
    channel or file that is gone, a payload we can never read (the caller records the
    reason on the source and may disable it); False for a rate limit, a timeout, a
    network blip (the caller retries with backoff). ``retry_after_s``: how long the
    service asked us to wait (``Retry-After``, ``x-rate-limit-reset``, Telegram's
    FloodWait), in seconds, when it said.
    """

    def __init__(self, reason: str, *, permanent: bool, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"SourceError({self.reason!r}, permanent={self.permanent})"


class SourceAdapter(ABC):
    """Base of every adapter: built with its ``Source`` row, identified by ``kind``.

    Subclasses set ``kind`` (one of ``Source.Kind``) and register themselves with
    ``ingest.sources.registry.register``.
    """

    kind: ClassVar[str]

    def __init__(self, source: Source) -> None:
        self.source = source

    @abstractmethod
    def fetch(self) -> Iterator[Envelope]:
        """Pull what the source has now, as envelopes (event time in UTC).

        Lazy: nothing is read before the first ``next``. Items the adapter cannot turn
        into an envelope are skipped and logged by the adapter, never raised.

        Raises:
            SourceError: the source as a whole cannot deliver; ``permanent`` says
                whether a later attempt could succeed.
        """


@dataclass(slots=True)
class Poll:
    """One poll's outcome: ``envelopes`` (every item the source gave, in its order),
    ``cursor`` (where the next poll resumes: a feed's validators, X's ``since_id``,
    Telegram's last ids), ``not_modified`` (an HTTP 304), ``problem`` (what could be
    read only in part, or "")."""

    envelopes: list[Envelope] = field(default_factory=list)
    cursor: dict[str, Any] = field(default_factory=dict)
    not_modified: bool = False
    problem: str = ""


class PollingAdapter(SourceAdapter):
    """An adapter asked on a schedule (``ingest.polling``): one ``poll`` at a time,
    resuming from ``source.cursor``."""

    default_poll_interval_s: ClassVar[int] = 300
    """Seconds between polls when the source's config gives none."""

    @abstractmethod
    def poll(self) -> Poll:
        """What the source has after ``source.cursor``, and the cursor to resume from.

        Raises:
            SourceError: the source cannot deliver now (``permanent`` says whether it
                ever could; ``retry_after_s`` how long the service asked us to wait).
        """

    def fetch(self) -> Iterator[Envelope]:
        """The envelopes of one ``poll``."""
        yield from self.poll().envelopes
