"""The chain of stages, and the only way work moves from one stage to the next.

::

    ingest ──► enrich ──► detect ──► alerts
    (persist)  (language,  (trends,    (rules, push)
               entities,   stories,
               sentiment)  anomalies)

The stages and their queues are defined once, in ``twiscope.queues``.

A stage never imports the next stage's tasks: it calls ``hand_off(from_stage, ...)``,
which sends the next stage's task **by name**, after the current transaction commits
(``transaction.on_commit``). This module imports no project app, so every app may use
it without an import running back up the flow.

Every dispatch records when it was sent, per item (an event id, a trend id, a batch
key), in a Redis sorted set of its stage (``twiscope:dispatched:<stage>``, score: epoch
seconds); a stage marks its items done when it has handled them. A stage's sweeper
asks ``stuck()`` which of its unfinished items really are stuck: never dispatched
(the process died between commit and send), dispatched long ago while the stage's
queue is empty (the message was lost), or dispatched so long ago that no worker can
hold the message any more (``PIPELINE_LOST_AFTER_S``: lost, even under sustained
load). A worker that takes a message refreshes its items' records
(``task_received``), so work a worker holds is not taken for lost either. Items
merely waiting behind a backlog are not re-sent before that bound, so a slow pool is
not handed the same work twice.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

import structlog
from amqp.exceptions import ChannelError
from celery.signals import task_received
from django.conf import settings
from django.db import transaction

from twiscope.celery import app
from twiscope.queues import ALERTS, DETECT, ENRICH, INFERENCE, INGEST, STAGES
from twiscope.redis import get_redis

log = structlog.get_logger(__name__)

ENTRY_TASKS = {
    INGEST: "ingest.persist_batch",
    ENRICH: "enrich.enrich_events",
    DETECT: "detect.advance_stream",
    ALERTS: "alerts.evaluate_trends",
    INFERENCE: "inference.score_backlog",
}
"""The task that takes a stage's input, by stage. Task kwargs, by stage:
``ingest``: ``batch_key``, ``source_id``; ``enrich``: ``event_ids``, ``source_id``;
``detect``: ``source_id``; ``alerts``: ``trend_ids``. ``inference`` is a branch off the
chain, not a stage of it (nothing waits for it): the transformer labels of enriched
events, from ``mlengine.scoring``'s backlog; no kwargs."""

SIDE_TASKS = {
    ALERTS: {
        "anomalies": "alerts.evaluate_anomalies",
        "confirmations": "alerts.confirm_trends",
        "anomaly_updates": "alerts.update_anomaly_alerts",
        "viral": "alerts.evaluate_viral",
    }
}
"""Other inputs of a stage than its entry task's, by stage and key (``send(task=key)``):
``alerts``/``anomalies`` takes ``anomaly_ids`` (dispatch records ``anomaly:<id>``);
``alerts``/``confirmations`` takes ``trend_ids`` of predicted trends that came true;
``alerts``/``anomaly_updates`` takes ``anomaly_ids`` of anomalies whose window grew or
closed; ``alerts``/``viral`` takes ``event_ids`` of posts the virality model scored
high (dispatch records ``viral:<id>``, written before the scores commit: ``record``)."""

NEXT_STAGE = dict(itertools.pairwise(STAGES))
"""The stage after each stage but the last (``STAGES`` is in flow order)."""

ITEM_KWARGS = {INGEST: "batch_key", ENRICH: "event_ids", ALERTS: "trend_ids"}
"""The task kwarg naming a stage's items (dispatch records), by stage."""
STAGE_OF_TASK = {task: stage for stage, task in ENTRY_TASKS.items()}

RECORDS_OF_TASK = {
    **{ENTRY_TASKS[stage]: (stage, kwarg, "") for stage, kwarg in ITEM_KWARGS.items()},
    SIDE_TASKS[ALERTS]["anomalies"]: (ALERTS, "anomaly_ids", "anomaly:"),
    SIDE_TASKS[ALERTS]["viral"]: (ALERTS, "event_ids", "viral:"),
}
"""``task name: (stage, kwarg, record prefix)``: the dispatch records a task's message
carries (``<prefix><item>`` for each item of the kwarg), refreshed when a worker takes it."""

DISPATCH_KEY = "twiscope:dispatched:{stage}"
PENDING_KEY = "twiscope:pending:{stage}:{key}"
COALESCE_EXPIRY_S = 60
"""A coalesced task lost before it started holds its key back for at most this long."""


def hand_off(
    from_stage: str, *, items: Sequence[int | str] = (), task: str | None = None, **kwargs: Any
) -> None:
    """Queue the stage after ``from_stage`` with ``kwargs``, once the current transaction
    commits (at once outside a transaction).

    ``items`` are the ids the next stage will work on (recorded with their dispatch
    time, see ``stuck``); ``task`` names another task of the next stage than its entry
    task (one of ``SIDE_TASKS``). Raises ``KeyError`` for a stage with no successor or a
    task that is not the stage's.
    """
    stage = NEXT_STAGE[from_stage]
    if stage == DETECT and "source_id" in kwargs:
        # One waiting trend task per stream does the work of every hand-off before it.
        kwargs.setdefault("coalesce", f"source:{kwargs['source_id']}")
    send(stage, items=items, task=task, **kwargs)


def send(
    stage: str,
    *,
    items: Sequence[int | str] = (),
    countdown: float | None = None,
    coalesce: str | None = None,
    coalesce_expiry_s: float = COALESCE_EXPIRY_S,
    task: str | None = None,
    **kwargs: Any,
) -> None:
    """Queue ``stage``'s entry task with ``kwargs`` after commit (see ``hand_off``); a
    stage uses it for its own input (an adapter staging a batch, a sweeper re-sending).

    ``countdown`` delays the task by that many seconds. With ``coalesce``, the task is
    not sent while one sent with the same key is still waiting (not yet ``started``):
    a burst of hand-offs for one stream becomes one task that does all their work. A
    task lost before it started holds the key back for ``coalesce_expiry_s`` seconds.
    """
    task_name = ENTRY_TASKS[stage] if task is None else SIDE_TASKS[stage][task]
    members = [str(item) for item in items]

    def dispatch() -> None:
        if coalesce is not None and not get_redis().set(
            PENDING_KEY.format(stage=stage, key=coalesce),
            1,
            nx=True,
            px=max(1, int(coalesce_expiry_s * 1000)),
        ):
            return
        app.send_task(task_name, kwargs=kwargs, countdown=countdown)
        if members:
            get_redis().zadd(DISPATCH_KEY.format(stage=stage), dict.fromkeys(members, time.time()))

    transaction.on_commit(dispatch)


@task_received.connect
def _touch_on_receipt(request: Any = None, **_: Any) -> None:
    """A worker took a message (to run now, or prefetched to run next): refresh its items'
    dispatch records (``RECORDS_OF_TASK``), so they are not taken for lost while a
    worker holds them. Records already marked done are not written again."""
    found = RECORDS_OF_TASK.get(getattr(request, "name", ""))
    if found is None:
        return
    stage, kwarg, prefix = found
    value = (getattr(request, "kwargs", None) or {}).get(kwarg)
    members = [
        f"{prefix}{v}" for v in (value if isinstance(value, list) else [value]) if v is not None
    ]
    if members:
        get_redis().zadd(
            DISPATCH_KEY.format(stage=stage), dict.fromkeys(members, time.time()), xx=True
        )


PROGRESS_KEY = "twiscope:progress:{stage}:{source_id}"


def add_progress(stage: str, source_id: int, events: int) -> None:
    """Count ``events`` of ``source_id`` through ``stage`` (call after its commit).

    The ingest stage counts the events it stored, the trend stage those it counted; the
    difference is the stream's work in flight (``in_flight``), whatever stage holds it.
    """
    if events:
        get_redis().incrby(PROGRESS_KEY.format(stage=stage, source_id=source_id), events)


def in_flight(source_id: int, *, first: str = INGEST, last: str = DETECT) -> int:
    """Events of ``source_id`` that ``first`` reported and ``last`` has not yet (never
    below 0: the counters live in Redis and start again from 0 if Redis loses them)."""
    done_first, done_last = cast(
        "list[bytes | None]",
        get_redis().mget(
            PROGRESS_KEY.format(stage=first, source_id=source_id),
            PROGRESS_KEY.format(stage=last, source_id=source_id),
        ),
    )
    return max(0, int(done_first or 0) - int(done_last or 0))


def reconcile_progress(
    source_id: int, true_in_flight: int, *, first: str = INGEST, last: str = DETECT
) -> None:
    """Set ``last``'s counter so that ``in_flight`` says ``true_in_flight`` (the stage
    that knows it, from its tables, corrects counts a crash or a lost Redis skewed)."""
    redis = get_redis()
    done_first = int(
        cast("bytes | None", redis.get(PROGRESS_KEY.format(stage=first, source_id=source_id))) or 0
    )
    redis.set(
        PROGRESS_KEY.format(stage=last, source_id=source_id),
        done_first - max(0, true_in_flight),
    )


def started(stage: str, coalesce: str) -> None:
    """A coalesced task of ``stage`` has started: later hand-offs send a new one (the
    work they announce may come after what this task reads)."""
    get_redis().delete(PENDING_KEY.format(stage=stage, key=coalesce))


def record(stage: str, items: Iterable[int | str]) -> None:
    """Write dispatch records for ``items`` of ``stage`` now, before the transaction that
    creates their work commits (``send`` refreshes them after commit). A crash between
    the commit and the send then leaves a record for the sweeper to find
    (``recorded``), where it would otherwise leave nothing; a record whose transaction
    rolled back names work that is not there, which the stage finds and marks done."""
    members = [str(item) for item in items]
    if members:
        get_redis().zadd(DISPATCH_KEY.format(stage=stage), dict.fromkeys(members, time.time()))


def recorded(
    stage: str, *, prefix: str, older_than_s: float, limit: int | None = None
) -> list[str]:
    """Dispatch records of ``stage`` starting with ``prefix`` written (or refreshed) over
    ``older_than_s`` seconds ago, oldest first, at most ``limit`` (None: all of them):
    unfinished work whose only trace is its record (``record``). Reads the stage's
    records 1,000 at a time."""
    cutoff = time.time() - older_than_s
    found: list[str] = []
    offset, page = 0, 1000
    redis = get_redis()
    while limit is None or len(found) < limit:
        members = cast(
            "list[bytes]",
            redis.zrangebyscore(
                DISPATCH_KEY.format(stage=stage), "-inf", cutoff, start=offset, num=page
            ),
        )
        found += [m.decode() for m in members if m.decode().startswith(prefix)]
        if len(members) < page:
            break
        offset += page
    return found if limit is None else found[:limit]


def mark_done(stage: str, items: Iterable[int | str]) -> None:
    """Forget the dispatch records of ``items``: ``stage`` has handled them (or found
    them already handled). Safe to call for items never recorded."""
    members = [str(item) for item in items]
    if members:
        get_redis().zrem(DISPATCH_KEY.format(stage=stage), *members)


def stuck(
    stage: str,
    items: Sequence[int | str],
    *,
    older_than_s: float,
    lost_after_s: float | None = None,
) -> list[str]:
    """Which of ``items`` (unfinished work of ``stage``) to send again; returns them as
    strings, in input order.

    An item is stuck when:

    - it has no dispatch record (never sent: the process died between commit and send);
    - its record is older than ``older_than_s`` seconds while ``stage``'s queue holds no
      message (nothing queued could still deliver it);
    - or its record is older than ``lost_after_s`` seconds (default: the setting
      ``PIPELINE_LOST_AFTER_S``, 2 × (visibility timeout + longest task time limit) =
      7,440 s), whatever the queue holds. A record is refreshed when a worker takes the
      message (``task_received``, prefetched ones too). A worker that dies holding it
      leaves it unacknowledged, and Redis hands it out again after the visibility
      timeout, when the next worker refreshes it again; a task runs at most its time
      limit. So past that bound no worker holds the message and none will get it back:
      it was lost, or it has waited in the queue behind a backlog that long. Under
      sustained load the queue is never empty, and without this bound a lost message
      would hold its stream's watermark for good; the cost of the second case is one
      more message per item per bound, which the idempotent task does nothing with.
    """
    if not items:
        return []
    lost_after_s = settings.PIPELINE_LOST_AFTER_S if lost_after_s is None else lost_after_s
    members = [str(item) for item in items]
    scores = cast(
        "list[float | None]", get_redis().zmscore(DISPATCH_KEY.format(stage=stage), members)
    )
    now = time.time()
    resend = {m for m, score in zip(members, scores, strict=True) if score is None}
    lost = {
        m
        for m, score in zip(members, scores, strict=True)
        if score is not None and score < now - lost_after_s
    }
    if lost:
        log.warning("pipeline.lost", stage=stage, items=len(lost), lost_after_s=lost_after_s)
    resend |= lost
    old = [
        m
        for m, score in zip(members, scores, strict=True)
        if score is not None and score < now - older_than_s
    ]
    if old and queue_depth(stage) == 0:
        resend |= set(old)
    return [m for m in members if m in resend]


def dispatched_count(stage: str) -> int:
    """How many items of ``stage`` are dispatched and not yet marked done."""
    return cast(int, get_redis().zcard(DISPATCH_KEY.format(stage=stage)))


def queue_depth(stage: str) -> int:
    """Messages waiting in ``stage``'s queue (0 when the broker never created it)."""
    return queue_depths((stage,))[stage]


def queue_depths(stages: Sequence[str] = STAGES) -> dict[str, int]:
    """Messages waiting in each queue of ``stages`` (not counting those a worker holds)."""
    depths: dict[str, int] = {}
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        for name in stages:
            try:
                depths[name] = int(channel.queue_declare(name, passive=True).message_count)
            except ChannelError:
                # The broker has not created the queue: nothing was ever sent to it.
                depths[name] = 0
    return depths


BUSY_RECENT_S = 30.0


def is_busy(*, batches: int = 2, events: int = 500) -> bool:
    """Whether the pipeline has more work in hand than it takes at once: at least
    ``batches`` staged batches not yet persisted, or ``events`` events not yet enriched,
    dispatched in the last ``BUSY_RECENT_S`` seconds (older records are the sweepers'
    business). Under a full-speed replay it is busy nearly all the time; under a steady
    load it keeps up with, nearly never. One Redis round trip. Workers prefetch their
    messages, so queue depths would say little. Model work that should take only idle
    CPU waits while it is busy."""
    since = time.time() - BUSY_RECENT_S
    pipe = get_redis().pipeline()
    pipe.zcount(DISPATCH_KEY.format(stage="ingest"), since, "+inf")
    pipe.zcount(DISPATCH_KEY.format(stage="enrich"), since, "+inf")
    staged, unenriched = cast("list[int]", pipe.execute())
    return staged >= batches or unenriched >= events


def is_idle() -> bool:
    """Whether no pipeline queue holds a message and no dispatched item is unfinished."""
    return not any(queue_depths().values()) and not any(dispatched_count(stage) for stage in STAGES)
