"""The virality model: gradient-boosted trees over the features of
``mlengine.inference.virality_features`` and the sentence vector's principal components;
the active model, and the scores it gives posts at posting time.

**Model.** Gradient-boosted trees (scikit-learn's ``HistGradientBoostingClassifier``,
after Ke et al., "LightGBM", NeurIPS 2017). Features and hyper-parameters were chosen on
time splits inside 2009-2015 (docs/virality.md).

**Artefact.** ``MODELS_DIR/virality/vN/model.npz``: the trees as arrays, the PCA and
the feature names (no pickle: loading one runs no code).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlengine.inference.virality_features import FEATURES, DataError, Post, feature_rows

TASK = "virality"
MODEL_NAME = "virality-hgb"
ALERT_MIN_SCORE = 0.5
"""The least ``min_score`` (P(viral)) a "viral_post" alert rule may have: posts scored
below it are not handed to the alerts stage at all."""


def _design(
    rows: np.ndarray, vectors: np.ndarray, mean: np.ndarray, components: np.ndarray
) -> np.ndarray:
    projected = (vectors.astype(np.float64) - mean) @ components.T
    return np.hstack([rows, projected])


@dataclass(frozen=True)
class ViralityModel:
    """A trained virality model: the embedding's PCA and the boosted trees as arrays.

    ``pca_mean`` (384,) and ``pca_components`` (k, 384) project a sentence vector onto
    ``k`` text features (``emb_0``...). The trees are flat node arrays (``feature``,
    ``threshold``, ``missing_left``, ``left``, ``right``, ``leaf``, ``value``; children
    are absolute node indices, ``roots`` the first node of each tree); the probability is
    ``sigmoid(baseline + sum of the leaves reached)``, as scikit-learn's
    ``HistGradientBoostingClassifier.predict_proba`` computes it for numeric features.
    ``version``: "name vN" once registered, "" before.
    """

    pca_mean: np.ndarray
    pca_components: np.ndarray
    baseline: float
    roots: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    missing_left: np.ndarray
    left: np.ndarray
    right: np.ndarray
    leaf: np.ndarray
    value: np.ndarray
    version: str = ""

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The columns of ``design``: ``FEATURES`` then ``emb_0``... ``emb_{k-1}``."""
        return (*FEATURES, *(f"emb_{i}" for i in range(len(self.pca_components))))

    def design(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """``rows`` (n, len(FEATURES)) from ``feature_rows`` with the PCA of ``vectors``
        (n, 384) appended: (n, len(feature_names)) float64."""
        return _design(rows, vectors, self.pca_mean, self.pca_components)

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        """P(viral) of each row of a ``design`` matrix: (n,) float64 in [0, 1]."""
        n = len(X)
        raw = np.full(n, self.baseline)
        if n == 0:
            return raw
        nodes = np.broadcast_to(self.roots, (n, len(self.roots))).copy()
        rows = np.arange(n)[:, None]
        while True:
            inner = ~self.leaf[nodes]
            if not inner.any():
                break
            x = X[rows, self.feature[nodes]]
            go_left = np.where(np.isnan(x), self.missing_left[nodes], x <= self.threshold[nodes])
            nodes = np.where(inner, np.where(go_left, self.left[nodes], self.right[nodes]), nodes)
        raw += self.value[nodes].sum(axis=1)
        return 1.0 / (1.0 + np.exp(-raw))

    def save(self, path: Path) -> None:
        """Write the model to ``path`` (``.npz``; creates the folder)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            features=np.array(self.feature_names),
            pca_mean=self.pca_mean,
            pca_components=self.pca_components,
            baseline=np.array(self.baseline),
            roots=self.roots,
            feature=self.feature,
            threshold=self.threshold,
            missing_left=self.missing_left,
            left=self.left,
            right=self.right,
            leaf=self.leaf,
            value=self.value,
        )

    @classmethod
    def load(cls, path: Path, version: str = "") -> ViralityModel:
        """The model saved at ``path``.

        Raises:
            OSError: unreadable. ValueError: not a virality model of these ``FEATURES``.
        """
        with np.load(path, allow_pickle=False) as data:
            names = tuple(str(n) for n in data["features"])
            if names[: len(FEATURES)] != FEATURES:
                raise ValueError(f"{path} was saved with other features: {names}")
            return cls(
                pca_mean=data["pca_mean"],
                pca_components=data["pca_components"],
                baseline=float(data["baseline"]),
                roots=data["roots"],
                feature=data["feature"],
                threshold=data["threshold"],
                missing_left=data["missing_left"],
                left=data["left"],
                right=data["right"],
                leaf=data["leaf"],
                value=data["value"],
                version=version,
            )


PCA_COMPONENTS = 32
HYPER_PARAMETERS: dict[str, Any] = {
    "learning_rate": 0.05,
    "max_iter": 300,
    "max_leaf_nodes": 15,
    "min_samples_leaf": 50,
    "l2_regularization": 1.0,
    "early_stopping": False,
    "random_state": 0,
}
"""Chosen on train <= 2013 / validate 2014 and train <= 2014 / validate 2015 (see
docs/virality.md); the figures move by under 0.004 ROC-AUC across nearby values."""


def fit(rows: np.ndarray, vectors: np.ndarray, y: np.ndarray) -> ViralityModel:
    """Fit the PCA on ``vectors`` (n, 384) and the trees on ``rows`` (n, len(FEATURES),
    from ``feature_rows``, scored rows only) with labels ``y`` (n,) in {0, 1}.

    Raises:
        DataError: fewer than 2 rows of each class, or fewer rows than PCA components.
    """
    from sklearn.decomposition import PCA
    from sklearn.ensemble import HistGradientBoostingClassifier

    if len(y) <= PCA_COMPONENTS or min(int(y.sum()), int(len(y) - y.sum())) < 2:
        raise DataError(
            f"too little to learn from: {len(y)} scored posts, {int(y.sum())} viral "
            f"(needs more than {PCA_COMPONENTS}, and both kinds)"
        )
    pca = PCA(PCA_COMPONENTS, random_state=0).fit(vectors.astype(np.float64))
    # The trees learn from the very projection ``design`` serves (not ``pca.transform``:
    # rounding differences would move values across split thresholds).
    design = _design(rows, vectors, pca.mean_, pca.components_)
    trees = HistGradientBoostingClassifier(**HYPER_PARAMETERS).fit(design, y)
    nodes = [predictors[0].nodes for predictors in trees._predictors]
    offsets = np.cumsum([0] + [len(n) for n in nodes[:-1]])
    flat = np.concatenate(nodes)
    shift = np.repeat(offsets, [len(n) for n in nodes])
    leaf = flat["is_leaf"].astype(bool)
    return ViralityModel(
        pca_mean=pca.mean_,
        pca_components=pca.components_,
        baseline=float(np.ravel(trees._baseline_prediction)[0]),
        roots=offsets.astype(np.int64),
        feature=flat["feature_idx"].astype(np.int64),
        threshold=flat["num_threshold"].astype(np.float64),
        missing_left=flat["missing_go_to_left"].astype(bool),
        left=np.where(leaf, 0, flat["left"].astype(np.int64) + shift),
        right=np.where(leaf, 0, flat["right"].astype(np.int64) + shift),
        leaf=leaf,
        value=np.where(leaf, flat["value"], 0.0).astype(np.float64),
    )


def text_vectors(
    texts: Sequence[str], progress: Callable[[int], None] | None, cache: dict[str, np.ndarray]
) -> np.ndarray:
    """Sentence vectors of ``texts`` (n, 384), through ``cache`` (text -> vector)."""
    from mlengine.inference.training import embed_all

    todo = list(dict.fromkeys(t for t in texts if t not in cache))
    if todo:
        cache.update(zip(todo, embed_all(todo, progress), strict=True))
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return np.stack([cache[t] for t in texts])


_loaded: dict[int, ViralityModel] = {}


def load_version(version: Any) -> ViralityModel:
    from django.conf import settings

    model = _loaded.get(version.id)
    if model is None:
        path = Path(settings.MODELS_DIR) / version.artefact / "model.npz"
        model = _loaded[version.id] = ViralityModel.load(
            path, version=f"{version.name} v{version.version}"
        )
    return model


def active_model() -> ViralityModel:
    """The active virality model (loaded once per process).

    Raises:
        mlengine.inference.training.NoTrainedModel: none is active, or its artefact is missing or
            unreadable.
    """
    from mlengine.inference.training import NoTrainedModel
    from mlengine.models import ModelVersion

    version = ModelVersion.objects.filter(task=TASK, active=True).first()
    if version is None:
        raise NoTrainedModel(f"no trained {TASK} model: run `manage.py train {TASK} --data CSV`")
    try:
        return load_version(version)
    except (OSError, ValueError) as exc:
        raise NoTrainedModel(
            f"the artefact of {version} is unusable ({exc}): train it again"
        ) from exc


@dataclass(frozen=True, slots=True)
class ViralityScore:
    """A post's P(viral) in [0, 1] (None: fewer than ``HISTORY_MIN`` predecessors, not
    scored) and the model that gave it ("name vN")."""

    score: float | None
    model_version: str


def score_posts(
    model: ViralityModel,
    posts: Sequence[Post],
    histories: Mapping[str, Sequence[Post]],
    vectors: np.ndarray | None = None,
) -> list[ViralityScore]:
    """Score a batch of posts at posting time, in input order.

    ``histories``: each author's earlier posts with their ``retweet_count`` (and
    ``favorite_count`` when known); only those strictly before a post's ``created_at``
    count, and only the latest ``HISTORY_WINDOW`` of them; a post with fewer than
    ``HISTORY_MIN`` gets ``score=None``. ``vectors``: the posts' sentence vectors (n,
    384) when the caller already has them; else the scored ones are embedded here
    (``mlengine.inference.encoder``: blocking, call it from a worker). No other side effect.
    """
    rows, scored = feature_rows(posts, histories)
    index = np.flatnonzero(scored)
    scores: list[float | None] = [None] * len(posts)
    if len(index):
        if vectors is None:
            picked = text_vectors([posts[int(i)].text for i in index], None, {})
        else:
            picked = np.asarray(vectors)[index]
        p = model.probabilities(model.design(rows[index], picked))
        for i, value in zip(index, p, strict=True):
            scores[int(i)] = round(float(value), 4)
    return [ViralityScore(score=s, model_version=model.version) for s in scores]
