"""``evaluate alerts --background PATH --events DIR``: alerts in a noisy stream.

A real background stream with real events injected at known times, replayed as one
stream (one source) through production's trend code and the default "New trend" rule,
as ``mlengine.evaluation.crisislex`` replays one event alone:

- **Background**: ``PATH``, an archive in any format ``manage.py replay`` reads
  (``ingest.sources.replay.formats.read_archive``; rows it cannot use are skipped, a
  repeated external id keeps its first row, as the unique key does). Its span is its
  first to its last post; ``background_days`` is that span in days.
- **Events**: each ``DIR/<event>/`` in CrisisLexT26's layout
  (``crisislex.event_dirs``, ``crisislex.load_event``), in folder-name order.
- **Scale** (``share``, default ``DEFAULT_SHARE``): an event whose busiest hour (the most
  posts in any sliding hour of its whole sample) exceeds ``share`` × the background's
  mean posts per hour is thinned to that fraction: it keeps the ``ceil(n × cap /
  busiest)`` posts of lowest CRC-32 of ``<event>/<external id>`` (deterministic, and
  uniform in time, so the event keeps its shape). A smaller event is kept whole.
- **Placement**: the background's span is cut into ``len(events) + 1`` equal slots; the
  first is left to the background alone (the detector's warm-up), and event ``i`` gets
  slot ``i + 1``. Its (thinned) sample is shifted by whole seconds so that its detectable
  burst (``crisislex.detectable_burst``; an event without one: the start of its busiest
  hour) lands a quarter of a slot after the slot's start, and only its posts inside the
  slot are kept: the event's *span*. Spans do not overlap.
- **Replay**: background and injected posts, in event-time order (ties by external id;
  injected ids are ``<event index>:<id>``), with the terms and author keys production
  gives them (``crisislex.to_post``: a CrisisLexT26 post is its own author), the bucket
  production gives a replayed source of the merged stream
  (``crisislex.production_params``), through ``StoryDetector`` with production's
  ``story_params()`` and the default rule (``crisislex.rule_alerts``, 24 h cooldown).

Scoring. A trend is *driven by* an event when more than half of the posts that hold its
term in its bucket, up to its evidence, are the event's injected posts (else by the
background). An alert *names* event E when one of its terms is a word of E's keywords
(``crisislex``'s rule: without ``#``/``@``, case-insensitive) and that term's trend was
driven by E, from the moment the alert named the term. The origin test keeps a
background trend on an everyday word that happens to be a keyword word ("airport",
"new", "fire") from counting as a detection or hiding a false alert.

- ``detected``: an alert names the event within its span; ``delay_from_burst_h``: hours
  from the event's (shifted) detectable burst to the first such naming (negative when it
  comes first; None when not detected).
- ``alerts``: the alerts *of* the event: those with a term whose trend the event drove;
  ``keyword_precision``: the share of them that name the event (None without any).
- ``false_alerts_per_day``: alerts that name no injected event (by their last update),
  over ``background_days``;
  each is listed (``false_alerts``) with its time, terms and ``origin``: ``background``,
  or the names of the events that drove one of its terms, comma-separated (an event's
  alert on a word that is not a keyword, such as a prayer hashtag, is false by this
  definition too).
"""

from __future__ import annotations

import bisect
import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ingest.envelope import Envelope
from ingest.sources.replay.formats import ArchiveFormatError, read_archive
from mlengine.enrichment.text import Enrichment
from mlengine.evaluation import crisislex
from mlengine.evaluation.crisislex import Alert, CrisisEvent, Post

DEFAULT_SHARE = 0.5
"""An injected event's busiest hour holds at most this share of the background's mean
posts per hour (on the airline archive, about 40 posts against 80 an hour)."""
BURST_OFFSET = 0.25
"""Where an event's burst lands in its slot, as a share of the slot from its start."""
MIN_SLOT = timedelta(hours=1)
BACKGROUND = "background"


class AlertBenchError(ValueError):
    """The background or the events cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Injected:
    """One event as injected: its ``posts`` (shifted, thinned, inside the span, event
    order), the span ``[start, end)``, its shifted ``burst`` (None when the thinned
    sample never holds 5 posts within an hour), the ``shift`` applied, the sample's
    size and the ``kept`` fraction of it after thinning."""

    event: CrisisEvent
    posts: tuple[Post, ...]
    start: datetime
    end: datetime
    burst: datetime | None
    shift: timedelta
    sample: int
    kept: float


def load_background(path: Path, *, enrich: dict[str, Enrichment] | None = None) -> list[Post]:
    """The archive's posts in event-time order (ties by external id), as the trend stage
    reads them (``crisislex.to_post``); unusable rows skipped, a repeated id's first row
    kept.

    Raises:
        AlertBenchError: the file is missing or unreadable, its format unknown, or it
            holds no post.
    """
    cache = enrich if enrich is not None else {}
    seen: set[str] = set()
    posts: list[Post] = []
    try:
        for item in read_archive(path):
            if not isinstance(item, Envelope) or item.external_id in seen:
                continue
            seen.add(item.external_id)
            posts.append(
                crisislex.to_post(
                    len(posts), item.external_id, item.created_at, item.author, item.text, cache
                )
            )
    except (ArchiveFormatError, OSError) as exc:
        raise AlertBenchError(f"background {path}: {exc}") from exc
    if not posts:
        raise AlertBenchError(f"background {path}: no post in it")
    posts.sort(key=lambda p: (p.created_at, p.external_id))
    return posts


def busiest_hour(times: Sequence[datetime]) -> tuple[int, datetime | None]:
    """``(posts, start)`` of the sliding hour holding the most of ``times`` (sorted):
    the window that starts at a post and ends an hour later (inclusive); ``(0, None)``
    for no times."""
    best, start = 0, None
    for i, at in enumerate(times):
        n = bisect.bisect_right(times, at + timedelta(hours=1)) - i
        if n > best:
            best, start = n, at
    return best, start


def _thin(event: CrisisEvent, cap: float) -> list[Post]:
    """The event's posts thinned so its busiest hour holds about ``cap`` (module doc)."""
    busiest, _ = busiest_hour([p.created_at for p in event.posts])
    if busiest <= cap:
        return list(event.posts)
    keep = math.ceil(len(event.posts) * cap / busiest)
    ranked = sorted(
        event.posts,
        key=lambda p: (zlib.crc32(f"{event.name}/{p.external_id}".encode()), p.external_id),
    )
    return sorted(ranked[:keep], key=lambda p: (p.created_at, p.external_id))


def inject(
    background: Sequence[Post], events: Sequence[CrisisEvent], *, share: float = DEFAULT_SHARE
) -> list[Injected]:
    """Scale and place each event in the background's span (module docstring).

    Raises:
        AlertBenchError: no events, ``share`` not positive, or a slot shorter than
            ``MIN_SLOT`` (too many events for the background's span).
    """
    if not events:
        raise AlertBenchError("no events to inject")
    if share <= 0:
        raise AlertBenchError(f"--share must be positive, not {share}")
    first, last = background[0].created_at, background[-1].created_at
    slot = (last - first) / (len(events) + 1)
    if slot < MIN_SLOT:
        raise AlertBenchError(
            f"the background spans {last - first}: too short for {len(events)} events "
            f"(each needs a slot of at least {MIN_SLOT})"
        )
    hours = max((last - first).total_seconds() / 3600, 1.0)
    cap = share * len(background) / hours
    injected = []
    for i, event in enumerate(events):
        kept = _thin(event, cap)
        times = [p.created_at for p in kept]
        burst = crisislex.detectable_burst(times)
        anchor = burst or busiest_hour(times)[1] or times[0]
        start = first + slot * (i + 1)
        end = start + slot
        shift = timedelta(seconds=round((start + slot * BURST_OFFSET - anchor).total_seconds()))
        posts = tuple(
            Post(
                id=p.id,
                external_id=f"{i}:{p.external_id}",
                created_at=p.created_at + shift,
                author=p.author,
                terms=p.terms,
                text=p.text,
            )
            for p in kept
            if start <= p.created_at + shift < end
        )
        injected.append(
            Injected(
                event=event,
                posts=posts,
                start=start,
                end=end,
                burst=burst + shift if burst else None,
                shift=shift,
                sample=len(event.posts),
                kept=round(len(kept) / len(event.posts), 3),
            )
        )
    return injected


@dataclass(frozen=True, slots=True)
class Stream:
    """The merged stream: ``posts`` in replay order (ids 0, 1, …) and, per post, the
    index of the injected event it came from (-1: the background)."""

    posts: tuple[Post, ...]
    origin: tuple[int, ...]
    times: tuple[datetime, ...]

    @classmethod
    def merge(cls, background: Sequence[Post], injected: Sequence[Injected]) -> Stream:
        """Background and injected posts in event-time order, ties by external id."""
        tagged = [(p, -1) for p in background] + [
            (p, i) for i, inj in enumerate(injected) for p in inj.posts
        ]
        tagged.sort(key=lambda t: (t[0].created_at, t[0].external_id))
        posts = tuple(
            Post(n, p.external_id, p.created_at, p.author, p.terms, p.text)
            for n, (p, _) in enumerate(tagged)
        )
        return cls(
            posts=posts,
            origin=tuple(o for _, o in tagged),
            times=tuple(p.created_at for p in posts),
        )

    def driver(self, term: str, bucket_start: datetime, evidence: datetime) -> int:
        """The event (index) holding more than half of the posts with ``term`` from
        ``bucket_start`` to ``evidence`` (inclusive), else -1 (the background)."""
        lo = bisect.bisect_left(self.times, bucket_start)
        hi = bisect.bisect_right(self.times, evidence)
        counts = Counter(self.origin[n] for n in range(lo, hi) if term in self.posts[n].terms)
        total = sum(counts.values())
        for origin, n in counts.most_common(1):
            if origin >= 0 and 2 * n > total:
                return origin
        return -1


def _hours(delta: timedelta) -> float:
    return round(delta.total_seconds() / 3600, 2)


@dataclass(frozen=True, slots=True)
class _Scored:
    alert: Alert
    drivers: tuple[int, ...]
    named: dict[int, datetime]
    """Per event index, when the alert first named it."""


def _score(stream: Stream, injected: Sequence[Injected], alerts: Sequence[Alert]) -> list[_Scored]:
    scored = []
    for alert in alerts:
        drivers = tuple(
            stream.driver(t, b, e) for t, (b, e) in zip(alert.terms, alert.trended, strict=True)
        )
        named: dict[int, datetime] = {}
        for term, at, driver in zip(alert.terms, alert.added, drivers, strict=True):
            if driver >= 0 and crisislex.names_word(term, injected[driver].event.keyword_words):
                named[driver] = min(at, named.get(driver, at))
        scored.append(_Scored(alert, drivers, named))
    return scored


def evaluate(
    background: Sequence[Post], events: Sequence[CrisisEvent], *, share: float = DEFAULT_SHARE
) -> dict[str, Any]:
    """Inject ``events`` into ``background`` (event-time order), replay, score (module
    docstring). Returns ``{"events": [{"name", "detected", "delay_from_burst_h",
    "keyword_precision", "alerts", "burst", "span", "posts_injected", "sample",
    "kept", "fired": [{"at", "terms", "names_keywords", "named_at"}]}],
    "false_alerts_per_day", "background_days", "false_alerts":
    [{"at", "terms", "origin"}], "alerts", "bucket_s", "share", "background",
    "detected", "detected_within_1h", "median_delay_from_burst_h",
    "median_keyword_precision"}``; times are ISO 8601, delays in hours. Pure.

    Raises:
        AlertBenchError: as ``inject``.
    """
    injected = inject(background, events, share=share)
    stream = Stream.merge(background, injected)
    params = crisislex.production_params(stream.posts)
    alerts = crisislex.story_alerts(stream.posts, params)
    scored = _score(stream, injected, alerts)
    rows: list[dict[str, Any]] = []
    for i, inj in enumerate(injected):
        mine = [s for s in scored if i in s.drivers or i in s.named]
        naming = sorted(
            s.named[i] for s in mine if i in s.named and inj.start <= s.named[i] < inj.end
        )
        rows.append(
            {
                "name": inj.event.name,
                "detected": bool(naming),
                "delay_from_burst_h": (
                    _hours(naming[0] - inj.burst) if naming and inj.burst else None
                ),
                "keyword_precision": (
                    round(sum(i in s.named for s in mine) / len(mine), 3) if mine else None
                ),
                "alerts": len(mine),
                "burst": inj.burst.isoformat() if inj.burst else None,
                "span": [inj.start.isoformat(), inj.end.isoformat()],
                "posts_injected": len(inj.posts),
                "sample": inj.sample,
                "kept": inj.kept,
                "fired": [
                    {
                        "at": s.alert.at.isoformat(),
                        "terms": list(s.alert.terms),
                        "names_keywords": i in s.named,
                        "named_at": s.named[i].isoformat() if i in s.named else None,
                    }
                    for s in mine
                ],
            }
        )
    first, last = background[0].created_at, background[-1].created_at
    days = (last - first).total_seconds() / 86400
    false = [
        {
            "at": s.alert.at.isoformat(),
            "terms": list(s.alert.terms),
            "origin": ", ".join(sorted({injected[d].event.name for d in s.drivers if d >= 0}))
            or BACKGROUND,
        }
        for s in scored
        if not s.named
    ]
    delays = [r["delay_from_burst_h"] for r in rows]
    return {
        "events": rows,
        "false_alerts_per_day": round(len(false) / days, 2) if days > 0 else None,
        "background_days": round(days, 2),
        "false_alerts": false,
        "alerts": len(alerts),
        "bucket_s": params.bucket_s,
        "share": share,
        "background": {
            "posts": len(background),
            "start": first.isoformat(),
            "end": last.isoformat(),
            "posts_per_hour": round(len(background) / max(days * 24, 1e-9), 1),
        },
        "detected": sum(r["detected"] for r in rows),
        "detected_within_1h": sum(d is not None and d <= 1 for d in delays),
        "median_delay_from_burst_h": crisislex.median(delays),
        "median_keyword_precision": crisislex.median(r["keyword_precision"] for r in rows),
    }


def run(background: Path, events: Path, *, share: float = DEFAULT_SHARE) -> dict[str, Any]:
    """``evaluate`` on the archive ``background`` and the event folders of ``events``,
    with ``"background": {"path", …}`` and ``"events_dir"`` added.

    Raises:
        AlertBenchError: the background cannot be used, or as ``inject``.
        crisislex.CrisisLexError: ``events`` is not CrisisLexT26's layout.
    """
    folders = crisislex.event_dirs(events)  # first: it costs nothing, the background seconds
    cache: dict[str, Enrichment] = {}
    posts = load_background(background, enrich=cache)
    loaded = [crisislex.load_event(folder, enrich=cache) for folder in folders]
    result = evaluate(posts, loaded, share=share)
    result["background"]["path"] = str(background)
    result["events_dir"] = str(events)
    return result
