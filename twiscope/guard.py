"""One poison item never stalls a stage: bisection of a failing batch and an attempt cap.

Every stage runs its batch through ``run_guarded``::

    outcome = guard.run_guarded("enrich", "events", event_ids, enrich_batch, park=park)

``fn(batch)`` does the stage's work on ``batch`` all or nothing (``run_guarded`` runs it
inside ``transaction.atomic()``, a savepoint when a transaction is open, so a failure
rolls back only that call). When it raises an error that is not transient, the batch
is split in two halves and each is run again, down to single items, so every good
item goes on in the same delivery and only the items that fail alone remain: about
``2 log2(n)`` extra calls for one poison item in a batch of ``n``.

An item that fails alone counts one attempt, in Redis (``ATTEMPTS_KEY``, kept
``ATTEMPTS_TTL_S``), so that the count survives a worker crash and the message's
redelivery. Under ``DEAD_LETTER_MAX_ATTEMPTS`` attempts the item is left undone for
the stage's sweeper to send again (``Outcome.failed``); at the cap it is handed to
``park`` (the stage writes its dead letter, through ``ingest.services``) and counts
as handled (``Outcome.parked``).

Transient errors (``TRANSIENT_ERRORS``: the database or the broker away, a time limit)
are not the item's fault: they propagate at once, count no attempt and park nothing,
so an outage never fills the dead-letter table.

This module imports no project app (``twiscope.pipeline``'s rule).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from django.conf import settings
from django.db import transaction

from twiscope.outage import DEPENDENCY_ERRORS
from twiscope.redis import get_redis

log = structlog.get_logger(__name__)

T = TypeVar("T", bound=Hashable)
R = TypeVar("R")

ATTEMPTS_KEY = "twiscope:attempts:{stage}:{scope}:{item}"
ATTEMPTS_TTL_S = 7 * 24 * 3600
"""An item's attempt count is forgotten this long after its last failure (seconds)."""

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *DEPENDENCY_ERRORS,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
"""Errors that say nothing about the item: re-raised, never counted or parked."""

SUMMARY_CHARS = 500
TRACEBACK_FRAMES = 6


@dataclass(frozen=True, slots=True)
class Failure(Generic[T]):
    """An item that failed alone: ``attempts`` so far (this one included), the error."""

    item: T
    attempts: int
    error: BaseException

    @property
    def summary(self) -> str:
        """``"<type>: <message>"``, at most ``SUMMARY_CHARS`` characters."""
        return f"{type(self.error).__name__}: {self.error}"[:SUMMARY_CHARS]

    @property
    def short_traceback(self) -> str:
        """The last ``TRACEBACK_FRAMES`` frames of the error's traceback, as text."""
        frames = traceback.extract_tb(self.error.__traceback__)[-TRACEBACK_FRAMES:]
        return "".join(traceback.format_list(frames)) + self.summary


@dataclass(slots=True)
class Outcome(Generic[T, R]):
    """What a guarded run did: ``results`` of every successful call of ``fn``, in item
    order; the items ``parked`` (dead-lettered: handled); those ``failed`` under the
    cap (left for the next delivery)."""

    results: list[R] = field(default_factory=list)
    parked: list[Failure[T]] = field(default_factory=list)
    failed: list[Failure[T]] = field(default_factory=list)

    @property
    def unfinished(self) -> set[T]:
        """Items to send again (``failed``), as a set."""
        return {f.item for f in self.failed}


def max_attempts() -> int:
    """``DEAD_LETTER_MAX_ATTEMPTS`` (at least 1)."""
    return max(1, int(settings.DEAD_LETTER_MAX_ATTEMPTS))


def run_guarded(
    stage: str,
    scope: str,
    items: Sequence[T],
    fn: Callable[[list[T]], Sequence[R]],
    *,
    park: Callable[[list[Failure[T]]], object],
    cap: int | None = None,
) -> Outcome[T, R]:
    """Run ``fn`` on ``items``, bisecting on failure; park items that reach the cap.

    ``stage`` and ``scope`` (the kind of item: "events", "trends", "stream"...) name the
    items' attempt counters. ``fn(batch)`` returns a sequence of results (concatenated
    into ``Outcome.results``); it must be idempotent and all or nothing. ``park`` gets
    the items that failed alone for the ``cap``-th time (default
    ``DEAD_LETTER_MAX_ATTEMPTS``), in one call after the run, and must record them (its
    own errors propagate); their counters are then deleted.

    Raises: any of ``TRANSIENT_ERRORS`` raised by ``fn``, at once (work already done by
    earlier halves stays done).
    """
    limit = cap if cap is not None else max_attempts()
    outcome: Outcome[T, R] = Outcome()
    _run(stage, scope, list(items), fn, outcome, limit)
    if outcome.parked:
        park(outcome.parked)
        forget_attempts(stage, scope, [f.item for f in outcome.parked])
        for failure in outcome.parked:
            log.error(
                "pipeline.item_parked",
                stage=stage,
                scope=scope,
                item=str(failure.item),
                attempts=failure.attempts,
                error=failure.summary,
            )
    for failure in outcome.failed:
        log.warning(
            "pipeline.item_failed",
            stage=stage,
            scope=scope,
            item=str(failure.item),
            attempts=failure.attempts,
            cap=limit,
            error=failure.summary,
        )
    return outcome


def _run(
    stage: str,
    scope: str,
    batch: list[T],
    fn: Callable[[list[T]], Sequence[R]],
    outcome: Outcome[T, R],
    limit: int,
) -> None:
    if not batch:
        return
    try:
        with transaction.atomic():
            outcome.results.extend(fn(batch))
        return
    except TRANSIENT_ERRORS:
        raise
    except Exception as error:  # any other error may be one item's: find which
        if len(batch) > 1:
            log.info("pipeline.batch_bisected", stage=stage, scope=scope, items=len(batch))
            middle = len(batch) // 2
            _run(stage, scope, batch[:middle], fn, outcome, limit)
            _run(stage, scope, batch[middle:], fn, outcome, limit)
            return
        failure = Failure(batch[0], _count_attempt(stage, scope, batch[0]), error)
    (outcome.parked if failure.attempts >= limit else outcome.failed).append(failure)


def _count_attempt(stage: str, scope: str, item: object) -> int:
    key = ATTEMPTS_KEY.format(stage=stage, scope=scope, item=item)
    pipe = get_redis().pipeline()
    pipe.incr(key)
    pipe.expire(key, ATTEMPTS_TTL_S)
    count, _ = pipe.execute()
    return int(count)


def attempts(stage: str, scope: str, item: object) -> int:
    """How many times ``item`` failed alone and was not parked (0: never, or forgotten)."""
    value = get_redis().get(ATTEMPTS_KEY.format(stage=stage, scope=scope, item=item))
    return int(value) if value is not None else 0  # type: ignore[arg-type]


def forget_attempts(stage: str, scope: str, items: Sequence[object]) -> None:
    """Delete the attempt counters of ``items`` (parked, or requeued after a fix)."""
    if items:
        get_redis().delete(
            *[ATTEMPTS_KEY.format(stage=stage, scope=scope, item=item) for item in items]
        )
