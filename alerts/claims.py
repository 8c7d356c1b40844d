"""The alerts stage's claims: what makes each firing happen once, whatever the
redeliveries and races, with a fixed number of statements per batch.

- checks (``TrendCheck``, ``AnomalyCheck``, ``ViralCheck``: insert, conflict-ignore): a
  trend, an anomaly or a scored post is evaluated once, and a redelivered or racing
  task evaluates nothing twice;
- cooldowns (``RuleTermClaim``, ``Cooldowns``: the batch's rows locked by one upsert,
  decided in memory, written by one UPDATE), in event time: a rule alerts on a key of a
  source (a trend's term, a viral post's author) once per moment, and again only
  ``cooldown_s`` after the moment it last alerted on;
- each team's next sequence numbers (``AlertSequence``: one UPDATE);
- stories (``alert_unique_story``, unique on rule and story): a rule alerts on a story
  once; ``insert_alerts`` reads the story's committed alert under the sequence lock,
  so a worker that lost the race joins the winner's alert;
- the insert of the alerts (one conflict-ignore insert, on any constraint).

Locks are always taken in one global order: checks by id, then cooldown claims by
rule, source, term (one statement for the whole batch), then sequences by team, then
alerts (inserted under the sequence lock: two inserts of one rule's alerts never wait
on each other; updated in id order). So concurrent alert workers cannot deadlock each
other; a deadlock or serialization failure with anything else is retried with backoff
(``retry_lock_conflicts``), never dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
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


_LOCK_COOLDOWNS_SQL = """
INSERT INTO alerts_ruletermclaim AS c (rule_id, source_id, term, last_bucket_start)
SELECT v.rule_id, v.source_id, v.term, NULL::timestamptz
FROM (VALUES %s) AS v(rule_id, source_id, term)
ORDER BY v.rule_id, v.source_id, v.term
ON CONFLICT (rule_id, source_id, term) DO UPDATE SET last_bucket_start = c.last_bucket_start
RETURNING rule_id, source_id, term, last_bucket_start
"""

_SAVE_COOLDOWNS_SQL = """
UPDATE alerts_ruletermclaim AS c SET last_bucket_start = v.moment
FROM (VALUES %s) AS v(rule_id, source_id, term, moment)
WHERE c.rule_id = v.rule_id AND c.source_id = v.source_id AND c.term = v.term
"""


Cooldown = tuple[AlertRule, int, str, datetime, int]
"""``(rule, source id, key, event time, target id)``: a firing that claims ``rule``'s
cooldown on ``key`` of the source (a trend's term, "author:<key>" for a viral post) at
that event time, for the alert's target (a trend or an event)."""

CooldownKey = tuple[int, int, str]
"""``(rule id, source id, key)``: one ``RuleTermClaim`` row."""


class Cooldowns:
    """The cooldown claims of one batch, inside the caller's transaction.

    ``lock`` takes every claim row the batch may touch in one upsert, in ``(rule,
    source, key)`` order (the global lock order's second step), creating the missing
    rows (``last_bucket_start`` NULL: never alerted) and reading the others' last
    moment. The claims are then decided in memory, in the order the caller makes them
    (``claim``), and ``save`` writes the won moments back (one UPDATE). Two statements
    whatever the batch holds, and the rows stay locked until the transaction ends, so
    the decision is the one a conditional UPDATE per claim would take.
    """

    def __init__(self, last: dict[CooldownKey, datetime | None]) -> None:
        self._last = last
        self._won: dict[CooldownKey, datetime] = {}

    @classmethod
    def lock(cls, keys: Sequence[CooldownKey]) -> Cooldowns:
        """Lock (create when missing) the claim rows of ``keys``; one statement, none for
        no keys."""
        unique = sorted(set(keys))
        if not unique:
            return cls({})
        with connection.cursor() as cursor:
            returned = execute_values(
                cursor.cursor,
                _LOCK_COOLDOWNS_SQL,
                unique,
                template="(%s::bigint, %s::bigint, %s::varchar)",
                fetch=True,
                page_size=max(len(unique), 1),
            )
        return cls({(rule_id, source_id, key): last for rule_id, source_id, key, last in returned})

    def claim(self, rule: AlertRule, source_id: int, key: str, moment: datetime) -> bool:
        """Whether ``rule`` may alert on ``key`` of the source at event time ``moment``:
        it never did, or ``moment`` is later than the last moment it did and at least
        ``rule.cooldown_s`` seconds after it. A win becomes the key's last moment.

        Raises:
            KeyError: the key was not locked (``lock``).
        """
        claim = (rule.id, source_id, key)
        last = self._last[claim]
        if last is not None and (
            last >= moment or last > moment - timedelta(seconds=rule.cooldown_s)
        ):
            return False
        self._last[claim] = self._won[claim] = moment
        return True

    def save(self) -> None:
        """Write the won moments (one UPDATE; none when nothing was won)."""
        if not self._won:
            return
        with connection.cursor() as cursor:
            execute_values(
                cursor.cursor,
                _SAVE_COOLDOWNS_SQL,
                sorted(
                    (rule_id, source_id, key, moment)
                    for (rule_id, source_id, key), moment in self._won.items()
                ),
                template="(%s::bigint, %s::bigint, %s::varchar, %s::timestamptz)",
                page_size=max(len(self._won), 1),
            )


def claim_cooldowns(firings: list[Cooldown]) -> set[tuple[int, int]]:
    """Claim the cooldown of each firing, in input order; return the ``(rule id, target
    id)`` pairs that won (two statements: ``Cooldowns``). A batch holding several
    moments of one rule's key claims them in input order: give them earliest first."""
    cooldowns = Cooldowns.lock(
        [(rule.id, source_id, key) for rule, source_id, key, _, _ in firings]
    )
    won = {
        (rule.id, target_id)
        for rule, source_id, key, moment, target_id in firings
        if cooldowns.claim(rule, source_id, key, moment)
    }
    cooldowns.save()
    return won


def _next_seqs(counts: dict[int, int]) -> dict[int, int]:
    """Reserve ``counts[team]`` sequence numbers for each team; return the first of each.

    Teams are locked in id order (one upsert), the global lock order's third step.
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
            page_size=max(len(counts), 1),
        )
    return {team_id: last - counts[team_id] + 1 for team_id, last in returned}


def _story_alerts(keys: set[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """``{(rule id, story id): alert id}`` of the committed alerts of ``keys`` (one query)."""
    with connection.cursor() as cursor:
        returned = execute_values(
            cursor.cursor,
            """
            SELECT a.rule_id, a.story_id, a.id FROM alerts_alert AS a
            JOIN (VALUES %s) AS v(rule_id, story_id)
              ON a.rule_id = v.rule_id AND a.story_id = v.story_id
            """,
            sorted(keys),
            template="(%s::bigint, %s::bigint)",
            fetch=True,
            page_size=max(len(keys), 1),
        )
    return {(rule_id, story_id): alert_id for rule_id, story_id, alert_id in returned}


AlertRow = tuple[AlertRule, int, str, str, str, datetime, datetime, int | None]
"""``(rule, target id, title, evidence JSON, explanation JSON, event received, event
created, story id)``."""


@dataclass(frozen=True, slots=True)
class Inserted:
    """What ``insert_alerts`` did: ``ids`` of the new alerts, in input order; ``taken``:
    ``{(rule id, story id): alert id}`` for the input rows not inserted because their
    rule had already alerted on their story (another worker's committed alert)."""

    ids: list[int]
    taken: dict[tuple[int, int], int] = field(default_factory=dict)


def insert_alerts(
    target: Literal["trend_id", "anomaly_id", "event_id"], firing: list[AlertRow]
) -> Inserted:
    """Insert one alert per row of ``firing`` with consecutive per-team ``seq`` (the
    story id is a trend's ``TrendView.story_id``; None for the other targets).

    Rows with no story: the teams' sequences are taken and advanced by one upsert, then
    one conflict-ignore insert (a ``(rule, target)`` pair already alerted is skipped).
    Rows with a story: the sequences are locked first, which waits for every other
    transaction inserting alerts of those teams to end; then the rule's committed
    alerts of those stories are read, and the rows whose story has one are not inserted
    but reported in ``taken`` (the caller joins them to it); then the rest are inserted
    and the sequences advanced (four statements). The story claim is the constraint
    ``alert_unique_story``; reading it under the sequence lock first keeps a lost race
    from burning a sequence number (a gap a dashboard would wait on).

    An insert that still skips a row (it never should: the evaluation claims, then
    these locks, come first) leaves its ``seq`` unused; logged as
    ``alerts.insert_skipped``.
    """
    if not firing:
        return Inserted([])
    stories = {(rule.id, story_id) for rule, *_, story_id in firing if story_id is not None}
    taken: dict[tuple[int, int], int] = {}
    if stories:
        _lock_seqs({rule.team_id for rule, *_ in firing})
        taken = _story_alerts(stories)
        firing = [row for row in firing if (row[0].id, row[7]) not in taken]
    counts: dict[int, int] = defaultdict(int)
    for rule, *_ in firing:
        counts[rule.team_id] += 1
    if not counts:
        return Inserted([], taken)
    next_seq = _next_seqs(counts)
    now = timezone.now()
    rows = []
    for rule, target_id, title, evidence, explanation, received_at, created_at, story_id in firing:
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
                explanation,
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
                explanation, event_received_at, event_created_at, created_at
            ) VALUES %s
            ON CONFLICT DO NOTHING
            RETURNING id
            """,
            rows,
            template="(%s, %s, %s, %s::bigint, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s)",
            fetch=True,
            page_size=max(len(rows), 1),
        )
    if len(returned) < len(rows):
        log.warning("alerts.insert_skipped", target=target, rows=len(rows), inserted=len(returned))
    return Inserted([row[0] for row in returned], taken)


def _lock_seqs(team_ids: set[int]) -> None:
    """Lock the sequence rows of ``team_ids`` (created when missing), in team order: one
    upsert that changes nothing. Held to the end of the transaction."""
    with connection.cursor() as cursor:
        execute_values(
            cursor.cursor,
            """
            INSERT INTO alerts_alertsequence AS s (team_id, last_seq)
            SELECT v.team_id, 0 FROM (VALUES %s) AS v(team_id) ORDER BY v.team_id
            ON CONFLICT (team_id) DO UPDATE SET last_seq = s.last_seq
            """,
            [(team_id,) for team_id in sorted(team_ids)],
            template="(%s::bigint)",
            page_size=max(len(team_ids), 1),
        )


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
