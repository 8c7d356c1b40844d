"""Writes of the watches (``mlengine.models.Watch``): an analyst's terms, whose series the
anomaly stage (``mlengine.anomalies.stage``) steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from django.db import connection, transaction

from mlengine.anomalies import stage
from mlengine.enrichment.text import normalise_term
from mlengine.models import Watch

log = structlog.get_logger(__name__)


def normalise_terms(terms: Sequence[str]) -> list[str]:
    """A watch's terms as stored: each through ``mlengine.enrichment.text.normalise_term``,
    blanks dropped, duplicates dropped (first kept), in the order given."""
    return list(dict.fromkeys(t for t in (normalise_term(term) for term in terms) if t))


def save_watch(*, watch: Watch | None, data: dict[str, Any]) -> Watch:
    """Create a watch (``watch`` None) or update ``watch`` with validated ``data`` (the
    fields of ``Watch.EDITABLE_FIELDS``); ``terms`` are normalised (``normalise_terms``).

    The anomaly stage reads watches at the start of each run: a new or re-enabled watch
    gets its series there, a disabled one has them retired, and a change of terms
    retires them and starts new ones (``mlengine.anomalies.stage``). Raises
    ``django.db.IntegrityError`` for a name the team already uses."""
    if "terms" in data:
        data = {**data, "terms": normalise_terms(data["terms"])}
    if watch is None:
        with transaction.atomic():  # a taken name rolls back to here, not the caller's
            watch = Watch.objects.create(**data)
        log.info("ml.watch_created", watch_id=watch.id, team_id=watch.team_id)
        return watch
    for name, value in data.items():
        setattr(watch, name, value)
    with transaction.atomic():
        watch.save(update_fields=list(data))
    log.info("ml.watch_updated", watch_id=watch.id, fields=sorted(data))
    return watch


def delete_watch(*, watch: Watch) -> None:
    """Delete ``watch`` with its series, their points and anomalies (alerts keep their
    title and evidence; their ``anomaly`` becomes null).

    Waits for the anomaly stage's lock first (``stage.LOCK_KEY``), so a run
    stepping the watch's series never writes points of a series deleted under it, and
    the two never deadlock on the series' and anomalies' rows."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [stage.LOCK_KEY])
        watch_id, team_id = watch.id, watch.team_id
        watch.delete()
    log.info("ml.watch_deleted", watch_id=watch_id, team_id=team_id)
