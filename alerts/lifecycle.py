"""The alert lifecycle: the state machine, the transitions analysts make, and the
re-open of a resting alert whose story keeps growing (Sentry's "escalating").

States: ``open`` → ``acknowledged`` → ``resolved``, or ``noise`` (a false positive);
``reopen`` takes an acknowledged, resolved or noise alert back to ``open``.
``TRANSITIONS`` is the one table of what each state-changing action is allowed from and
leads to; ``assign``, ``snooze`` and ``comment`` change no state (``KEEPS_STATE``: where
each is allowed). Every change, by an analyst or by the pipeline, is an
``AlertActivity`` row and an ``alert.updated`` push after commit (``alerts.push``).

Concurrency: a change locks its alert's row (``SELECT … FOR UPDATE``) and checks the
state it found there, so two transitions at once run one after the other: the second
sees the first's state (and is refused if it no longer applies); neither activity entry
is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import structlog
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.utils import timezone

from alerts import push
from alerts.models import Alert, AlertActivity, Severity
from mlengine import facade
from teams.models import Membership

log = structlog.get_logger(__name__)

State = Alert.State

TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "acknowledge": (frozenset({State.OPEN}), State.ACKNOWLEDGED),
    "resolve": (frozenset({State.OPEN, State.ACKNOWLEDGED}), State.RESOLVED),
    "reopen": (frozenset({State.ACKNOWLEDGED, State.RESOLVED, State.NOISE}), State.OPEN),
    "mark_noise": (frozenset({State.OPEN, State.ACKNOWLEDGED}), State.NOISE),
}
"""action → (the states it is allowed from, the state it leads to)."""

KEEPS_STATE: dict[str, frozenset[str]] = {
    "assign": frozenset(State.values),
    "snooze": frozenset({State.OPEN, State.ACKNOWLEDGED}),
    "comment": frozenset(State.values),
}
"""action → the states it is allowed in (it changes no state)."""

ESCALATED = "escalated"
"""The activity's action when the pipeline re-opens an alert whose story grew."""

SEVERITY_RISE = {Severity.INFO: Severity.WARNING, Severity.WARNING: Severity.CRITICAL}
"""An escalated alert's severity rises one step (critical stays critical)."""

GROWTH_FACTOR = 2
"""A resting alert re-opens when its story's posts reach this many times what they were
when it was resolved or snoozed."""


class TransitionRefused(Exception):
    """A change that cannot be made: ``field`` names the request field at fault
    (``state`` for a transition the alert's state does not allow), ``message`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Change:
    """What an analyst asks: ``action`` (a key of ``TRANSITIONS`` or ``KEEPS_STATE``),
    and its argument: ``reason`` (mark_noise), ``assignee_id`` (assign; None to
    unassign), ``until`` (snooze, aware) or ``text`` (comment)."""

    action: str
    reason: str = ""
    assignee_id: int | None = None
    until: datetime | None = None
    text: str = ""


def allowed(action: str, state: str) -> bool:
    """Whether ``action`` may be taken on an alert in ``state``.

    Raises:
        KeyError: ``action`` is no action of the lifecycle.
    """
    if action in TRANSITIONS:
        return state in TRANSITIONS[action][0]
    return state in KEEPS_STATE[action]


def apply(*, alert_id: int, user: AbstractBaseUser | AnonymousUser, change: Change) -> Alert:
    """Make ``change`` to the alert ``alert_id`` on behalf of ``user`` (a member of its
    team: the caller checks); returns the alert as saved.

    In one transaction: locks the alert's row, checks the change against its state,
    writes the alert and one ``AlertActivity``; after commit, pushes ``alert.updated``
    (with the alert's own ``seq``) to its team's group.

    Raises:
        Alert.DoesNotExist: no such alert.
        TransitionRefused: the state does not allow it (field ``state``), the assignee is
            no member of the team or already assigned (``user``), the snooze's end is
            not in the future (``until``).
    """
    now = timezone.now()
    with transaction.atomic():
        alert = Alert.objects.select_for_update().get(id=alert_id)
        if not allowed(change.action, alert.state):
            raise TransitionRefused(
                "state", f"cannot {change.action.replace('_', ' ')} an alert that is {alert.state}"
            )
        fields, detail = _make(alert, change, now)
        alert.save(update_fields=fields)
        AlertActivity.objects.create(
            alert=alert, at=now, user_id=user.pk, action=change.action, detail=detail
        )
        transaction.on_commit(lambda: push.push_updates(alert_ids=[alert_id]))
    log.info("alerts.transition", alert_id=alert_id, action=change.action, state=alert.state)
    return alert


def _make(alert: Alert, change: Change, now: datetime) -> tuple[list[str], str]:
    """Apply ``change`` to ``alert`` in memory; return the fields changed and the
    activity's detail."""
    action = change.action
    if action in TRANSITIONS:
        alert.state = TRANSITIONS[action][1]
        fields = ["state"]
        detail = ""
        if action == "acknowledge" and alert.acknowledged_at is None:
            alert.acknowledged_at = now
            fields.append("acknowledged_at")
        if action == "mark_noise":
            alert.noise_reason = change.reason
            fields.append("noise_reason")
            detail = change.reason
        if action == "reopen":
            alert.noise_reason = ""
            alert.snoozed_until = None
            fields += ["noise_reason", "snoozed_until"]
        if action == "resolve":
            fields += _rest(alert)
        return fields, detail
    if action == "assign":
        if change.assignee_id == alert.assignee_id:
            raise TransitionRefused("user", "the alert is already assigned so")
        if (
            change.assignee_id is not None
            and not Membership.objects.filter(
                team_id=alert.team_id, user_id=change.assignee_id
            ).exists()
        ):
            raise TransitionRefused("user", "not a member of the alert's team")
        alert.assignee_id = change.assignee_id
        return ["assignee"], "" if change.assignee_id is None else str(change.assignee_id)
    if action == "snooze":
        if change.until is None or change.until <= now:
            raise TransitionRefused("until", "a snooze must end in the future")
        alert.snoozed_until = change.until
        return ["snoozed_until", *_rest(alert)], change.until.isoformat()
    # comment
    return [], change.text


def _rest(alert: Alert) -> list[str]:
    """Record the story's size and forecast peak as the alert goes to rest (resolved or
    snoozed): what ``escalate`` compares the growing story against. One query for a
    story alert, none otherwise."""
    if alert.story_id is None:
        return []
    alert.rest_story_events = facade.story_volumes([alert.story_id]).get(alert.story_id)
    forecast = (alert.evidence.get("story") or {}).get("forecast") or {}
    peak = forecast.get("peak_volume")
    alert.rest_forecast_peak = float(peak) if isinstance(peak, int | float) else None
    return ["rest_story_events", "rest_forecast_peak"]


def resting(alert: Alert, now: datetime) -> bool:
    """Whether ``alert`` is at rest: resolved, or snoozed until after ``now``."""
    return alert.state == State.RESOLVED or (
        alert.snoozed_until is not None
        and alert.snoozed_until > now
        and alert.state in (State.OPEN, State.ACKNOWLEDGED)
    )


def escalate(alerts: list[Alert], latest_events: dict[int, int], now: datetime) -> list[int]:
    """Re-open each resting alert of ``alerts`` (locked by the caller, the pipeline's
    story update) whose story grew: its posts reached ``GROWTH_FACTOR`` times their count
    at rest (``rest_story_events``), or a new member's bucket count (``latest_events``,
    by alert id) passed the forecast peak recorded at rest. Such an alert goes back to
    ``open``, unsnoozed, its severity one step up, with an ``escalated`` activity entry
    saying why. Returns the ids re-opened; the caller pushes them. One query for the
    stories' sizes when any alert is at rest, none otherwise."""
    candidates = [a for a in alerts if a.story_id is not None and resting(a, now)]
    if not candidates:
        return []
    volumes = facade.story_volumes(sorted({a.story_id for a in candidates if a.story_id}))
    reopened: list[int] = []
    entries: list[AlertActivity] = []
    for alert in candidates:
        assert alert.story_id is not None
        why = _why(alert, volumes.get(alert.story_id, 0), latest_events.get(alert.id, 0))
        if why is None:
            continue
        was = alert.state
        alert.state = State.OPEN
        alert.snoozed_until = None
        alert.severity = SEVERITY_RISE.get(Severity(alert.severity), alert.severity)
        alert.save(update_fields=["state", "snoozed_until", "severity"])
        entries.append(
            AlertActivity(
                alert=alert, at=now, user=None, action=ESCALATED, detail=f"{why} (was {was})"
            )
        )
        reopened.append(alert.id)
    AlertActivity.objects.bulk_create(entries)
    if reopened:
        log.info("alerts.escalated", alert_ids=reopened)
    return reopened


def _why(alert: Alert, volume: int, latest: int) -> str | None:
    """Why the story re-opens ``alert`` (None: it does not)."""
    peak = alert.rest_forecast_peak
    if peak is not None and latest > peak:
        return f"story grew past its forecast: {latest} posts in a bucket, forecast peak {peak:g}"
    rest = alert.rest_story_events
    if rest and volume >= GROWTH_FACTOR * rest:
        return f"story grew from {rest} to {volume} posts since it was put to rest"
    return None
