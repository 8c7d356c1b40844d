"""Celery entry points of the ``alerts`` queue (thin shells around ``alerts.evaluation``
and ``alerts.sweeps``) and of the ``notify`` queue (around ``alerts.delivery``).

Each evaluation runs under ``twiscope.guard.run_guarded`` (``_guarded``): a batch that
fails is bisected so the good trends, anomalies and posts are evaluated, and an item
that fails alone ``DEAD_LETTER_MAX_ATTEMPTS`` times is parked as a dead letter of the
``alerts`` stage (``manage.py requeue`` sends it again); an item already parked is
skipped, so the sweeper's re-sends of it do no work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from celery import shared_task
from django.conf import settings

from alerts import delivery, evaluation, sweeps
from ingest import selectors as ingest_selectors
from ingest import services as ingest_services
from mlengine import facade
from twiscope import guard, pipeline
from twiscope.queues import ALERTS


def _guarded(
    scope: str,
    task: str | None,
    kwarg: str,
    ids: Sequence[int],
    evaluate: Callable[[list[int]], Sequence[int]],
    sources: Callable[[list[int]], dict[int, int]],
    record: str | None,
) -> list[int]:
    """``evaluate(ids)`` under the guard; return the alert ids it returned.

    ``scope`` names the items (``trends``, ``anomalies``...), ``task`` the
    ``twiscope.pipeline.SIDE_TASKS`` key that takes them (None: the entry task) with
    the list kwarg ``kwarg``; ``sources(ids)`` maps item ids to their source ids (for
    a dead letter's team scope); ``record`` is the prefix of the items' dispatch
    records (``twiscope.pipeline.record``; None: they have none), which parked items
    have marked done, so the sweeper and ``pipeline.is_idle`` stop waiting for them."""
    keys = {f"{ALERTS}:{scope}:{item}": item for item in ids}
    parked = ingest_selectors.open_dead_letter_keys(list(keys))
    todo = [item for key, item in keys.items() if key not in parked]

    def done(items: Sequence[int]) -> None:
        if record is not None and items:
            pipeline.mark_done(ALERTS, [f"{record}{item}" for item in items])

    done([keys[key] for key in parked])

    def park(failures: list[guard.Failure[int]]) -> None:
        source_of = sources([f.item for f in failures])
        ingest_services.park_items(
            stage=ALERTS,
            items=[
                ingest_services.ParkedItem(
                    key=f"{ALERTS}:{scope}:{failure.item}",
                    source_id=source_of.get(failure.item),
                    reason=f"alert evaluation of {scope[:-1]} {failure.item} failed "
                    f"{failure.attempts} times: {failure.summary}",
                    error=failure.short_traceback,
                    attempts=failure.attempts,
                    payload={
                        "scope": scope,
                        "item": failure.item,
                        "resend": {"task": task, "kwarg": kwarg, "kwargs": {}},
                    },
                )
                for failure in failures
            ],
        )
        done([failure.item for failure in failures])

    return guard.run_guarded(ALERTS, scope, todo, evaluate, park=park).results


def _trend_sources(ids: list[int]) -> dict[int, int]:
    return {trend.id: trend.source_id for trend in facade.trends(ids)}


def _anomaly_sources(ids: list[int]) -> dict[int, int]:
    return {anomaly.id: anomaly.source_id for anomaly in facade.anomalies(ids)}


@shared_task(name="alerts.evaluate_trends", soft_time_limit=30, time_limit=60)
def evaluate_trends(*, trend_ids: list[int]) -> int:
    """Fire alert rules on new trends; returns how many alerts were created."""
    return len(
        _guarded(
            "trends",
            None,
            "trend_ids",
            trend_ids,
            lambda ids: evaluation.evaluate_trends(trend_ids=ids),
            _trend_sources,
            "",
        )
    )


@shared_task(name="alerts.evaluate_anomalies", soft_time_limit=30, time_limit=60)
def evaluate_anomalies(*, anomaly_ids: list[int]) -> int:
    """Fire "anomaly" alert rules on new anomalies; returns how many alerts were created."""
    return len(
        _guarded(
            "anomalies",
            "anomalies",
            "anomaly_ids",
            anomaly_ids,
            lambda ids: evaluation.evaluate_anomalies(anomaly_ids=ids),
            _anomaly_sources,
            "anomaly:",
        )
    )


@shared_task(name="alerts.confirm_trends", soft_time_limit=30, time_limit=60)
def confirm_trends(*, trend_ids: list[int]) -> int:
    """Mark the alerts of predicted trends that came true as confirmed; returns how many
    alerts were updated."""
    return len(
        _guarded(
            "confirmations",
            "confirmations",
            "trend_ids",
            trend_ids,
            lambda ids: evaluation.confirm_trends(trend_ids=ids),
            _trend_sources,
            None,
        )
    )


@shared_task(name="alerts.withdraw_predictions", soft_time_limit=30, time_limit=60)
def withdraw_predictions(*, trend_ids: list[int]) -> int:
    """Mark the alerts of predictions that did not materialise as withdrawn; returns how
    many alerts were updated."""
    return len(
        _guarded(
            "withdrawals",
            "withdrawals",
            "trend_ids",
            trend_ids,
            lambda ids: evaluation.withdraw_predictions(trend_ids=ids),
            _trend_sources,
            None,
        )
    )


@shared_task(name="alerts.update_anomaly_alerts", soft_time_limit=30, time_limit=60)
def update_anomaly_alerts(*, anomaly_ids: list[int]) -> int:
    """Bring the alerts of anomalies that grew or closed up to date; returns how many
    alerts were updated."""
    return len(
        _guarded(
            "anomaly_updates",
            "anomaly_updates",
            "anomaly_ids",
            anomaly_ids,
            lambda ids: evaluation.update_anomaly_alerts(anomaly_ids=ids),
            _anomaly_sources,
            None,
        )
    )


@shared_task(name="alerts.evaluate_viral", soft_time_limit=30, time_limit=60)
def evaluate_viral(*, event_ids: list[int]) -> int:
    """Fire "viral_post" alert rules on posts scored likely viral; returns how many alerts
    were created."""
    return len(
        _guarded(
            "viral",
            "viral",
            "event_ids",
            event_ids,
            lambda ids: evaluation.evaluate_viral(event_ids=ids),
            ingest_selectors.source_of_events,
            "viral:",
        )
    )


@shared_task(name="alerts.sweep", soft_time_limit=25, time_limit=30)
def sweep() -> dict[str, int]:
    """Periodic: re-send trends, anomalies and scored posts never evaluated; update alerts
    left stale; push alerts never pushed."""
    return sweeps.sweep(older_than_s=settings.PIPELINE_STUCK_AFTER_S)


@shared_task(name="notify.deliver", soft_time_limit=40, time_limit=60)
def deliver(*, delivery_id: int) -> str | None:
    """Make the next try of a delivery when it is due (``alerts.delivery.deliver``);
    returns its status after the try, or None when there was nothing to do."""
    outcome = delivery.deliver(delivery_id=delivery_id)
    return outcome.status if outcome is not None else None


@shared_task(name="notify.slack_digest", soft_time_limit=40, time_limit=60)
def slack_digest(*, channel_id: int) -> str | None:
    """Send the alerts folded into a Slack channel's digest as one message."""
    outcome = delivery.send_slack_digest(channel_id=channel_id)
    return outcome.status if outcome is not None else None


@shared_task(name="notify.sweep", soft_time_limit=25, time_limit=30)
def sweep_deliveries() -> int:
    """Periodic: re-send the deliveries due and not in flight; returns how many."""
    return delivery.sweep(older_than_s=settings.PIPELINE_STUCK_AFTER_S)
