"""The alerts stage's evaluations: rules fire on new trends, anomalies and posts scored
likely viral, and the alerts are persisted, then pushed; the alerts of a story that
grows, of a prediction that came true and of an anomaly that changed are brought up to
date.

``evaluate_trends`` works on a whole batch of trends with a fixed number of statements,
whatever the batch's size (the claims: ``alerts.claims``):

1. claim the evaluation of each trend (``TrendCheck``: insert, conflict-ignore), so a
   redelivered or racing task evaluates nothing twice;
2. match the teams' enabled rules to the trends (one query for the rules);
3. claim the cooldowns (``RuleTermClaim``: one conditional upsert), in event time: a
   rule alerts on a term of a source once per bucket, and again only ``cooldown_s``
   after the bucket it last alerted on;
4. take each team's next sequence numbers (``AlertSequence``: one UPDATE);
5. explain the alerts (``alerts.explain``: one read for the batch), insert them (one
   conflict-ignore insert), record their deliveries to the rules' channels
   (``alerts.delivery.schedule``), and push them after commit.

Trends, stories and anomalies come from ``mlengine.facade`` as frozen dataclasses; a
trend alert keeps its story's id as a plain value (``Alert.story_id``, from
``TrendView.story_id``), by which the later members of the story find it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import structlog
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from alerts import claims, delivery, explain, lifecycle, push
from alerts.models import Alert, AlertRule, AnomalyCheck
from ingest import virality_reads as ingest_virality_reads
from mlengine import facade
from twiscope import pipeline

log = structlog.get_logger(__name__)


def rule_matches(rule: AlertRule, trend: facade.TrendView) -> bool:
    """Whether ``trend`` passes ``rule``'s filters (source, terms, thresholds). A trend of
    an always-on term that joined no story (``TrendView.always_on``: a busy hour of a
    stream's everyday term) matches only a rule that names its term."""
    return (
        rule.enabled
        and (rule.source_id is None or rule.source_id == trend.source_id)
        and (not rule.terms or trend.term in rule.terms)
        and (not trend.always_on or trend.story_id is not None or trend.term in rule.terms)
        and trend.score >= rule.min_score
        and trend.events >= rule.min_events
        and trend.authors_count >= rule.min_authors
    )


@claims.retry_lock_conflicts
def evaluate_trends(*, trend_ids: Sequence[int]) -> list[int]:
    """Fire the matching rules of each trend's team; return the new alert ids.

    Trends that are gone, or already evaluated, are skipped. A rule alerts on a story
    once (``alert_unique_story``): its members are decided in event-time order, after
    the cooldown claims (``_decide``); a member of a story whose alert exists (stored,
    fired by an earlier member of the batch, or committed meanwhile by another worker)
    updates that alert instead (``_update_story_alerts``). A deadlock or serialization
    failure rolls back and retries the whole batch (exponential backoff with jitter, at
    most ``alerts.claims.RETRY_ATTEMPTS`` tries; then the error propagates and the task
    is redelivered). Side effects after commit: the new alerts are pushed
    (``alert.created``) and the updated ones (``alert.updated``) to their teams'
    WebSocket groups (``alerts.push``), and the trends are marked done for the sweeper.
    """
    trends = facade.trends(trend_ids)
    with transaction.atomic():
        fresh = claims.claim_checks([t.id for t in trends])
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
        firing, joining, waiting = _decide(pairs)
        inserted = _create_alerts(firing)
        created = inserted.ids
        # Another worker's alert of the story committed meanwhile: every member of the
        # batch joins it (its cooldown claim stays spent: the term did alert, in its story).
        joining += [
            (rule, t)
            for rule, t in firing + [m for members in waiting.values() for m in members]
            if (rule.id, t.story_id) in inserted.taken
        ]
        joining.sort(key=lambda pair: (pair[1].evidence_created_at, pair[1].id))
        for (rule_id, story_id), members in waiting.items():
            if (rule_id, story_id) not in inserted.taken:
                log.info(
                    "alerts.story_not_alerted",
                    reason="cooldown",
                    rule_id=rule_id,
                    story_id=story_id,
                    trend_ids=[t.id for _, t in members],
                    terms=[t.term for _, t in members],
                )
        updated = _update_story_alerts(joining)
        if created:
            transaction.on_commit(lambda: push.push_alerts(alert_ids=created))
            delivery.schedule(alert_ids=created, event="alert.created")
        if updated:
            transaction.on_commit(lambda: push.push_updates(alert_ids=updated))
            delivery.schedule(alert_ids=updated, event="alert.updated")
    if created or updated:
        log.info("alerts.fired", alerts=len(created), updated=len(updated))
    return created


Pair = tuple[AlertRule, facade.TrendView]


def _decide(pairs: list[Pair]) -> tuple[list[Pair], list[Pair], dict[tuple[int, int], list[Pair]]]:
    """``(firing, joining, waiting)`` of ``pairs`` (in event-time order), inside the
    caller's transaction.

    A trend with no story fires if it wins its rule's cooldown on its term. The members
    of a story (``TrendView.story_id``) are taken in event-time order, for each rule: a
    member of a story the rule has alerted on (a stored alert, one query) joins it; else
    the member claims the cooldown of its term, and the first that wins fires as the
    story's alert and the members after it join it. The members before it (or all, when
    none won) lost their cooldowns: ``waiting``, by ``(rule id, story id)``, holds them
    while no member fired; a later member, in this batch or a later one, may still fire
    for the story. Two statements for the cooldowns (``alerts.claims.Cooldowns``),
    whatever the number of members.
    """
    keys = {(rule.id, t.story_id) for rule, t in pairs if t.story_id is not None}
    alerted = (
        set(
            Alert.objects.filter(
                rule_id__in={k[0] for k in keys}, story_id__in={k[1] for k in keys}
            ).values_list("rule_id", "story_id")
        )
        if keys
        else set()
    )
    cooldowns = claims.Cooldowns.lock(
        [
            (rule.id, t.source_id, t.term)
            for rule, t in pairs
            if (rule.id, t.story_id) not in alerted
        ]
    )
    firing: list[Pair] = []
    joining: list[Pair] = []
    waiting: dict[tuple[int, int], list[Pair]] = defaultdict(list)
    for rule, t in pairs:
        story = (rule.id, t.story_id) if t.story_id is not None else None
        if story is not None and story in alerted:
            joining.append((rule, t))
        elif cooldowns.claim(rule, t.source_id, t.term, t.bucket_start):
            firing.append((rule, t))
            if story is not None:
                alerted.add(story)
                waiting.pop(story, None)
        elif story is not None:
            waiting[story].append((rule, t))
    cooldowns.save()
    return firing, joining, dict(waiting)


def _update_story_alerts(joining: list[Pair]) -> list[int]:
    """Update each story's alert with the members that joined it (``joining``, in event
    time order); return the ids of the alerts updated. The alerts are locked in id
    order, one UPDATE each.

    The story's terms in ``evidence["story"]`` become the union of the alert's and the
    latest member's (in order of detection); the rest of the story (label, forecast,
    ``updated_by``, ``predicted``) and the title are the latest member's when it is no
    older (event time) than the alert's evidence, so a member that joins late, out of
    order, never takes the story back, and so is the ``explanation``, recomputed for
    that member (``alerts.explain.for_trends``, one read for the batch); ``updated_at``
    is now. An alert at rest
    (resolved, or snoozed) whose story grew past its forecast or doubled re-opens
    (``alerts.lifecycle.escalate``: state, severity, an ``escalated`` activity entry).
    """
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
    latest_events: dict[int, int] = {}
    rules = {rule.id: rule for rule, _ in joining}
    explanations = explain.for_trends(
        [
            (rules[alert.rule_id], latest[(alert.rule_id, alert.story_id)])
            for alert in alerts
            if alert.story_id is not None
            and (alert.rule_id, alert.story_id) in latest
            and latest[(alert.rule_id, alert.story_id)].evidence_created_at
            >= alert.event_created_at
        ]
    )
    for alert in alerts:
        story_id = alert.story_id
        member = latest.get((alert.rule_id, story_id)) if story_id is not None else None
        if member is None:
            continue
        shown = alert.evidence.get("story") or {}
        story = _story(member)
        terms = list(dict.fromkeys([*shown.get("terms", []), *story["terms"]]))
        if member.evidence_created_at >= alert.event_created_at:
            alert.evidence = {**alert.evidence, "story": {**story, "terms": terms}}
            alert.title = _title(member, events=max(member.events, alert.evidence.get("events", 0)))
            alert.explanation = explanations.get((alert.rule_id, member.id), alert.explanation)
        else:
            alert.evidence = {**alert.evidence, "story": {**shown, "terms": terms}}
        alert.updated_at = now
        alert.save(update_fields=["evidence", "title", "explanation", "updated_at"])
        updated.append(alert.id)
        latest_events[alert.id] = member.events
    lifecycle.escalate([a for a in alerts if a.id in latest_events], latest_events, now)
    return updated


def confirm_trends(*, trend_ids: Sequence[int]) -> list[int]:
    """Predicted trends came true: each alert of their stories that still shows a
    prediction is updated (title, ``evidence.story.predicted`` false, its
    ``explanation`` recomputed without the projection, ``updated_at``) and
    pushed as ``alert.updated`` after commit; returns the ids of the alerts updated. A
    redelivered call finds nothing left to update."""
    confirmed = [t for t in facade.trends(trend_ids) if not t.is_prediction]
    if not confirmed:
        return []
    by_story = {t.story_id if t.story_id is not None else t.id: t for t in confirmed}
    updated = []
    now = timezone.now()
    with transaction.atomic():
        alerts = [
            alert
            for alert in Alert.objects.select_for_update(of=("self",))
            .select_related("rule")
            .filter(story_id__in=list(by_story))
            .order_by("id")
            if (alert.evidence.get("story") or {}).get("predicted")
            and alert.story_id is not None
            and alert.story_id in by_story
        ]
        explanations = explain.for_trends(
            [(alert.rule, by_story[alert.story_id]) for alert in alerts if alert.story_id]
        )
        for alert in alerts:
            story = alert.evidence.get("story") or {}
            assert alert.story_id is not None
            trend = by_story[alert.story_id]
            alert.evidence = {
                **alert.evidence,
                "story": {**story, "predicted": False, "prediction": "confirmed"},
            }
            alert.title = _title(trend, events=max(trend.events, alert.evidence.get("events", 0)))
            alert.explanation = explanations.get((alert.rule_id, trend.id), alert.explanation)
            alert.updated_at = now
            alert.save(update_fields=["evidence", "title", "explanation", "updated_at"])
            updated.append(alert.id)
        if updated:
            transaction.on_commit(lambda: push.push_updates(alert_ids=updated))
            delivery.schedule(alert_ids=updated, event="alert.updated")
    return updated


@claims.retry_lock_conflicts
def withdraw_predictions(*, trend_ids: Sequence[int]) -> list[int]:
    """Predictions whose bucket closed without coming true (``TrendView.is_withdrawn``):
    each alert of their stories that still shows a prediction, in a story left with no
    member confirmed and none still open (``facade.story_outcomes``), is updated to "did
    not materialise" (title, ``evidence.story.predicted`` false and ``prediction``
    "withdrawn", ``updated_at``) and pushed as ``alert.updated`` after commit; returns
    the ids of the alerts updated. A redelivered call finds nothing left to update."""
    withdrawn = [t for t in facade.trends(trend_ids) if t.is_withdrawn]
    if not withdrawn:
        return []
    by_story = {t.story_id if t.story_id is not None else t.id: t for t in withdrawn}
    outcomes = facade.story_outcomes(sorted(by_story))
    gone = [key for key in by_story if outcomes.get(key) == "withdrawn"]
    if not gone:
        return []
    updated = []
    now = timezone.now()
    with transaction.atomic():
        alerts = (
            Alert.objects.select_for_update()
            .filter(Q(story_id__in=gone) | Q(story_id__isnull=True, trend_id__in=gone))
            .order_by("id")
        )
        for alert in alerts:
            story = alert.evidence.get("story") or {}
            if not story.get("predicted"):
                continue
            key = alert.story_id if alert.story_id is not None else alert.trend_id
            trend = by_story.get(key) if key is not None else None
            if trend is None:
                continue
            alert.evidence = {
                **alert.evidence,
                "story": {
                    **story,
                    "predicted": False,
                    "prediction": "withdrawn",
                    "withdrawn_at": trend.withdrawn_at.isoformat() if trend.withdrawn_at else None,
                },
            }
            alert.title = _withdrawn_title(alert.title)
            alert.updated_at = now
            alert.save(update_fields=["evidence", "title", "updated_at"])
            updated.append(alert.id)
        if updated:
            transaction.on_commit(lambda: push.push_updates(alert_ids=updated))
            delivery.schedule(alert_ids=updated, event="alert.updated")
    log.info("alerts.predictions_withdrawn", alerts=len(updated), trends=len(withdrawn))
    return updated


PREDICTED_HEAD = "Emerging (predicted)"
WITHDRAWN_HEAD = "Did not materialise"


def _withdrawn_title(title: str) -> str:
    """A prediction's title with its head changed to ``WITHDRAWN_HEAD``."""
    head, sep, rest = title.partition(": ")
    return f"{WITHDRAWN_HEAD}: {rest}" if sep and head == PREDICTED_HEAD else title


def _title(trend: facade.TrendView, *, events: int | None = None) -> str:
    """``Trending: <the story's label> in <source>: <posts> posts (expected <e>),
    <score>σ above baseline``; while the trend is a prediction not yet confirmed,
    ``Emerging (predicted): <label> in <source>: <posts> posts so far, projected <p> by
    the bucket's end (expected <e>), <score>σ``: the figures its score was computed on."""
    label = ", ".join(trend.story_label or (trend.term,))
    if trend.is_prediction and trend.projected is not None:
        return (
            f"{PREDICTED_HEAD}: {label} in {trend.source_name}: {events or trend.events} "
            f"posts so far, projected {trend.projected:.0f} by the bucket's end "
            f"(expected {trend.expected:.1f}), {trend.score:.1f}σ"
        )[:300]
    head = PREDICTED_HEAD if trend.is_prediction else "Trending"
    return (
        f"{head}: {label} in {trend.source_name}: {events or trend.events} posts "
        f"(expected {trend.expected:.1f}), {trend.score:.1f}σ above baseline"
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
        "prediction": trend.prediction,
    }


def _create_alerts(firing: list[Pair]) -> claims.Inserted:
    """Insert one alert per ``(rule, trend)`` with consecutive per-team ``seq``, each with
    its story's id (``alerts.claims.insert_alerts``: a pair whose story the rule alerted
    on meanwhile is not inserted but reported in ``taken``)."""
    explanations = explain.for_trends(firing)
    return claims.insert_alerts(
        "trend_id",
        [
            (
                rule,
                t.id,
                _title(t),
                _evidence(t),
                _json(explanations[(rule.id, t.id)]),
                t.evidence_received_at,
                t.evidence_created_at,
                t.story_id,
            )
            for rule, t in firing
        ],
    )


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _evidence(trend: facade.TrendView) -> str:
    return json.dumps(
        {
            "term": trend.term,
            "events": trend.events,
            "projected": trend.projected,
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


def anomaly_rule_matches(rule: AlertRule, anomaly: facade.AnomalyView) -> bool:
    """Whether ``anomaly`` passes ``rule``'s filters: an enabled "anomaly" rule, of the
    anomaly's source (or every source), whose ``terms`` (when set) hold the anomaly's
    term series' term or one of its watch series' terms (compared case-insensitively:
    watch terms are normalised), whose ``min_score`` the anomaly's peak score reaches,
    and, for a count series (every kind but the negative share), whose ``min_peak`` the
    value at the peak reaches (posts in the peak bucket)."""
    return (
        rule.enabled
        and rule.kind == AlertRule.Kind.ANOMALY
        and (rule.source_id is None or rule.source_id == anomaly.source_id)
        and (not rule.terms or _anomaly_terms_match(rule.terms, anomaly))
        and anomaly.score >= rule.min_score
        and (anomaly.kind == "negative_share" or anomaly.value >= rule.min_peak)
    )


def _anomaly_terms_match(terms: Sequence[str], anomaly: facade.AnomalyView) -> bool:
    if anomaly.kind == "term":
        return anomaly.term in terms
    if anomaly.kind == "watch":
        wanted = {term.lower() for term in terms}
        return not wanted.isdisjoint(term.lower() for term in anomaly.watch_terms)
    return False


@claims.retry_lock_conflicts
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
        firing = claims.claim_and_match(
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
            transaction.on_commit(lambda: push.push_alerts(alert_ids=created))
            delivery.schedule(alert_ids=created, event="alert.created")
    if created:
        log.info("alerts.anomalies_fired", alerts=len(created))
    return created


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
        return f"{value:.1%}"
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _fmt_band(anomaly: facade.AnomalyView) -> str:
    """The band as the title shows it: for a count series the whole counts inside it
    (``ceil(low)`` to ``floor(high)``), so that a value above the band never reads as
    inside it ("2 (expected 0–1)", not "0–2" for a band up to 1.97)."""
    low, high = anomaly.low, anomaly.high
    if anomaly.kind == "negative_share" or low is None or high is None:
        return f"{_fmt(anomaly, low)}–{_fmt(anomaly, high)}"
    return f"{math.ceil(low)}–{math.floor(high)}"


def _anomaly_title(anomaly: facade.AnomalyView) -> str:
    """The anomaly and its band in words: "Anomaly: <series> in <source>: <value> posts
    in <bucket>, expected <low>–<high> (score <score>)", or for the negative share
    "<value> of posts negative in <bucket>, expected <low>–<high> (score <score>)"."""
    per = explain.bucket_words(anomaly.bucket_s)
    what = "of posts negative" if anomaly.kind == "negative_share" else "posts"
    return (
        f"Anomaly: {_series_label(anomaly)} in {anomaly.source_name}: "
        f"{_fmt(anomaly, anomaly.value)} {what} in {per}, expected {_fmt_band(anomaly)} "
        f"(score {anomaly.score:.1f})"
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
    whose evidence or explanation no longer says what the anomaly says is updated
    (title, evidence, ``explanation``, ``updated_at``) and pushed as ``alert.updated``
    after commit; returns the ids of the alerts updated. The alerts are locked in id
    order; a redelivered call finds nothing left to update.

    A peak that rose may now pass a rule that the anomaly did not pass when it opened (a
    burst whose first bucket held 3 posts and its second 40, against ``min_peak`` 5):
    those rules fire now, once per ``(rule, anomaly)`` as ever (``_fire_late``)."""
    found = {a.id: a for a in facade.anomalies(anomaly_ids)}
    if not found:
        return []
    _fire_late(list(found.values()))
    updated = []
    now = timezone.now()
    with transaction.atomic():
        alerts = list(
            Alert.objects.select_for_update(of=("self",))
            .select_related("rule")
            .filter(anomaly_id__in=list(found))
            .order_by("id")
        )
        explanations = explain.for_anomalies(
            [(alert.rule, found[alert.anomaly_id]) for alert in alerts if alert.anomaly_id]
        )
        for alert in alerts:
            assert alert.anomaly_id is not None
            anomaly = found[alert.anomaly_id]
            evidence = json.loads(_anomaly_evidence(anomaly))
            title = _anomaly_title(anomaly)
            explanation = explanations[(alert.rule_id, anomaly.id)]
            if (
                alert.evidence == evidence
                and alert.title == title
                and alert.explanation == explanation
            ):
                continue
            alert.evidence, alert.title, alert.updated_at = evidence, title, now
            alert.explanation = explanation
            alert.save(update_fields=["evidence", "title", "explanation", "updated_at"])
            updated.append(alert.id)
        if updated:
            transaction.on_commit(lambda: push.push_updates(alert_ids=updated))
            delivery.schedule(alert_ids=updated, event="alert.updated")
    return updated


@claims.retry_lock_conflicts
def _fire_late(anomalies: list[facade.AnomalyView]) -> list[int]:
    """Fire the matching "anomaly" rules of ``anomalies`` (grown ones, already evaluated
    when new) that have no alert of them yet; return the new alert ids. A pair already
    alerted is skipped by the insert (``alert_unique_anomaly``). Side effect after
    commit: the new alerts are pushed (``alert.created``)."""
    with transaction.atomic():
        # Only anomalies evaluated when new, and pairs not alerted yet: an insert that
        # skips a pair would leave a gap in the team's sequence.
        checked = set(
            AnomalyCheck.objects.filter(anomaly_id__in=[a.id for a in anomalies]).values_list(
                "anomaly_id", flat=True
            )
        )
        anomalies = [a for a in anomalies if a.id in checked]
        alerted = set(
            Alert.objects.filter(anomaly_id__in=list(checked)).values_list("rule_id", "anomaly_id")
        )
        rules = list(
            AlertRule.objects.filter(
                team_id__in={a.team_id for a in anomalies},
                enabled=True,
                kind=AlertRule.Kind.ANOMALY,
            ).order_by("id")
        )
        firing = [
            (rule, a)
            for a in sorted(anomalies, key=lambda a: (a.evidence_created_at, a.id))
            for rule in rules
            if rule.team_id == a.team_id
            and (rule.id, a.id) not in alerted
            and anomaly_rule_matches(rule, a)
        ]
        if not firing:
            return []
        created = _create_anomaly_alerts(firing)
        if created:
            transaction.on_commit(lambda: push.push_alerts(alert_ids=created))
            delivery.schedule(alert_ids=created, event="alert.created")
    if created:
        log.info("alerts.anomalies_fired_late", alerts=len(created))
    return created


def _create_anomaly_alerts(firing: list[tuple[AlertRule, facade.AnomalyView]]) -> list[int]:
    """Insert one alert per ``(rule, anomaly)`` with consecutive per-team ``seq``; return
    their ids (one statement; a pair already alerted is skipped)."""
    explanations = explain.for_anomalies(firing)
    return claims.insert_alerts(
        "anomaly_id",
        [
            (
                rule,
                a.id,
                _anomaly_title(a),
                _anomaly_evidence(a),
                _json(explanations[(rule.id, a.id)]),
                a.evidence_received_at,
                a.evidence_created_at,
                None,
            )
            for rule, a in firing
        ],
    ).ids


def viral_rule_matches(rule: AlertRule, post: ingest_virality_reads.ScoredPost) -> bool:
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


@claims.retry_lock_conflicts
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
    posts = ingest_virality_reads.scored_posts(event_ids)  # in event-time order
    with transaction.atomic():
        pairs = claims.claim_and_match(
            AlertRule.Kind.VIRAL_POST,
            ("alerts_viralcheck", "event_id", "viral"),
            event_ids,
            posts,
            viral_rule_matches,
        )
        if not pairs:
            return []
        won = claims.claim_cooldowns(
            [
                (rule, p.source_id, f"author:{p.author or p.id}", p.created_at, p.id)
                for rule, p in pairs
            ]
        )
        winners = [(rule, p) for rule, p in pairs if (rule.id, p.id) in won]
        explanations = explain.for_posts(winners)
        created = claims.insert_alerts(
            "event_id",
            [
                (
                    rule,
                    p.id,
                    _viral_title(p),
                    _viral_evidence(p),
                    _json(explanations[(rule.id, p.id)]),
                    p.received_at,
                    p.created_at,
                    None,
                )
                for rule, p in winners
            ],
        ).ids
        if created:
            transaction.on_commit(lambda: push.push_alerts(alert_ids=created))
            delivery.schedule(alert_ids=created, event="alert.created")
    if created:
        log.info("alerts.viral_fired", alerts=len(created))
    return created


def _viral_title(post: ingest_virality_reads.ScoredPost) -> str:
    """ "Likely viral (<P>%): <author> in <source>: “<text>”"."""
    text = " ".join(post.text.split())
    if len(text) > 120:
        text = text[:119] + "…"
    return (
        f"Likely viral ({post.virality_score:.0%}): {post.author_label or 'unknown author'} "
        f"in {post.source_name}: “{text}”"
    )[:300]


def _viral_evidence(post: ingest_virality_reads.ScoredPost) -> str:
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
