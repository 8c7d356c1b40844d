"""The alerts stage's claims: what makes each firing happen once, whatever the
redeliveries and races, with a fixed number of statements per batch.

- checks (``TrendCheck``, ``AnomalyCheck``, ``ViralCheck``: insert, conflict-ignore): a
  trend, an anomaly or a scored post is evaluated once, and a redelivered or racing
  task evaluates nothing twice;
- cooldowns (``RuleTermClaim``: one conditional upsert), in event time: a rule alerts on
  a key of a source (a trend's term, a viral post's author) once per moment, and again
  only ``cooldown_s`` after the moment it last alerted on;
- each team's next sequence numbers (``AlertSequence``: one UPDATE);
- the insert of the alerts (one conflict-ignore insert).

Locks are always taken in one global order (checks by id, then cooldown claims by rule,
source, term, then sequences by team), so concurrent alert workers cannot deadlock each
other; a deadlock or serialization failure with anything else is retried with backoff
(``retry_lock_conflicts``), never dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

import structlog
from django.db import OperationalError, connection, transaction
from django.utils import timezone
from psycopg2 import errorcodes
from psycopg2.extras import execute_values
from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from alerts.models import AlertRule
from twiscope import pipeline

log = structlog.get_logger(__name__)

RETRY_ATTEMPTS = 8


def _is_lock_conflict(exc: BaseException) -> bool:
    cause = getattr(exc, "__cause__", None)
    return isinstance(exc, OperationalError) and getattr(cause, "pgcode", None) in {
        errorcodes.DEADLOCK_DETECTED,
        errorcodes.SERIALIZATION_FAILURE,
    }


def _log_retry(state: Any) -> None:
    log.warning("alerts.evaluate_retried", attempt=state.attempt_number)


retry_lock_conflicts = retry(
    retry=retry_if_exception(_is_lock_conflict),
    wait=wait_random_exponential(multiplier=0.05, max=2.0),
    stop=stop_after_attempt(RETRY_ATTEMPTS),
    before_sleep=_log_retry,
    reraise=True,
)
"""Retry a whole evaluation on a deadlock or serialization failure (exponential backoff
with jitter, at most ``RETRY_ATTEMPTS`` tries; then the error propagates)."""


def claim_checks(trend_ids: list[int]) -> set[int]:
    """Insert a ``TrendCheck`` for each trend (sorted: the lock order); return the ids
    this transaction claimed (the others were evaluated, or are being, elsewhere)."""
    return _claim("alerts_trendcheck", "trend_id", trend_ids)


def _claim(
    table: Literal["alerts_trendcheck", "alerts_anomalycheck", "alerts_viralcheck"],
    column: str,
    ids: list[int],
) -> set[int]:
    """Insert a check row per id of ``ids`` into ``table`` (sorted: the lock order);
    return the ids this transaction claimed (one statement)."""
    if not ids:
        return set()
    with connection.cursor() as cursor:
        returned = execute_values(
            cursor.cursor,
            f"""
            INSERT INTO {table} ({column}, checked_at) VALUES %s
            ON CONFLICT ({column}) DO NOTHING RETURNING {column}
            """,
            [(i, timezone.now()) for i in sorted(set(ids))],
            fetch=True,
        )
    return {row[0] for row in returned}


_CLAIM_SQL = """
INSERT INTO alerts_ruletermclaim AS c (rule_id, source_id, term, last_bucket_start)
SELECT v.rule_id, v.source_id, v.term, v.bucket
FROM (VALUES %s) AS v(rule_id, source_id, term, bucket, cooldown_s)
ORDER BY v.rule_id, v.source_id, v.term
ON CONFLICT (rule_id, source_id, term) DO UPDATE
    SET last_bucket_start = excluded.last_bucket_start
    WHERE c.last_bucket_start IS NULL
       OR (c.last_bucket_start < excluded.last_bucket_start
           AND c.last_bucket_start <= excluded.last_bucket_start - (
               SELECT r.cooldown_s FROM alerts_alertrule r WHERE r.id = c.rule_id
           ) * interval '1 second')
RETURNING rule_id, source_id, term, last_bucket_start
"""


Cooldown = tuple[AlertRule, int, str, datetime, int]
"""``(rule, source id, key, event time, target id)``: a firing that claims ``rule``'s
cooldown on ``key`` of the source (a trend's term, "author:<key>" for a viral post) at
that event time, for the alert's target (a trend or an event)."""


def claim_cooldowns(firings: list[Cooldown]) -> set[tuple[int, int]]:
    """Claim the cooldown of each firing; return the ``(rule id, target id)`` pairs that
    won.

    One upsert per round; a batch holding several moments of one rule's key takes one
    round per moment, earliest first (an upsert may touch a row once).
    """
    won: set[tuple[int, int]] = set()
    pending = list(firings)
    while pending:
        round_: dict[tuple[int, int, str], Cooldown] = {}
        rest = []
        for firing in pending:
            rule, source_id, key, _, _ = firing
            claim = (rule.id, source_id, key)
            if claim in round_:
                rest.append(firing)
            else:
                round_[claim] = firing
        with connection.cursor() as cursor:
            returned = execute_values(
                cursor.cursor,
                _CLAIM_SQL,
                [
                    (rule.id, source_id, key, moment, rule.cooldown_s)
                    for (rule, source_id, key, moment, _) in (round_[k] for k in sorted(round_))
                ],
                template="(%s::bigint, %s::bigint, %s::varchar, %s::timestamptz, %s::int)",
                fetch=True,
            )
        claimed = {
            (rule_id, source_id, key, moment) for rule_id, source_id, key, moment in returned
        }
        for claim, (rule, _, _, moment, target_id) in round_.items():
            if (*claim, moment) in claimed:
                won.add((rule.id, target_id))
        pending = rest
    return won


def _next_seqs(counts: dict[int, int]) -> dict[int, int]:
    """Reserve ``counts[team]`` sequence numbers for each team; return the first of each.

    Teams are locked in id order (one upsert), the global lock order's last step.
    """
    with connection.cursor() as cursor:
        returned = execute_values(
            cursor.cursor,
            """
            INSERT INTO alerts_alertsequence AS s (team_id, last_seq)
            SELECT v.team_id, v.n FROM (VALUES %s) AS v(team_id, n) ORDER BY v.team_id
            ON CONFLICT (team_id) DO UPDATE SET last_seq = s.last_seq + excluded.last_seq
            RETURNING team_id, last_seq
            """,
            sorted(counts.items()),
            template="(%s::bigint, %s::bigint)",
            fetch=True,
        )
    return {team_id: last - counts[team_id] + 1 for team_id, last in returned}


def insert_alerts(
    target: Literal["trend_id", "anomaly_id", "event_id"],
    firing: list[tuple[AlertRule, int, str, str, datetime, datetime, int | None]],
) -> list[int]:
    """Insert one alert per ``(rule, target id, title, evidence JSON, event received,
    event created, story id)`` with consecutive per-team ``seq``; return their ids (one
    statement; a ``(rule, target)`` pair already alerted is skipped). The story id is a
    trend's ``TrendView.story_id`` (None for the other targets)."""
    if not firing:
        return []
    counts: dict[int, int] = defaultdict(int)
    for rule, *_ in firing:
        counts[rule.team_id] += 1
    next_seq = _next_seqs(counts)
    now = timezone.now()
    rows = []
    for rule, target_id, title, evidence, received_at, created_at, story_id in firing:
        seq = next_seq[rule.team_id]
        next_seq[rule.team_id] += 1
        rows.append(
            (
                rule.team_id,
                rule.id,
                target_id,
                story_id,
                seq,
                title,
                rule.severity,
                evidence,
                received_at,
                created_at,
                now,
            )
        )
    with connection.cursor() as cursor:
        returned = execute_values(
            cursor.cursor,
            f"""
            INSERT INTO alerts_alert (
                team_id, rule_id, {target}, story_id, seq, title, severity, evidence,
                event_received_at, event_created_at, created_at
            ) VALUES %s
            ON CONFLICT (rule_id, {target}) DO NOTHING
            RETURNING id
            """,
            rows,
            template="(%s, %s, %s, %s::bigint, %s, %s, %s, %s::jsonb, %s, %s, %s)",
            fetch=True,
        )
    return [row[0] for row in returned]


class _Evaluated(Protocol):
    """What ``claim_and_match`` reads of an anomaly or a scored post."""

    @property
    def id(self) -> int: ...

    @property
    def team_id(self) -> int: ...


E = TypeVar("E", bound=_Evaluated)
CheckTable = tuple[Literal["alerts_anomalycheck", "alerts_viralcheck"], str, str]
"""``(check table, its id column, dispatch record prefix)`` of an evaluated kind."""


def claim_and_match(
    kind: AlertRule.Kind,
    check: CheckTable,
    ids: Sequence[int],
    found: list[E],
    matches: Callable[[AlertRule, E], bool],
) -> list[tuple[AlertRule, E]]:
    """Inside the caller's transaction: claim the evaluation of each of ``found`` (its
    check row), have the dispatch records ``<prefix>:<id>`` of all ``ids`` marked done
    after commit, and return the ``(rule, item)`` pairs of the claimed items' teams'
    enabled rules of ``kind`` that ``matches`` says fire, in the order of ``found``."""
    table, column, prefix = check
    fresh = _claim(table, column, [item.id for item in found])
    transaction.on_commit(lambda: pipeline.mark_done("alerts", [f"{prefix}:{i}" for i in ids]))
    claimed = [item for item in found if item.id in fresh]
    if not claimed:
        return []
    rules = list(
        AlertRule.objects.filter(
            team_id__in={item.team_id for item in claimed}, enabled=True, kind=kind
        ).order_by("id")
    )
    return [
        (rule, item)
        for item in claimed
        for rule in rules
        if rule.team_id == item.team_id and matches(rule, item)
    ]
