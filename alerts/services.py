"""Writes of the alerts stage: rules fire on new trends, alerts are persisted, then pushed.

``evaluate_trends`` works on a whole batch of trends with a fixed number of statements,
whatever the batch's size:

1. claim the evaluation of each trend (``TrendCheck``: insert, conflict-ignore), so a
   redelivered or racing task evaluates nothing twice;
2. match the teams' enabled rules to the trends (one query for the rules);
3. claim the cooldowns (``RuleTermClaim``: one conditional upsert), in event time: a
   rule alerts on a term of a source once per bucket, and again only ``cooldown_s``
   after the bucket it last alerted on;
4. take each team's next sequence numbers (``AlertSequence``: one UPDATE);
5. insert the alerts (one conflict-ignore insert) and push them after commit.

Locks are always taken in one global order (trend checks by trend id, then claims by
rule, source, term, then sequences by team), so concurrent alert workers cannot
deadlock each other; a deadlock or serialization failure with anything else is retried
with backoff, never dropped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
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

from alerts import push
from alerts.models import Alert, AlertRule, AlertSequence, AnomalyCheck, TrendCheck, ViralCheck
from ingest import selectors as ingest_selectors
from mlengine import facade
from teams.models import Team
from twiscope import pipeline

log = structlog.get_logger(__name__)

DEFAULT_RULE_NAME = "New trend"
RETRY_ATTEMPTS = 8
SWEEP_LIMIT = 5000


def ensure_default_rule(team: Team) -> AlertRule:
    """The team-wide "New trend" rule: every detected trend alerts once per term a day."""
    rule, _ = AlertRule.objects.get_or_create(
        team=team,
        name=DEFAULT_RULE_NAME,
        defaults={"kind": AlertRule.Kind.NEW_TREND, "cooldown_s": 24 * 3600},
    )
    return rule


def rule_matches(rule: AlertRule, trend: facade.TrendView) -> bool:
    """Whether ``trend`` passes ``rule``'s filters (source, terms, thresholds)."""
    return (
        rule.enabled
        and (rule.source_id is None or rule.source_id == trend.source_id)
        and (not rule.terms or trend.term in rule.terms)
        and trend.score >= rule.min_score
        and trend.events >= rule.min_events
        and trend.authors_count >= rule.min_authors
    )


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


@retry_lock_conflicts
def evaluate_trends(*, trend_ids: Sequence[int]) -> list[int]:
    """Fire the matching rules of each trend's team; return the new alert ids.

    Trends that are gone, or already evaluated, are skipped. A deadlock or
    serialization failure rolls back and retries the whole batch (exponential backoff
    with jitter, at most ``RETRY_ATTEMPTS`` tries; then the error propagates and the
    task is redelivered). Side effects after commit: the new alerts are pushed to their
    teams' WebSocket groups (``alerts.push``), and the trends are marked done for the
    sweeper.
    """
    trends = facade.trends(trend_ids)
    with transaction.atomic():
        fresh = _claim_checks([t.id for t in trends])
        transaction.on_commit(lambda: pipeline.mark_done("alerts", trend_ids))
        trends = [t for t in trends if t.id in fresh]
        if not trends:
            return []
        rules_by_team: dict[int, list[AlertRule]] = defaultdict(list)
        for rule in AlertRule.objects.filter(
            team_id__in={t.team_id for t in trends},
            enabled=True,
            kind=AlertRule.Kind.NEW_TREND,
        ).order_by("id"):
            rules_by_team[rule.team_id].append(rule)
        pairs = [
            (rule, trend)
            for trend in sorted(trends, key=lambda t: (t.evidence_created_at, t.id))
            for rule in rules_by_team[trend.team_id]
            if rule_matches(rule, trend)
        ]
        pairs, joining = _split_story_members(pairs)
        won = _claim_cooldowns(
            [(rule, t.source_id, t.term, t.bucket_start, t.id) for rule, t in pairs]
        )
        firing = [(rule, trend) for rule, trend in pairs if (rule.id, trend.id) in won]
        created = _create_alerts(firing)
        updated = _update_story_alerts(joining)
        if created:
            transaction.on_commit(lambda: _push(created))
        if updated:
            transaction.on_commit(lambda: push.push_updates(alert_ids=updated))
    if created or updated:
        log.info("alerts.fired", alerts=len(created), updated=len(updated))
    return created


def _split_story_members(
    pairs: list[tuple[AlertRule, facade.TrendView]],
) -> tuple[list[tuple[AlertRule, facade.TrendView]], list[tuple[AlertRule, facade.TrendView]]]:
    """``(pairs that may fire, pairs that update their story's alert)``.

    A later member of a story (``TrendView.joins_story``) updates the alert its rule
    gave the story, when there is one (stored, or firing in this batch from an earlier
    member); else it may fire, as the story's first alert for that rule.
    """
    stories = {t.story_id for _, t in pairs if t.joins_story}
    alerted = set(
        Alert.objects.filter(
            rule_id__in={r.id for r, _ in pairs}, story_id__in=stories
        ).values_list("rule_id", "story_id")
    )
    may_fire, joining = [], []
    for rule, trend in pairs:
        key = (rule.id, trend.story_id if trend.story_id is not None else trend.id)
        if trend.joins_story and key in alerted:
            joining.append((rule, trend))
        else:
            may_fire.append((rule, trend))
            alerted.add(key)
    return may_fire, joining


def _update_story_alerts(joining: list[tuple[AlertRule, facade.TrendView]]) -> list[int]:
    """Update each story's alert with the member that joined it (the story's terms,
    label and forecast in ``evidence["story"]``, the title, ``updated_at``); return the
    ids of the alerts updated. The alerts are locked in id order."""
    if not joining:
        return []
    latest: dict[tuple[int, int], facade.TrendView] = {}
    for rule, trend in joining:  # in event-time order: the last member has them all
        assert trend.story_id is not None
        latest[(rule.id, trend.story_id)] = trend
    alerts = list(
        Alert.objects.select_for_update()
        .filter(rule_id__in={k[0] for k in latest}, story_id__in={k[1] for k in latest})
        .order_by("id")
    )
    now = timezone.now()
    updated = []
    for alert in alerts:
        story_id = alert.story_id
        member = latest.get((alert.rule_id, story_id)) if story_id is not None else None
        if member is None:
            continue
        alert.evidence = {**alert.evidence, "story": _story(member)}
        alert.title = _title(member, events=max(member.events, alert.evidence.get("events", 0)))
        alert.updated_at = now
        alert.save(update_fields=["evidence", "title", "updated_at"])
        updated.append(alert.id)
    return updated


def confirm_trends(*, trend_ids: Sequence[int]) -> list[int]:
    """Predicted trends came true: each alert of their stories that still shows a
    prediction is updated (title, ``evidence.story.predicted`` false, ``updated_at``) and
    pushed as ``alert.updated`` after commit; returns the ids of the alerts updated. A
    redelivered call finds nothing left to update."""
    confirmed = [t for t in facade.trends(trend_ids) if not t.is_prediction]
    if not confirmed:
        return []
    by_story = {t.story_id if t.story_id is not None else t.id: t for t in confirmed}
    updated = []
    now = timezone.now()
    with transaction.atomic():
        alerts = (
            Alert.objects.select_for_update().filter(story_id__in=list(by_story)).order_by("id")
        )
        for alert in alerts:
            story = alert.evidence.get("story") or {}
            if not story.get("predicted"):
                continue
            story_id = alert.story_id
            trend = by_story.get(story_id) if story_id is not None else None
            if trend is None:
                continue
            alert.evidence = {**alert.evidence, "story": {**story, "predicted": False}}
            alert.title = _title(trend, events=max(trend.events, alert.evidence.get("events", 0)))
            alert.updated_at = now
            alert.save(update_fields=["evidence", "title", "updated_at"])
            updated.append(alert.id)
        if updated:
            transaction.on_commit(lambda: push.push_updates(alert_ids=updated))
    return updated


def _push(alert_ids: list[int]) -> None:
    push.push_alerts(alert_ids=alert_ids)


def _claim_checks(trend_ids: list[int]) -> set[int]:
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


def _claim_cooldowns(firings: list[Cooldown]) -> set[tuple[int, int]]:
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


def _title(trend: facade.TrendView, *, events: int | None = None) -> str:
    """``Trending: <the story's label> in <source>: <posts>, <score>σ above baseline``;
    ``Emerging (predicted): …`` while the trend is a prediction not yet confirmed."""
    label = ", ".join(trend.story_label or (trend.term,))
    head = "Emerging (predicted)" if trend.is_prediction else "Trending"
    return (
        f"{head}: {label} in {trend.source_name}: {events or trend.events} posts, "
        f"{trend.score:.1f}σ above baseline"
    )[:300]


def _story(trend: facade.TrendView) -> dict[str, Any]:
    """The story part of an alert's evidence."""
    return {
        "id": trend.story_id if trend.story_id is not None else trend.id,
        "label": list(trend.story_label or (trend.term,)),
        "terms": list(trend.story_terms or (trend.term,)),
        "forecast": trend.forecast,
        "updated_by": trend.term,
        "predicted": trend.is_prediction,
    }


def _create_alerts(firing: list[tuple[AlertRule, facade.TrendView]]) -> list[int]:
    """Insert one alert per ``(rule, trend)`` with consecutive per-team ``seq``; return
    their ids (one statement; a pair already alerted is skipped)."""
    return _insert_alerts(
        "trend_id",
        [
            (
                rule,
                t.id,
                _title(t),
                _evidence(t),
                t.evidence_received_at,
                t.evidence_created_at,
                t.story_id,
            )
            for rule, t in firing
        ],
    )


def _insert_alerts(
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


def _evidence(trend: facade.TrendView) -> str:
    return json.dumps(
        {
            "term": trend.term,
            "events": trend.events,
            "expected": trend.expected,
            "score": trend.score,
            "authors_count": trend.authors_count,
            "velocity": trend.velocity,
            "bucket_start": trend.bucket_start.isoformat(),
            "bucket_s": trend.bucket_s,
            "detected_event_time": trend.evidence_created_at.isoformat(),
            "source": {"id": trend.source_id, "name": trend.source_name},
            "sample_event_ids": list(trend.sample_event_ids),
            "story": _story(trend),
        },
        ensure_ascii=False,
    )


def sweep(*, older_than_s: float) -> dict[str, int]:
    """Re-send trends and anomalies detected over ``older_than_s`` ago (within a day),
    and scored posts (``viral:<id>`` records) that long ago, that no rule evaluation
    claimed and that are really stuck (``twiscope.pipeline.stuck``); bring up to date
    the alerts a lost confirmation or anomaly update left stale; push alerts persisted
    that long ago but never pushed. Returns the counts."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=older_than_s)
    detected = facade.trend_ids_detected_before(
        cutoff, since=now - timedelta(days=1), limit=SWEEP_LIMIT
    )
    checked = set(
        TrendCheck.objects.filter(trend_id__in=detected).values_list("trend_id", flat=True)
    )
    unchecked = [trend_id for trend_id in detected if trend_id not in checked]
    resend = [int(m) for m in pipeline.stuck("alerts", unchecked, older_than_s=older_than_s)]
    with transaction.atomic():
        for i in range(0, len(resend), 250):
            chunk = resend[i : i + 250]
            pipeline.send("alerts", items=chunk, trend_ids=chunk)
    pipeline.mark_done("alerts", [t for t in detected if t in checked])
    anomalies = _sweep_anomalies(now, cutoff, older_than_s)
    viral = _sweep_viral(older_than_s)
    stale = _sweep_stale_alerts(now, cutoff)
    unpushed = list(
        Alert.objects.filter(pushed_at__isnull=True, created_at__lt=cutoff).values_list(
            "id", flat=True
        )[:SWEEP_LIMIT]
    )
    if unpushed:
        _push(unpushed)
    swept = {
        "trends": len(resend),
        "anomalies": anomalies,
        "viral_posts": viral,
        "alerts_updated": stale,
        "alerts_pushed": len(unpushed),
    }
    if any(swept.values()):
        log.warning("alerts.swept", **swept)
    return swept


def anomaly_rule_matches(rule: AlertRule, anomaly: facade.AnomalyView) -> bool:
    """Whether ``anomaly`` passes ``rule``'s filters: an enabled "anomaly" rule, of the
    anomaly's source (or every source), whose ``terms`` (when set) hold the anomaly's
    term series' term or one of its watch series' terms (compared case-insensitively:
    watch terms are normalised), and whose ``min_score`` the anomaly's peak score
    reaches."""
    return (
        rule.enabled
        and rule.kind == AlertRule.Kind.ANOMALY
        and (rule.source_id is None or rule.source_id == anomaly.source_id)
        and (not rule.terms or _anomaly_terms_match(rule.terms, anomaly))
        and anomaly.score >= rule.min_score
    )


def _anomaly_terms_match(terms: Sequence[str], anomaly: facade.AnomalyView) -> bool:
    if anomaly.kind == "term":
        return anomaly.term in terms
    if anomaly.kind == "watch":
        wanted = {term.lower() for term in terms}
        return not wanted.isdisjoint(term.lower() for term in anomaly.watch_terms)
    return False


@retry_lock_conflicts
def evaluate_anomalies(*, anomaly_ids: Sequence[int]) -> list[int]:
    """Fire the matching "anomaly" rules of each anomaly's team; return the new alert ids.

    Anomalies that are gone, or already evaluated (``AnomalyCheck``), are skipped; each
    ``(rule, anomaly)`` alerts once (``alert_unique_anomaly``), with the team's next
    ``seq``. Lock conflicts are retried as in ``evaluate_trends``. Side effects after
    commit: the new alerts are pushed (``alerts.push.push_alerts``: ``alert.created``),
    and the anomalies are marked done for the sweeper (items ``anomaly:<id>``).
    """
    found = facade.anomalies(anomaly_ids)
    with transaction.atomic():
        firing = _claim_and_match(
            AlertRule.Kind.ANOMALY,
            ("alerts_anomalycheck", "anomaly_id", "anomaly"),
            anomaly_ids,
            sorted(found, key=lambda a: (a.evidence_created_at, a.id)),
            anomaly_rule_matches,
        )
        if not firing:
            return []
        created = _create_anomaly_alerts(firing)
        if created:
            transaction.on_commit(lambda: _push(created))
    if created:
        log.info("alerts.anomalies_fired", alerts=len(created))
    return created


class _Evaluated(Protocol):
    """What ``_claim_and_match`` reads of an anomaly or a scored post."""

    @property
    def id(self) -> int: ...

    @property
    def team_id(self) -> int: ...


E = TypeVar("E", bound=_Evaluated)
CheckTable = tuple[Literal["alerts_anomalycheck", "alerts_viralcheck"], str, str]
"""``(check table, its id column, dispatch record prefix)`` of an evaluated kind."""


def _claim_and_match(
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


def _series_label(anomaly: facade.AnomalyView) -> str:
    if anomaly.kind == "term":
        return f"{anomaly.term} volume"
    if anomaly.kind == "watch":
        return f"watch {anomaly.watch_name} volume"
    return "negative share" if anomaly.kind == "negative_share" else "post volume"


def _fmt(anomaly: facade.AnomalyView, value: float | None) -> str:
    if value is None:
        return "?"
    if anomaly.kind == "negative_share":
        return f"{value:.0%}"
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _anomaly_title(anomaly: facade.AnomalyView) -> str:
    """ "Anomaly: <series> in <source>: <value> (expected <low>–<high>), <score>σ"."""
    return (
        f"Anomaly: {_series_label(anomaly)} in {anomaly.source_name}: "
        f"{_fmt(anomaly, anomaly.value)} (expected {_fmt(anomaly, anomaly.low)}–"
        f"{_fmt(anomaly, anomaly.high)}), {anomaly.score:.1f}σ"
    )[:300]


def _series_evidence(anomaly: facade.AnomalyView) -> dict[str, Any]:
    """``{"kind", "term"}``, and for a watch series ``"watch": {"id", "name"}``."""
    series: dict[str, Any] = {"kind": anomaly.kind, "term": anomaly.term}
    if anomaly.kind == "watch":
        series["watch"] = {"id": anomaly.watch_id, "name": anomaly.watch_name}
    return series


def _anomaly_evidence(anomaly: facade.AnomalyView) -> str:
    return json.dumps(
        {
            "anomaly": anomaly.id,
            "series": _series_evidence(anomaly),
            "window_start": anomaly.window_start.isoformat(),
            "window_end": anomaly.window_end.isoformat(),
            "bucket_s": anomaly.bucket_s,
            "peak_at": anomaly.peak_at.isoformat(),
            "score": anomaly.score,
            "value": anomaly.value,
            "expected": anomaly.expected,
            "low": anomaly.low,
            "high": anomaly.high,
            "detected_event_time": anomaly.evidence_created_at.isoformat(),
            "closed": anomaly.closed,
            "source": {"id": anomaly.source_id, "name": anomaly.source_name},
        },
        ensure_ascii=False,
    )


def update_anomaly_alerts(*, anomaly_ids: Sequence[int]) -> list[int]:
    """Anomalies whose window grew, whose peak rose, or that closed: each of their alerts
    whose evidence no longer says what the anomaly says is updated (title, evidence,
    ``updated_at``) and pushed as ``alert.updated`` after commit; returns the ids of
    the alerts updated. The alerts are locked in id order; a redelivered call finds
    nothing left to update."""
    found = {a.id: a for a in facade.anomalies(anomaly_ids)}
    if not found:
        return []
    updated = []
    now = timezone.now()
    with transaction.atomic():
        for alert in (
            Alert.objects.select_for_update().filter(anomaly_id__in=list(found)).order_by("id")
        ):
            assert alert.anomaly_id is not None
            anomaly = found[alert.anomaly_id]
            evidence = json.loads(_anomaly_evidence(anomaly))
            title = _anomaly_title(anomaly)
            if alert.evidence == evidence and alert.title == title:
                continue
            alert.evidence, alert.title, alert.updated_at = evidence, title, now
            alert.save(update_fields=["evidence", "title", "updated_at"])
            updated.append(alert.id)
        if updated:
            transaction.on_commit(lambda: push.push_updates(alert_ids=updated))
    return updated


def _sweep_stale_alerts(now: datetime, cutoff: datetime) -> int:
    """Bring up to date the alerts created within a day and before ``cutoff`` that a lost
    update left behind: a prediction whose trend was confirmed (``confirm_trends``) and
    an anomaly that grew or closed since (``update_anomaly_alerts``); returns how many
    alerts it updated."""
    recent = Alert.objects.filter(created_at__gte=now - timedelta(days=1), created_at__lt=cutoff)
    predicted_stories = {
        story_id if story_id is not None else trend_id
        for trend_id, story_id in recent.filter(
            trend_id__isnull=False, evidence__story__predicted=True
        ).values_list("trend_id", "story_id")[:SWEEP_LIMIT]
    }
    updated = confirm_trends(trend_ids=facade.confirmed_trend_ids(sorted(predicted_stories)))
    anomalies = list(
        recent.filter(anomaly__isnull=False, evidence__closed=False).values_list(
            "anomaly_id", flat=True
        )[:SWEEP_LIMIT]
    )
    updated += update_anomaly_alerts(anomaly_ids=anomalies) if anomalies else []
    return len(updated)


def _create_anomaly_alerts(firing: list[tuple[AlertRule, facade.AnomalyView]]) -> list[int]:
    """Insert one alert per ``(rule, anomaly)`` with consecutive per-team ``seq``; return
    their ids (one statement; a pair already alerted is skipped)."""
    return _insert_alerts(
        "anomaly_id",
        [
            (
                rule,
                a.id,
                _anomaly_title(a),
                _anomaly_evidence(a),
                a.evidence_received_at,
                a.evidence_created_at,
                None,
            )
            for rule, a in firing
        ],
    )


def _sweep_anomalies(now: datetime, cutoff: datetime, older_than_s: float) -> int:
    """Re-send anomalies detected before ``cutoff`` (within a day) that no evaluation
    claimed and that are really stuck; returns how many."""
    detected = facade.anomaly_ids_detected_before(
        cutoff, since=now - timedelta(days=1), limit=SWEEP_LIMIT
    )
    checked = set(
        AnomalyCheck.objects.filter(anomaly_id__in=detected).values_list("anomaly_id", flat=True)
    )
    pipeline.mark_done("alerts", [f"anomaly:{i}" for i in detected if i in checked])
    unchecked = [i for i in detected if i not in checked]
    return _resend_stuck("anomaly", "anomalies", "anomaly_ids", unchecked, older_than_s)


def _resend_stuck(prefix: str, task: str, kwarg: str, ids: list[int], older_than_s: float) -> int:
    """Send ``task`` again, 250 ids at a time as ``kwarg``, for the ids whose dispatch
    records (``<prefix>:<id>``) say they are really stuck (``twiscope.pipeline.stuck``);
    returns how many were sent."""
    items = [f"{prefix}:{i}" for i in ids]
    resend = [
        int(m.partition(":")[2]) for m in pipeline.stuck("alerts", items, older_than_s=older_than_s)
    ]
    with transaction.atomic():
        for i in range(0, len(resend), 250):
            chunk = resend[i : i + 250]
            ids_kwarg: dict[str, Any] = {kwarg: chunk}
            pipeline.send("alerts", items=[f"{prefix}:{e}" for e in chunk], task=task, **ids_kwarg)
    return len(resend)


def viral_rule_matches(rule: AlertRule, post: ingest_selectors.ScoredPost) -> bool:
    """Whether ``post`` passes ``rule``'s filters: an enabled "viral_post" rule, of the
    post's source (or every source), whose ``terms`` (when set) share one with the post's
    (case-insensitive), and whose ``min_score`` the post's P(viral) reaches."""
    wanted = {term.lower() for term in rule.terms}
    return (
        rule.enabled
        and rule.kind == AlertRule.Kind.VIRAL_POST
        and (rule.source_id is None or rule.source_id == post.source_id)
        and (not wanted or not wanted.isdisjoint(term.lower() for term in post.terms))
        and post.virality_score >= rule.min_score
    )


@retry_lock_conflicts
def evaluate_viral(*, event_ids: Sequence[int]) -> list[int]:
    """Fire the matching "viral_post" rules of each scored post's team; return the new
    alert ids.

    Posts that are gone, unscored, or already evaluated (``ViralCheck``) are skipped. A
    rule alerts on an author of a source once per ``cooldown_s`` of event time (the
    claim ``RuleTermClaim`` keyed "author:<key>"; a post with no author key is its own
    key), and on a post once (``alert_unique_event``), with the team's next ``seq``.
    Lock conflicts are retried as in ``evaluate_trends``. Side effects after commit: the
    new alerts are pushed (``alert.created``), the posts' dispatch records (items
    ``viral:<id>``) are marked done.
    """
    posts = ingest_selectors.scored_posts(event_ids)  # in event-time order
    with transaction.atomic():
        pairs = _claim_and_match(
            AlertRule.Kind.VIRAL_POST,
            ("alerts_viralcheck", "event_id", "viral"),
            event_ids,
            posts,
            viral_rule_matches,
        )
        if not pairs:
            return []
        won = _claim_cooldowns(
            [
                (rule, p.source_id, f"author:{p.author or p.id}", p.created_at, p.id)
                for rule, p in pairs
            ]
        )
        created = _insert_alerts(
            "event_id",
            [
                (
                    rule,
                    p.id,
                    _viral_title(p),
                    _viral_evidence(p),
                    p.received_at,
                    p.created_at,
                    None,
                )
                for rule, p in pairs
                if (rule.id, p.id) in won
            ],
        )
        if created:
            transaction.on_commit(lambda: _push(created))
    if created:
        log.info("alerts.viral_fired", alerts=len(created))
    return created


def _viral_title(post: ingest_selectors.ScoredPost) -> str:
    """ "Likely viral (<P>%): <author> in <source>: “<text>”"."""
    text = " ".join(post.text.split())
    if len(text) > 120:
        text = text[:119] + "…"
    return (
        f"Likely viral ({post.virality_score:.0%}): {post.author_label or 'unknown author'} "
        f"in {post.source_name}: “{text}”"
    )[:300]


def _viral_evidence(post: ingest_selectors.ScoredPost) -> str:
    return json.dumps(
        {
            "event": post.id,
            "virality_score": post.virality_score,
            "virality_model": post.virality_model,
            "author": post.author_label,
            "text": post.text[:1000],
            "url": post.url,
            "terms": list(post.terms[:20]),
            "detected_event_time": post.created_at.isoformat(),
            "source": {"id": post.source_id, "name": post.source_name},
        },
        ensure_ascii=False,
    )


def _sweep_viral(older_than_s: float) -> int:
    """Re-send the scored posts whose dispatch record (``viral:<id>``, written before
    their scores committed) is over ``older_than_s`` old, that no evaluation claimed,
    and that are really stuck; mark the claimed ones done. Returns how many."""
    items = pipeline.recorded(
        "alerts", prefix="viral:", older_than_s=older_than_s, limit=SWEEP_LIMIT
    )
    ids = [int(item.partition(":")[2]) for item in items]
    checked = set(ViralCheck.objects.filter(event_id__in=ids).values_list("event_id", flat=True))
    pipeline.mark_done("alerts", [f"viral:{i}" for i in ids if i in checked])
    unchecked = [i for i in ids if i not in checked]
    return _resend_stuck("viral", "viral", "event_ids", unchecked, older_than_s)


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


def team_sequences(team_ids: Sequence[int]) -> dict[int, int]:
    """The last alert sequence number of each of ``team_ids`` (0 when none yet)."""
    seqs = dict(
        AlertSequence.objects.filter(team_id__in=list(team_ids)).values_list("team_id", "last_seq")
    )
    return {team_id: seqs.get(team_id, 0) for team_id in team_ids}
