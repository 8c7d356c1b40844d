"""The enrich stage: language, entities, keywords and lexicon sentiment of new events.

It sits between ``ingest`` (which stores events) and the trend stage: it reads the
events' texts through ``ingest.selectors``, runs ``mlengine.enrichment.text`` on them, and writes
the results through ``ingest.services.save_enrichments`` (the events table is
ingest's). After commit it hands the source on to the trend stage.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import timedelta

import structlog
from django.db import transaction
from django.utils import timezone

from ingest import selectors as ingest_selectors
from ingest import services as ingest_services
from mlengine.enrichment.text import Enrichment, enrich_text, vader_label
from mlengine.inference import scoring
from twiscope import guard, pipeline
from twiscope.queues import DETECT, ENRICH

log = structlog.get_logger(__name__)

SWEEP_PAGE = 5000
SWEEP_CHUNK = 250


SCOPE = "events"
"""The enrich stage's items, for ``twiscope.guard``: event ids."""


def enrich_events(*, event_ids: Sequence[int], source_id: int | None = None) -> list[int]:
    """Enrich the events among ``event_ids`` not enriched yet (nor parked); return the ids
    enriched.

    The claim is in the UPDATE (``enriched_at IS NULL``), so a redelivered task writes
    nothing twice. The batch runs under ``twiscope.guard.run_guarded``: should it fail,
    it is bisected so every good event is enriched, and an event that fails alone
    ``DEAD_LETTER_MAX_ATTEMPTS`` times (over deliveries) is parked: a dead letter with
    its envelope, and ``Event.parked_at``, so the stream's watermark stops waiting for
    it. One that failed fewer times stays unenriched (and not marked done) for the
    sweeper to send again. Side effects after commit: marks the handled ids done for the
    sweeper, puts the enriched events in the transformer's scoring backlog
    (``mlengine.inference.scoring``), and hands ``source_id`` to the trend stage (also with
    no ids: the persisted batch may have moved the source's watermark).

    Raises: ``twiscope.guard.TRANSIENT_ERRORS`` (the database or Redis away), untouched.
    """
    outcome = guard.run_guarded(ENRICH, SCOPE, list(event_ids), _enrich_batch, park=_park)
    unfinished = outcome.unfinished
    handled = [event_id for event_id in event_ids if event_id not in unfinished]
    transaction.on_commit(lambda: pipeline.mark_done(ENRICH, handled))
    if source_id is not None:
        pipeline.hand_off(ENRICH, source_id=source_id)
    return outcome.results


def _enrich_batch(event_ids: list[int]) -> list[int]:
    """Enrich ``event_ids`` (inside the guard's transaction); return the ids written.
    After commit, the written events go to the scoring backlog."""
    rows = ingest_selectors.unenriched_texts(event_ids)
    values = []
    # Copies and reposts repeat a text verbatim, and a burst is mostly copies: each
    # distinct text of the batch is enriched once (enrich_text is pure).
    done: dict[str, Enrichment] = {}
    for event_id, text, lang in rows:
        enrichment = done.get(text)
        if enrichment is None:
            enrichment = done[text] = enrich_text(text)
        values.append(
            (
                event_id,
                lang or enrichment.lang,
                list(enrichment.hashtags),
                list(enrichment.mentions),
                list(enrichment.cashtags),
                list(enrichment.urls),
                list(enrichment.keywords),
                enrichment.sentiment,
                vader_label(enrichment.sentiment),
            )
        )
    enriched = ingest_services.save_enrichments(values)
    transaction.on_commit(lambda: scoring.enqueue(enriched))
    return [event_id for event_id, _ in enriched]


def _park(failures: list[guard.Failure[int]]) -> None:
    """Dead-letter the events that failed ``DEAD_LETTER_MAX_ATTEMPTS`` times; after
    commit, count them out of their streams' work in flight (``pipeline.add_progress``:
    they will not reach the trend stage)."""
    source_of = ingest_selectors.source_of_events([failure.item for failure in failures])
    items = [
        ingest_services.ParkedItem(
            key=f"{ENRICH}:{SCOPE}:{failure.item}",
            source_id=source_of.get(failure.item),
            reason=f"enrichment failed {failure.attempts} times: {failure.summary}",
            error=failure.short_traceback,
            attempts=failure.attempts,
            payload={
                "scope": SCOPE,
                "item": failure.item,
                "resend": {
                    "task": None,
                    "kwarg": "event_ids",
                    "kwargs": {"source_id": source_of.get(failure.item)},
                },
            },
            event_id=failure.item,
        )
        for failure in failures
    ]
    with transaction.atomic():
        ingest_services.park_items(stage=ENRICH, items=items)
        for source_id, parked in Counter(source_of.values()).items():
            transaction.on_commit(
                lambda s=source_id, n=parked: pipeline.add_progress(DETECT, s, n)  # type: ignore[misc]
            )


def sweep_unenriched(*, older_than_s: float) -> int:
    """Re-send events received more than ``older_than_s`` ago and still not enriched,
    when they are really stuck (``twiscope.pipeline.stuck``: also under load, once past
    ``PIPELINE_LOST_AFTER_S``); returns how many. Reads every such event, ``SWEEP_PAGE``
    a query (keyset on ``(received_at, id)``), so events that wait long (a backlog,
    events that fail) never hide a lost one behind them. Forgets the dispatch records of
    events already handled (``twiscope.pipeline.forget_finished``)."""
    before = timezone.now() - timedelta(seconds=older_than_s)
    source_of: dict[int, int] = {}
    after = None
    while True:
        page = ingest_selectors.unenriched_before(before, limit=SWEEP_PAGE, after=after)
        source_of.update((event_id, source_id) for event_id, source_id, _ in page)
        if len(page) < SWEEP_PAGE:
            break
        after = (page[-1][2], page[-1][0])
    resend = pipeline.stuck(ENRICH, list(source_of), older_than_s=older_than_s)
    pipeline.forget_finished(ENRICH, source_of, older_than_s=older_than_s)
    by_source: dict[int, list[int]] = defaultdict(list)
    for member in resend:
        by_source[source_of[int(member)]].append(int(member))
    with transaction.atomic():
        for source_id, ids in by_source.items():
            for i in range(0, len(ids), SWEEP_CHUNK):
                chunk = ids[i : i + SWEEP_CHUNK]
                pipeline.send(ENRICH, items=chunk, event_ids=chunk, source_id=source_id)
    if resend:
        log.warning("enrich.swept", events=len(resend))
    return len(resend)
