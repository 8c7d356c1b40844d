"""The why of every alert: its ``explanation``, computed in the pipeline when the alert
fires and when its story or anomaly changes, never in a request.

An explanation is a JSON object (``Alert.explanation``; the API documents it as
``alerts.api.serializers.ExplanationSerializer``):

- ``measure``: what crossed, in words ("posts per 15 min holding 'evacuation'"); a
  prediction's says it is projected to the bucket's end;
- ``value``, ``baseline``, ``threshold``: the measure at the alert, what was expected,
  and the least value that would have alerted (same unit as ``value``); a prediction
  also has ``so_far`` (posts counted at detection) and ``projected`` (its ``value``);
- ``score`` and ``score_kind`` ("σ" for trends, "robust z" for anomalies, "P(viral)"
  for viral posts);
- ``window``: ``{"start", "end"}``, ISO 8601 UTC, event time;
- ``series``: the measure over the last ``SERIES_BUCKETS`` buckets, oldest first,
  ``[{"t", "value", "baseline"}]`` (``t`` the bucket's start); its last point is the
  alert's bucket and carries ``value``, the figure the detector decided on;
- ``top_terms``: up to 10 ``{"term", "count"}`` of the window's posts;
- ``top_authors``: up to 5 ``{"handle", "posts", "share"}`` (``share`` of the window's
  posts, 0–1, rounded down);
- ``evidence``: up to 5 posts ``{"event", "text", "author", "created_at", "why"}``,
  ``why`` one of ``first``, ``most_engaged``, ``latest``; ``event`` is the id in
  ``/api/events/``.

Each ``for_*`` function explains a batch of ``(rule, subject)`` pairs with one read
(``ingest.selectors.explain_windows``: two queries), whatever the batch's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from alerts.models import AlertRule
from ingest import selectors as ingest_selectors
from ingest import virality_reads as ingest_virality_reads
from mlengine import facade

SERIES_BUCKETS = 24
"""Buckets in an explanation's series (the trend detector's baseline: 24 buckets)."""

VIRAL_BUCKET_S = 900
"""The bucket of a viral post's series, in seconds (the trend detector's)."""

EVIDENCE_MAX = 5
TEXT_MAX = 500

Explanation = dict[str, Any]


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def bucket_words(bucket_s: int) -> str:
    """``bucket_s`` (seconds) in words, as titles and measures say it: "15 min", "1 h"."""
    if bucket_s % 3600 == 0:
        return f"{bucket_s // 3600} h"
    if bucket_s % 60 == 0:
        return f"{bucket_s // 60} min"
    return f"{bucket_s} s"


def _bucket_floor(moment: datetime, bucket_s: int) -> datetime:
    epoch = int(moment.timestamp()) // bucket_s * bucket_s
    return datetime.fromtimestamp(epoch, tz=UTC)


def _series_since(last: datetime, bucket_s: int) -> datetime:
    return last - timedelta(seconds=bucket_s * (SERIES_BUCKETS - 1))


def _series(
    reads: ingest_selectors.ExplainReads,
    last: datetime,
    bucket_s: int,
    value: float,
    baseline: float | None,
    *,
    measure: str = "events",
) -> list[dict[str, Any]]:
    """``SERIES_BUCKETS`` points ending at the bucket starting at ``last``; each bucket's
    figure by ``measure`` ("events", "negative_share" or "max_virality"; None where a
    share or a score has no post to stand on); the last point carries ``value``."""
    points = []
    for i in range(SERIES_BUCKETS):
        start = last - timedelta(seconds=bucket_s * (SERIES_BUCKETS - 1 - i))
        bucket = reads.buckets.get(int(start.timestamp()))
        figure: float | None
        if measure == "negative_share":
            figure = bucket.negative / bucket.labelled if bucket and bucket.labelled else None
        elif measure == "max_virality":
            figure = bucket.max_virality if bucket else None
        else:
            figure = float(bucket.events) if bucket else 0.0
        points.append({"t": _iso(start), "value": _round(figure), "baseline": _round(baseline)})
    points[-1]["value"] = _round(value)
    return points


def _common(reads: ingest_selectors.ExplainReads) -> dict[str, Any]:
    """``top_terms``, ``top_authors`` and ``evidence`` of a window's reads."""
    total = reads.posts
    return {
        "top_terms": [{"term": term, "count": n} for term, n in reads.top_terms[:10]],
        "top_authors": [
            {
                "handle": handle,
                "posts": n,
                "share": math.floor(n / total * 10_000) / 10_000 if total else 0.0,
            }
            for handle, n in reads.top_authors[:5]
        ],
        "evidence": [_post(p) for p in reads.evidence[:EVIDENCE_MAX]],
    }


def _post(post: ingest_selectors.ExplainPost) -> dict[str, Any]:
    return {
        "event": post.id,
        "text": post.text[:TEXT_MAX],
        "author": post.author,
        "created_at": _iso(post.created_at),
        "why": post.why,
    }


def trend_threshold(rule: AlertRule, trend: facade.TrendView) -> float:
    """The least posts in the trend's bucket that would have alerted: the count whose
    score reaches the larger of the detector's and the rule's least score (``score =
    (posts − expected) / sqrt(expected + 1)``), and at least the detector's and the
    rule's least events."""
    sigmas = max(facade.TREND_MIN_SCORE, rule.min_score)
    by_score = trend.expected + sigmas * math.sqrt(trend.expected + 1.0)
    return float(max(math.ceil(by_score), facade.TREND_MIN_EVENTS, rule.min_events))


def for_trends(
    pairs: Sequence[tuple[AlertRule, facade.TrendView]],
) -> dict[tuple[int, int], Explanation]:
    """The explanation of each ``(rule, trend)``, by ``(rule id, trend id)``: the posts
    per bucket holding the trend's term (a story's alert is explained by the member
    that last updated it); the window is the trend's bucket, its posts stored so far
    (as ``TrendView.events`` counts them). A prediction's ``value`` is its projected count, with
    ``so_far`` and ``projected``. One read for the batch."""
    trends = {t.id: t for _, t in pairs}
    reads = ingest_selectors.explain_windows(
        [
            ingest_selectors.ExplainWindow(
                key=str(t.id),
                source_id=t.source_id,
                terms=(t.term,),
                series_since=_series_since(t.bucket_start, t.bucket_s),
                start=t.bucket_start,
                until=t.bucket_start + timedelta(seconds=t.bucket_s, microseconds=-1),
                bucket_s=t.bucket_s,
            )
            for t in trends.values()
        ]
    )
    out = {}
    for rule, t in pairs:
        predicted = t.is_prediction and t.projected is not None
        value = float(t.projected) if predicted and t.projected is not None else float(t.events)
        measure = f"posts per {bucket_words(t.bucket_s)} holding '{t.term}' in {t.source_name}"
        if predicted:
            measure += ", projected to the bucket's end"
        explanation: Explanation = {
            "measure": measure,
            "value": _round(value),
            "baseline": _round(t.expected),
            "threshold": trend_threshold(rule, t),
            "score": _round(t.score),
            "score_kind": "σ",
            "window": {
                "start": _iso(t.bucket_start),
                "end": _iso(t.bucket_start + timedelta(seconds=t.bucket_s)),
            },
            "series": _series(reads[str(t.id)], t.bucket_start, t.bucket_s, value, t.expected),
            **_common(reads[str(t.id)]),
        }
        if predicted:
            explanation["so_far"] = t.events
            explanation["projected"] = _round(t.projected)
        out[(rule.id, t.id)] = explanation
    return out


def _anomaly_measure(anomaly: facade.AnomalyView) -> str:
    per = bucket_words(anomaly.bucket_s)
    if anomaly.kind == "negative_share":
        return f"share of posts labelled negative per {per} in {anomaly.source_name}"
    if anomaly.kind == "term":
        return f"posts per {per} holding '{anomaly.term}' in {anomaly.source_name}"
    if anomaly.kind == "watch":
        return f"posts per {per} matching watch '{anomaly.watch_name}' in {anomaly.source_name}"
    return f"posts per {per} in {anomaly.source_name}"


def _anomaly_terms(anomaly: facade.AnomalyView) -> tuple[str, ...] | None:
    if anomaly.kind == "term":
        return (anomaly.term,)
    if anomaly.kind == "watch":
        return anomaly.watch_terms
    return None


def for_anomalies(
    pairs: Sequence[tuple[AlertRule, facade.AnomalyView]],
) -> dict[tuple[int, int], Explanation]:
    """The explanation of each ``(rule, anomaly)``, by ``(rule id, anomaly id)``: the
    anomaly's series (posts per bucket of the source, of a term, of a watch's terms,
    or the share labelled negative) up to its peak bucket; ``baseline`` the expected
    value, ``threshold`` the top of the band (``high``). One read for the batch."""
    anomalies = {a.id: a for _, a in pairs}
    reads = ingest_selectors.explain_windows(
        [
            ingest_selectors.ExplainWindow(
                key=str(a.id),
                source_id=a.source_id,
                terms=_anomaly_terms(a),
                series_since=_series_since(_bucket_floor(a.peak_at, a.bucket_s), a.bucket_s),
                start=a.window_start,
                until=max(a.window_start, a.window_end - timedelta(microseconds=1)),
                bucket_s=a.bucket_s,
            )
            for a in anomalies.values()
        ]
    )
    out = {}
    for rule, a in pairs:
        out[(rule.id, a.id)] = {
            "measure": _anomaly_measure(a),
            "value": _round(a.value),
            "baseline": _round(a.expected),
            "threshold": _round(a.high),
            "band": {"low": _round(a.low), "high": _round(a.high)},
            "score": _round(a.score),
            "score_kind": "robust z",
            "window": {"start": _iso(a.window_start), "end": _iso(a.window_end)},
            "series": _series(
                reads[str(a.id)],
                _bucket_floor(a.peak_at, a.bucket_s),
                a.bucket_s,
                a.value,
                a.expected,
                measure="negative_share" if a.kind == "negative_share" else "events",
            ),
            **_common(reads[str(a.id)]),
        }
    return out


def for_posts(
    pairs: Sequence[tuple[AlertRule, ingest_virality_reads.ScoredPost]],
) -> dict[tuple[int, int], Explanation]:
    """The explanation of each ``(rule, post)`` of a "viral_post" rule, by ``(rule id,
    post id)``: ``value`` and ``score`` are the post's P(viral), ``threshold`` the
    rule's least score, ``baseline`` the mean of the highest P(viral) per bucket of the
    source's earlier buckets (None: none scored); the series holds each bucket's
    highest P(viral) (null where none was scored). The window is the
    ``VIRAL_BUCKET_S`` up to the post, over every post of its source; the post itself
    is among the evidence (``latest``). One read for the batch."""
    posts = {p.id: p for _, p in pairs}
    reads = ingest_selectors.explain_windows(
        [
            ingest_selectors.ExplainWindow(
                key=str(p.id),
                source_id=p.source_id,
                terms=None,
                series_since=_series_since(
                    _bucket_floor(p.created_at, VIRAL_BUCKET_S), VIRAL_BUCKET_S
                ),
                start=p.created_at - timedelta(seconds=VIRAL_BUCKET_S),
                until=p.created_at,
                bucket_s=VIRAL_BUCKET_S,
            )
            for p in posts.values()
        ]
    )
    out = {}
    for rule, p in pairs:
        read = reads[str(p.id)]
        last = _bucket_floor(p.created_at, VIRAL_BUCKET_S)
        earlier = [
            b.max_virality
            for start, b in read.buckets.items()
            if start < int(last.timestamp()) and b.max_virality is not None
        ]
        baseline = sum(earlier) / len(earlier) if earlier else None
        common = _common(read)
        own = {
            "event": p.id,
            "text": p.text[:TEXT_MAX],
            "author": p.author_label,
            "created_at": _iso(p.created_at),
            "why": "latest",
        }
        others = [e for e in common["evidence"] if e["event"] != p.id and e["why"] != "latest"]
        common["evidence"] = [*others[: EVIDENCE_MAX - 1], own]
        out[(rule.id, p.id)] = {
            "measure": f"P(viral) of a post by {p.author_label or 'an unknown author'} "
            f"in {p.source_name}, scored at posting",
            "value": _round(p.virality_score),
            "baseline": _round(baseline),
            "threshold": _round(max(rule.min_score, facade.VIRAL_ALERT_MIN_SCORE)),
            "score": _round(p.virality_score),
            "score_kind": "P(viral)",
            "window": {
                "start": _iso(p.created_at - timedelta(seconds=VIRAL_BUCKET_S)),
                "end": _iso(p.created_at),
            },
            "series": _series(
                read, last, VIRAL_BUCKET_S, p.virality_score, baseline, measure="max_virality"
            ),
            **common,
        }
    return out
