"""The public surface of ``mlengine``: other apps import this module only.

Everything returned is a frozen dataclass or a plain value; the models, detectors and
their parameters stay internal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from mlengine import encoder, heads, scoring, training
from mlengine.models import Trend

__all__ = [
    "NoTrainedModel",
    "Prediction",
    "ScoringStats",
    "TrendView",
    "UnknownTask",
    "classify",
    "embed",
    "scoring_stats",
    "trend_ids_detected_before",
    "trends",
]

NoTrainedModel = training.NoTrainedModel
UnknownTask = heads.UnknownTask
ScoringStats = scoring.ScoringStats
scoring_stats = scoring.scoring_stats


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
    """Sentence vectors of ``texts`` from all-MiniLM-L6-v2 (``mlengine.encoder``).

    Returns a float32 array of shape ``(len(texts), 384)``, each row L2-normalised (so a
    dot product is a cosine), in input order; ``(0, 384)`` for no texts. Texts longer than
    256 tokens are truncated. Runs on this process's encoder, created on first use
    (a few seconds): CUDA in fp16 when torch sees a GPU, else the CPU: in bfloat16 where
    it has AMX tiles, else through the int8 ONNX Runtime graph (``mlengine.quantized``;
    ``mlengine.encoder.default_cpu_dtype``; ``TWISCOPE_ML_DEVICE`` overrides the device).
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
    ``evidence_received_at`` the processing time of that event.
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


def trends(trend_ids: Sequence[int]) -> list[TrendView]:
    """The trends among ``trend_ids`` that still exist, ordered by id (one query)."""
    rows = Trend.objects.filter(id__in=list(trend_ids)).select_related("source").order_by("id")
    return [
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
        )
        for t in rows
    ]


def trend_ids_detected_before(moment: datetime, *, since: datetime, limit: int) -> list[int]:
    """Ids of trends first detected (processing time) in ``[since, moment)``, oldest
    first, at most ``limit``."""
    return list(
        Trend.objects.filter(detected_at__gte=since, detected_at__lt=moment)
        .order_by("detected_at")
        .values_list("id", flat=True)[:limit]
    )
