"""Virality at posting time: will a post be retweeted at least twice as much as its
author usually is? The label, the features and the posts they are read from.

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
sentence vector's first ``PCA_COMPONENTS`` principal components
(``mlengine.inference.encoder``; the model adds them: ``virality_model``).
Engagement features are log ratios to the author's own trailing median: absolute counts
shift by orders of magnitude over time (the 2015-2016 campaign) and a ratio carries
over between regimes, so no feature is an absolute count (adding one measured worse on
the later validation year).

The model that learns from them: ``mlengine.inference.virality_model``; its training and
evaluation: ``mlengine.inference.virality_training`` (docs/virality.md).

**Caveat of the public data.** ``trump_tweets``' counts were taken about January 2018,
long after each post: the history features use the *final* counts of predecessors, a
few of which (the last hours' posts) were still growing when the post arrived. Live, a
predecessor's count is what it is at scoring time, so the public figures are somewhat
optimistic for the momentum features (docs/virality.md).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

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
