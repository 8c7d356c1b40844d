"""Writes of the alerts stage: rules fire on new trends, alerts are persisted, then pushed.

An alert is created only by the worker whose conditional UPDATE of the rule's claim
row for the term changed exactly one row (the cooldown claim), and the alert row is
unique per (rule, trend): a redelivered task fires nothing twice. Alerts are pushed
to the dashboard only after the transaction that wrote them commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import structlog
from django.db import connection, transaction
from django.utils import timezone

from alerts.models import Alert, AlertRule
from dashboard.models import Team
from mlengine.models import Trend

log = structlog.get_logger(__name__)

DEFAULT_RULE_NAME = "New trend"


def ensure_default_rule(team: Team) -> AlertRule:
    """The team-wide "New trend" rule: every detected trend alerts once per term a day."""
    rule, _ = AlertRule.objects.get_or_create(
        team=team,
        name=DEFAULT_RULE_NAME,
        defaults={"kind": AlertRule.Kind.NEW_TREND, "cooldown_s": 24 * 3600},
    )
    return rule


def rule_matches(rule: AlertRule, trend: Trend) -> bool:
    """Whether ``trend`` passes ``rule``'s filters (source, terms, thresholds)."""
    return (
        rule.enabled
        and (rule.source_id is None or rule.source_id == trend.source_id)
        and (not rule.terms or trend.term in rule.terms)
        and trend.score >= rule.min_score
        and trend.events >= rule.min_events
        and trend.authors_count >= rule.min_authors
    )


def _claim(rule: AlertRule, trend: Trend) -> bool:
    """Claim the right to alert on ``trend.term`` of its source for ``rule``.

    The cooldown is in event time: the claim succeeds when the rule never alerted on
    this term of this source, or last did for a bucket at least ``cooldown_s`` earlier.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO alerts_ruletermclaim (rule_id, source_id, term, last_bucket_start)
            VALUES (%s, %s, %s, NULL) ON CONFLICT (rule_id, source_id, term) DO NOTHING
            """,
            [rule.id, trend.source_id, trend.term],
        )
        cursor.execute(
            """
            UPDATE alerts_ruletermclaim SET last_bucket_start = %s
            WHERE rule_id = %s AND source_id = %s AND term = %s
              AND (last_bucket_start IS NULL OR last_bucket_start <= %s)
            """,
            [
                trend.bucket_start,
                rule.id,
                trend.source_id,
                trend.term,
                trend.bucket_start - timedelta(seconds=rule.cooldown_s),
            ],
        )
        return cursor.rowcount == 1


def _title(trend: Trend) -> str:
    return (
        f"Trending: {trend.term} in {trend.source.name}: {trend.events} posts, "
        f"{trend.score:.1f}σ above baseline"
    )[:300]


def evaluate_trends(*, trend_ids: Sequence[int]) -> list[int]:
    """Fire the matching rules of each trend's team; return the new alert ids.

    Trends that are gone are skipped. Side effect after commit: the new alerts are
    pushed to their team's WebSocket group (``alerts.push``).
    """
    trends = list(Trend.objects.filter(id__in=trend_ids).select_related("source").order_by("id"))
    created: list[int] = []
    with transaction.atomic():
        for trend in trends:
            rules = AlertRule.objects.filter(team_id=trend.source.team_id, enabled=True)
            for rule in rules.order_by("id"):
                if (
                    not rule_matches(rule, trend)
                    or Alert.objects.filter(rule=rule, trend=trend).exists()
                ):
                    continue
                if not _claim(rule, trend):
                    continue
                created.append(_create_alert(rule, trend).id)
        if created:
            transaction.on_commit(lambda: _after_alerts(created))
    if created:
        log.info("alerts.fired", alerts=len(created))
    return created


def _create_alert(rule: AlertRule, trend: Trend) -> Alert:
    team_id = trend.source.team_id
    # One statement: the row lock it takes orders concurrent alerts of the team.
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE dashboard_team SET alert_seq = alert_seq + 1 WHERE id = %s RETURNING alert_seq",
            [team_id],
        )
        (seq,) = cursor.fetchone()
    return Alert.objects.create(
        team_id=team_id,
        rule=rule,
        trend=trend,
        seq=seq,
        title=_title(trend),
        severity=rule.severity,
        evidence={
            "term": trend.term,
            "events": trend.events,
            "expected": trend.expected,
            "score": trend.score,
            "authors_count": trend.authors_count,
            "velocity": trend.velocity,
            "bucket_start": trend.bucket_start.isoformat(),
            "bucket_s": trend.bucket_s,
            "source": {"id": trend.source_id, "name": trend.source.name},
            "sample_event_ids": trend.sample_event_ids,
        },
        event_received_at=trend.evidence_received_at,
        event_created_at=trend.evidence_created_at,
        created_at=timezone.now(),
    )


def _after_alerts(alert_ids: list[int]) -> None:
    from alerts import push

    push.push_alerts(alert_ids=alert_ids)


def save_rule(*, rule: AlertRule | None, data: dict[str, object]) -> AlertRule:
    """Create a rule (``rule`` None) or update ``rule`` with validated ``data``."""
    if rule is None:
        rule = AlertRule.objects.create(**data)
        log.info("alerts.rule_created", rule_id=rule.id, team_id=rule.team_id)
        return rule
    for name, value in data.items():
        setattr(rule, name, value)
    rule.save(update_fields=list(data))
    log.info("alerts.rule_updated", rule_id=rule.id, fields=sorted(data))
    return rule
