"""The enrich stage: language, entities, keywords and lexicon sentiment of new events.

It sits between ``ingest`` (which stores events) and the trend stage: it reads the
events' texts through ``ingest.selectors``, runs ``mlengine.enrichment.text`` on them, and writes
the results through ``ingest.services.save_enrichments`` (the events table is
ingest's). After commit it hands the source on to the trend stage.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta

import structlog
from django.db import transaction
from django.utils import timezone

from ingest import selectors as ingest_selectors
from ingest import services as ingest_services
from mlengine.enrichment.text import Enrichment, enrich_text, vader_label
from mlengine.inference import scoring
from twiscope import pipeline

log = structlog.get_logger(__name__)

SWEEP_PAGE = 5000
SWEEP_CHUNK = 250


def enrich_events(*, event_ids: Sequence[int], source_id: int | None = None) -> list[int]:
    """Enrich the events among ``event_ids`` not enriched yet; return the ids enriched.

    The claim is in the UPDATE (``enriched_at IS NULL``), so a redelivered task writes
    nothing twice. Side effects after commit: marks the ids done for the sweeper, puts
    the enriched events in the transformer's scoring backlog (``mlengine.inference.scoring``), and
    hands ``source_id`` to the trend stage (also with no ids: the persisted batch may
    have moved the source's watermark).
    """
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
    with transaction.atomic():
        enriched = ingest_services.save_enrichments(values)
        handled = list(event_ids)
        transaction.on_commit(lambda: pipeline.mark_done("enrich", handled))
        transaction.on_commit(lambda: scoring.enqueue(enriched))
        if source_id is not None:
            pipeline.hand_off("enrich", source_id=source_id)
    return [event_id for event_id, _ in enriched]


def sweep_unenriched(*, older_than_s: float) -> int:
    """Re-send events received more than ``older_than_s`` ago and still not enriched,
    when they are really stuck (``twiscope.pipeline.stuck``: also under load, once past
    ``PIPELINE_LOST_AFTER_S``); returns how many. Reads every such event, ``SWEEP_PAGE``
    a query (keyset on ``(received_at, id)``), so events that wait long (a backlog,
    events that fail) never hide a lost one behind them."""
    before = timezone.now() - timedelta(seconds=older_than_s)
    source_of: dict[int, int] = {}
    after = None
    while True:
        page = ingest_selectors.unenriched_before(before, limit=SWEEP_PAGE, after=after)
        source_of.update((event_id, source_id) for event_id, source_id, _ in page)
        if len(page) < SWEEP_PAGE:
            break
        after = (page[-1][2], page[-1][0])
    resend = pipeline.stuck("enrich", list(source_of), older_than_s=older_than_s)
    by_source: dict[int, list[int]] = defaultdict(list)
    for member in resend:
        by_source[source_of[int(member)]].append(int(member))
    with transaction.atomic():
        for source_id, ids in by_source.items():
            for i in range(0, len(ids), SWEEP_CHUNK):
                chunk = ids[i : i + SWEEP_CHUNK]
                pipeline.send("enrich", items=chunk, event_ids=chunk, source_id=source_id)
    if resend:
        log.warning("enrich.swept", events=len(resend))
    return len(resend)
