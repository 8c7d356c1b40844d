"""``evaluate trends --crisislex DIR``: the trend detector replayed on CrisisLexT26 events.

CrisisLexT26 (Olteanu, Vieweg & Castillo, "What to expect when the unexpected happens:
social media communications across crises", CSCW 2015; ``../shared/data/crisislex_t26``)
gives, per crisis, about 1,000 crowd-labelled tweets collected by keyword, and the
keywords. Each ``DIR/<event>/`` is one stream, replayed as production would live through
it, with production's code and parameters:

- a post per labelled tweet: event time from the snowflake id (``ms = (id >> 22) +
  1288834974657``, ``ingest.sources.replay.rows.snowflake_time``), terms from
  ``mlengine.enrichment.text.enrich_text`` exactly as the enrich stage and
  ``ingest.selectors.events_for_trends`` make them, author key ``Author().key(id)`` (the
  set has no author: each post is its own author, as a replay of it is); posts in event
  order, ties by external id;
- the bucket that ``bucket_s_for`` gives a replayed source (``suggest_bucket_s`` of its
  events per active day), the other thresholds from settings (``params_for``);
- two detectors: ``terms`` (the detector before the story layer: every term trend is a
  candidate alert, and the default "New trend" rule fires once per term per 24 h of
  event time) and ``stories`` (``mlengine.trends.stories.StoryDetector`` with production's
  ``story_params()``, through the default rule as ``alerts.evaluation.evaluate_trends``
  applies it to stories: ``rule_alerts``).

Per event: ``alerts`` fired; ``first_alert_delay_h``, hours from the onset (the event
time of the earliest tweet that holds every word of one of the event's keywords, words
being ``\\w+`` runs, case-insensitive) to the first moment an alert names a keyword word
(one of its terms, without ``#``/``@``, is one; a story names it from the update that
added that member), or None; ``delay_from_burst_h``, hours from the event's detectable
burst (``detectable_burst``: the event time at which a burst of the labelled sample, by
Kleinberg's automaton, first holds ``BURST_POSTS`` posts within ``BURST_WINDOW``) to that
same first keyword alert, or None;
``keyword_precision``, the share of alerts with such a term; ``peak_lead_h``, hours from
the first alert to the start of the UTC hour with the most tweets. Medians over events
(None values left out), and the mean alerts per event.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from django.conf import settings

from ingest.envelope import Author
from ingest.selectors import TERM_MAX_CHARS
from ingest.services import events_per_active_day
from ingest.sources.replay.rows import snowflake_time
from mlengine.enrichment.text import Enrichment, enrich_text
from mlengine.trends.detector import TermStream, TrendParams, suggest_bucket_s
from mlengine.trends.params import params_for
from mlengine.trends.params import story_params as production_story_params
from mlengine.trends.stories import StoryDetector, StoryEvent, StoryParams

Detector = Literal["terms", "stories"]
DETECTORS: tuple[Detector, ...] = ("terms", "stories")
DEFAULT_RULE_COOLDOWN_S = 24 * 3600
"""The default "New trend" rule's cooldown (``alerts.services.ensure_default_rule``)."""
BURST_POSTS = 5
BURST_WINDOW = timedelta(hours=1)
"""An event's detectable burst: the first moment one of its bursts holds ``BURST_POSTS``
posts within ``BURST_WINDOW`` (``detectable_burst``)."""
BURST_RATIO = 2.0
BURST_GAMMA = 1.0
"""Kleinberg's burst automaton: the burst state's rate over the base rate, and the cost
of entering it in units of ``ln n`` (``kleinberg_bursts``)."""
_WORD_RE = re.compile(r"\w+")


class CrisisLexError(ValueError):
    """The folder is not a CrisisLexT26 layout; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class Post:
    """One labelled tweet as the trend stage sees it (``mlengine.trends.detector.StreamPost``)."""

    id: int
    external_id: str
    created_at: datetime
    author: str
    terms: tuple[str, ...]
    text: str


@dataclass(frozen=True, slots=True)
class CrisisEvent:
    """One event folder: ``name`` (the folder), ``posts`` in replay order, ``keywords``
    (from ``<event>-event_description.json``) and their lower-cased words."""

    name: str
    posts: tuple[Post, ...]
    keywords: tuple[str, ...]
    keyword_words: frozenset[str]


@dataclass(frozen=True, slots=True)
class Alert:
    """An alert of the replay: the event time it fired at and the terms it names, each
    with the event time it was added (a term alert: its term, at ``at``; a story: its
    members, each from the alert or the later update that named it). ``trended``: per
    term, the ``(bucket start, evidence event time)`` of the trend that made it a member
    (empty when not recorded), so a caller can tell which posts drove it."""

    at: datetime
    terms: tuple[str, ...]
    added: tuple[datetime, ...] = ()
    trended: tuple[tuple[datetime, datetime], ...] = field(default=())

    def named_at(self, words: frozenset[str]) -> datetime | None:
        """Event time from which the alert names one of ``words``, or None."""
        times = self.added or (self.at,) * len(self.terms)
        found = [t for term, t in zip(self.terms, times, strict=True) if names_word(term, words)]
        return min(found, default=None)


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD_RE.findall(text)}


def event_dirs(root: Path) -> list[Path]:
    """The event folders of ``root`` (those holding a ``*-tweets_labeled.csv``), by name.

    Raises:
        CrisisLexError: ``root`` is not a folder or holds no event folder.
    """
    if not root.is_dir():
        raise CrisisLexError(f"{root}: not a folder (expected CrisisLexT26's event folders)")
    found = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*-tweets_labeled.csv")))
    if not found:
        raise CrisisLexError(f"{root}: no <event>/<event>-tweets_labeled.csv folders in it")
    return found


def load_event(folder: Path, *, enrich: dict[str, Enrichment] | None = None) -> CrisisEvent:
    """Read one event folder (see the module docstring). ``enrich`` caches enrichments
    by text across calls (copies and retweets repeat a text).

    Raises:
        CrisisLexError: the labelled CSV or the description is missing or unreadable,
            or the CSV holds no tweet with a snowflake id.
    """
    labelled = sorted(folder.glob("*-tweets_labeled.csv"))
    described = sorted(folder.glob("*-event_description.json"))
    if not labelled or not described:
        raise CrisisLexError(
            f"{folder}: needs <event>-tweets_labeled.csv and <event>-event_description.json"
        )
    try:
        keywords = tuple(str(k) for k in json.loads(described[0].read_text("utf-8"))["keywords"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CrisisLexError(f"{described[0]}: no readable 'keywords' list ({exc})") from exc
    cache = enrich if enrich is not None else {}
    posts: list[Post] = []
    with labelled[0].open(newline="", encoding="utf-8", errors="replace") as handle:
        rows = csv.reader(handle)
        next(rows, None)
        for row in rows:
            if len(row) < 2:
                continue
            external_id = row[0].strip().strip("'\"")
            if not external_id.isdigit():
                continue
            try:
                created_at = snowflake_time(int(external_id))
            except ValueError:
                continue
            posts.append(
                to_post(int(external_id), external_id, created_at, Author(), row[1], cache)
            )
    if not posts:
        raise CrisisLexError(f"{labelled[0]}: no tweet with a snowflake id")
    posts.sort(key=lambda p: (p.created_at, p.external_id))
    return CrisisEvent(
        name=folder.name,
        posts=tuple(posts),
        keywords=keywords,
        keyword_words=frozenset(w for k in keywords for w in _words(k)),
    )


def to_post(
    id: int,
    external_id: str,
    created_at: datetime,
    author: Author,
    text: str,
    cache: dict[str, Enrichment],
) -> Post:
    """A post as the trend stage reads it: terms from ``enrich_text`` as the enrich stage
    stores them and ``ingest.selectors.distinct_terms`` reads them back (hashtags,
    mentions, cashtags, keywords, each cut to ``TERM_MAX_CHARS``), the distinct-author key
    ``author.key(external_id)`` as ``ingest.selectors`` makes it. ``cache`` holds the
    enrichments by text (side effect: new texts are added)."""
    found = cache.get(text)
    if found is None:
        found = cache[text] = enrich_text(text)
    terms = tuple(
        dict.fromkeys(
            t[:TERM_MAX_CHARS]
            for t in (*found.hashtags, *found.mentions, *found.cashtags, *found.keywords)
        )
    )
    return Post(
        id=id,
        external_id=external_id,
        created_at=created_at,
        author=author.key(external_id)[:128],
        terms=terms,
        text=text,
    )


def production_params(posts: Sequence[Post]) -> TrendParams:
    """The parameters production gives a replayed stream of ``posts``: the bucket of
    ``mlengine.trends.params.bucket_s_for`` (a replay records its events per active day),
    the rest from settings."""
    per_day = events_per_active_day([p.created_at for p in posts])
    return params_for(suggest_bucket_s(per_day, min_events=settings.TRENDS_MIN_EVENTS))


def term_alerts(posts: Sequence[Post], params: TrendParams) -> list[Alert]:
    """Alerts of the term-level detector: each term trend, through the default rule's
    per-term cooldown (event time, by bucket start, as ``alerts.claims`` claims it)."""
    last: dict[str, datetime] = {}
    alerts = []
    cooldown = timedelta(seconds=DEFAULT_RULE_COOLDOWN_S)
    for trend in TermStream(params).step(posts):
        before = last.get(trend.term)
        if before is not None and trend.bucket_start - before < cooldown:
            continue
        last[trend.term] = trend.bucket_start
        alerts.append(Alert(at=trend.evidence_created_at, terms=(trend.term,)))
    return alerts


def story_alerts(
    posts: Sequence[Post], params: TrendParams, story_params: StoryParams | None = None
) -> list[Alert]:
    """Alerts of the story layer through the default rule: ``rule_alerts`` of
    ``StoryDetector(params, story_params or story_params())``'s events on ``posts``."""
    detector = StoryDetector(params, story_params or production_story_params())
    return rule_alerts(detector.step(posts))


@dataclass(slots=True)
class _Firing:
    at: datetime
    named: dict[str, datetime]
    trended: dict[str, tuple[datetime, datetime]]


def rule_alerts(
    events: Iterable[StoryEvent], cooldown_s: int = DEFAULT_RULE_COOLDOWN_S
) -> list[Alert]:
    """The alerts a "new trend" rule with no filters and ``cooldown_s`` fires on story
    ``events`` (event-time order, as ``StoryDetector.step`` returns them), in order of
    firing: the in-memory form of ``alerts.evaluation.evaluate_trends`` (``_decide``,
    ``alerts.claims.Cooldowns.claim``), which this app cannot import.

    - A trend is a term in a bucket: the first event of a ``(term, bucket start)`` (a
      later one is the confirmation of a predicted trend, the same stored trend, which
      production only updates: ``confirm_trends``).
    - A trend of a story that has an alert joins it: the alert names its term from the
      trend's evidence time.
    - Otherwise the trend claims the cooldown of its term at its bucket start: it wins when
      the term never won, or won at an earlier bucket at least ``cooldown_s`` before.
      A win fires the story's alert, at the trend's evidence time, naming every member
      of the story so far; a loss leaves the story without an alert, and a later member
      may still fire it.
    """
    seen: set[tuple[str, datetime]] = set()
    last_win: dict[str, datetime] = {}
    members: dict[int, dict[str, tuple[datetime, datetime]]] = {}
    fired: dict[int, _Firing] = {}
    cooldown = timedelta(seconds=cooldown_s)
    for event in events:
        trend = event.trend
        story = members.setdefault(event.story_id, {})
        story.setdefault(event.term, (trend.bucket_start, trend.evidence_created_at))
        if (event.term, trend.bucket_start) in seen:
            continue
        seen.add((event.term, trend.bucket_start))
        firing = fired.get(event.story_id)
        if firing is not None:
            firing.named.setdefault(event.term, trend.evidence_created_at)
            firing.trended.setdefault(event.term, story[event.term])
            continue
        won = last_win.get(event.term)
        if won is not None and (won >= trend.bucket_start or won > trend.bucket_start - cooldown):
            continue
        last_win[event.term] = trend.bucket_start
        at = trend.evidence_created_at
        fired[event.story_id] = _Firing(at, dict.fromkeys(story, at), dict(story))
    return [
        Alert(
            at=f.at,
            terms=tuple(f.named),
            added=tuple(f.named.values()),
            trended=tuple(f.trended[t] for t in f.named),
        )
        for f in sorted(fired.values(), key=lambda f: f.at)
    ]


def onset(event: CrisisEvent) -> datetime | None:
    """Event time of the earliest post holding every word of one of the keywords."""
    keys = [_words(k) for k in event.keywords]
    for post in event.posts:
        words = _words(post.text)
        if any(key and key <= words for key in keys):
            return post.created_at
    return None


def kleinberg_bursts(
    times: Iterable[datetime], *, s: float = BURST_RATIO, gamma: float = BURST_GAMMA
) -> list[tuple[datetime, datetime]]:
    """The burst intervals of ``times`` (event times, any order) by Kleinberg's two-state
    automaton on inter-arrival gaps (J. Kleinberg, "Bursty and hierarchical structure in
    streams", KDD 2002, §2): gaps are exponential with the sample's mean rate ``n / T`` in
    the base state and ``s`` times it in the burst state; entering the burst state costs
    ``gamma · ln n``; the cheapest state sequence (Viterbi) is kept. ``s = 2`` and
    ``gamma = 1`` are the paper's own settings.

    Returns ``[(first, last)]``, the event times of each burst's first and last post, in
    order; ``[]`` for fewer than 3 posts or when no stretch is bursty. O(n log n)."""
    ordered = sorted(times)
    if len(ordered) < 3:
        return []
    gaps = [max((b - a).total_seconds(), 1e-3) for a, b in itertools.pairwise(ordered)]
    base = len(gaps) / sum(gaps)
    rates = (base, s * base)
    enter = gamma * math.log(len(gaps))
    cost = (0.0, math.inf)
    came_from: list[tuple[int, int]] = []
    for gap in gaps:
        steps = []
        for state in (0, 1):
            stay, switch = cost[state], cost[1 - state] + (enter if state == 1 else 0.0)
            steps.append((stay, state) if stay <= switch else (switch, 1 - state))
        emit = [rate * gap - math.log(rate) for rate in rates]
        cost = (steps[0][0] + emit[0], steps[1][0] + emit[1])
        came_from.append((steps[0][1], steps[1][1]))
    state = 0 if cost[0] <= cost[1] else 1
    states = []
    for back in reversed(came_from):
        states.append(state)
        state = back[state]
    states.reverse()
    bursts: list[tuple[datetime, datetime]] = []
    for i, bursty in enumerate(states):
        # gap i runs from post i to post i + 1: a bursty gap puts both in the burst.
        if not bursty:
            continue
        if bursts and bursts[-1][1] == ordered[i]:
            bursts[-1] = (bursts[-1][0], ordered[i + 1])
        else:
            bursts.append((ordered[i], ordered[i + 1]))
    return bursts


def first_dense_moment(
    times: Iterable[datetime], *, posts: int = BURST_POSTS, window: timedelta = BURST_WINDOW
) -> datetime | None:
    """The first moment ``times`` (event times, any order) hold ``posts`` posts within
    ``window``: the time of the earliest post whose ``posts - 1`` predecessors all lie at
    most ``window`` before it (a sliding window over the sorted times); None when no
    stretch is that dense."""
    ordered = sorted(times)
    for i in range(posts - 1, len(ordered)):
        if ordered[i] - ordered[i - posts + 1] <= window:
            return ordered[i]
    return None


def detectable_burst(
    times: Iterable[datetime], *, posts: int = BURST_POSTS, window: timedelta = BURST_WINDOW
) -> datetime | None:
    """An event's detectable burst: the first moment at which one of its bursts
    (``kleinberg_bursts``) holds ``posts`` posts within ``window``
    (``first_dense_moment`` over that burst's posts); None when no burst is that dense.
    A sample with no burst against its own rate (a steady one, all surge) is taken
    whole: ``first_dense_moment`` of all its posts.

    A keyword-collected sample often holds days of chatter before its event; five such
    posts in an hour are no burst against the event's own rate. The burst state is
    relative to the sample's mean rate, so the moment found is the event's surge: on the
    public CrisisLexT26 events it falls 6 to 60 minutes after the recorded times of the
    Costa Rica, Bohol and Italy earthquakes and the Sydney fires' first day, where the
    fixed window alone fell 13 h and 4 days early."""
    ordered = sorted(times)
    bursts = kleinberg_bursts(ordered)
    if not bursts:
        return first_dense_moment(ordered, posts=posts, window=window)
    for first, last in bursts:
        moment = first_dense_moment(
            [t for t in ordered if first <= t <= last], posts=posts, window=window
        )
        if moment is not None:
            return moment
    return None


def names_word(term: str, words: frozenset[str]) -> bool:
    """Whether the term (a hashtag, mention, cashtag or keyword) is one of ``words``
    (lower-case keyword words), without its ``#``/``@``/``$``, case-insensitive."""
    return term.lstrip("#@$").lower() in words


def _hours(delta: timedelta) -> float:
    return round(delta.total_seconds() / 3600, 2)


def metrics(event: CrisisEvent, alerts: Sequence[Alert]) -> dict[str, Any]:
    """The event's figures (module docstring) for ``alerts`` (event-time order)."""
    start = onset(event)
    burst = detectable_burst(p.created_at for p in event.posts)
    named = [a for a in alerts if a.named_at(event.keyword_words) is not None]
    named_at = [t for a in named if (t := a.named_at(event.keyword_words)) is not None]
    hours = Counter(p.created_at.replace(minute=0, second=0, microsecond=0) for p in event.posts)
    peak = min(h for h, n in hours.items() if n == max(hours.values()))
    return {
        "name": event.name,
        "alerts": len(alerts),
        "first_alert_delay_h": _hours(min(named_at) - start) if named_at and start else None,
        "delay_from_burst_h": _hours(min(named_at) - burst) if named_at and burst else None,
        "keyword_precision": round(len(named) / len(alerts), 3) if alerts else None,
        "peak_lead_h": _hours(peak - alerts[0].at) if alerts else None,
    }


def median(values: Iterable[float | int | None]) -> float | None:
    """The median of the values that are not None, rounded to 2 decimals; None if none."""
    present = [v for v in values if v is not None]
    return round(float(statistics.median(present)), 2) if present else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"events": rows, "median_first_alert_delay_h", "median_delay_from_burst_h",
    "median_keyword_precision", "median_alerts", "alerts_per_event"}`` (the last the mean,
    None without rows)."""
    return {
        "events": rows,
        "median_first_alert_delay_h": median(r["first_alert_delay_h"] for r in rows),
        "median_delay_from_burst_h": median(r["delay_from_burst_h"] for r in rows),
        "median_keyword_precision": median(r["keyword_precision"] for r in rows),
        "median_alerts": median(r["alerts"] for r in rows),
        "alerts_per_event": (
            round(sum(r["alerts"] for r in rows) / len(rows), 2) if rows else None
        ),
    }


def evaluate(
    root: Path,
    *,
    detector: Detector = "stories",
    story_params: StoryParams | None = None,
    events: Sequence[CrisisEvent] | None = None,
) -> dict[str, Any]:
    """Replay every event folder of ``root`` (or the pre-loaded ``events``) through
    ``detector``; return ``summarise``'s result, with ``detector`` and each event's
    ``bucket_s``, ``onset`` and ``burst`` (ISO 8601, or None) added.

    Raises:
        CrisisLexError: ``root`` or an event folder is not CrisisLexT26's layout.
        ValueError: an unknown ``detector``.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}: one of {', '.join(DETECTORS)}")
    if events is None:
        cache: dict[str, Enrichment] = {}
        events = [load_event(folder, enrich=cache) for folder in event_dirs(root)]
    rows = []
    for event in events:
        params = production_params(event.posts)
        if detector == "terms":
            alerts = term_alerts(event.posts, params)
        else:
            alerts = story_alerts(event.posts, params, story_params)
        row = metrics(event, alerts)
        start = onset(event)
        burst = detectable_burst(p.created_at for p in event.posts)
        row["bucket_s"] = params.bucket_s
        row["onset"] = start.isoformat() if start else None
        row["burst"] = burst.isoformat() if burst else None
        rows.append(row)
    result = summarise(rows)
    result["detector"] = detector
    return result
