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
seconds); a stage marks its items done when it has handled them. While a worker holds a
message (prefetched, waiting for its countdown, or running), its main process refreshes
the message's records every ``PIPELINE_HEARTBEAT_S`` seconds (5 s; ``HeldWorkHeartbeat``, a bootstep
of every worker's consumer; and once on receipt, ``task_received``). So a record older
than a few heartbeats (``PIPELINE_STUCK_AFTER_S``, 30 s) belongs to a message no live
worker holds: one waiting in its queue, or one lost (never sent, dropped by a broker
that lost its data, or taken by a worker that was killed; Redis would hand that one
out again only after its visibility timeout, an hour later).

A stage's sweeper asks ``stuck()`` which of its unfinished items really are stuck:
never dispatched (the process died between commit and send); dispatched over
``PIPELINE_STUCK_AFTER_S`` ago and not waiting in the stage's queue (on Redis, the
queue's messages are read: ``queued_items``; on a broker whose queue cannot be read,
only while the queue is empty); or dispatched so long ago that no worker can hold the
message any more (``PIPELINE_LOST_AFTER_S``, the last resort). Items merely waiting
behind a backlog are not re-sent, so a slow pool is not handed the same work twice.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

import structlog
from amqp.exceptions import ChannelError
from celery import bootsteps
from celery.signals import task_received
from celery.worker import state as worker_state
from django.conf import settings
from django.db import transaction

from twiscope.celery import app
from twiscope.outage import DEPENDENCY_ERRORS
from twiscope.queues import ALERTS, DETECT, ENRICH, INFERENCE, INGEST, NOTIFY, STAGES
from twiscope.redis import get_redis

log = structlog.get_logger(__name__)

ENTRY_TASKS = {
    INGEST: "ingest.persist_batch",
    ENRICH: "enrich.enrich_events",
    DETECT: "detect.advance_stream",
    ALERTS: "alerts.evaluate_trends",
    INFERENCE: "inference.score_backlog",
    NOTIFY: "notify.deliver",
}
"""The task that takes a stage's input, by stage. Task kwargs, by stage:
``ingest``: ``batch_key``, ``source_id``; ``enrich``: ``event_ids``, ``source_id``;
``detect``: ``source_id``; ``alerts``: ``trend_ids``. ``inference`` is a branch off the
chain, not a stage of it (nothing waits for it): the transformer labels of enriched
events, from ``mlengine.scoring``'s backlog; no kwargs. ``notify`` is a branch off
``alerts``: one delivery of an alert to a channel, ``delivery_id``."""

SIDE_TASKS = {
    ALERTS: {
        "anomalies": "alerts.evaluate_anomalies",
        "confirmations": "alerts.confirm_trends",
        "withdrawals": "alerts.withdraw_predictions",
        "anomaly_updates": "alerts.update_anomaly_alerts",
        "viral": "alerts.evaluate_viral",
    },
    NOTIFY: {"slack_digest": "notify.slack_digest"},
}
"""Other inputs of a stage than its entry task's, by stage and key (``send(task=key)``):
``alerts``/``anomalies`` takes ``anomaly_ids`` (dispatch records ``anomaly:<id>``);
``alerts``/``confirmations`` takes ``trend_ids`` of predicted trends that came true;
``alerts``/``withdrawals`` those whose bucket closed without coming true;
``alerts``/``anomaly_updates`` takes ``anomaly_ids`` of anomalies whose window grew or
closed; ``alerts``/``viral`` takes ``event_ids`` of posts the virality model scored
high (dispatch records ``viral:<id>``, written before the scores commit: ``record``);
``notify``/``slack_digest`` takes ``channel_id``: the alerts folded into a Slack
channel's digest, sent as one message."""

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
COALESCE_LEASE_HEARTBEATS = 3
"""A coalesced task's key (``send``) lives this many ``PIPELINE_HEARTBEAT_S`` (15 s), and
the heartbeat of a worker holding the task renews it; so a task lost with a killed
worker holds later hand-offs back for at most that long."""

COALESCED_TASKS = {ENTRY_TASKS[DETECT]: (DETECT, "source_id", "source:")}
"""``task name: (stage, kwarg, key prefix)``: the coalesce key (``<prefix><kwarg's
value>``) a task's message holds, renewed by ``refresh`` while a worker holds it."""


def coalesce_lease_s() -> float:
    """Seconds a coalesce key lives unless a worker's heartbeat renews it."""
    return COALESCE_LEASE_HEARTBEATS * float(settings.PIPELINE_HEARTBEAT_S)


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
    coalesce_expiry_s: float | None = None,
    task: str | None = None,
    **kwargs: Any,
) -> None:
    """Queue ``stage``'s entry task with ``kwargs`` after commit (see ``hand_off``); a
    stage uses it for its own input (an adapter staging a batch, a sweeper re-sending).

    ``countdown`` delays the task by that many seconds. With ``coalesce``, the task is
    not sent while one sent with the same key is still waiting (not yet ``started``):
    a burst of hand-offs for one stream becomes one task that does all their work. The
    key lives ``coalesce_expiry_s`` seconds (default ``coalesce_lease_s()``, 15 s),
    renewed while a worker holds the task (``refresh``, ``COALESCED_TASKS``): a task lost
    before it started (its worker killed) holds the key back for at most that long.
    """
    task_name = ENTRY_TASKS[stage] if task is None else SIDE_TASKS[stage][task]
    members = [str(item) for item in items]
    expiry_s = coalesce_lease_s() if coalesce_expiry_s is None else coalesce_expiry_s

    def dispatch() -> None:
        if coalesce is not None and not get_redis().set(
            PENDING_KEY.format(stage=stage, key=coalesce),
            1,
            nx=True,
            px=max(1, int(expiry_s * 1000)),
        ):
            return
        app.send_task(task_name, kwargs=kwargs, countdown=countdown)
        if members:
            get_redis().zadd(DISPATCH_KEY.format(stage=stage), dict.fromkeys(members, time.time()))

    transaction.on_commit(dispatch)


def _records_of(requests: Iterable[Any]) -> dict[str, list[str]]:
    """The dispatch records the task messages ``requests`` carry (``RECORDS_OF_TASK``),
    by stage; ``requests`` are Celery requests (``name``, ``kwargs``) or anything alike."""
    found: dict[str, list[str]] = {}
    for request in requests:
        records = RECORDS_OF_TASK.get(getattr(request, "name", "") or "")
        if records is None:
            continue
        stage, kwarg, prefix = records
        found.setdefault(stage, []).extend(
            _members(prefix, (getattr(request, "kwargs", None) or {}).get(kwarg))
        )
    return {stage: members for stage, members in found.items() if members}


def _members(prefix: str, value: Any) -> list[str]:
    """``<prefix><item>`` for each item of a task kwarg's value (one item or a list)."""
    return [
        f"{prefix}{v}" for v in (value if isinstance(value, list) else [value]) if v is not None
    ]


def _coalesce_keys_of(requests: Iterable[Any]) -> set[str]:
    """The coalesce keys (``PENDING_KEY``) the task messages ``requests`` hold
    (``COALESCED_TASKS``)."""
    keys: set[str] = set()
    for request in requests:
        held = COALESCED_TASKS.get(getattr(request, "name", "") or "")
        value = (getattr(request, "kwargs", None) or {}).get(held[1]) if held else None
        if held is not None and value is not None:
            keys.add(PENDING_KEY.format(stage=held[0], key=f"{held[2]}{value}"))
    return keys


def refresh(requests: Iterable[Any]) -> int:
    """Refresh what the task messages ``requests`` (a worker holds them) stand for: their
    dispatch records' score becomes now (records already marked done are not written
    again: ``ZADD XX``), and the coalesce keys of their streams live another
    ``coalesce_lease_s()`` (a key already gone stays gone). One Redis round trip;
    returns how many records it named."""
    requests = list(requests)
    found = _records_of(requests)
    keys = _coalesce_keys_of(requests)
    if not found and not keys:
        return 0
    now = time.time()
    pipe = get_redis().pipeline(transaction=False)
    for stage, members in found.items():
        pipe.zadd(DISPATCH_KEY.format(stage=stage), dict.fromkeys(members, now), xx=True)
    for key in keys:
        pipe.pexpire(key, max(1, int(coalesce_lease_s() * 1000)))
    pipe.execute()
    return sum(len(members) for members in found.values())


@task_received.connect
def _touch_on_receipt(request: Any = None, **_: Any) -> None:
    """A worker took a message (to run now, or prefetched to run next): refresh its items'
    dispatch records at once (``refresh``); ``HeldWorkHeartbeat`` keeps them fresh
    while the worker holds it."""
    refresh([request])


def held_requests() -> list[Any]:
    """The task requests this worker process holds, unacknowledged: prefetched
    (``reserved_requests``), waiting for their countdown (``scheduled_requests``) and
    running (``active_requests``), from ``celery.worker.state`` (kept by the worker's
    main process, prefork pool included). Safe to call from another thread than the
    consumer's: a set that changed while it was copied is copied again."""
    for _attempt in range(10):
        try:
            return [
                *tuple(worker_state.reserved_requests),
                *tuple(worker_state.scheduled_requests),
                *tuple(worker_state.active_requests),
            ]
        except RuntimeError:  # "Set changed size during iteration": the consumer wrote
            continue
    return []


class HeldWorkHeartbeat(bootsteps.StartStopStep):
    """A bootstep of the worker's consumer (``app.steps["consumer"]``, see
    ``twiscope.celery``): a daemon thread of the worker's main process that refreshes,
    every ``PIPELINE_HEARTBEAT_S`` seconds, the dispatch records of every message the worker
    holds (``held_requests``, ``refresh``). A thread rather than the consumer's timer,
    so that a task running in the consumer's own thread (the solo pool) does not stop
    the beat. It starts with the consumer and stops with it (a restart after a broker
    outage starts a new one). A Redis error is logged (``pipeline.heartbeat_failed``)
    and the next beat tries again."""

    label = "twiscope heartbeat"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="twiscope-heartbeat", daemon=True
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=settings.PIPELINE_HEARTBEAT_S)
            self._thread = None

    shutdown = stop

    @staticmethod
    def _run(stop: threading.Event) -> None:
        while not stop.wait(settings.PIPELINE_HEARTBEAT_S):
            try:
                refresh(held_requests())
            except DEPENDENCY_ERRORS as exc:
                log.warning("pipeline.heartbeat_failed", error=repr(exc))


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


def claim_pending(stage: str, coalesce: str, holder: str, expiry_s: float) -> bool:
    """Claim the key ``coalesce`` of ``stage`` for the task message ``holder`` (its task
    id) about to be sent, unless another message holds it (sent within ``expiry_s``
    seconds and not yet started, see ``release_pending``); True: the caller sends it.
    For a task that queues itself again (not through ``send``), so that chains of such
    tasks never multiply."""
    return bool(
        get_redis().set(
            PENDING_KEY.format(stage=stage, key=coalesce),
            holder,
            nx=True,
            px=max(1, int(expiry_s * 1000)),
        )
    )


_RELEASE_IF_HOLDER = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def release_pending(stage: str, coalesce: str, holder: str) -> None:
    """The message ``holder`` started: free the key it claimed (``claim_pending``), and
    only if it holds it, so a task sent otherwise (the beat) leaves another's claim."""
    get_redis().eval(_RELEASE_IF_HOLDER, 1, PENDING_KEY.format(stage=stage, key=coalesce), holder)


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


FORGET_MARGIN_S = 10.0
"""``forget_finished`` forgets only records this much older than the sweeper's cutoff, so
an item written just before the cutoff but read by the sweeper as too young is kept."""


def forget_finished(
    stage: str,
    unfinished: Iterable[int | str],
    *,
    older_than_s: float,
    prefix: str = "",
    numeric: bool = False,
) -> int:
    """Forget the dispatch records of ``stage`` (starting with ``prefix``; with
    ``numeric``, only plain ids) written over ``older_than_s`` + ``FORGET_MARGIN_S``
    seconds ago whose item is not among ``unfinished``: the unfinished work the stage's
    sweeper read, with the cutoff ``older_than_s``, before calling this. Such an item was
    handled, parked, or never committed. Returns how many records it forgot.

    Such records are left by a process killed between its commit and its
    ``transaction.on_commit`` that marks the items done, and by a transaction that
    rolled back after ``record``; nothing else would ever remove them. Forgetting a
    record wrongly costs one message at most: an item with no record counts as never
    sent (``stuck``), and ``send`` writes the record again.
    """
    keep = {str(item) for item in unfinished}
    old = recorded(stage, prefix=prefix, older_than_s=older_than_s + FORGET_MARGIN_S)
    gone = [m for m in old if m not in keep and (not numeric or m.isdigit())]
    mark_done(stage, gone)
    if gone:
        log.info("pipeline.records_forgotten", stage=stage, records=len(gone))
    return len(gone)


def stuck(
    stage: str,
    items: Sequence[int | str],
    *,
    older_than_s: float | None = None,
    lost_after_s: float | None = None,
) -> list[str]:
    """Which of ``items`` (unfinished work of ``stage``) to send again; returns them as
    strings, in input order.

    An item is stuck when:

    - it has no dispatch record (never sent: the process died between commit and send);
    - its record is older than ``older_than_s`` seconds (default: the setting
      ``PIPELINE_STUCK_AFTER_S``, 30 s) and no message in ``stage``'s queue carries it
      (``queued_items``; on a broker whose queue cannot be read, while the queue holds
      no message at all). A worker that holds a message refreshes its records every
      ``PIPELINE_HEARTBEAT_S`` (5 s) seconds (``HeldWorkHeartbeat``), so such a record belongs
      to a message no live worker holds, and none waits in the queue: it was lost
      (taken by a worker that died, dropped by the broker), even while the queue is
      long. The queue is read after the records, and the records of the items it does
      not hold are read again, so a message a worker took meanwhile is not taken for
      lost;
    - or its record is older than ``lost_after_s`` seconds (default: the setting
      ``PIPELINE_LOST_AFTER_S``, 2 × (visibility timeout + longest task time limit) =
      7,440 s), whatever the queue holds: the last resort, for a broker whose queue
      cannot be read and is never empty under sustained load (past that bound no worker
      holds the message and none will get it back). Its cost, if the message was in
      fact waiting, is one more message per item, which the idempotent task does
      nothing with.
    """
    if not items:
        return []
    older_than_s = settings.PIPELINE_STUCK_AFTER_S if older_than_s is None else older_than_s
    lost_after_s = settings.PIPELINE_LOST_AFTER_S if lost_after_s is None else lost_after_s
    key = DISPATCH_KEY.format(stage=stage)
    members = [str(item) for item in items]
    scores = cast("list[float | None]", get_redis().zmscore(key, members))
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
        if score is not None and score < now - older_than_s and m not in lost
    ]
    if old:
        resend |= _not_waiting(stage, old, older_than_s=older_than_s)
    return [m for m in members if m in resend]


def _not_waiting(stage: str, old: list[str], *, older_than_s: float) -> set[str]:
    """Of ``old`` (records of ``stage`` older than ``older_than_s``), those no message in
    the stage's queue carries and no worker refreshed while the queue was read."""
    waiting = queued_items(stage)
    if waiting is None:
        return set(old) if queue_depth(stage) == 0 else set()
    absent = [m for m in old if m not in waiting]
    if not absent:
        return set()
    cutoff = time.time() - older_than_s
    scores = cast(
        "list[float | None]", get_redis().zmscore(DISPATCH_KEY.format(stage=stage), absent)
    )
    lost = {
        m for m, score in zip(absent, scores, strict=True) if score is not None and score < cutoff
    }
    if lost:
        log.warning("pipeline.lost_from_queue", stage=stage, items=len(lost))
    return lost


QUEUE_PAGE = 500
REDIS_PRIORITY_SEP = "\x06\x16"
"""kombu's Redis transport keeps a queue's messages of priority step ``p`` > 0 in the
list ``<queue><sep><p>`` (``kombu.transport.redis``, ``Channel._q_for_pri``)."""


def queued_items(stage: str) -> set[str] | None:
    """The dispatch records (``<prefix><item>``, ``RECORDS_OF_TASK``) that the messages
    waiting in ``stage``'s queue carry; None where the broker's queue cannot be read
    (not a Redis broker).

    kombu's Redis transport keeps a queue as Redis lists of JSON messages (the plain
    list and one per priority step); each message is ``{"body", "headers",
    "properties"}``, ``headers["task"]`` names the task and the body (base64 of JSON
    when ``properties["body_encoding"]`` says so) is Celery's protocol-2 ``[args,
    kwargs, embed]``. The lists are read ``QUEUE_PAGE`` messages at a time (LRANGE), so
    a long queue costs many short round trips, never one huge one. A message that
    cannot be decoded is skipped (logged: ``pipeline.undecodable_message``). Messages
    a worker holds are not in the queue (that is the heartbeat's business)."""
    if not app.conf.broker_url or not str(app.conf.broker_url).startswith(
        ("redis://", "rediss://", "redis+socket://")
    ):
        return None
    steps = app.conf.broker_transport_options.get("priority_steps", [0, 3, 6, 9])
    lists = [stage] + [f"{stage}{REDIS_PRIORITY_SEP}{p}" for p in steps if p]
    found: set[str] = set()
    with app.connection_for_read() as conn:
        client = conn.default_channel.client
        for name in lists:
            offset = 0
            while True:
                page = cast("list[bytes]", client.lrange(name, offset, offset + QUEUE_PAGE - 1))
                for raw in page:
                    found.update(_records_of_message(raw))
                if len(page) < QUEUE_PAGE:
                    break
                offset += QUEUE_PAGE
    return found


def _records_of_message(raw: bytes) -> list[str]:
    """The dispatch records one raw message of kombu's Redis transport carries."""
    try:
        message = json.loads(raw)
        records = RECORDS_OF_TASK.get(message.get("headers", {}).get("task", ""))
        if records is None:
            return []
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        log.warning("pipeline.undecodable_message", error=repr(exc))
        return []
    _stage, kwarg, prefix = records
    return _members(prefix, kwargs.get(kwarg))


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
