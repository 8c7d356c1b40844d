"""Celery entry points of the ``alerts`` queue: thin shells around ``alerts.services``."""

from __future__ import annotations

from celery import shared_task

from alerts import services


@shared_task(name="alerts.evaluate_trends", soft_time_limit=30, time_limit=60)
def evaluate_trends(*, trend_ids: list[int]) -> int:
    """Fire alert rules on new trends; returns how many alerts were created."""
    return len(services.evaluate_trends(trend_ids=trend_ids))
