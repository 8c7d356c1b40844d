"""The replay's pacing and reporting, apart from its command (``manage.py replay``):
batches released in event time (``paced_batches``), the progress bar in event time
(``EventTimeBar``) and what the pipeline did with a replay (``Outcome``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from django.core.management.base import OutputWrapper
from tqdm import tqdm

from ingest.envelope import Envelope

FLUSH_WINDOW_S = 0.2
"""With ``--speed``, a batch spans at most this much wall time of the replay schedule,
so no event waits longer than about this for its batch to fill."""


@dataclass(frozen=True)
class Outcome:
    """What the pipeline did with a replay, from the source's counts before and after.

    ``duplicates`` are the events sent that were neither stored new nor dead-lettered at
    ingest: already stored (an earlier replay) or repeated within the archive
    (``repeated_in_archive`` of them share an external id with an earlier row).
    """

    stored: int
    duplicates: int
    ingest_dead_letters: int
    replay_dead_letters: int
    repeated_in_archive: int = 0

    @classmethod
    def between(
        cls,
        before: dict[str, int],
        after: dict[str, int],
        *,
        sent: int,
        replay_dead: int,
        repeated_in_archive: int = 0,
    ) -> Outcome:
        """``before``/``after``: ``ingest.selectors.source_counts`` of the source."""
        stored = after["events"] - before["events"]
        ingest_dead = max(0, after["dead_letters"] - before["dead_letters"] - replay_dead)
        return cls(
            stored=stored,
            duplicates=max(0, sent - stored - ingest_dead),
            ingest_dead_letters=ingest_dead,
            replay_dead_letters=replay_dead,
            repeated_in_archive=repeated_in_archive,
        )

    def text(self) -> str:
        dead = self.ingest_dead_letters + self.replay_dead_letters
        repeated = (
            f" ({self.repeated_in_archive} repeated within the archive)"
            if self.repeated_in_archive
            else ""
        )
        return (
            f"stored {self.stored} new, {self.duplicates} duplicates{repeated}, "
            f"{dead} dead letters "
            f"(ingest {self.ingest_dead_letters}, replay {self.replay_dead_letters})"
        )


class BarStream:
    """A command's stderr as tqdm's file: no added newline, no error colour; a TTY
    exactly when the command's stderr is one (so tqdm's ``disable=None`` applies)."""

    def __init__(self, wrapper: OutputWrapper) -> None:
        self._wrapper = wrapper
        self.encoding = getattr(wrapper, "encoding", None) or "utf-8"

    def write(self, text: str) -> None:
        self._wrapper.write(text, style_func=lambda s: s, ending="")

    def flush(self) -> None:
        self._wrapper.flush()

    def isatty(self) -> bool:
        return self._wrapper.isatty()


class EventTimeBar:
    """A progress bar whose position is the event time reached, in seconds since the
    archive's first event (its length: the archive's event-time span)."""

    def __init__(self, stream: BarStream, *, first: datetime, last: datetime, total: int) -> None:
        self._first = first
        self._span = (last - first).total_seconds()
        self._total = total
        self._sent = 0
        self._bar = tqdm(
            total=self._span or 1.0,
            file=stream,
            disable=None,
            leave=False,
            dynamic_ncols=True,
            desc=self._when(first),
            postfix=self._sent_text(),
            bar_format="{desc} |{bar}| {percentage:3.0f}% of event time{postfix} "
            "[{elapsed}<{remaining}]",
        )

    def advance(self, event_time: datetime, sent: int) -> None:
        """The replay has sent ``sent`` more events, up to ``event_time``."""
        self._sent += sent
        reached = (event_time - self._first).total_seconds() if self._span else 1.0
        self._bar.set_description_str(self._when(event_time), refresh=False)
        self._bar.set_postfix_str(self._sent_text(), refresh=False)
        self._bar.update(reached - self._bar.n)
        if self._sent >= self._total:
            # The last batch: show it even within tqdm's refresh interval.
            self._bar.refresh()

    @staticmethod
    def _when(event_time: datetime) -> str:
        return f"event time {event_time:%Y-%m-%d %H:%M:%S} UTC"

    def _sent_text(self) -> str:
        return f"{self._sent}/{self._total} events sent"

    def close(self) -> None:
        self._bar.close()


def paced_batches(
    envelopes: Sequence[Envelope],
    *,
    speed: float | None,
    batch_size: int,
    rate: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[list[Envelope]]:
    """Yield ``envelopes`` (sorted by ``created_at``) in batches, each when it is due.

    ``speed`` and ``rate`` None: batches of ``batch_size`` as fast as the consumer takes
    them. ``speed`` > 0: an event is due ``(created_at - first created_at) / speed``
    seconds of ``clock`` after the first ``next``. ``rate`` > 0 (events per second,
    instead of ``speed``): the i-th event is due ``i / rate`` seconds after it, a steady
    load whatever the archive's gaps. The generator sleeps until each event is due
    before adding it to the batch, and yields a batch when it is full or when the next
    event is due more than ``FLUSH_WINDOW_S`` after the batch's first, so a slow replay
    is not held back waiting for a batch to fill. Time spent by the consumer between
    batches counts against the schedule (a slow consumer is caught up, not added to).
    """
    if speed is None and rate is None:
        for start in range(0, len(envelopes), batch_size):
            yield list(envelopes[start : start + batch_size])
        return
    if not envelopes:
        return
    origin = envelopes[0].created_at
    started = clock()
    batch: list[Envelope] = []
    batch_due = 0.0
    for i, envelope in enumerate(envelopes):
        due = i / rate if rate else (envelope.created_at - origin).total_seconds() / (speed or 1)
        if batch and due - batch_due > FLUSH_WINDOW_S:
            yield batch
            batch = []
        wait = started + due - clock()
        if wait > 0:
            sleep(wait)
        if not batch:
            batch_due = due
        batch.append(envelope)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
