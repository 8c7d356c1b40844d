"""Delivery beyond the page: channels, and each alert event sent to each channel that
wants it, retried, logged per try, with the channel's health kept.

Flow (DESIGN.md, "Delivery semantics"):

1. ``schedule(alert_ids=..., event=...)`` runs in the transaction that fired or changed
   the alerts: it inserts one ``Delivery`` per (alert, channel of the alert's rule that
   wants the event), due now, and after commit sends one ``notify.deliver`` task per
   delivery (``twiscope.pipeline.send``), so one slow receiver delays no other channel,
   and the WebSocket push (sent by its own on-commit callback, registered first) waits
   for none of them.
2. ``deliver(delivery_id=...)`` claims the try with a conditional UPDATE (due, pending,
   channel enabled: ``next_attempt_at`` moves forward by a lease), sends it
   (``alerts.senders``), logs a ``DeliveryAttempt`` and then marks the delivery
   delivered, failed (a permanent error or the last of ``DELIVERY_MAX_ATTEMPTS``
   tries), or due again after a backoff with full jitter (``backoff_s``), re-sending
   its task with that countdown. A 410 disables the channel.
3. ``sweep(older_than_s=...)`` (``notify.sweep``, beat) re-sends the deliveries due for
   over ``older_than_s`` and not claimed: a task lost between commit and broker, or
   with a worker.

Slack takes one message a second per incoming webhook: a try that finds the channel's
Redis gate (``SLACK_GATE_KEY``, one second) taken folds its alert into the channel's
digest list instead, and the first to do so sends ``notify.slack_digest`` for when the
gate opens; that task sends every folded alert as one message.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from alerts import senders
from alerts.models import Alert, Channel, Delivery, DeliveryAttempt
from alerts.payload import alert_payload
from ingest import credentials
from twiscope import pipeline
from twiscope.queues import NOTIFY
from twiscope.redis import get_redis

log = structlog.get_logger(__name__)

EVENTS = (Delivery.Event.CREATED.value, Delivery.Event.UPDATED.value)
DEFAULT_EVENTS = [Delivery.Event.CREATED.value]
"""The events a channel wants unless its config's ``events`` says otherwise."""
SLACK_GATE_KEY = "notify:slack:gate:{channel}"
SLACK_DIGEST_KEY = "notify:slack:digest:{channel}"
SLACK_INTERVAL_MS = 1000
"""Slack's rate for incoming webhooks: one message a second per webhook."""
SWEEP_PAGE = 1000


def lease_s() -> float:
    """How long a claimed try holds its delivery before the sweeper may re-send it:
    past the longest call (``DELIVERY_TIMEOUT_S`` for connect and for read) and the
    task's time limit, with room for a Slack digest's wait."""
    return 2 * float(settings.DELIVERY_TIMEOUT_S) + 60.0


def backoff_s(attempts: int) -> float:
    """Seconds before try ``attempts + 1``: uniform in [0, min(``DELIVERY_BACKOFF_MAX_S``,
    ``DELIVERY_BACKOFF_BASE_S`` × 2^``attempts``)] ("full jitter", AWS Architecture Blog,
    "Exponential Backoff and Jitter", 2015). With the defaults (15 s, 8 h, 15 tries)
    the tries spread over about a day: expected ~20 h, at most ~40 h."""
    ceiling = min(
        float(settings.DELIVERY_BACKOFF_MAX_S),
        float(settings.DELIVERY_BACKOFF_BASE_S) * 2 ** min(attempts, 30),
    )
    return random.uniform(0, ceiling)


# --- channels ---------------------------------------------------------------------------


def channel_secrets(channel: Channel) -> dict[str, Any]:
    """The channel's sealed secrets (``secret`` of a webhook, ``webhook_url`` of Slack).

    Raises:
        ingest.credentials.CredentialsError: no configured key opens them.
    """
    return credentials.unseal(channel.credentials)


def save_channel(
    *, channel: Channel | None, data: dict[str, Any], secrets: dict[str, Any] | None = None
) -> tuple[Channel, str | None]:
    """Create a channel (``channel`` None) or update it with validated ``data`` (model
    fields); ``secrets`` (a Slack ``webhook_url``), when given, replace the sealed ones.
    A new webhook channel gets a fresh signing secret. Returns the channel and the new
    webhook secret (None unless one was made: the only time it is ever shown).
    Re-enabling a disabled channel clears its disabled reason and failure count."""
    new_secret = None
    if channel is None:
        channel = Channel(**data)
        sealed: dict[str, Any] = dict(secrets or {})
        if channel.kind == Channel.Kind.WEBHOOK:
            new_secret = senders.new_webhook_secret()
            sealed["secret"] = new_secret
        channel.credentials = credentials.seal(sealed)
        channel.save()
        log.info("notify.channel_created", channel_id=channel.id, kind=channel.kind)
        return channel, new_secret
    fields = list(data)
    was_enabled = channel.enabled
    for name, value in data.items():
        setattr(channel, name, value)
    if secrets:
        channel.credentials = credentials.seal({**channel_secrets(channel), **secrets})
        fields.append("credentials")
    if channel.enabled and not was_enabled:
        channel.disabled_reason, channel.consecutive_failures = "", 0
        fields += ["disabled_reason", "consecutive_failures"]
    channel.save(update_fields=sorted(set(fields)))
    log.info("notify.channel_updated", channel_id=channel.id, fields=sorted(set(fields)))
    return channel, None


def channel_health(channel: Channel) -> dict[str, Any]:
    """``{"status", "last_error", "last_error_at", "last_success_at",
    "consecutive_failures"}``: ``status`` is ``disabled`` (off, by hand or after a 410:
    ``disabled_reason``), ``failing`` (its last ``DELIVERY_FAILING_AFTER`` or more tries
    failed) or ``ok``."""
    if not channel.enabled:
        status = "disabled"
    elif channel.consecutive_failures >= settings.DELIVERY_FAILING_AFTER:
        status = "failing"
    else:
        status = "ok"
    return {
        "status": status,
        "last_error": channel.last_error,
        "last_error_at": channel.last_error_at,
        "last_success_at": channel.last_success_at,
        "consecutive_failures": channel.consecutive_failures,
    }


def wanted_events(channel: Channel) -> list[str]:
    """The alert events ``channel`` wants (its config's ``events``, or created only)."""
    events = channel.config.get("events") if isinstance(channel.config, dict) else None
    return list(events) if isinstance(events, list) and events else list(DEFAULT_EVENTS)


# --- scheduling ---------------------------------------------------------------------------


def schedule(*, alert_ids: Sequence[int], event: str) -> list[int]:
    """Record a delivery of ``event`` (``alert.created`` or ``alert.updated``) of each
    alert to each enabled channel of its rule that wants it, and send their tasks once
    the current transaction commits (at once outside one). ``alert.created`` is
    delivered once per (alert, channel) (a conflict-ignore insert); each call with
    ``alert.updated`` is a new delivery. Returns the new deliveries' ids.

    Call it in the transaction that wrote the alerts, after registering their
    WebSocket push: the push's callback runs first and no delivery holds it up.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown alert event {event!r}")
    if not alert_ids:
        return []
    pairs = list(
        Alert.objects.filter(
            id__in=list(alert_ids),
            rule__channels__enabled=True,
        ).values_list("id", "team_id", "rule__channels__id", "rule__channels__config")
    )
    now = timezone.now()
    rows = [
        Delivery(
            alert_id=alert_id,
            team_id=team_id,
            channel_id=channel_id,
            event=event,
            webhook_id=f"msg_{uuid.uuid4().hex}",
            next_attempt_at=now,
            created_at=now,
        )
        for alert_id, team_id, channel_id, config in pairs
        if event in _events_of(config)
    ]
    if not rows:
        return []
    created = Delivery.objects.bulk_create(rows, ignore_conflicts=event == Delivery.Event.CREATED)
    if event == Delivery.Event.CREATED:
        # ignore_conflicts returns no ids: read back the ones this call inserted.
        ids = list(
            Delivery.objects.filter(webhook_id__in=[row.webhook_id for row in rows]).values_list(
                "id", flat=True
            )
        )
    else:
        ids = [row.id for row in created]
    _send_later(ids)
    log.info("notify.scheduled", alert_event=event, deliveries=len(ids))
    return ids


def _events_of(config: Any) -> list[str]:
    events = config.get("events") if isinstance(config, dict) else None
    return list(events) if isinstance(events, list) and events else list(DEFAULT_EVENTS)


def _send_later(ids: Sequence[int], countdown: float | None = None) -> None:
    """One ``notify.deliver`` task per delivery id, after commit."""
    for delivery_id in ids:
        pipeline.send(NOTIFY, countdown=countdown, delivery_id=delivery_id)


# --- trying ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a try came to: the delivery's ``status`` after it, and the ``Sent``."""

    status: str
    sent: senders.Sent | None


def _claim(delivery_id: int, now: datetime) -> Delivery | None:
    """Take the next try of a pending, due delivery of an enabled channel: one
    conditional UPDATE moving ``next_attempt_at`` a lease ahead; None when another
    worker holds it, it is not due, done, or gone. A delivery of a disabled channel is
    marked skipped."""
    claimed = Delivery.objects.filter(
        id=delivery_id,
        status=Delivery.Status.PENDING,
        next_attempt_at__lte=now + timedelta(seconds=1),
        channel__enabled=True,
    ).update(next_attempt_at=now + timedelta(seconds=lease_s()))
    if claimed != 1:
        Delivery.objects.filter(
            id=delivery_id, status=Delivery.Status.PENDING, channel__enabled=False
        ).update(status=Delivery.Status.SKIPPED, last_error="the channel is disabled")
        return None
    return Delivery.objects.select_related("channel", "alert__rule").get(id=delivery_id)


def deliver(*, delivery_id: int, timeout_s: float | None = None) -> Outcome | None:
    """Make the next try of a delivery if it is due and no one else holds it (see the
    module docstring); returns the outcome, or None when there was nothing to do (or
    the alert went into a Slack digest that ``send_slack_digest`` will send).

    Side effects: a ``DeliveryAttempt`` row, the delivery's and channel's state, and the
    next try's task (after commit) when it is to be retried.
    """
    now = timezone.now()
    delivery = _claim(delivery_id, now)
    if delivery is None:
        return None
    timeout = float(settings.DELIVERY_TIMEOUT_S if timeout_s is None else timeout_s)
    channel = delivery.channel
    payload = alert_payload(delivery.alert)
    if channel.kind == Channel.Kind.SLACK and not _slack_gate(channel.id):
        _fold_into_digest(channel.id, delivery.id)
        return None
    sent = _send(channel, delivery, payload, timeout)
    return Outcome(_record(delivery, sent), sent)


def _send(
    channel: Channel, delivery: Delivery, payload: dict[str, Any], timeout: float
) -> senders.Sent:
    try:
        sealed = channel_secrets(channel)
    except credentials.CredentialsError as exc:
        return senders.Sent(False, None, 0.0, str(exc), permanent=True)
    if channel.kind == Channel.Kind.WEBHOOK:
        return senders.send_webhook(
            url=str(channel.config.get("url", "")),
            secret=str(sealed.get("secret", "")),
            msg_id=delivery.webhook_id,
            event=delivery.event,
            alert=payload,
            timeout_s=timeout,
        )
    if channel.kind == Channel.Kind.SLACK:
        return senders.send_slack(
            webhook_url=str(sealed.get("webhook_url", "")),
            message=senders.slack_message([payload], delivery.event),
            timeout_s=timeout,
        )
    return senders.send_email(
        to=list(channel.config.get("to", [])),
        event=delivery.event,
        alert=payload,
        timeout_s=timeout,
    )


def _record(delivery: Delivery, sent: senders.Sent) -> str:
    """Log the try, then mark ``delivery`` delivered, failed or due again (its next
    task sent after commit), and keep its channel's health; returns the new status."""
    now = timezone.now()
    attempts = delivery.attempts + 1
    if sent.ok:
        status, outcome, retry_in = (
            Delivery.Status.DELIVERED,
            DeliveryAttempt.Outcome.DELIVERED,
            None,
        )
    elif sent.permanent or attempts >= settings.DELIVERY_MAX_ATTEMPTS:
        status, outcome, retry_in = Delivery.Status.FAILED, DeliveryAttempt.Outcome.FAILED, None
    else:
        status, outcome = Delivery.Status.PENDING, DeliveryAttempt.Outcome.RETRY
        retry_in = backoff_s(attempts)
    with transaction.atomic():
        DeliveryAttempt.objects.create(
            delivery=delivery,
            at=now,
            outcome=outcome,
            http_status=sent.http_status,
            latency_ms=sent.latency_ms,
            error=sent.error,
        )
        Delivery.objects.filter(id=delivery.id).update(
            status=status,
            attempts=attempts,
            last_error=sent.error,
            delivered_at=now if sent.ok else None,
            next_attempt_at=now + timedelta(seconds=retry_in) if retry_in is not None else None,
        )
        channels = Channel.objects.filter(id=delivery.channel_id)
        if sent.ok:
            channels.update(consecutive_failures=0, last_success_at=now)
        else:
            channels.update(
                consecutive_failures=F("consecutive_failures") + 1,
                last_error=sent.error,
                last_error_at=now,
            )
        if sent.disable:
            channels.update(enabled=False, disabled_reason=f"the receiver answered {sent.error}")
            log.warning("notify.channel_disabled", channel_id=delivery.channel_id, error=sent.error)
        if retry_in is not None:
            _send_later([delivery.id], countdown=retry_in)
    log.info(
        "notify.tried",
        delivery_id=delivery.id,
        channel_id=delivery.channel_id,
        status=status,
        http_status=sent.http_status,
        latency_ms=sent.latency_ms,
        attempts=attempts,
        error=sent.error or None,
    )
    return str(status)


# --- Slack's rate: one message a second, the rest folded into a digest -----------------


def _slack_gate(channel_id: int) -> bool:
    """Take the channel's one-message-a-second slot; False when a message went out
    less than a second ago (the slot is a Redis key living ``SLACK_INTERVAL_MS``)."""
    key = SLACK_GATE_KEY.format(channel=channel_id)
    return bool(get_redis().set(key, 1, nx=True, px=SLACK_INTERVAL_MS))


def _fold_into_digest(channel_id: int, delivery_id: int) -> None:
    """Add the delivery to the channel's digest; the first to wait sends the digest's
    task for when the gate opens."""
    redis = get_redis()
    waiting = redis.rpush(SLACK_DIGEST_KEY.format(channel=channel_id), delivery_id)
    if waiting == 1:
        _send_digest_later(channel_id)
    log.info("notify.slack_folded", channel_id=channel_id, delivery_id=delivery_id)


def _send_digest_later(channel_id: int) -> None:
    """The channel's ``notify.slack_digest`` task, for when its gate opens."""
    wait_ms = cast(int, get_redis().pttl(SLACK_GATE_KEY.format(channel=channel_id)))
    countdown = max(wait_ms, 1) / 1000
    pipeline.send(NOTIFY, task="slack_digest", countdown=countdown, channel_id=channel_id)


def send_slack_digest(*, channel_id: int, timeout_s: float | None = None) -> Outcome | None:
    """Send the alerts folded into the channel's digest as one Slack message when its
    gate is open (otherwise the task is sent again for when it opens); each folded
    delivery logs the try. Returns the outcome, or None when there was nothing to send
    or the gate was still shut."""
    redis = get_redis()
    if not _slack_gate(channel_id):
        _send_digest_later(channel_id)
        return None
    key = SLACK_DIGEST_KEY.format(channel=channel_id)
    with redis.pipeline(transaction=True) as multi:
        multi.lrange(key, 0, -1)
        multi.delete(key)
        raw, _ = multi.execute()
    ids = [int(item) for item in raw]
    deliveries = list(
        Delivery.objects.filter(id__in=ids, status=Delivery.Status.PENDING)
        .select_related("channel", "alert__rule")
        .order_by("id")
    )
    if not deliveries:
        return None
    channel = deliveries[0].channel
    timeout = float(settings.DELIVERY_TIMEOUT_S if timeout_s is None else timeout_s)
    try:
        url = str(channel_secrets(channel).get("webhook_url", ""))
    except credentials.CredentialsError as exc:
        sent = senders.Sent(False, None, 0.0, str(exc), permanent=True)
    else:
        message = senders.slack_message(
            [alert_payload(d.alert) for d in deliveries], deliveries[0].event
        )
        sent = senders.send_slack(webhook_url=url, message=message, timeout_s=timeout)
    status = ""
    for delivery in deliveries:
        status = _record(delivery, sent)
    log.info("notify.slack_digest", channel_id=channel_id, alerts=len(deliveries))
    return Outcome(status, sent)


# --- test-send and the sweeper ---------------------------------------------------------------


def send_test(*, channel: Channel) -> senders.Sent:
    """Send a test message to ``channel`` now (``DELIVERY_TEST_TIMEOUT_S``), outside the
    delivery log and the Slack gate; the channel's health is not changed. A webhook
    test is an ``alert.created`` of a made-up alert (id 0) under a fresh message id."""
    now = timezone.now().isoformat().replace("+00:00", "Z")
    payload: dict[str, Any] = {
        "id": 0,
        "team": channel.team_id,
        "seq": 0,
        "rule": {"id": 0, "name": "test"},
        "title": f"Test message from Twiscope to {channel.name}",
        "severity": "info",
        "evidence": {"summary": "a test: no alert fired"},
        "created_at": now,
        "test": True,
    }
    delivery = Delivery(
        channel=channel, event=Delivery.Event.CREATED, webhook_id=f"msg_test_{uuid.uuid4().hex}"
    )
    sent = _send(channel, delivery, payload, float(settings.DELIVERY_TEST_TIMEOUT_S))
    log.info("notify.test_sent", channel_id=channel.id, ok=sent.ok, error=sent.error or None)
    return sent


def sweep(*, older_than_s: float) -> int:
    """Re-send the ``notify.deliver`` task of every pending delivery of an enabled
    channel due for over ``older_than_s`` seconds (its task was lost, or its worker
    died mid-try, past the claim's lease), ``SWEEP_PAGE`` at a time; returns how many."""
    cutoff = timezone.now() - timedelta(seconds=older_than_s)
    due = Delivery.objects.filter(
        Q(next_attempt_at__lt=cutoff),
        status=Delivery.Status.PENDING,
        channel__enabled=True,
    )
    resent = 0
    after = 0
    while True:
        ids = list(
            due.filter(id__gt=after).order_by("id").values_list("id", flat=True)[:SWEEP_PAGE]
        )
        if not ids:
            break
        with transaction.atomic():
            _send_later(ids)
        resent += len(ids)
        after = ids[-1]
    if resent:
        log.warning("notify.swept", deliveries=resent)
    return resent
