"""The alerts stage's sweeper (the periodic ``alerts.sweep``): it re-sends the trends,
anomalies and scored posts whose evaluation a lost message or a crash left undone,
brings up to date the alerts a lost update left stale, and pushes the alerts persisted
but never pushed."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import structlog
from django.db import transaction
from django.utils import timezone

from alerts import evaluation, push
from alerts.models import Alert, AnomalyCheck, TrendCheck, ViralCheck
from mlengine import facade
from twiscope import pipeline

log = structlog.get_logger(__name__)

SWEEP_LIMIT = 5000


def sweep(*, older_than_s: float) -> dict[str, int]:
    """Re-send trends and anomalies detected over ``older_than_s`` ago (within a day),
    and scored posts (``viral:<id>`` records) that long ago, that no rule evaluation
    claimed and that are really stuck (``twiscope.pipeline.stuck``); bring up to date
    the alerts a lost confirmation or anomaly update left stale; push alerts persisted
    that long ago but never pushed. Returns the counts."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=older_than_s)
    detected = facade.trend_ids_detected_before(
        cutoff, since=now - timedelta(days=1), limit=SWEEP_LIMIT
    )
    checked = set(
        TrendCheck.objects.filter(trend_id__in=detected).values_list("trend_id", flat=True)
    )
    unchecked = [trend_id for trend_id in detected if trend_id not in checked]
    resend = [int(m) for m in pipeline.stuck("alerts", unchecked, older_than_s=older_than_s)]
    with transaction.atomic():
        for i in range(0, len(resend), 250):
            chunk = resend[i : i + 250]
            pipeline.send("alerts", items=chunk, trend_ids=chunk)
    pipeline.mark_done("alerts", [t for t in detected if t in checked])
    anomalies = _sweep_anomalies(now, cutoff, older_than_s)
    viral = _sweep_viral(older_than_s)
    stale = _sweep_stale_alerts(now, cutoff)
    unpushed = list(
        Alert.objects.filter(pushed_at__isnull=True, created_at__lt=cutoff).values_list(
            "id", flat=True
        )[:SWEEP_LIMIT]
    )
    if unpushed:
        push.push_alerts(alert_ids=unpushed)
    swept = {
        "trends": len(resend),
        "anomalies": anomalies,
        "viral_posts": viral,
        "alerts_updated": stale,
        "alerts_pushed": len(unpushed),
    }
    if any(swept.values()):
        log.warning("alerts.swept", **swept)
    return swept


def _sweep_anomalies(now: datetime, cutoff: datetime, older_than_s: float) -> int:
    """Re-send anomalies detected before ``cutoff`` (within a day) that no evaluation
    claimed and that are really stuck; returns how many."""
    detected = facade.anomaly_ids_detected_before(
        cutoff, since=now - timedelta(days=1), limit=SWEEP_LIMIT
    )
    checked = set(
        AnomalyCheck.objects.filter(anomaly_id__in=detected).values_list("anomaly_id", flat=True)
    )
    pipeline.mark_done("alerts", [f"anomaly:{i}" for i in detected if i in checked])
    unchecked = [i for i in detected if i not in checked]
    return _resend_stuck("anomaly", "anomalies", "anomaly_ids", unchecked, older_than_s)


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
    and that are really stuck; mark the claimed ones done. Returns how many."""
    items = pipeline.recorded(
        "alerts", prefix="viral:", older_than_s=older_than_s, limit=SWEEP_LIMIT
    )
    ids = [int(item.partition(":")[2]) for item in items]
    checked = set(ViralCheck.objects.filter(event_id__in=ids).values_list("event_id", flat=True))
    pipeline.mark_done("alerts", [f"viral:{i}" for i in ids if i in checked])
    unchecked = [i for i in ids if i not in checked]
    return _resend_stuck("viral", "viral", "event_ids", unchecked, older_than_s)


def _sweep_stale_alerts(now: datetime, cutoff: datetime) -> int:
    """Bring up to date the alerts created within a day and before ``cutoff`` that a lost
    update left behind: a prediction whose trend was confirmed (``confirm_trends``) and
    an anomaly that grew or closed since (``update_anomaly_alerts``); returns how many
    alerts it updated."""
    recent = Alert.objects.filter(created_at__gte=now - timedelta(days=1), created_at__lt=cutoff)
    predicted_stories = {
        story_id if story_id is not None else trend_id
        for trend_id, story_id in recent.filter(
            trend_id__isnull=False, evidence__story__predicted=True
        ).values_list("trend_id", "story_id")[:SWEEP_LIMIT]
    }
    updated = evaluation.confirm_trends(
        trend_ids=facade.confirmed_trend_ids(sorted(predicted_stories))
    )
    anomalies = list(
        recent.filter(anomaly__isnull=False, evidence__closed=False).values_list(
            "anomaly_id", flat=True
        )[:SWEEP_LIMIT]
    )
    updated += evaluation.update_anomaly_alerts(anomaly_ids=anomalies) if anomalies else []
    return len(updated)
