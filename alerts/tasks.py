"""Celery entry points of the ``alerts`` queue: thin shells around ``alerts.evaluation``
and ``alerts.sweeps``."""

from __future__ import annotations

from celery import shared_task

from alerts import evaluation, sweeps

SWEEP_AFTER_S = 120


@shared_task(name="alerts.evaluate_trends", soft_time_limit=30, time_limit=60)
def evaluate_trends(*, trend_ids: list[int]) -> int:
    """Fire alert rules on new trends; returns how many alerts were created."""
    return len(evaluation.evaluate_trends(trend_ids=trend_ids))


@shared_task(name="alerts.evaluate_anomalies", soft_time_limit=30, time_limit=60)
def evaluate_anomalies(*, anomaly_ids: list[int]) -> int:
    """Fire "anomaly" alert rules on new anomalies; returns how many alerts were created."""
    return len(evaluation.evaluate_anomalies(anomaly_ids=anomaly_ids))


@shared_task(name="alerts.confirm_trends", soft_time_limit=30, time_limit=60)
def confirm_trends(*, trend_ids: list[int]) -> int:
    """Mark the alerts of predicted trends that came true as confirmed; returns how many
    alerts were updated."""
    return len(evaluation.confirm_trends(trend_ids=trend_ids))


@shared_task(name="alerts.update_anomaly_alerts", soft_time_limit=30, time_limit=60)
def update_anomaly_alerts(*, anomaly_ids: list[int]) -> int:
    """Bring the alerts of anomalies that grew or closed up to date; returns how many
    alerts were updated."""
    return len(evaluation.update_anomaly_alerts(anomaly_ids=anomaly_ids))


@shared_task(name="alerts.evaluate_viral", soft_time_limit=30, time_limit=60)
def evaluate_viral(*, event_ids: list[int]) -> int:
    """Fire "viral_post" alert rules on posts scored likely viral; returns how many alerts
    were created."""
    return len(evaluation.evaluate_viral(event_ids=event_ids))


@shared_task(name="alerts.sweep", soft_time_limit=25, time_limit=30)
def sweep() -> dict[str, int]:
    """Periodic: re-send trends, anomalies and scored posts never evaluated; update alerts
    left stale; push alerts never pushed."""
    return sweeps.sweep(older_than_s=SWEEP_AFTER_S)
