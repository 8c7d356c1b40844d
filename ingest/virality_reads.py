"""Reads of the ingest app for the virality model and the viral-post alert rules: the
posts to score with their authors' history, and the posts scored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import connection

from ingest.models import AUTHOR_KEY, AUTHOR_KEY_SQL, Event
from ingest.selectors import distinct_terms


@dataclass(frozen=True, slots=True)
class ViralityPost:
    """A post to score for virality, or one of its author's earlier posts.

    ``author``: ``"<source id>:<author key>"`` (``ingest.models.AUTHOR_KEY``): a history
    is one author's within one source. ``created_at``: event time. ``text`` and
    ``is_reply`` (``reply_to`` set, or the payload's v1.1 ``in_reply_to_user_id_str``)
    are "" / False on history rows; ``reposts`` / ``likes`` (the event's ``metrics``)
    are None on posts to score, and ``likes`` also where the source did not count them.
    """

    id: int
    author: str
    created_at: datetime
    text: str = ""
    is_reply: bool = False
    reposts: int | None = None
    likes: int | None = None


@dataclass(frozen=True, slots=True)
class ViralityInputs:
    """``posts``: the events among the ids asked for that exist and have an author key;
    ``history``: for each of them, its author's latest earlier posts with a repost count
    (each row once, however many posts share it), in no particular order."""

    posts: list[ViralityPost]
    history: list[ViralityPost]


def virality_inputs(event_ids: Sequence[int], *, window: int) -> ViralityInputs:
    """The events among ``event_ids`` and their authors' trailing history, in one query.

    For each event: up to ``window`` of the latest events of the same source and author
    (``AUTHOR_KEY``) with a ``metrics["reposts"]`` (a count: the envelope admits only
    non-negative integers) and a strictly earlier ``created_at``: a LATERAL join on the
    ``event_author_reposts_time`` index (about ``window`` index entries per event,
    whatever the source's size), deduplicated by id before the counts are read. Events
    with no author key get no history. Read only.
    """
    author = AUTHOR_KEY_SQL.format(t="e")
    earlier_author = AUTHOR_KEY_SQL.format(t="p")
    sql = f"""
WITH ev AS MATERIALIZED (
    SELECT e.id, e.source_id, e.created_at, e.text, {author} AS author,
           e.reply_to <> '' OR COALESCE(e.raw->>'in_reply_to_user_id_str', '')
                               NOT IN ('', 'NA') AS is_reply
    FROM ingest_event e WHERE e.id = ANY(%s::bigint[])
), earlier AS (
    SELECT DISTINCT ev.source_id, ev.author, h.id
    FROM ev CROSS JOIN LATERAL (
        SELECT p.id FROM ingest_event p
        WHERE p.source_id = ev.source_id AND {earlier_author} = ev.author
          AND p.metrics ? 'reposts' AND p.created_at < ev.created_at
        ORDER BY p.created_at DESC
        LIMIT %s
    ) h
), hist AS (
    SELECT earlier.*, p.created_at, (p.metrics->>'reposts')::float8 AS reposts,
           CASE WHEN jsonb_typeof(p.metrics->'likes') = 'number'
                THEN (p.metrics->>'likes')::float8 END AS likes
    FROM earlier JOIN ingest_event p ON p.id = earlier.id
)
SELECT true, ev.id, ev.source_id, ev.author, ev.created_at, ev.text, ev.is_reply, NULL, NULL
FROM ev WHERE ev.author IS NOT NULL
UNION ALL
SELECT false, id, source_id, author, created_at, '', false, reposts, likes FROM hist
"""
    with connection.cursor() as cursor:
        cursor.execute(sql, [[int(event_id) for event_id in event_ids], int(window)])
        rows = cursor.fetchall()
    posts: list[ViralityPost] = []
    history: list[ViralityPost] = []
    for to_score, id_, source_id, key, created_at, text, is_reply, reposts, likes in rows:
        post = ViralityPost(
            id=id_,
            author=f"{source_id}:{key}",
            created_at=created_at,
            text=text,
            is_reply=bool(is_reply),
            reposts=None if reposts is None else int(reposts),
            likes=None if likes is None else int(likes),
        )
        (posts if to_score else history).append(post)
    return ViralityInputs(posts=posts, history=history)


@dataclass(frozen=True, slots=True)
class ScoredPost:
    """A post the virality model scored, as the "viral_post" alert rules read it.

    ``author``: the distinct-author key (``ingest.models.AUTHOR_KEY``, "" when the
    source tells none); ``author_label``: "@handle", else the name, else the key.
    ``terms``: its distinct hashtags, mentions, cashtags and keywords (as
    ``TrendInput.terms``). ``virality_score``: P(viral), 0-1; ``virality_model``:
    "name vN". ``created_at``: event time; ``received_at``: processing time.
    """

    id: int
    source_id: int
    source_name: str
    team_id: int
    author: str
    author_label: str
    text: str
    url: str
    terms: tuple[str, ...]
    virality_score: float
    virality_model: str
    created_at: datetime
    received_at: datetime


def scored_posts(event_ids: Sequence[int]) -> list[ScoredPost]:
    """The events among ``event_ids`` that exist and carry a virality score, ordered by
    event time then id (one query). Read only."""
    rows = (
        Event.objects.filter(id__in=[int(i) for i in event_ids], virality_score__isnull=False)
        .select_related("source")
        .annotate(author_key=AUTHOR_KEY)
        .order_by("created_at", "id")
    )
    posts = []
    for e in rows:
        key = e.author_key or ""
        label = f"@{e.author_handle}" if e.author_handle else (e.author_name or key)
        assert e.virality_score is not None
        posts.append(
            ScoredPost(
                id=e.id,
                source_id=e.source_id,
                source_name=e.source.name,
                team_id=e.source.team_id,
                author=key,
                author_label=label,
                text=e.text,
                url=e.url,
                terms=distinct_terms((e.hashtags, e.mentions, e.cashtags, e.keywords)),
                virality_score=e.virality_score,
                virality_model=e.virality_model,
                created_at=e.created_at,
                received_at=e.received_at,
            )
        )
    return posts
