"""The stories of the trend stage's new trends, on the database path: each joins a story
by the rule of ``mlengine.trends.stories.choose_story`` and stores its story's forecast
(``mlengine.trends.forecast``), in a fixed number of queries (``assign_stories``).
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection

from ingest import selectors as ingest_selectors
from mlengine.models import Trend
from mlengine.trends.forecast import forecast_volume
from mlengine.trends.params import story_params
from mlengine.trends.stories import StoryParams, choose_story

STORY_EVENTS_LIMIT = 50_000
"""At most this many events are read in one query for one ``assign_stories`` call (a
few hundred bytes each in memory: tens of MB at most). A call whose range holds more
reads each trend's posts and forecast volume in queries of their own instead."""


def assign_stories(source_id: int, trend_ids: Sequence[int]) -> None:
    """Put each new trend of ``source_id`` in a story, in event-time order of detection.

    The rule is ``mlengine.trends.stories.choose_story``, on the same posts as the in-memory
    ``StoryDetector``: the trend's posts in its bucket up to its evidence and in the
    bucket before (at most ``max_postings`` a bucket), against each live story's. A live
    story is one with a member in the ``ttl`` before (the baseline window); it holds all
    its members, however old (``live_stories``). A term already in a live story stays
    in it. An always-on trend (``Trend.always_on``) joins a story only through the posts
    of its members that are not always on, and joins no story otherwise (``story`` stays
    null; the alerts stage then fires only rules naming its term), as
    ``StoryDetector`` does. The trends are taken by evidence event time (ties: bucket,
    then term) and the stories in the order they were founded, so the stories and forecasts are a
    function of the events alone: the same whichever calls the trends arrive in
    (full speed or paced, any batch boundaries) and whatever order the rows lie in.
    Each trend also stores its story's forecast (``mlengine.trends.forecast.forecast``)
    of posts per bucket holding any member, the current bucket projected to its end.

    Four queries whatever the number of trends: the new trends, the live stories'
    members (``live_stories``), the events that any of their terms or the new trends'
    hold in the range the posts and forecasts need (``_StoryEvents``: the posts and
    volumes are then cut from them in memory, as ``events_for_term`` and
    ``volume_of_terms`` would read them), one update of all the new trends.

    Side effects: ``Trend.story`` and ``Trend.forecast`` of ``trend_ids``.
    """
    new = list(
        Trend.objects.filter(id__in=list(trend_ids)).order_by(
            "evidence_created_at", "bucket_start", "term", "id"
        )
    )
    if not new:
        return
    params = story_params()
    bucket_s = new[0].bucket_s
    ttl = timedelta(seconds=settings.TRENDS_BASELINE_BUCKETS * bucket_s)
    stories, last_bucket, always_on = live_stories(source_id, since=new[0].bucket_start - ttl)
    events = _StoryEvents.read(source_id, new, stories.values(), params)
    placed = []
    for trend in new:
        live = {
            sid: terms
            for sid, terms in stories.items()
            if last_bucket[sid] >= trend.bucket_start - ttl
        }
        joined = next((sid for sid, terms in live.items() if trend.term in terms), None)
        if joined is None:
            linking = {sid: terms - always_on.get(sid, set()) for sid, terms in live.items()}
            joined = _closest_story(events, trend, linking, params)
        if joined is None and trend.always_on:
            continue  # an always-on term starts no story: it stays without one
        story_id = joined if joined is not None else trend.id
        members = stories.setdefault(story_id, set())
        if trend.always_on and trend.term not in members:
            # A member is always on as it first joined (live_stories reads it so).
            always_on.setdefault(story_id, set()).add(trend.term)
        members.add(trend.term)
        last_bucket[story_id] = max(
            trend.bucket_start, last_bucket.get(story_id, trend.bucket_start)
        )
        trend.story_id = story_id
        trend.forecast = _story_forecast(events, trend, sorted(stories[story_id]), params)
        placed.append(trend)
    if not placed:
        return
    document = json.dumps(
        [{"id": t.id, "story_id": t.story_id, "forecast": t.forecast} for t in placed]
    )
    with connection.cursor() as cursor:
        cursor.execute(_UPDATE_STORIES_SQL, [document])


def live_stories(
    source_id: int, *, since: datetime
) -> tuple[dict[int, set[str]], dict[int, datetime], dict[int, set[str]]]:
    """The stories of ``source_id`` with a member in a bucket starting at ``since`` or
    later, each with **all** its member terms (however old: a story keeps its members
    while it lives, as ``StoryDetector`` does), the start of its latest member's
    bucket, and its always-on members (which link no term to it): ``({story id: terms},
    {story id: last bucket start}, {story id: always-on terms})``. One query.

    The stories come in the order they were founded: by their first trend's evidence
    event time, then its bucket and term (the story id last). That is a function of the
    events alone, as is the order of ``StoryDetector.stories``, so ``choose_story``'s
    ties go the same way whatever the batch boundaries of the calls that stored them,
    the ids the database gave, or the physical order of the rows.
    """
    live = Trend.objects.filter(
        source_id=source_id, story__isnull=False, bucket_start__gte=since
    ).values("story_id")
    members = (
        Trend.objects.filter(source_id=source_id, story_id__in=live)
        .order_by(
            "story__evidence_created_at",
            "story__bucket_start",
            "story__term",
            "story_id",
            "bucket_start",
            "term",
        )
        .values_list("story_id", "term", "bucket_start", "always_on")
    )
    stories: dict[int, set[str]] = defaultdict(set)
    last_bucket: dict[int, datetime] = {}
    always_on: dict[int, set[str]] = defaultdict(set)
    for story_id, term, start, everyday in members:
        # A member is always on as it first joined (its earliest row), as in StoryDetector.
        if everyday and term not in stories[story_id]:
            always_on[story_id].add(term)
        stories[story_id].add(term)
        last_bucket[story_id] = max(start, last_bucket.get(story_id, start))
    return dict(stories), last_bucket, dict(always_on)


_UPDATE_STORIES_SQL = """
UPDATE mlengine_trend AS tr SET story_id = v.story_id, forecast = v.forecast
FROM jsonb_to_recordset(%s::jsonb) AS v(id bigint, story_id bigint, forecast jsonb)
WHERE tr.id = v.id
"""


class _StoryEvents:
    """The events one ``assign_stories`` call reads, held in memory: ``posts`` and
    ``volume`` give what ``ingest.selectors.events_for_term`` and ``volume_of_terms``
    give, and ask them instead for a read outside what is held (other terms, another
    range or bucket size; every read when the range held more than
    ``STORY_EVENTS_LIMIT`` events)."""

    def __init__(
        self,
        source_id: int,
        held: Sequence[ingest_selectors.TermEvent] | None,
        *,
        terms: frozenset[str] = frozenset(),
        since: datetime | None = None,
        until: datetime | None = None,
        bucket_s: int = 0,
    ) -> None:
        self.source_id = source_id
        self.held = held is not None
        self.terms, self.since, self.until, self.bucket_s = terms, since, until, bucket_s
        # Per term, its events in event-time order (ties by external id), and their times.
        self.by_term: dict[str, list[ingest_selectors.TermEvent]] = defaultdict(list)
        for event in held or ():
            for term in event.matched:
                self.by_term[term].append(event)
        self.times = {
            term: [event.created_at for event in events] for term, events in self.by_term.items()
        }

    @classmethod
    def read(
        cls,
        source_id: int,
        trends: Sequence[Trend],
        stories: Iterable[set[str]],
        params: StoryParams,
    ) -> _StoryEvents:
        """One query: the events holding a term of ``trends`` or of ``stories`` from the
        earliest bucket a trend's posts or forecast look at to the latest evidence."""
        bucket_s = trends[0].bucket_s
        terms = frozenset({trend.term for trend in trends}.union(*stories))
        since = min(
            trend.bucket_start - timedelta(seconds=trend.bucket_s * max(params.horizon + 2, 1))
            for trend in trends
        )
        until = max(trend.evidence_created_at for trend in trends)
        held = ingest_selectors.events_with_terms(
            source_id,
            sorted(terms),
            since=since,
            until=until,
            bucket_s=bucket_s,
            limit=STORY_EVENTS_LIMIT + 1,
        )
        if len(held) > STORY_EVENTS_LIMIT:
            return cls(source_id, None)
        return cls(source_id, held, terms=terms, since=since, until=until, bucket_s=bucket_s)

    def _holds(self, terms: Iterable[str], since: datetime, until: datetime) -> bool:
        return (
            self.held
            and self.since is not None
            and self.until is not None
            and self.since <= since
            and until <= self.until
            and self.terms.issuperset(terms)
        )

    def _in_range(
        self, term: str, since: datetime, until: datetime
    ) -> list[ingest_selectors.TermEvent]:
        times = self.times.get(term, [])
        return self.by_term[term][bisect_left(times, since) : bisect_right(times, until)]

    def posts(
        self, term: str, *, since: datetime, until: datetime, limit: int
    ) -> list[tuple[int, tuple[str, ...]]]:
        """``(id, terms)`` of ``events_for_term(term, since, until, limit)``."""
        if not self._holds([term], since, until):
            return [
                (p.id, p.terms)
                for p in ingest_selectors.events_for_term(
                    self.source_id, term, since=since, until=until, limit=limit
                )
            ]
        return [(e.id, e.terms) for e in self._in_range(term, since, until)[: max(limit, 0)]]

    def volume(
        self, terms: Sequence[str], *, since: datetime, until: datetime, bucket_s: int
    ) -> dict[int, int]:
        """``volume_of_terms(terms, since, until, bucket_s)``."""
        if bucket_s != self.bucket_s or not self._holds(terms, since, until):
            return ingest_selectors.volume_of_terms(
                self.source_id, terms, since=since, until=until, bucket_s=bucket_s
            )
        buckets = {e.id: e.bucket for term in terms for e in self._in_range(term, since, until)}
        volume: dict[int, int] = defaultdict(int)
        for bucket in buckets.values():
            volume[bucket] += 1
        return dict(volume)


def _closest_story(
    events: _StoryEvents, trend: Trend, live: dict[int, set[str]], params: StoryParams
) -> int | None:
    """The live story ``trend`` joins by ``choose_story``, or None."""
    if not live:
        return None
    posts: list[tuple[int, tuple[str, ...]]] = []
    for start in (trend.bucket_start - timedelta(seconds=trend.bucket_s), trend.bucket_start):
        end = min(trend.evidence_created_at, start + timedelta(seconds=trend.bucket_s - 1e-6))
        posts += events.posts(trend.term, since=start, until=end, limit=params.max_postings)
    term_posts = {post_id for post_id, _ in posts}
    # |A ∩ B| needs B only within A: the story's posts among the term's own.
    candidates = {
        sid: {post_id for post_id, post_terms in posts if terms.intersection(post_terms)}
        for sid, terms in live.items()
    }
    return choose_story(term_posts, candidates, params.min_overlap)


def _story_forecast(
    events: _StoryEvents, trend: Trend, terms: list[str], params: StoryParams
) -> dict[str, Any]:
    """The story's forecast at ``trend`` (``mlengine.trends.forecast``), as JSON."""
    bucket_s = trend.bucket_s
    now = int(trend.bucket_start.timestamp())
    since = trend.bucket_start - timedelta(seconds=bucket_s * (params.horizon + 2))
    volume = events.volume(terms, since=since, until=trend.evidence_created_at, bucket_s=bucket_s)
    result = forecast_volume(
        volume,
        bucket_start=now,
        current=volume.get(now, 0),
        elapsed_s=(trend.evidence_created_at - trend.bucket_start).total_seconds(),
        bucket_s=bucket_s,
        horizon=params.horizon,
    )
    return {
        "next_counts": [round(v, 2) for v in result.next_counts],
        "peak_volume": round(result.peak_volume, 2),
        "buckets_to_peak": result.buckets_to_peak,
        "time_to_peak_s": result.buckets_to_peak * bucket_s,
        "growth": round(result.growth, 4),
        "acceleration": round(result.acceleration, 4),
        "method": result.method,
        "bucket_s": bucket_s,
    }
