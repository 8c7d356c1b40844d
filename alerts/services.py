"""Writes of alert rules (the API, the admin and the demo set-up save them here).

The writes of the alerts stage itself are its rooms: ``alerts.evaluation`` (firing and
updating alerts), ``alerts.claims`` (the claims and the insert they guard) and
``alerts.sweeps`` (the sweeper).
"""

from __future__ import annotations

import structlog

from alerts.models import AlertRule
from teams.models import Team
from twiscope import hotcache

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


def save_rule(*, rule: AlertRule | None, data: dict[str, object]) -> AlertRule:
    """Create a rule (``rule`` None) or update ``rule`` with validated ``data``; its
    ``channels`` (a list of channels of the rule's team), when given, replace the
    rule's."""
    data = dict(data)
    channels = data.pop("channels", None)
    if rule is None:
        rule = AlertRule.objects.create(**data)
        if channels is not None:
            rule.channels.set(channels)  # type: ignore[arg-type]
        log.info("alerts.rule_created", rule_id=rule.id, team_id=rule.team_id)
        return rule
    for name, value in data.items():
        setattr(rule, name, value)
    if data:
        rule.save(update_fields=list(data))
    if channels is not None:
        rule.channels.set(channels)  # type: ignore[arg-type]
    hotcache.bump_on_commit("alerts", [rule.team_id])  # the alerts list shows its name
    log.info("alerts.rule_updated", rule_id=rule.id, fields=sorted(data))
    return rule
