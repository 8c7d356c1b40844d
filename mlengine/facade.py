"""The public surface of ``mlengine``: other apps import this module only.

Everything returned is a frozen dataclass or a plain value; the models, detectors and
their parameters stay internal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from django.db.models import Q, QuerySet, Sum

from mlengine.inference import encoder, heads, scoring, training, virality_model
from mlengine.models import Anomaly, Trend
from mlengine.trends.detector import TrendParams

__all__ = [
    "TREND_MIN_EVENTS",
    "TREND_MIN_SCORE",
    "VIRAL_ALERT_MIN_SCORE",
    "AnomalyView",
    "Cursor",
    "DetectedPage",
    "NoTrainedModel",
    "Prediction",
    "ScoringStats",
    "TrendView",
    "UnknownTask",
    "anomalies",
    "anomaly_ids_detected_before",
    "classify",
    "confirmed_trend_ids",
    "embed",
    "scoring_stats",
    "story_volumes",
    "trend_ids_detected_before",
    "trends",
]

NoTrainedModel = training.NoTrainedModel
UnknownTask = heads.UnknownTask
ScoringStats = scoring.ScoringStats
scoring_stats = scoring.scoring_stats
VIRAL_ALERT_MIN_SCORE = virality_model.ALERT_MIN_SCORE
"""The least P(viral) a "viral_post" alert rule may ask for: posts scored lower never
reach the alerts stage."""
TREND_MIN_SCORE = TrendParams().min_score
"""The least score (Poisson σ above the baseline) at which the trend detector reports a
term: with ``TREND_MIN_EVENTS``, the threshold an alert's explanation shows."""
TREND_MIN_EVENTS = TrendParams().min_events
"""The least posts in a bucket at which the trend detector reports a term."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """One text's verdict: ``label`` (the most probable), ``probabilities`` by label
    (summing to 1), and ``model_version`` ("name vN" of the head that gave it)."""

    label: str
    probabilities: dict[str, float]
    model_version: str


def classify(task: str, texts: Sequence[str]) -> list[Prediction]:
    """Predictions of the task's active head for ``texts``, in input order.

    ``task``: "sentiment" (negative / neutral / positive), "emotion" (anger / joy /
    optimism / sadness) or "offensive" (not-offensive / offensive). Embeds the texts with
    the version's encoder (the shared one, or its fine-tuned copy: same device and cost
    as ``embed``) and applies its head, a softmax over the labels.
    Blocking; call it from a worker, never in a request.

    Raises:
        UnknownTask: ``task`` is none of those.
        NoTrainedModel: the task has no active trained head (``manage.py train``).
    """
    found = training.verdicts(task, texts)
    return [Prediction(*found.verdict(i), model_version=found.model) for i in range(len(texts))]


def embed(texts: Sequence[str]) -> np.ndarray:
    """Sentence vectors of ``texts`` from all-MiniLM-L6-v2 (``mlengine.inference.encoder``).

    Returns a float32 array of shape ``(len(texts), 384)``, each row L2-normalised (so a
    dot product is a cosine), in input order; ``(0, 384)`` for no texts. Texts longer than
    256 tokens are truncated. Runs on this process's encoder, created on first use
    (a few seconds): CUDA in fp16 when torch sees a GPU, else the CPU: in bfloat16 where
    it has AMX tiles, else through the int8 ONNX Runtime graph (``mlengine.inference.quantized``;
    ``mlengine.inference.encoder.default_cpu_dtype``; ``TWISCOPE_ML_DEVICE`` overrides the device).
    Blocking; call it from a worker, never in a request.

    Raises:
        FileNotFoundError: the packaged model files are missing.
    """
    return encoder.get_encoder().embed(texts)


@dataclass(frozen=True, slots=True)
class TrendView:
    """A detected trend, as other stages see it.

    ``score`` in Poisson σ above the baseline; ``velocity`` in events per minute;
    ``bucket_s`` in seconds; ``evidence_created_at`` is the event time of detection and
    ``evidence_received_at`` the processing time of that event. A prediction's
    ``projected`` is its bucket's count projected to the bucket's end at detection (the
    figure its ``score`` and ``expected`` are for); ``withdrawn_at`` the event time its
    bucket closed without confirming it. ``always_on``: the term is an everyday term of
    its stream (``mlengine.trends.detector``), which starts no story by itself.
    """

    id: int
    source_id: int
    source_name: str
    team_id: int
    term: str
    bucket_start: datetime
    bucket_s: int
    events: int
    expected: float
    score: float
    authors_count: int
    velocity: float
    evidence_received_at: datetime
    evidence_created_at: datetime
    sample_event_ids: tuple[int, ...]
    story_id: int | None = None
    predicted: bool = False
    confirmed_at: datetime | None = None
    story_terms: tuple[str, ...] = ()
    story_label: tuple[str, ...] = ()
    forecast: dict[str, Any] | None = None
    projected: float | None = None
    withdrawn_at: datetime | None = None
    always_on: bool = False

    @property
    def is_prediction(self) -> bool:
        """An emerging trend not (yet) confirmed: its alert is shown as a prediction."""
        return self.predicted and self.confirmed_at is None and self.withdrawn_at is None

    @property
    def prediction(self) -> str | None:
        """Where this trend's prediction stands: "open", "confirmed", "withdrawn", or
        None for a trend that was never a prediction."""
        return _prediction_state(self.predicted, self.confirmed_at, self.withdrawn_at)

    @property
    def is_withdrawn(self) -> bool:
        """A prediction whose bucket closed without the count passing: it did not
        materialise."""
        return self.predicted and self.confirmed_at is None and self.withdrawn_at is not None

    @property
    def joins_story(self) -> bool:
        """Whether this trend is a later member of a story (its alert is the story's,
        updated), not the story's first trend."""
        return self.story_id is not None and self.story_id != self.id


STORY_LABEL_TERMS = 3


def trends(trend_ids: Sequence[int]) -> list[TrendView]:
    """The trends among ``trend_ids`` that still exist, ordered by id, each with its
    story (``mlengine.trends.stories``): ``story_id`` (the story's first trend), its member
    terms up to this trend in order of detection, its label (the
    ``STORY_LABEL_TERMS`` members with the most events) and its ``forecast`` (two
    queries)."""
    rows = list(
        Trend.objects.filter(id__in=list(trend_ids)).select_related("source").order_by("id")
    )
    members: dict[int, list[tuple[datetime, int, str, int]]] = {}
    story_ids = {t.story_id for t in rows if t.story_id is not None}
    for story_id, created, member_id, term, events in (
        Trend.objects.filter(story_id__in=story_ids)
        .order_by("evidence_created_at", "id")
        .values_list("story_id", "evidence_created_at", "id", "term", "events")
    ):
        members.setdefault(story_id, []).append((created, member_id, term, events))

    def story_of(t: Trend) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if t.story_id is None:
            return (t.term,), (t.term,)
        upto = [
            m for m in members.get(t.story_id, []) if (m[0], m[1]) <= (t.evidence_created_at, t.id)
        ]
        terms = tuple(dict.fromkeys(m[2] for m in upto)) or (t.term,)
        ranked = sorted(upto, key=lambda m: -m[3])
        label = tuple(dict.fromkeys(m[2] for m in ranked))[:STORY_LABEL_TERMS] or (t.term,)
        return terms, label

    views = []
    for t in rows:
        terms, label = story_of(t)
        views.append(
            TrendView(
                id=t.id,
                source_id=t.source_id,
                source_name=t.source.name,
                team_id=t.source.team_id,
                term=t.term,
                bucket_start=t.bucket_start,
                bucket_s=t.bucket_s,
                events=t.events,
                expected=t.expected,
                score=t.score,
                authors_count=t.authors_count,
                velocity=t.velocity,
                evidence_received_at=t.evidence_received_at,
                evidence_created_at=t.evidence_created_at,
                sample_event_ids=tuple(t.sample_event_ids),
                story_id=t.story_id,
                predicted=t.predicted,
                confirmed_at=t.confirmed_at,
                story_terms=terms,
                story_label=label,
                forecast=t.forecast or None,
                projected=t.projected,
                withdrawn_at=t.withdrawn_at,
                always_on=t.always_on,
            )
        )
    return views


Cursor = tuple[datetime, int]
"""``(detected_at, id)`` of the last item of a page: where the next page starts."""


@dataclass(frozen=True, slots=True)
class DetectedPage:
    """One page of ids in order of detection (processing time, then id): ``ids``, and
    ``after``, the cursor to pass for the next page (None: this page is the last)."""

    ids: tuple[int, ...]
    after: Cursor | None


def _detected_page(
    rows: QuerySet[Any], moment: datetime, since: datetime, limit: int, after: Cursor | None
) -> DetectedPage:
    """Keyset pagination over ``rows`` detected in ``[since, moment)`` by ``(detected_at,
    id)`` (one query; the ``*_detected`` index)."""
    rows = rows.filter(detected_at__gte=since, detected_at__lt=moment)
    if after is not None:
        rows = rows.filter(Q(detected_at__gt=after[0]) | Q(detected_at=after[0], id__gt=after[1]))
    page = list(rows.order_by("detected_at", "id").values_list("detected_at", "id")[:limit])
    return DetectedPage(
        ids=tuple(item_id for _, item_id in page),
        after=page[-1] if len(page) == limit else None,
    )


def trend_ids_detected_before(
    moment: datetime, *, since: datetime, limit: int, after: Cursor | None = None
) -> DetectedPage:
    """A page of the ids of trends first detected (processing time) in ``[since,
    moment)``, in order of detection, at most ``limit``, after the cursor ``after``: a
    reader pages through them all (``DetectedPage.after``), however many there are."""
    return _detected_page(Trend.objects.all(), moment, since, limit, after)


def confirmed_trend_ids(story_ids: Sequence[int]) -> list[int]:
    """Ids of the predicted trends of the stories ``story_ids`` (a story's id is its first
    trend's) that came true (``confirmed_at`` set), ordered by id (one query)."""
    ids = list(story_ids)
    return list(
        Trend.objects.filter(story_id__in=ids, predicted=True, confirmed_at__isnull=False)
        .order_by("id")
        .values_list("id", flat=True)
    )


def _prediction_state(
    predicted: bool, confirmed_at: datetime | None, withdrawn_at: datetime | None
) -> str | None:
    """ "open", "confirmed" or "withdrawn" for a prediction; None for a trend that was
    never one."""
    if not predicted:
        return None
    if confirmed_at is not None:
        return "confirmed"
    return "withdrawn" if withdrawn_at is not None else "open"


def _of_stories(ids: Sequence[int]) -> Q:
    """The trends of the stories ``ids`` (a story's id is its first trend's), and the
    trends without a story among ``ids``."""
    return Q(story_id__in=ids) | Q(id__in=ids, story__isnull=True)


def story_outcomes(story_ids: Sequence[int]) -> dict[int, str]:
    """Where each story's prediction stands, by story id (a story's id is its first
    trend's; a trend without a story is its own): "confirmed" when a member passed the
    test as it was (detected so, or a prediction confirmed), else "open" while a member's
    prediction waits for its bucket to close, else "withdrawn" (every member a prediction
    whose bucket closed without passing). Ids of no trend are left out. One query."""
    rows = Trend.objects.filter(_of_stories(list(story_ids))).values_list(
        "id", "story_id", "predicted", "confirmed_at", "withdrawn_at"
    )
    rank = {"withdrawn": 0, "open": 1, "confirmed": 2}
    found: dict[int, str] = {}
    for trend_id, story_id, predicted, confirmed_at, withdrawn_at in rows:
        key = story_id if story_id is not None else trend_id
        # A trend detected as it was counts as a confirmed one.
        state = _prediction_state(predicted, confirmed_at, withdrawn_at) or "confirmed"
        if key not in found or rank[state] > rank[found[key]]:
            found[key] = state
    return found


def story_volumes(story_ids: Sequence[int]) -> dict[int, int]:
    """Each story's posts, by story id (a story's id is its first trend's): the sum of
    its members' bucket counts (``Trend.events``; a post holding two member terms counts
    twice, so this is an upper bound, used only to see a story grow). Ids of no story
    are left out. One grouped query."""
    return dict(
        Trend.objects.filter(story_id__in=list(story_ids))
        .values("story_id")
        .annotate(total=Sum("events"))
        .values_list("story_id", "total")
    )


def withdrawn_trend_ids(story_ids: Sequence[int]) -> list[int]:
    """Ids of the withdrawn predictions (``TrendView.is_withdrawn``) of the stories
    ``story_ids`` (or trends without a story, by their own id), ordered (one query)."""
    return list(
        Trend.objects.filter(_of_stories(list(story_ids)))
        .filter(predicted=True, confirmed_at__isnull=True, withdrawn_at__isnull=False)
        .order_by("id")
        .values_list("id", flat=True)
    )


@dataclass(frozen=True, slots=True)
class AnomalyView:
    """An anomaly of a series (``mlengine.anomalies.stage``), as other stages see it.

    ``kind``: "volume" (events per bucket), "negative_share" (share of labelled events
    labelled negative, 0..1), "term" (events holding ``term``; "" for the others) or
    "watch" (events holding any of ``watch_terms``, the terms the series counts, of the
    watch ``watch_id`` named ``watch_name``; None, "" and () for the other kinds).
    ``window_start``/``window_end`` (exclusive) are event time, ``bucket_s`` seconds;
    ``score`` is the peak robust z-score, ``value``/``expected``/``low``/``high`` the
    series' at the peak (the band may be None before a baseline exists).
    ``evidence_created_at`` is the event time of detection, ``evidence_received_at`` the
    latest processing time of the detecting bucket's events.
    """

    id: int
    source_id: int
    source_name: str
    team_id: int
    kind: str
    term: str
    window_start: datetime
    window_end: datetime
    bucket_s: int
    peak_at: datetime
    score: float
    value: float
    expected: float | None
    low: float | None
    high: float | None
    closed: bool
    evidence_created_at: datetime
    evidence_received_at: datetime
    watch_id: int | None = None
    watch_name: str = ""
    watch_terms: tuple[str, ...] = ()


def anomalies(anomaly_ids: Sequence[int]) -> list[AnomalyView]:
    """The anomalies among ``anomaly_ids`` that still exist, ordered by id (one query)."""
    rows = Anomaly.objects.filter(id__in=list(anomaly_ids)).select_related(
        "series__watch", "source"
    )
    return [
        AnomalyView(
            id=a.id,
            source_id=a.source_id,
            source_name=a.source.name,
            team_id=a.source.team_id,
            kind=a.series.kind,
            term=a.series.term,
            window_start=a.window_start,
            window_end=a.window_end,
            bucket_s=a.bucket_s,
            peak_at=a.peak_at,
            score=a.score,
            value=a.value,
            expected=a.expected,
            low=a.low,
            high=a.high,
            closed=a.closed,
            evidence_created_at=a.evidence_created_at,
            evidence_received_at=a.evidence_received_at,
            watch_id=a.series.watch_id,
            watch_name=a.series.watch.name if a.series.watch is not None else "",
            watch_terms=tuple(a.series.watch_terms),
        )
        for a in rows.order_by("id")
    ]


def anomaly_ids_detected_before(
    moment: datetime, *, since: datetime, limit: int, after: Cursor | None = None
) -> DetectedPage:
    """A page of the ids of anomalies first detected (processing time) in ``[since,
    moment)``, as ``trend_ids_detected_before`` for trends."""
    return _detected_page(Anomaly.objects.all(), moment, since, limit, after)
