"""Reads of the alerts app for the other rooms (consumers, API, dashboard)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db.models import (
    Aggregate,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    Q,
    QuerySet,
)
from django.db.models.functions import Extract
from django.utils import timezone

from alerts.models import Alert, AlertSequence, Severity


def team_sequences(team_ids: Sequence[int]) -> dict[int, int]:
    """The last alert sequence number of each of ``team_ids`` (0 when none yet)."""
    seqs = dict(
        AlertSequence.objects.filter(team_id__in=list(team_ids)).values_list("team_id", "last_seq")
    )
    return {team_id: seqs.get(team_id, 0) for team_id in team_ids}


class Median(Aggregate):
    """PostgreSQL's ``percentile_cont(0.5) WITHIN GROUP (ORDER BY expr)``: the median of
    the non-null values (interpolated between the two middle ones), a float."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(0.5) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()


def alert_summary(alerts: QuerySet[Alert]) -> dict[str, Any]:
    """Counts of ``alerts`` (already scoped and filtered): ``{"total": int, "state":
    {state: int} (every state), "severity": {severity: int} (every severity),
    "snoozed": int}`` (snoozed until after now). Two grouped queries."""
    now = timezone.now()
    base = alerts.order_by()
    by_state = dict.fromkeys(Alert.State.values, 0)
    snoozed = 0
    for state, count, resting in (
        base.values("state")
        .annotate(n=Count("id"), z=Count("id", filter=Q(snoozed_until__gt=now)))
        .values_list("state", "n", "z")
    ):
        by_state[state] = count
        snoozed += resting
    by_severity = dict.fromkeys(Severity.values, 0)
    by_severity.update(base.values("severity").annotate(n=Count("id")).values_list("severity", "n"))
    return {
        "total": sum(by_state.values()),
        "state": by_state,
        "severity": by_severity,
        "snoozed": snoozed,
    }


def rule_stats(rule_id: int) -> dict[str, Any]:
    """A rule's figures, in one aggregate query: ``fired``, ``acknowledged`` (ever:
    ``acknowledged_at`` set), ``resolved`` and ``noise`` (now in that state),
    ``noise_share`` (noise / fired, rounded to 4 places; 0.0 when none fired) and
    ``median_ack_s`` (median seconds from creation to first acknowledgement, None when
    none was)."""
    row = Alert.objects.filter(rule_id=rule_id).aggregate(
        fired=Count("id"),
        acknowledged=Count("id", filter=Q(acknowledged_at__isnull=False)),
        resolved=Count("id", filter=Q(state=Alert.State.RESOLVED)),
        noise=Count("id", filter=Q(state=Alert.State.NOISE)),
        median_ack_s=Median(
            Extract(
                ExpressionWrapper(
                    F("acknowledged_at") - F("created_at"), output_field=DurationField()
                ),
                "epoch",
            )
        ),
    )
    fired = row["fired"]
    median = row["median_ack_s"]
    return {
        "rule": rule_id,
        **{key: row[key] for key in ("fired", "acknowledged", "resolved", "noise")},
        "noise_share": round(row["noise"] / fired, 4) if fired else 0.0,
        "median_ack_s": None if median is None else round(float(median), 3),
    }
