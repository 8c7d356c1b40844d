"""Transformer labels for every event: the ``inference`` queue's work, newest first.

The enrich stage labels each event's sentiment from VADER (``sentiment_model``
"vader") and, once it has committed, puts the event in the **scoring backlog**: a Redis
sorted set of event ids scored by their processing time (``received_at``, epoch
seconds). A task on the ``inference`` queue (the ml pool's model worker, the process
that may own a GPU) drains it:

1. events that have waited longer than ``settings.SCORING_LAG_S`` (default 10 s) leave
   the backlog unscored: they keep their VADER label, recorded as such (counted as
   fallbacks);
2. with ``INFERENCE_IDLE_ONLY`` (the CPU default), it waits during a burst (events
   stored faster than ``SCORING_PAUSE_ABOVE_EPS``, 300/s) and while the pipeline has
   more work in hand than it takes at once (``twiscope.pipeline.is_busy``): the model
   takes only the CPU the pipeline leaves idle;
3. the newest ``settings.SCORING_BATCH_SIZE`` events are taken (``ZPOPMAX``), their
   distinct texts embedded once per encoder and labelled by every task's active head
   (sentiment, emotion, offensive; ``mlengine.inference.training.active_model``) and, with an
   active virality model, scored for virality where the author has at least 100 earlier
   posts in the source (``score_virality``, reusing the shared encoder's vectors), and
   written in one statement (``ingest.services.save_labels``); the posts scored at
   least ``virality_model.ALERT_MIN_SCORE`` go on to the alerts stage's "viral_post" rules;
4. again, until the backlog is empty or the task has run ``SCORING_BUDGET_S``; then it
   queues itself again if work is left. Sends are coalesced: while a scoring task waits
   in the queue no other is sent, and a task lost before it started holds the next one
   back for at most ``SCORING_LAG_S``.

So under load the newest events get the model and the oldest fall back: the model
never holds the pipeline's latency hostage (trends and alerts never wait for it, and on
a CPU it runs only in the pipeline's idle time, under ``SCHED_IDLE``: ``yield_cpu``). The
backlog is best effort by design: an event it loses (Redis restarted, a worker killed
between taking a batch and writing it) keeps its VADER label, exactly as if it had
waited too long. With no active head (nor virality model) the backlog is not filled at
all. The virality score rides on the same backlog: an event that falls back gets none
(NULL), since the encoder's vectors it needs are what the lag keeps off the pipeline.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import numpy as np
import structlog
from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from ingest import selectors as ingest_selectors
from ingest import services as ingest_services
from ingest import virality_reads as ingest_virality_reads
from ingest.counters import EVENTS_RATE_ALL, events_rate_name
from mlengine.inference import heads, training, virality_features, virality_model
from mlengine.models import ModelVersion
from twiscope import pipeline
from twiscope.redis import add_to_rate, get_redis, rate_total

log = structlog.get_logger(__name__)

BACKLOG_KEY = "twiscope:scoring:backlog"
COALESCE_KEY = "backlog"
ACTIVE_CHECK_S = 30.0
"""How long a process trusts its answer to "is any head active?" (seconds)."""


def scored_rate_name(team_id: int) -> str:
    """The rolling counter of a team's events labelled by the transformer heads."""
    return f"scored:team:{team_id}"


FALLBACK_RATE = "scoring:fallback"
"""The rolling counter of events that left the backlog unscored (all teams)."""


_active_checked: list[float] = [float("-inf"), 0.0]


def any_active_head() -> bool:
    """Whether any task has an active trained head (one query per ``ACTIVE_CHECK_S`` per
    process: a head trained or activated is picked up within that long)."""
    checked_at, answer = _active_checked
    now = time.monotonic()
    if now - checked_at > ACTIVE_CHECK_S:
        answer = float(ModelVersion.objects.filter(active=True).exists())
        _active_checked[:] = [now, answer]
    return bool(answer)


def enqueue(events: Sequence[tuple[int, datetime]]) -> None:
    """Put ``(event id, received_at)`` in the scoring backlog and make sure a scoring
    task is queued; call after the events' enrichment has committed.

    Does nothing when no head is active. Drops events already past the lag, and trims
    the backlog of those (so it stays bounded when no inference worker runs).
    """
    if not events or not any_active_head():
        return
    cutoff = time.time() - settings.SCORING_LAG_S
    members = {str(event_id): at.timestamp() for event_id, at in events}
    fresh = {member: at for member, at in members.items() if at >= cutoff}
    pipe = get_redis().pipeline()
    if fresh:
        pipe.zadd(BACKLOG_KEY, fresh)
    pipe.zremrangebyscore(BACKLOG_KEY, "-inf", f"({cutoff}")
    dropped = cast("list[int]", pipe.execute())[-1]
    fell_back = dropped + len(members) - len(fresh)
    if fell_back:
        add_to_rate(FALLBACK_RATE, fell_back)
    if fresh:
        _queue_scoring_task()


def _queue_scoring_task() -> None:
    """Queue a scoring task unless one is waiting (after commit; see the module
    docstring for the coalescing)."""
    pipeline.send("inference", coalesce=COALESCE_KEY, coalesce_expiry_s=settings.SCORING_LAG_S)


def yield_cpu() -> str:
    """Put this process under the kernel's idle scheduling policy (``SCHED_IDLE``: it
    runs only when no other process wants the CPU; Linux, ``sched(7)``), or at nice 19
    where the OS has no such policy; returns which. Threads started afterwards (torch's
    and ONNX Runtime's pools) inherit it. Call before the first model batch."""
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    os.nice(19 - os.nice(0))
    return "nice 19"


BURST_WINDOW_S = 2


def in_burst() -> bool:
    """Whether events are being stored faster than ``SCORING_PAUSE_ABOVE_EPS`` per
    second, over the last ``BURST_WINDOW_S`` seconds (all sources; a rolling counter)."""
    stored = rate_total([EVENTS_RATE_ALL], seconds=BURST_WINDOW_S)
    return stored / BURST_WINDOW_S > settings.SCORING_PAUSE_ABOVE_EPS


@dataclass(frozen=True, slots=True)
class ScoringRun:
    """What one scoring task did: ``scored`` events labelled by the heads, ``fell_back``
    events that left the backlog past the lag, ``batches`` model batches, ``seconds``
    of wall time, of which ``paused_s`` waiting for the pipeline to be idle, ``left``
    events still in the backlog."""

    scored: int
    fell_back: int
    batches: int
    seconds: float
    paused_s: float
    left: int


def score_backlog(
    *,
    batch_size: int | None = None,
    lag_s: float | None = None,
    budget_s: float | None = None,
    idle_only: bool | None = None,
) -> ScoringRun:
    """Drain the scoring backlog, newest first (see the module docstring).

    ``batch_size`` (events per model batch), ``lag_s`` and ``budget_s`` (seconds)
    default to the settings ``SCORING_BATCH_SIZE``, ``SCORING_LAG_S`` and
    ``SCORING_BUDGET_S``; ``idle_only`` to ``INFERENCE_IDLE_ONLY``: then no batch
    starts during a burst (``in_burst``) or while the pipeline is busy
    (``twiscope.pipeline.is_busy``: two staged batches or a batch's worth of events to
    enrich); polled every ``SCORING_BUSY_POLL_S``, so the model does not slow a loaded
    pipeline down; the events that wait past the lag meanwhile keep VADER's label.
    Side effects: label columns of the events scored; rolling counters
    (``scored_rate_name``, ``FALLBACK_RATE``); queues another scoring task when the
    budget ran out with work left.
    """
    batch_size = batch_size or settings.SCORING_BATCH_SIZE
    lag_s = settings.SCORING_LAG_S if lag_s is None else lag_s
    budget_s = settings.SCORING_BUDGET_S if budget_s is None else budget_s
    pipeline.started("inference", COALESCE_KEY)
    start = time.monotonic()
    redis = get_redis()
    scored = fell_back = batches = 0
    paused_s = 0.0
    idle_only = settings.INFERENCE_IDLE_ONLY if idle_only is None else idle_only
    while time.monotonic() - start < budget_s:
        pipe = redis.pipeline()
        pipe.zremrangebyscore(BACKLOG_KEY, "-inf", f"({time.time() - lag_s}")
        pipe.zcard(BACKLOG_KEY)
        dropped, waiting = cast("tuple[int, int]", pipe.execute())
        fell_back += dropped
        if dropped:
            add_to_rate(FALLBACK_RATE, dropped)
        if not waiting:
            break
        if idle_only and (in_burst() or pipeline.is_busy(events=settings.INGEST_BATCH_SIZE)):
            paused_s += settings.SCORING_BUSY_POLL_S
            time.sleep(settings.SCORING_BUSY_POLL_S)
            continue
        popped = cast("list[tuple[bytes, float]]", redis.zpopmax(BACKLOG_KEY, batch_size))
        if not popped:
            continue
        scored += score_events([int(member) for member, _ in popped])
        batches += 1
    left = cast(int, redis.zcard(BACKLOG_KEY))
    if left:
        _queue_scoring_task()
    run = ScoringRun(
        scored, fell_back, batches, round(time.monotonic() - start, 3), round(paused_s, 3), left
    )
    if scored or fell_back:
        log.info("inference.scored", **dataclasses.asdict(run))
    return run


def score_events(event_ids: Sequence[int]) -> int:
    """Label the events among ``event_ids`` with every active head and write the labels
    (one statement); return how many events were written.

    Events that are gone are skipped; a task with no active head is left out (its
    columns keep what they hold). Side effects: the ``scored_rate_name`` counters; the
    events scored at least ``virality_model.ALERT_MIN_SCORE`` go to the alerts stage's
    "viral_post" rules after commit (``alerts.evaluate_viral``).
    """
    rows = ingest_selectors.texts_for_scoring(event_ids)
    if not rows:
        return 0
    texts = sorted({text for _, text, _ in rows})
    vectors: dict[int, np.ndarray] = {}
    labels = label_texts(texts, vectors)
    viral = score_virality([event_id for event_id, _, _ in rows], texts, vectors)
    if not labels and not viral:
        return 0
    index = {text: i for i, text in enumerate(texts)}
    values: list[dict[str, Any]] = []
    for event_id, text, _ in rows:
        value: dict[str, Any] = {"id": event_id}
        for found in labels:
            value.update(_columns(found, index[text]))
        value.update(viral.get(event_id, {}))
        if len(value) > 1:
            values.append(value)
    likely_viral = [
        event_id
        for event_id, columns in viral.items()
        if columns["virality_score"] >= virality_model.ALERT_MIN_SCORE
    ]
    with transaction.atomic():
        written = ingest_services.save_labels(values)
        if likely_viral:
            # The alerts stage's "viral_post" rules (a branch, not the chain's next
            # stage: nothing waits for it). Recorded before the commit, so the sweeper
            # finds the work even if this process dies between the commit and the send.
            items = [f"viral:{event_id}" for event_id in likely_viral]
            pipeline.record("alerts", items)
            pipeline.send("alerts", items=items, task="viral", event_ids=likely_viral)
    if labels:
        for team_id, count in Counter(team_id for _, _, team_id in rows).items():
            add_to_rate(scored_rate_name(team_id), count)
    return written


_SHARED_ENCODER = id(None)
"""The key of the shared encoder's vectors in ``training.verdicts``' cache (a head on
the frozen encoder has ``ServedModel.encoder`` None): the virality model embeds with it."""


def score_virality(
    event_ids: Sequence[int], texts: Sequence[str], vectors: dict[int, np.ndarray]
) -> dict[int, dict[str, Any]]:
    """The active virality model's scores of the events among ``event_ids`` that have at
    least ``virality_features.HISTORY_MIN`` earlier posts (same source and author, with a repost
    count), as ``ingest.services.save_labels`` columns by event id: ``virality_score``
    (0-1, 4 decimals) and ``virality_model`` ("name vN"). Others are left out (their
    columns stay NULL / ""); so is everything when no virality model is active.

    The history is read in one query (``ingest.virality_reads.virality_inputs``: the latest
    ``virality_features.HISTORY_WINDOW`` predecessors of each event). ``texts``/``vectors``: the
    batch's distinct texts and ``label_texts``' cache of their vectors by encoder; the
    shared encoder's are reused when a head computed them, else the scored posts alone
    are embedded here (blocking: the ml pool only).
    """
    try:
        model = virality_model.active_model()
    except training.NoTrainedModel:
        return {}
    inputs = ingest_virality_reads.virality_inputs(
        event_ids, window=virality_features.HISTORY_WINDOW
    )
    histories: dict[str, list[virality_features.Post]] = defaultdict(list)
    for row in inputs.history:
        histories[row.author].append(
            virality_features.Post(
                author=row.author,
                created_at=row.created_at,
                text="",
                retweet_count=row.reposts,
                favorite_count=row.likes,
                key=f"{row.id:020d}",
            )
        )
    posts = [
        virality_features.Post(
            author=p.author,
            created_at=p.created_at,
            text=p.text,
            is_reply=p.is_reply,
            key=f"{p.id:020d}",
        )
        for p in inputs.posts
        if len(histories.get(p.author, ())) >= virality_features.HISTORY_MIN
    ]
    if not posts:
        return {}
    shared = vectors.get(_SHARED_ENCODER)
    picked = None
    if shared is not None:
        index = {text: i for i, text in enumerate(texts)}
        picked = shared[[index[p.text] for p in posts]]
    scores = virality_model.score_posts(model, posts, histories, picked)
    return {
        int(post.key): {"virality_score": s.score, "virality_model": s.model_version}
        for post, s in zip(posts, scores, strict=True)
        if s.score is not None
    }


def label_texts(
    texts: Sequence[str], vectors: dict[int, np.ndarray] | None = None
) -> list[training.Verdicts]:
    """Every active head's verdicts on ``texts``, one per task that has one (tasks
    without an active head are left out). Each text is embedded once per distinct
    encoder: heads on the shared (frozen) encoder share its vectors; a fine-tuned head
    brings its own. ``vectors``: the cache of those vectors by encoder
    (``training.verdicts``), filled here for the caller to reuse."""
    vectors = {} if vectors is None else vectors
    out = []
    for name in heads.TASKS:
        try:
            out.append(training.verdicts(name, texts, vectors))
        except training.NoTrainedModel:
            continue
    return out


def _columns(found: training.Verdicts, i: int) -> dict[str, Any]:
    """Text ``i``'s event columns for one task (``ingest.services.save_labels``' keys)."""
    label, scores = found.verdict(i)
    label_column = "sentiment_label" if found.task == "sentiment" else found.task
    return {label_column: label, f"{found.task}_scores": scores, f"{found.task}_model": found.model}


@dataclass(frozen=True, slots=True)
class ScoringStats:
    """The scoring pool's health for ``/api/stats/``.

    ``transformer_share``: events labelled by the heads in the last 60 s over events
    stored in the last 60 s (processing time), for the given teams, at most 1; None
    when none were stored. ``backlog``: events waiting (all teams); ``lag_s``: how long
    the oldest of them has waited, seconds (0 when none); ``fallback_after_s``: the
    configured lag; ``fell_back_1m``: events that left the backlog unscored in the last
    60 s (all teams); ``active_heads``: "name vN" by task.
    """

    transformer_share: float | None
    backlog: int
    lag_s: float
    fallback_after_s: float
    fell_back_1m: int
    active_heads: dict[str, str]


ACTIVE_HEADS_KEY = "hot:active_heads"
ACTIVE_HEADS_TTL_S = 10
"""The active heads of ``scoring_stats`` are cached this long (seconds): a head
activated shows on the dashboard within it, and a stats poll reads no table."""


def _active_heads() -> dict[str, str]:
    return {
        v.task: f"{v.name} v{v.version}"
        for v in ModelVersion.objects.filter(active=True).order_by("task")
    }


def scoring_stats(team_ids: Sequence[int]) -> ScoringStats:
    """The scoring pool's numbers (see ``ScoringStats``): Redis reads, and one query at
    most every ``ACTIVE_HEADS_TTL_S`` seconds (the active heads, cached)."""
    stored = rate_total([events_rate_name(t) for t in team_ids], seconds=60)
    scored = rate_total([scored_rate_name(t) for t in team_ids], seconds=60)
    redis = get_redis()
    pipe = redis.pipeline()
    pipe.zcard(BACKLOG_KEY)
    pipe.zrange(BACKLOG_KEY, 0, 0, withscores=True)
    backlog, oldest = cast("tuple[int, list[tuple[bytes, float]]]", pipe.execute())
    active = cast(
        "dict[str, str]", cache.get_or_set(ACTIVE_HEADS_KEY, _active_heads, ACTIVE_HEADS_TTL_S)
    )
    return ScoringStats(
        transformer_share=round(min(1.0, scored / stored), 4) if stored else None,
        backlog=int(backlog),
        lag_s=round(max(0.0, time.time() - oldest[0][1]), 3) if oldest else 0.0,
        fallback_after_s=float(settings.SCORING_LAG_S),
        fell_back_1m=rate_total([FALLBACK_RATE], seconds=60),
        active_heads=active,
    )
