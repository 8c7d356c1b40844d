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
  ``story_params()``: one alert per story, as
  ``mlengine.trends.story_assignment.assign_stories`` and the alerts stage give one).

Per event: ``alerts`` fired; ``first_alert_delay_h``, hours from the onset (the event
time of the earliest tweet that holds every word of one of the event's keywords, words
being ``\\w+`` runs, case-insensitive) to the first moment an alert names a keyword word
(one of its terms, without ``#``/``@``, is one; a story names it from the update that
added that member), or None; ``keyword_precision``, the share of alerts with
such a term; ``peak_lead_h``, hours from the first alert to the start of the UTC hour
with the most tweets. Medians over events (None values left out).
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
from mlengine.trends.stories import StoryDetector, StoryParams

Detector = Literal["terms", "stories"]
DETECTORS: tuple[Detector, ...] = ("terms", "stories")
DEFAULT_RULE_COOLDOWN_S = 24 * 3600
"""The default "New trend" rule's cooldown (``alerts.services.ensure_default_rule``)."""
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
    members, each when its update added it)."""

    at: datetime
    terms: tuple[str, ...]
    added: tuple[datetime, ...] = ()

    def named_at(self, words: frozenset[str]) -> datetime | None:
        """Event time from which the alert names one of ``words``, or None."""
        times = self.added or (self.at,) * len(self.terms)
        found = [t for term, t in zip(self.terms, times, strict=True) if _is_word(term, words)]
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
            text = row[1]
            found = cache.get(text)
            if found is None:
                found = cache[text] = enrich_text(text)
            terms = tuple(
                dict.fromkeys(
                    t[:TERM_MAX_CHARS]
                    for t in (*found.hashtags, *found.mentions, *found.cashtags, *found.keywords)
                )
            )
            posts.append(
                Post(
                    id=int(external_id),
                    external_id=external_id,
                    created_at=created_at,
                    author=Author().key(external_id)[:128],
                    terms=terms,
                    text=text,
                )
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
    """Alerts of the story layer: one per story, at its first event ("new" or
    "emerging"), naming the story's members as of its last update."""
    detector = StoryDetector(params, story_params or production_story_params())
    first: dict[int, datetime] = {}
    members: dict[int, dict[str, datetime]] = {}
    for event in detector.step(posts):
        at = event.trend.evidence_created_at
        first.setdefault(event.story_id, at)
        members.setdefault(event.story_id, {}).setdefault(event.term, at)
    return [
        Alert(at=first[i], terms=tuple(members[i]), added=tuple(members[i].values()))
        for i in sorted(first, key=first.__getitem__)
    ]


def onset(event: CrisisEvent) -> datetime | None:
    """Event time of the earliest post holding every word of one of the keywords."""
    keys = [_words(k) for k in event.keywords]
    for post in event.posts:
        words = _words(post.text)
        if any(key and key <= words for key in keys):
            return post.created_at
    return None


def _is_word(term: str, words: frozenset[str]) -> bool:
    return term.lstrip("#@$").lower() in words


def _hours(delta: timedelta) -> float:
    return round(delta.total_seconds() / 3600, 2)


def metrics(event: CrisisEvent, alerts: Sequence[Alert]) -> dict[str, Any]:
    """The event's figures (module docstring) for ``alerts`` (event-time order)."""
    start = onset(event)
    named = [a for a in alerts if a.named_at(event.keyword_words) is not None]
    named_at = [t for a in named if (t := a.named_at(event.keyword_words)) is not None]
    hours = Counter(p.created_at.replace(minute=0, second=0, microsecond=0) for p in event.posts)
    peak = min(h for h, n in hours.items() if n == max(hours.values()))
    return {
        "name": event.name,
        "alerts": len(alerts),
        "first_alert_delay_h": _hours(min(named_at) - start) if named_at and start else None,
        "keyword_precision": round(len(named) / len(alerts), 3) if alerts else None,
        "peak_lead_h": _hours(peak - alerts[0].at) if alerts else None,
    }


def _median(values: Iterable[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(statistics.median(present)), 2) if present else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"events": rows, "median_first_alert_delay_h", "median_alerts"}``."""
    return {
        "events": rows,
        "median_first_alert_delay_h": _median(r["first_alert_delay_h"] for r in rows),
        "median_alerts": _median(r["alerts"] for r in rows),
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
    ``bucket_s`` and ``onset`` added.

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
        row["bucket_s"] = params.bucket_s
        row["onset"] = start.isoformat() if start else None
        rows.append(row)
    result = summarise(rows)
    result["detector"] = detector
    return result
