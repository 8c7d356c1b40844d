"""Virality at posting time: will a post be retweeted at least twice as much as its
author usually is?

**Label.** A post is *viral* when its ``retweet_count`` is at least ``VIRAL_FACTOR`` (2)
times the median ``retweet_count`` of the same author's previous ``HISTORY_MIN`` (100)
posts; a post with fewer predecessors is not scored (no label, no score).
*Previous* means a strictly earlier ``created_at``.

**Features** (``FEATURES``), all known when the post arrives: the text (length, words,
hashtags, mentions, URLs, media links, quotes, exclamation marks, capitals), whether it
is a reply, the hour and weekday (UTC), the author's trailing history from the last
``HISTORY_WINDOW`` predecessors only (the spread of their retweets, the trend: median
of the last 20 against the last 100, recent momentum: last 5, best and mean of the last
10, how often they went viral, favourites per retweet, the posting rate), and the
sentence vector's first ``PCA_COMPONENTS`` principal components (``mlengine.encoder``).
Engagement features are log ratios to the author's own trailing median: absolute counts
shift by orders of magnitude over time (the 2015-2016 campaign) and a ratio carries
over between regimes, so no feature is an absolute count (adding one measured worse on
the later validation year).

**Model.** Gradient-boosted trees (scikit-learn's ``HistGradientBoostingClassifier``,
after Ke et al., "LightGBM", NeurIPS 2017). Features and hyper-parameters were chosen on
time splits inside 2009-2015 (docs/virality.md).

**Caveat of the public data.** ``trump_tweets``' counts were taken about January 2018,
long after each post: the history features use the *final* counts of predecessors, a
few of which (the last hours' posts) were still growing when the post arrived. Live, a
predecessor's count is what it is at scoring time, so the public figures are somewhat
optimistic for the momentum features (docs/virality.md).

**Artefact.** ``MODELS_DIR/virality/vN/model.npz``: the trees as arrays, the PCA and
the feature names (no pickle: loading one runs no code).
"""

from __future__ import annotations

import csv
import math
import re
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger(__name__)

TASK = "virality"
MODEL_NAME = "virality-hgb"
HISTORY_MIN = 100
"""Predecessors a post needs to be labelled and scored (the label's median window)."""
HISTORY_WINDOW = 200
"""Predecessors the history features look at (the latest ones)."""
VIRAL_FACTOR = 2.0
CSV_COLUMNS = ("text", "created_at", "retweet_count")
"""Columns a CSV in the trump_tweets layout must have (``favorite_count``, ``source``,
``in_reply_to_user_id_str``, ``id_str`` and ``screen_name`` are used when present)."""


class DataError(ValueError):
    """A CSV that cannot be read as the trump_tweets layout, or too little data."""


@dataclass(frozen=True, slots=True)
class Post:
    """One post of one author.

    ``created_at``: event time, timezone-aware. ``retweet_count`` / ``favorite_count``:
    engagement as last seen (needed for history posts and for labels; None for a post
    being scored, where they are not used). ``source``: the client app, "" if unknown.
    """

    author: str
    created_at: datetime
    text: str
    is_reply: bool = False
    source: str = ""
    retweet_count: int | None = None
    favorite_count: int | None = None
    key: str = ""


_HASHTAG = re.compile(r"(?<!\w)#\w+")
_MENTION = re.compile(r"(?<!\w)@\w+")
_URL = re.compile(r"https?://\S+")
_MEDIA = re.compile(r"pic\.twitter\.com|instagram\.com|instagr\.am|twitpic|vine\.co|youtu")

TEXT_FEATURES = (
    "chars",
    "words",
    "hashtags",
    "mentions",
    "urls",
    "media",
    "quoted",
    "starts_with_mention",
    "exclamations",
    "caps_share",
    "is_reply",
    "hour",
    "weekday",
)
HISTORY_FEATURES = (
    "spread_q90",
    "spread_q25",
    "trend_20",
    "momentum_5",
    "best_10",
    "mean_10",
    "viral_share_100",
    "viral_share_20",
    "level_200",
    "fav_ratio",
    "fav_ratio_trend",
    "gap_s",
    "posts_24h",
)
FEATURES = (*TEXT_FEATURES, *HISTORY_FEATURES)


def text_features(post: Post) -> list[float]:
    """The post's own features, in ``TEXT_FEATURES`` order (counts; ``caps_share`` in
    [0, 1]; ``hour`` 0-23 and ``weekday`` 0-6, Monday 0, in UTC)."""
    text = post.text
    bare = _URL.sub("", text)
    letters = [c for c in bare if c.isalpha()]
    when = post.created_at.astimezone(UTC)
    stripped = text.lstrip()
    return [
        float(len(bare.strip())),
        float(len(bare.split())),
        float(len(_HASHTAG.findall(text))),
        float(len(_MENTION.findall(text))),
        float(len(_URL.findall(text))),
        float(bool(_MEDIA.search(text))),
        float(stripped.startswith(('"', "\u201c"))),
        float(stripped.startswith("@") or stripped.startswith('"@')),
        float(text.count("!")),
        sum(c.isupper() for c in letters) / len(letters) if letters else 0.0,
        float(post.is_reply),
        float(when.hour),
        float(when.weekday()),
    ]


def _log_median(values: np.ndarray) -> float:
    return math.log1p(float(np.median(values)))


def history_features(
    t: float, times: np.ndarray, retweets: np.ndarray, favs: np.ndarray
) -> list[float]:
    """Features of the author's trailing history at time ``t`` (epoch seconds), in
    ``HISTORY_FEATURES`` order.

    ``times`` (epoch s), ``retweets``, ``favs`` (NaN: unknown): the author's latest
    predecessors, oldest first, every one strictly before ``t``; at least
    ``HISTORY_MIN``. Engagement features are log1p ratios to the median retweets of the
    last 100 (``base``): spread (90th and 25th percentiles), trend (median of the last
    20), momentum (median of the last 5, best and mean of the last 10), the share of the
    last 100 and last 20 at or above ``VIRAL_FACTOR`` times ``base``, the level of the
    last 100 against all of the window, and favourites per retweet (last 100, and the
    last 20 against them); ``gap_s`` is the log seconds since the previous post and
    ``posts_24h`` the posts in the day before ``t``.
    """
    rt = retweets.astype(np.float64)
    last100 = rt[-HISTORY_MIN:]
    base = _log_median(last100)
    logs = np.log1p(rt)
    fav = favs[-HISTORY_MIN:]
    known = ~np.isnan(fav)
    if known.sum() >= 20:
        fav_ratio = _log_median(fav[known]) - _log_median(last100[known])
        recent = known.copy()
        recent[:-20] = False
        fav_recent = (
            _log_median(fav[recent]) - _log_median(last100[recent]) - fav_ratio
            if recent.sum() >= 5
            else math.nan
        )
    else:
        fav_ratio = fav_recent = math.nan
    threshold = VIRAL_FACTOR * float(np.median(last100))
    return [
        float(np.quantile(logs[-HISTORY_MIN:], 0.9)) - base,
        float(np.quantile(logs[-HISTORY_MIN:], 0.25)) - base,
        _log_median(rt[-20:]) - base,
        _log_median(rt[-5:]) - base,
        float(logs[-10:].max()) - base,
        float(logs[-10:].mean()) - base,
        float((last100 >= threshold).mean()),
        float((rt[-20:] >= threshold).mean()),
        base - _log_median(rt),
        fav_ratio,
        fav_recent,
        math.log1p(max(t - float(times[-1]), 0.0)),
        float((times >= t - 86400.0).sum()),
    ]


@dataclass(frozen=True)
class _History:
    """One author's known posts as arrays sorted by time (epoch s)."""

    times: np.ndarray
    retweets: np.ndarray
    favs: np.ndarray

    @classmethod
    def of(cls, posts: Iterable[Post]) -> _History:
        known = sorted(
            (p for p in posts if p.retweet_count is not None),
            key=lambda p: (p.created_at, p.key),
        )
        return cls(
            times=np.array([p.created_at.timestamp() for p in known], dtype=np.float64),
            retweets=np.array([p.retweet_count for p in known], dtype=np.float64),
            favs=np.array(
                [math.nan if p.favorite_count is None else p.favorite_count for p in known],
                dtype=np.float64,
            ),
        )

    def before(self, t: float) -> slice:
        """The latest ``HISTORY_WINDOW`` posts strictly before ``t``."""
        end = int(np.searchsorted(self.times, t, side="left"))
        return slice(max(0, end - HISTORY_WINDOW), end)


def feature_rows(
    posts: Sequence[Post], histories: Mapping[str, Sequence[Post]]
) -> tuple[np.ndarray, np.ndarray]:
    """The features of ``posts`` (``FEATURES``; the model appends the text's embedding),
    and which are scored.

    ``histories`` maps an author to their known posts (any order, may include the posts
    themselves and later ones: only posts strictly before each post's ``created_at``,
    with a ``retweet_count``, are used). Returns ``(X, scored)``: X is float64 of shape
    (n, len(FEATURES)) and its rows are NaN where ``scored`` (n,
    bool) is False: the post has fewer than ``HISTORY_MIN`` predecessors.
    """
    X = np.full((len(posts), len(FEATURES)), np.nan)
    scored = np.zeros(len(posts), dtype=bool)
    cache: dict[str, _History] = {}
    width = len(TEXT_FEATURES) + len(HISTORY_FEATURES)
    for i, post in enumerate(posts):
        history = cache.get(post.author)
        if history is None:
            history = cache[post.author] = _History.of(histories.get(post.author, ()))
        t = post.created_at.timestamp()
        window = history.before(t)
        if window.stop < HISTORY_MIN:
            continue
        X[i, :width] = text_features(post) + history_features(
            t, history.times[window], history.retweets[window], history.favs[window]
        )
        scored[i] = True
    return X, scored


def labels(posts: Sequence[Post], histories: Mapping[str, Sequence[Post]]) -> np.ndarray:
    """The label of each post: 1 viral, 0 not, -1 not scored (fewer than
    ``HISTORY_MIN`` predecessors, or no ``retweet_count`` of its own).

    Viral: ``retweet_count >= VIRAL_FACTOR * median(retweet_count of the author's
    previous HISTORY_MIN posts)``, *previous* meaning strictly earlier ``created_at``
    among ``histories[author]`` (see ``feature_rows``).
    """
    out = np.full(len(posts), -1, dtype=np.int8)
    cache: dict[str, _History] = {}
    for i, post in enumerate(posts):
        history = cache.get(post.author)
        if history is None:
            history = cache[post.author] = _History.of(histories.get(post.author, ()))
        window = history.before(post.created_at.timestamp())
        if window.stop < HISTORY_MIN or post.retweet_count is None:
            continue
        median = float(np.median(history.retweets[window][-HISTORY_MIN:]))
        out[i] = int(post.retweet_count >= VIRAL_FACTOR * median)
    return out


def parse_date(value: str) -> datetime:
    """``YYYY-MM-DD`` or an ISO 8601 timestamp as an aware UTC datetime (naive: UTC).

    Raises:
        ValueError: not such a date.
    """
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a date: {value!r} (expected YYYY-MM-DD or ISO 8601)") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _count(value: str | None) -> int | None:
    if value is None or not value.strip() or value.strip().upper() == "NA":
        return None
    return int(float(value))


def read_csv(path: Path) -> list[Post]:
    """The posts of a CSV in the trump_tweets layout (``../shared/data/trump_tweets/``),
    sorted by ``created_at``. Rows with ``is_retweet`` TRUE are skipped (a retweet's count
    is the original's). The author is ``screen_name`` when there is such a column, else
    one author for the whole file.

    Raises:
        DataError: the file is missing or unreadable, a required column
            (``CSV_COLUMNS``) is missing, or a row has a malformed date or count (the
            message names the line).
    """
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    posts: list[Post] = []
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(
                    f"{path.name} lacks the column(s) {', '.join(missing)} "
                    f"(needs {', '.join(CSV_COLUMNS)})"
                )
            for row in reader:
                if (row.get("is_retweet") or "").strip().upper() == "TRUE":
                    continue
                try:
                    created = parse_date(row["created_at"] or "")
                    retweets = _count(row["retweet_count"])
                    favs = _count(row.get("favorite_count"))
                except ValueError as exc:
                    raise DataError(f"{path.name}, line {reader.line_num}: {exc}") from None
                reply = (row.get("in_reply_to_user_id_str") or "").strip()
                posts.append(
                    Post(
                        author=(row.get("screen_name") or "").strip() or "author",
                        created_at=created,
                        text=row["text"] or "",
                        is_reply=bool(reply) and reply.upper() != "NA",
                        source=(row.get("source") or "").strip(),
                        retweet_count=retweets,
                        favorite_count=favs,
                        key=(row.get("id_str") or "").strip() or str(reader.line_num),
                    )
                )
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    posts.sort(key=lambda p: (p.created_at, p.key))
    return posts


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


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(y, p)), 4)


def _vectors(
    texts: Sequence[str], progress: Callable[[int], None] | None, cache: dict[str, np.ndarray]
) -> np.ndarray:
    """Sentence vectors of ``texts`` (n, 384), through ``cache`` (text -> vector)."""
    from mlengine.training import embed_all

    todo = list(dict.fromkeys(t for t in texts if t not in cache))
    if todo:
        cache.update(zip(todo, embed_all(todo, progress), strict=True))
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return np.stack([cache[t] for t in texts])


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

    Side effects: embeds the texts (``mlengine.encoder``, ~600 texts/s on a CPU), writes
    ``MODELS_DIR/virality/vN/model.npz`` and the ModelVersion row.

    Raises:
        DataError: the CSV is unreadable, or too few scored posts of either class.
    """
    from django.conf import settings
    from django.db import connection, transaction
    from django.db.models import Max

    from mlengine.models import ModelVersion
    from mlengine.training import _digest

    posts = read_csv(data)
    known = [p for p in posts if until is None or p.created_at < until]
    split = _split(known, _by_author(known), None, None)
    if len(split.y) < 50:
        raise DataError(
            f"{data.name} has {len(split.y)} scored posts before {until or 'its end'}: a "
            f"post is scored after {HISTORY_MIN} earlier posts of its author; needs 50"
        )
    cache: dict[str, np.ndarray] = {}
    vectors = _vectors([p.text for p in split.posts], embed_progress, cache)
    cut = int(len(split.y) * (1 - EVAL_FRACTION))
    held_y = split.y[cut:]
    if min(int(held_y.sum()), int(len(held_y) - held_y.sum())) < 1:
        raise DataError("the held-out latest posts are all of one class: no ROC-AUC")
    trial = fit(split.rows[:cut], vectors[:cut], split.y[:cut])
    score = _auc(held_y, trial.probabilities(trial.design(split.rows[cut:], vectors[cut:])))
    model = fit(split.rows, vectors, split.y)
    staging = Path(settings.MODELS_DIR) / TASK / f".staging-{uuid.uuid4().hex}"
    model.save(staging / "model.npz")
    digest = _digest(staging)
    first, last = split.posts[0].created_at, split.posts[-1].created_at
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"ml-head:{TASK}"])
        active = ModelVersion.objects.filter(task=TASK, active=True).first()
        previous_score = None
        if active is not None:
            try:
                served = _load(active)
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
        mlengine.training.NoTrainedModel: no active virality model.
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
    vectors = _vectors([p.text for p in split.posts], embed_progress, {})
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


ALERT_MIN_SCORE = 0.5
"""The least ``min_score`` (P(viral)) a "viral_post" alert rule may have: posts scored
below it are not handed to the alerts stage at all."""
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


_loaded: dict[int, ViralityModel] = {}


def _load(version: Any) -> ViralityModel:
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
        mlengine.training.NoTrainedModel: none is active, or its artefact is missing or
            unreadable.
    """
    from mlengine.models import ModelVersion
    from mlengine.training import NoTrainedModel

    version = ModelVersion.objects.filter(task=TASK, active=True).first()
    if version is None:
        raise NoTrainedModel(f"no trained {TASK} model: run `manage.py train {TASK} --data CSV`")
    try:
        return _load(version)
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
    (``mlengine.encoder``: blocking, call it from a worker). No other side effect.
    """
    rows, scored = feature_rows(posts, histories)
    index = np.flatnonzero(scored)
    scores: list[float | None] = [None] * len(posts)
    if len(index):
        if vectors is None:
            picked = _vectors([posts[int(i)].text for i in index], None, {})
        else:
            picked = np.asarray(vectors)[index]
        p = model.probabilities(model.design(rows[index], picked))
        for i, value in zip(index, p, strict=True):
            scores[int(i)] = round(float(value), 4)
    return [ViralityScore(score=s, model_version=model.version) for s in scores]
