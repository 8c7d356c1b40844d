"""The replay's pacing and reporting, apart from its command (``manage.py replay``):
batches released in event time (``paced_batches``), the progress bar in event time
(``EventTimeBar``), what the pipeline did with a replay (``Outcome``), and staging that
rides out an outage of PostgreSQL or Redis (``OutageProofStager``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.management.base import OutputWrapper
from tqdm import tqdm

from ingest.envelope import Envelope
from twiscope.outage import Dependency, wait_out

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


RESEND_WINDOW_S = 5.0
"""After an outage, the batches staged in the last this-many seconds before it are
staged again: a store that acknowledged them may have lost them (Redis with its
append-only file fsynced every second loses up to about a second of writes)."""
OUTAGE_GIVE_UP_S = 900.0
"""A replay waits this long (seconds) for a dependency to come back, then fails."""


class OutageProofStager:
    """Stage a replay's batches through ``stage(batch)``, riding out outages.

    ``stage`` is the staging call (``persistence.enqueue_envelopes`` with the source
    bound); it may fail on an unreachable PostgreSQL or Redis
    (``twiscope.outage.DEPENDENCY_ERRORS``). Each call to ``send(batch)`` then waits
    with backoff (``twiscope.outage.wait_out``) and tries again, and does not return
    before the batch is staged: the replay resumes at the batch it was at, never from
    the start. Before that batch, the batches it staged in the ``resend_window_s``
    seconds before the failure are staged again, since the store may have lost them
    with the server; those come twice at worst, which the database ignores (events
    are unique on source and external id). ``on_wait(dependency, exc, delay_s)`` is
    told of every wait (to tell the user). Raises the dependency error after
    ``give_up_after_s`` seconds of one outage; other errors at once.
    """

    def __init__(
        self,
        stage: Callable[[Sequence[Envelope]], Any],
        *,
        resend_window_s: float = RESEND_WINDOW_S,
        give_up_after_s: float = OUTAGE_GIVE_UP_S,
        on_wait: Callable[[Dependency, BaseException, float], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stage = stage
        self._window_s = resend_window_s
        self._give_up_after_s = give_up_after_s
        self._on_wait = on_wait
        self._sleep = sleep
        self._clock = clock
        self._recent: deque[tuple[float, Sequence[Envelope]]] = deque()
        self._resend: list[Sequence[Envelope]] = []
        self._in_outage = False
        self.outages = 0
        """How many outages were ridden out (a run of failed tries is one)."""
        self.resent_batches = 0
        """How many batches were staged again after an outage."""

    def send(self, batch: Sequence[Envelope]) -> None:
        """Stage ``batch`` (after any batches to stage again), waiting out outages."""
        wait_out(
            lambda: self._attempt(batch),
            what="replay.stage",
            give_up_after_s=self._give_up_after_s,
            on_wait=self._waiting,
            sleep=self._sleep,
        )
        self._in_outage = False
        now = self._clock()
        self._recent.append((now, batch))
        while self._recent and now - self._recent[0][0] > self._window_s:
            self._recent.popleft()

    def call(self, what: str, function: Callable[[], Any]) -> Any:
        """``function()``, retried the same way (for the replay's other reads and
        writes: back-pressure, end of stream, drain); its outages count too."""
        result = wait_out(
            function,
            what=what,
            give_up_after_s=self._give_up_after_s,
            on_wait=self._waiting,
            sleep=self._sleep,
        )
        self._in_outage = False
        return result

    def _attempt(self, batch: Sequence[Envelope]) -> None:
        while self._resend:
            self._stage(self._resend[0])
            self._resend.pop(0)
            self.resent_batches += 1
        self._stage(batch)

    def _waiting(self, dependency: Dependency, exc: BaseException, delay_s: float) -> None:
        if not self._in_outage:
            # First failure of this outage: what it may have taken with it.
            self._in_outage = True
            self.outages += 1
            now = self._clock()
            self._resend += [b for t, b in self._recent if now - t <= self._window_s]
            self._recent.clear()
        if self._on_wait is not None:
            self._on_wait(dependency, exc, delay_s)
