"""The trend stage's parameters in production, read from settings: the detector's for a
stream's bucket (``params_for``), the bucket a new stream gets (``bucket_s_for``) and the
story layer's (``story_params``).
"""

from __future__ import annotations

from django.conf import settings

from ingest.models import Source
from mlengine.trends.detector import (
    TrendParams,
)
from mlengine.trends.detector import suggest_bucket_s as ladder_bucket_s
from mlengine.trends.stories import StoryParams


def params_for(bucket_s: int) -> TrendParams:
    """The detector parameters for a stream with ``bucket_s`` buckets (rest: settings)."""
    return TrendParams(
        bucket_s=bucket_s,
        baseline_buckets=settings.TRENDS_BASELINE_BUCKETS,
        min_history_buckets=settings.TRENDS_MIN_HISTORY_BUCKETS,
        min_score=settings.TRENDS_MIN_SCORE,
        min_events=settings.TRENDS_MIN_EVENTS,
        min_authors=settings.TRENDS_MIN_AUTHORS,
        emerging_sigmas=settings.TRENDS_EMERGING_SIGMAS,
        prior_posts=settings.TRENDS_PRIOR_POSTS,
        always_on_share=settings.TRENDS_ALWAYS_ON_SHARE,
    )


def bucket_s_for(source: Source) -> int:
    """The trend bucket (seconds) a new stream of ``source`` gets.

    ``config["trend_bucket_s"]`` when the source sets one; else, when the source tells
    its mean events per active day (``config["events_per_active_day"]``, as a replay
    does), the smallest bucket that holds twice ``TRENDS_MIN_EVENTS`` on average
    (``mlengine.trends.detector.suggest_bucket_s``); else ``settings.TRENDS_BUCKET_S``.
    """
    config = source.config if isinstance(source.config, dict) else {}
    explicit = config.get("trend_bucket_s")
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    per_day = config.get("events_per_active_day")
    if isinstance(per_day, int | float) and per_day > 0:
        return ladder_bucket_s(float(per_day), min_events=settings.TRENDS_MIN_EVENTS)
    return int(settings.TRENDS_BUCKET_S)


def story_params() -> StoryParams:
    """The story layer's parameters in production (``TRENDS_STORY_MIN_OVERLAP``,
    ``TRENDS_EMERGING``), as the database path applies them."""
    return StoryParams(
        min_overlap=settings.TRENDS_STORY_MIN_OVERLAP, emerging=settings.TRENDS_EMERGING
    )
