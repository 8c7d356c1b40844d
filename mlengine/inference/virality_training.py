"""Training and evaluating virality models (``mlengine.inference.virality_model``) on a
CSV in the trump_tweets layout: time splits, ROC-AUC, the operating points of an alert
rule's ``min_score``, and the registered ``ModelVersion`` (docs/virality.md).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from mlengine.inference.virality_features import (
    HISTORY_MIN,
    VIRAL_FACTOR,
    DataError,
    Post,
    feature_rows,
    labels,
    read_csv,
)
from mlengine.inference.virality_model import (
    HYPER_PARAMETERS,
    MODEL_NAME,
    TASK,
    active_model,
    fit,
    load_version,
    text_vectors,
)

log = structlog.get_logger(__name__)


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(y, p)), 4)


@dataclass(frozen=True)
class Split:
    """Scored posts of a CSV between two dates, with their history rows and labels."""

    posts: list[Post]
    rows: np.ndarray
    y: np.ndarray


def _split(
    posts: Sequence[Post],
    histories: Mapping[str, Sequence[Post]],
    since: datetime | None,
    until: datetime | None,
) -> Split:
    chosen = [
        p
        for p in posts
        if (since is None or p.created_at >= since) and (until is None or p.created_at < until)
    ]
    rows, scored = feature_rows(chosen, histories)
    y = labels(chosen, histories)
    keep = scored & (y >= 0)
    return Split(
        posts=[p for p, k in zip(chosen, keep, strict=True) if k],
        rows=rows[keep],
        y=y[keep].astype(np.int64),
    )


def _by_author(posts: Iterable[Post]) -> dict[str, list[Post]]:
    out: dict[str, list[Post]] = defaultdict(list)
    for post in posts:
        out[post.author].append(post)
    return out


EVAL_FRACTION = 0.15
"""The latest share of the training period's scored posts held out to measure a new model
(and compare it with the active one) before it is refitted on all of them."""


@dataclass(frozen=True)
class TrainingOutcome:
    """What ``train`` did: the new version, the active one's ROC-AUC on the same held-out
    posts (None when there was none), and whether the new one became active."""

    version: Any
    previous_score: float | None
    promoted: bool


def train(
    data: Path,
    *,
    until: datetime | None = None,
    embed_progress: Callable[[int], None] | None = None,
) -> TrainingOutcome:
    """Train a virality model on the posts of ``data`` (a trump_tweets-layout CSV)
    before ``until`` (all when None) and register it as a ``ModelVersion`` of task
    ``virality``.

    Measured first: fitted on the earliest 85% of the scored posts (by time) and scored
    by ROC-AUC on the latest ``EVAL_FRACTION``; then refitted, with the same
    hyper-parameters, on all of them: the registered artefact. It becomes active only if
    its held-out ROC-AUC beats the active version's on the same posts (the active one
    may have been trained on them: the comparison leans towards keeping it).

    Side effects: embeds the texts (``mlengine.inference.encoder``, ~600 texts/s on a CPU), writes
    ``MODELS_DIR/virality/vN/model.npz`` and the ModelVersion row.

    Raises:
        DataError: the CSV is unreadable, or too few scored posts of either class.
    """
    from django.conf import settings
    from django.db import connection, transaction
    from django.db.models import Max

    from mlengine.inference.training import artefact_digest
    from mlengine.models import ModelVersion

    posts = read_csv(data)
    known = [p for p in posts if until is None or p.created_at < until]
    split = _split(known, _by_author(known), None, None)
    if len(split.y) < 50:
        raise DataError(
            f"{data.name} has {len(split.y)} scored posts before {until or 'its end'}: a "
            f"post is scored after {HISTORY_MIN} earlier posts of its author; needs 50"
        )
    cache: dict[str, np.ndarray] = {}
    vectors = text_vectors([p.text for p in split.posts], embed_progress, cache)
    cut = int(len(split.y) * (1 - EVAL_FRACTION))
    held_y = split.y[cut:]
    if min(int(held_y.sum()), int(len(held_y) - held_y.sum())) < 1:
        raise DataError("the held-out latest posts are all of one class: no ROC-AUC")
    trial = fit(split.rows[:cut], vectors[:cut], split.y[:cut])
    score = _auc(held_y, trial.probabilities(trial.design(split.rows[cut:], vectors[cut:])))
    model = fit(split.rows, vectors, split.y)
    staging = Path(settings.MODELS_DIR) / TASK / f".staging-{uuid.uuid4().hex}"
    model.save(staging / "model.npz")
    digest = artefact_digest(staging)
    first, last = split.posts[0].created_at, split.posts[-1].created_at
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"ml-head:{TASK}"])
        active = ModelVersion.objects.filter(task=TASK, active=True).first()
        previous_score = None
        if active is not None:
            try:
                served = load_version(active)
                previous_score = _auc(
                    held_y, served.probabilities(served.design(split.rows[cut:], vectors[cut:]))
                )
            except (OSError, ValueError) as exc:
                log.warning("ml.active_head_unreadable", version=active.id, error=str(exc))
        number = (ModelVersion.objects.filter(task=TASK).aggregate(n=Max("version"))["n"] or 0) + 1
        relative = f"{TASK}/v{number}"
        target = Path(settings.MODELS_DIR) / relative
        if target.exists():
            # Left by a registration that rolled back, or another database's: kept aside.
            aside = target.with_name(f".orphan-{target.name}-{uuid.uuid4().hex[:8]}")
            log.warning("ml.orphaned_artefact_moved", path=str(target), to=str(aside))
            target.rename(aside)
        staging.rename(target)
        promoted = previous_score is None or score > previous_score
        if promoted and active is not None:
            ModelVersion.objects.filter(id=active.id).update(active=False)
        version = ModelVersion.objects.create(
            task=TASK,
            name=MODEL_NAME,
            version=number,
            metrics={
                "metric": "roc_auc",
                "roc_auc": score,
                "eval_split": f"latest {EVAL_FRACTION:.0%} of the scored posts "
                f"({split.posts[cut].created_at:%Y-%m-%d} on), by a model fit on the rest",
                "eval_n": len(held_y),
                "eval_positives": int(held_y.sum()),
                "previous_active_score": previous_score,
            },
            trained_on={
                "data": data.name,
                "until": until.isoformat() if until else None,
                "from": first.isoformat(),
                "to": last.isoformat(),
                "n": len(split.y),
                "positives": int(split.y.sum()),
                "features": list(model.feature_names),
                "hyper_parameters": HYPER_PARAMETERS,
                "label": f"retweets >= {VIRAL_FACTOR:g} x median of the previous "
                f"{HISTORY_MIN} posts",
            },
            artefact=relative,
            sha256=digest,
            active=promoted,
        )
    log.info(
        "ml.virality_trained",
        version=number,
        score=score,
        previous=previous_score,
        promoted=promoted,
    )
    return TrainingOutcome(version=version, previous_score=previous_score, promoted=promoted)


def evaluate(
    data: Path,
    *,
    since: datetime | None = None,
    embed_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """ROC-AUC of the active virality model on the scored posts of ``data`` at or after
    ``since`` (all when None); earlier rows serve as history only.

    Returns ``{"roc_auc", "n", "positives", "operating_points", "model_version"}``
    (plus ``since`` and ``data``); ``operating_points`` is ``operating_points``'s, what
    a "viral_post" alert rule's ``min_score`` would give. Side effects: embeds the
    scored texts.

    Raises:
        DataError: unreadable CSV, no scored posts, or only one class among them.
        mlengine.inference.training.NoTrainedModel: no active virality model.
    """
    posts = read_csv(data)
    model = active_model()
    split = _split(posts, _by_author(posts), since, None)
    positives = int(split.y.sum())
    if positives == 0 or positives == len(split.y):
        raise DataError(
            f"{len(split.y)} scored posts since {since or 'the start'}, {positives} viral: "
            "ROC-AUC needs both viral and other posts"
        )
    vectors = text_vectors([p.text for p in split.posts], embed_progress, {})
    probabilities = model.probabilities(model.design(split.rows, vectors))
    score = _auc(split.y, probabilities)
    return {
        "roc_auc": score,
        "n": len(split.y),
        "positives": positives,
        "operating_points": operating_points(split.y, probabilities),
        "model_version": model.version,
        "since": since.isoformat() if since else None,
        "data": data.name,
    }


OPERATING_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def operating_points(
    y: np.ndarray, probabilities: np.ndarray, thresholds: Sequence[float] = OPERATING_THRESHOLDS
) -> list[dict[str, float | int | None]]:
    """What alerting at ``P(viral) ≥ t`` gives, for each ``t`` of ``thresholds``:
    ``{"min_score": t, "alerts": posts at or above t, "alerts_per_1000": per 1,000
    scored posts, "precision": viral share of them (None when none), "recall": share of
    the viral posts among them}``, rounded to 4 decimals. ``y``: 0/1 labels, shape
    ``(n,)``; ``probabilities``: P(viral), shape ``(n,)``. Pure."""
    points: list[dict[str, float | int | None]] = []
    positives = max(int(y.sum()), 1)
    for t in thresholds:
        hit = probabilities >= t
        alerts = int(hit.sum())
        true = int(y[hit].sum())
        points.append(
            {
                "min_score": t,
                "alerts": alerts,
                "alerts_per_1000": round(1000 * alerts / max(len(y), 1), 1),
                "precision": round(true / alerts, 4) if alerts else None,
                "recall": round(true / positives, 4),
            }
        )
    return points
