"""The alerts stage's sweeper (the periodic ``alerts.sweep``): it re-sends the trends,
anomalies and scored posts whose evaluation a lost message or a crash left undone,
brings up to date the alerts a lost update left stale, and pushes the alerts persisted
but never pushed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.db import transaction
from django.db.models import BigIntegerField, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from alerts import evaluation, push
from alerts.models import Alert, AnomalyCheck, TrendCheck, ViralCheck
from mlengine import facade
from twiscope import pipeline

log = structlog.get_logger(__name__)

SWEEP_PAGE = 5000
"""Items read per query: every sweep pages through all its candidates, however many."""


def sweep(*, older_than_s: float) -> dict[str, int]:
    """Re-send trends and anomalies detected over ``older_than_s`` ago (within a day),
    and scored posts (``viral:<id>`` records) that long ago, that no rule evaluation
    claimed and that are really stuck (``twiscope.pipeline.stuck``: also under load,
    once past ``PIPELINE_LOST_AFTER_S``); bring up to date the alerts a lost
    confirmation or anomaly update left stale; push alerts persisted that long ago but
    never pushed. Every candidate is read, page after page (``SWEEP_PAGE``), never the
    first page alone. Forgets the dispatch records of trends and anomalies already
    evaluated or gone (``twiscope.pipeline.forget_finished``). Returns the counts."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=older_than_s)
    trends = _sweep_detected(
        facade.trend_ids_detected_before, TrendCheck, "trend_id", now, cutoff, older_than_s
    )
    anomalies = _sweep_detected(
        facade.anomaly_ids_detected_before, AnomalyCheck, "anomaly_id", now, cutoff, older_than_s
    )
    viral = _sweep_viral(older_than_s)
    stale = _sweep_stale_alerts(now, cutoff)
    unpushed = _sweep_unpushed(cutoff)
    swept = {
        "trends": trends,
        "anomalies": anomalies,
        "viral_posts": viral,
        "alerts_updated": stale,
        "alerts_pushed": unpushed,
    }
    if any(swept.values()):
        log.warning("alerts.swept", **swept)
    return swept


_KINDS: dict[str, tuple[str, str, str]] = {
    "trend_id": ("", "", "trend_ids"),
    "anomaly_id": ("anomaly", "anomalies", "anomaly_ids"),
}
"""By check column: ``(dispatch record prefix, task key in SIDE_TASKS, task kwarg)``."""


def _sweep_detected(
    pages: Callable[..., facade.DetectedPage],
    check: type[TrendCheck] | type[AnomalyCheck],
    column: str,
    now: datetime,
    cutoff: datetime,
    older_than_s: float,
) -> int:
    """Re-send the trends (or anomalies) detected before ``cutoff`` within a day that no
    evaluation claimed and that are really stuck; mark the claimed ones done. Pages
    through the day's items (keyset, ``SWEEP_PAGE`` a query, ``pages`` from
    ``mlengine.facade``), and filters each page against the check table: the checks are
    alerts' and the items mlengine's, so they meet here, page by page. Returns how many
    it sent."""
    prefix, task, kwarg = _KINDS[column]
    unchecked: list[int] = []
    after = None
    while True:
        page = pages(cutoff, since=now - timedelta(days=1), limit=SWEEP_PAGE, after=after)
        checked = set(
            check.objects.filter(**{f"{column}__in": page.ids}).values_list(column, flat=True)
        )
        pipeline.mark_done("alerts", [f"{prefix}:{i}" if prefix else i for i in checked])
        unchecked += [i for i in page.ids if i not in checked]
        if page.after is None:
            break
        after = page.after
    if prefix:
        pipeline.forget_finished(
            "alerts",
            [f"{prefix}:{i}" for i in unchecked],
            older_than_s=older_than_s,
            prefix=f"{prefix}:",
        )
    else:
        pipeline.forget_finished("alerts", unchecked, older_than_s=older_than_s, numeric=True)
    if not prefix:
        resend = [int(m) for m in pipeline.stuck("alerts", unchecked, older_than_s=older_than_s)]
        with transaction.atomic():
            for i in range(0, len(resend), 250):
                chunk = resend[i : i + 250]
                pipeline.send("alerts", items=chunk, trend_ids=chunk)
        return len(resend)
    return _resend_stuck(prefix, task, kwarg, unchecked, older_than_s)


def _resend_stuck(prefix: str, task: str, kwarg: str, ids: list[int], older_than_s: float) -> int:
    """Send ``task`` again, 250 ids at a time as ``kwarg``, for the ids whose dispatch
    records (``<prefix>:<id>``) say they are really stuck (``twiscope.pipeline.stuck``);
    returns how many were sent."""
    items = [f"{prefix}:{i}" for i in ids]
    resend = [
        int(m.partition(":")[2]) for m in pipeline.stuck("alerts", items, older_than_s=older_than_s)
    ]
    with transaction.atomic():
        for i in range(0, len(resend), 250):
            chunk = resend[i : i + 250]
            ids_kwarg: dict[str, Any] = {kwarg: chunk}
            pipeline.send("alerts", items=[f"{prefix}:{e}" for e in chunk], task=task, **ids_kwarg)
    return len(resend)


def _sweep_viral(older_than_s: float) -> int:
    """Re-send the scored posts whose dispatch record (``viral:<id>``, written before
    their scores committed) is over ``older_than_s`` old, that no evaluation claimed,
    and that are really stuck; mark the claimed ones done. Reads every such record
    (``twiscope.pipeline.recorded``), and checks them ``SWEEP_PAGE`` at a time. Returns
    how many."""
    items = pipeline.recorded("alerts", prefix="viral:", older_than_s=older_than_s)
    ids = [int(item.partition(":")[2]) for item in items]
    unchecked: list[int] = []
    for start in range(0, len(ids), SWEEP_PAGE):
        page = ids[start : start + SWEEP_PAGE]
        checked = set(
            ViralCheck.objects.filter(event_id__in=page).values_list("event_id", flat=True)
        )
        pipeline.mark_done("alerts", [f"viral:{i}" for i in checked])
        unchecked += [i for i in page if i not in checked]
    return _resend_stuck("viral", "viral", "event_ids", unchecked, older_than_s)


def _pages(rows: QuerySet[Alert], field: str) -> Iterator[list[Any]]:
    """``field`` of ``rows``, ``SWEEP_PAGE`` at a time, by alert id (keyset): all of
    them, however many (one query a page)."""
    after = 0
    while True:
        page = list(rows.filter(id__gt=after).order_by("id").values_list("id", field)[:SWEEP_PAGE])
        if page:
            yield [value for _, value in page]
        if len(page) < SWEEP_PAGE:
            return
        after = page[-1][0]


def _sweep_unpushed(cutoff: datetime) -> int:
    """Push the alerts persisted before ``cutoff`` and never pushed; returns how many."""
    pushed = 0
    for ids in _pages(Alert.objects.filter(pushed_at__isnull=True, created_at__lt=cutoff), "id"):
        push.push_alerts(alert_ids=ids)
        pushed += len(ids)
    return pushed


def _sweep_stale_alerts(now: datetime, cutoff: datetime) -> int:
    """Bring up to date the alerts created within a day and before ``cutoff`` that a lost
    update left behind: a prediction whose trend was confirmed (``confirm_trends``) or
    withdrawn (``withdraw_predictions``) and
    an anomaly that grew or closed since (``update_anomaly_alerts``), page by page;
    returns how many alerts it updated."""
    recent = Alert.objects.filter(created_at__gte=now - timedelta(days=1), created_at__lt=cutoff)
    updated = 0
    predicted = recent.filter(trend_id__isnull=False, evidence__story__predicted=True)
    for stories in _pages(
        predicted.annotate(story=Coalesce("story_id", "trend_id", output_field=BigIntegerField())),
        "story",
    ):
        keys = sorted(set(stories))
        updated += len(evaluation.confirm_trends(trend_ids=facade.confirmed_trend_ids(keys)))
        updated += len(evaluation.withdraw_predictions(trend_ids=facade.withdrawn_trend_ids(keys)))
    for anomalies in _pages(
        recent.filter(anomaly__isnull=False, evidence__closed=False), "anomaly_id"
    ):
        updated += len(evaluation.update_anomaly_alerts(anomaly_ids=anomalies))
    return updated
