"""The story layer of the trend detector: terms that surge together are one story.

A story is what an analyst means by "a trend": ``explosion``, ``plant``, ``waco``,
``#prayfortexas`` of one event, not four. It is built on the term-level detector
(``mlengine.trends.detector.TermStream``, the production one) and is pure: in memory, in event
time, no database.

- Membership by co-occurrence. When a term trends (or is predicted to: "emerging", see
  ``mlengine.trends.forecast``), its recent posts (the posts holding it in its bucket so far and
  in the bucket before) are compared with each live story's recent posts (the union of
  its members'). The term joins the story holding the largest share of its posts, when
  that share is at least ``StoryParams.min_overlap``; else it starts a story. The share
  is the overlap coefficient |A ∩ B| / |A| of the term's post set A (Vijaymeena &
  Kavitha, "A survey on similarity measures in text mining", MLAIJ 2016): a term whose
  posts are mostly the story's belongs to it, however many other posts the story has
  (Jaccard or cosine would shrink as the story grows). Only posts up to the detection
  count, so a verdict depends on the posts alone, not on how they are cut into steps.
- Always-on terms (``TermTrend.always_on``: a term in a large share of the stream's
  baseline, a brand handle in a brand-complaints stream) neither start nor link stories
  by themselves: such a term joins a live story when the story's other members hold
  enough of its posts, and is otherwise no story (no event, no alert); a story's posts,
  against which a trending term is compared, are those of its members that are not
  always on, so a handle present in every post cannot merge two stories.
- One alert per story. A story's first member fires it ("new", or "emerging" when the
  member is only predicted); every later member, or the confirmation of an emerging
  story, is an "updated" event of the same story: its alert is updated, not duplicated.
- A story lives while it grows: it closes ``ttl_buckets`` buckets (default: the
  baseline window) after its last new member, when its terms have left the baseline.
- Each event carries the story's forecast (``mlengine.trends.forecast.forecast``) of its volume
  (posts holding any member, per bucket; the current bucket projected to its end).

Bot resistance is the term detector's: a term trends only with ``min_authors`` distinct
authors, and its score counts posts against the stream's own baseline, so a stream's
everyday vocabulary (its handles, its common words) is judged against itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeVar

from mlengine.trends.detector import StreamPost, TermStream, TermTrend, TrendParams
from mlengine.trends.forecast import Forecast, forecast_volume

StoryKind = Literal["new", "emerging", "updated"]
K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class StoryParams:
    """Story thresholds. ``min_overlap``: share of a trending term's recent posts that a
    live story must hold for the term to join it (0–1). ``ttl_buckets``: a story closes
    this many buckets after its last new member (None: the baseline window).
    ``label_terms``: members named in the label. ``max_postings``: posts remembered per
    term and bucket (memory bound). ``emerging``: fire predicted stories.
    ``horizon``: buckets forecast."""

    min_overlap: float = 0.5
    ttl_buckets: int | None = None
    label_terms: int = 3
    max_postings: int = 2000
    emerging: bool = True
    horizon: int = 4


@dataclass(slots=True)
class StoryMember:
    """A story's member term: its first detection and whether it was confirmed."""

    term: str
    first_trend: TermTrend
    confirmed: bool
    events: int

    @property
    def links(self) -> bool:
        """Whether the member's posts count as the story's (not an always-on term)."""
        return not self.first_trend.always_on


@dataclass(slots=True)
class Story:
    """One story: ``id`` (1, 2, … per stream), member terms in order of joining, state
    ("emerging" until a member is confirmed, then "confirmed"), the event time of its
    alert (``alerted_at``) and of its confirmation, its last growth (bucket start, epoch
    s) and its per-bucket volume (bucket start → posts with any member)."""

    id: int
    members: dict[str, StoryMember]
    state: Literal["emerging", "confirmed"]
    alerted_at: datetime
    confirmed_at: datetime | None
    last_bucket: int
    volume: dict[int, int] = field(default_factory=dict)

    def label(self, size: int) -> tuple[str, ...]:
        """The ``size`` member terms with the most posts at detection (ties: first)."""
        ranked = sorted(self.members.values(), key=lambda m: -m.events)
        return tuple(m.term for m in ranked[:size])


@dataclass(frozen=True, slots=True)
class StoryEvent:
    """What one step says about one story, for the alerts stage.

    ``kind``: "new" (a confirmed story's first alert), "emerging" (a predicted story's
    first alert, to be shown as a prediction), "updated" (a new member, or an emerging
    story confirmed: update the story's alert). ``term`` is the member that caused it,
    ``trend`` that member's detection (event time, evidence post, score); ``terms`` all
    members; ``label`` the top terms; ``forecast`` the story's volume forecast.
    """

    kind: StoryKind
    story_id: int
    state: Literal["emerging", "confirmed"]
    term: str
    trend: TermTrend
    predicted: bool
    label: tuple[str, ...]
    terms: tuple[str, ...]
    forecast: Forecast


def choose_story(
    term_posts: AbstractSet[int], stories: Mapping[K, AbstractSet[int]], min_overlap: float
) -> K | None:
    """The story a newly trending term joins: the one holding the largest share
    ``|A ∩ B| / |A|`` of the term's recent posts ``A`` (``B``: the story's recent posts),
    when that share is at least ``min_overlap`` (0–1); else None (the term starts a
    story). Ties go to the first story in ``stories``' order. The one rule of both the
    in-memory detector (``StoryDetector``) and the database path
    (``mlengine.trends.story_assignment.assign_stories``)."""
    best: K | None = None
    best_share = 0.0
    for key, posts in stories.items():
        share = len(term_posts & posts) / max(len(term_posts), 1)
        if share > best_share:
            best, best_share = key, share
    return best if best is not None and best_share >= min_overlap else None


@dataclass(slots=True)
class _Postings:
    cur: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    prev: dict[str, list[int]] = field(default_factory=dict)


class StoryDetector:
    """Per-stream state of the story layer over the production term detector.

    ``step(posts)`` counts posts (event-time order; late ones are left out, as
    ``TermStream`` does) and returns the ``StoryEvent``s they cause, in event-time order
    of their evidence. The object is plain Python (picklable): production persists one
    per stream beside its watermark. ``stories`` holds the live ones.
    """

    def __init__(self, params: TrendParams, story_params: StoryParams | None = None) -> None:
        self.params = params
        self.story_params = story_params or StoryParams()
        self.terms = TermStream(params, emerging=self.story_params.emerging)
        self.stories: list[Story] = []
        self.closed = 0
        self._next_id = 1
        self._postings = _Postings()
        self._bucket: int | None = None
        self._last_time: datetime | None = None

    @property
    def ttl_s(self) -> int:
        """Seconds of event time a story lives after its last new member."""
        buckets = self.story_params.ttl_buckets or self.params.baseline_buckets
        return buckets * self.params.bucket_s

    def step(self, posts: Sequence[StreamPost]) -> list[StoryEvent]:
        """Count ``posts`` and return the story events they cause (see the class); an
        always-on term's trend that joins no story causes none.

        Side effects: advances this detector's state.
        """
        events: list[StoryEvent] = []
        segment: list[StreamPost] = []
        for post in posts:
            if not self.terms.accepts(post) or (
                self._last_time is not None and post.created_at < self._last_time
            ):
                self.terms.late_events += 1
                continue
            self._last_time = post.created_at
            start = self.terms.bucket_of(post.created_at)
            if start != self._bucket:
                if segment:
                    events += self._segment(segment)
                    segment = []
                self._open_bucket(start)
            segment.append(post)
        if segment:
            events += self._segment(segment)
        return events

    def _open_bucket(self, start: int) -> None:
        """Record the closing bucket's story volumes; roll the postings; close stories
        past their lifetime."""
        if self._bucket is not None:
            for story in self.stories:
                story.volume[self._bucket] = len(self._story_posts(story, None, prev=False))
        consecutive = self._bucket is not None and start - self._bucket == self.params.bucket_s
        self._postings.prev = dict(self._postings.cur) if consecutive else {}
        self._postings.cur = defaultdict(list)
        self._bucket = start
        live = [s for s in self.stories if start - s.last_bucket <= self.ttl_s]
        self.closed += len(self.stories) - len(live)
        self.stories = live

    def _segment(self, posts: list[StreamPost]) -> list[StoryEvent]:
        cap = self.story_params.max_postings
        seq = self.terms.seq
        for post in posts:
            for term in post.terms:
                postings = self._postings.cur[term]
                if len(postings) < cap:
                    postings.append(seq)
            seq += 1
        found = (self._on_trend(trend) for trend in self.terms.step(posts))
        return [event for event in found if event is not None]

    def _term_posts(self, term: str, upto: int | None, *, prev: bool = True) -> set[int]:
        cur = self._postings.cur.get(term, [])
        found = {s for s in cur if upto is None or s <= upto}
        if prev:
            found.update(self._postings.prev.get(term, ()))
        return found

    def _story_posts(
        self, story: Story, upto: int | None, *, prev: bool = True, linking: bool = False
    ) -> set[int]:
        """The story's posts: of all its members, or (``linking``) of those that may link
        a term to it (not always on)."""
        found: set[int] = set()
        for term, member in story.members.items():
            if not linking or member.links:
                found |= self._term_posts(term, upto, prev=prev)
        return found

    def _on_trend(self, trend: TermTrend) -> StoryEvent | None:
        predicted = trend.predicted
        for story in self.stories:
            member = story.members.get(trend.term)
            if member is not None:
                return self._grow_member(story, member, trend)
        posts = self._term_posts(trend.term, trend.seq)
        candidates = {
            i: self._story_posts(story, trend.seq, linking=True)
            for i, story in enumerate(self.stories)
        }
        chosen = choose_story(posts, candidates, self.story_params.min_overlap)
        best = self.stories[chosen] if chosen is not None else None
        if best is None and trend.always_on:
            return None
        bucket = int(trend.bucket_start.timestamp())
        if best is not None:
            best.members[trend.term] = StoryMember(trend.term, trend, not predicted, trend.events)
            best.last_bucket = bucket
            if not predicted and best.state == "emerging":
                best.state = "confirmed"
                best.confirmed_at = trend.evidence_created_at
            return self._event("updated", best, trend)
        story = Story(
            id=self._next_id,
            members={trend.term: StoryMember(trend.term, trend, not predicted, trend.events)},
            state="emerging" if predicted else "confirmed",
            alerted_at=trend.evidence_created_at,
            confirmed_at=None if predicted else trend.evidence_created_at,
            last_bucket=bucket,
        )
        self._next_id += 1
        self.stories.append(story)
        return self._event("emerging" if predicted else "new", story, trend)

    def _grow_member(self, story: Story, member: StoryMember, trend: TermTrend) -> StoryEvent:
        """A member trends again (a later bucket, or its prediction confirmed)."""
        member.events = max(member.events, trend.events)
        story.last_bucket = int(trend.bucket_start.timestamp())
        if not trend.predicted:
            member.confirmed = True
            if story.state == "emerging":
                story.state = "confirmed"
                story.confirmed_at = trend.evidence_created_at
        return self._event("updated", story, trend)

    def _event(self, kind: StoryKind, story: Story, trend: TermTrend) -> StoryEvent:
        return StoryEvent(
            kind=kind,
            story_id=story.id,
            state=story.state,
            term=trend.term,
            trend=trend,
            predicted=trend.predicted,
            label=story.label(self.story_params.label_terms),
            terms=tuple(story.members),
            forecast=self._forecast(story, trend),
        )

    def _forecast(self, story: Story, trend: TermTrend) -> Forecast:
        """The story's volume forecast at ``trend``: its past buckets' volumes (0 for a
        bucket without any) and the current one projected to its end."""
        now = int(trend.bucket_start.timestamp())
        return forecast_volume(
            story.volume,
            bucket_start=now,
            current=len(self._story_posts(story, trend.seq, prev=False)),
            elapsed_s=(trend.evidence_created_at - trend.bucket_start).total_seconds(),
            bucket_s=self.params.bucket_s,
            horizon=self.story_params.horizon,
        )
