"""The public surface of ``mlengine``: other apps import this module only.

Everything returned is a frozen dataclass or a plain value; the models, detectors and
their parameters stay internal.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime

from mlengine.text import Enrichment, enrich_text, warm_up
from mlengine.trends import TrendParams, suggest_bucket_s

__all__ = ["Enrichment", "TrendParams", "enrich_texts", "suggest_trend_bucket_s", "warm_up"]


def enrich_texts(texts: Sequence[str]) -> list[Enrichment]:
    """Fast-path enrichment of each text, in order (see ``mlengine.text``)."""
    return [enrich_text(text) for text in texts]


def suggest_trend_bucket_s(event_times: Iterable[datetime]) -> int:
    """A trend bucket size (seconds) for a stream with these event times.

    Uses the mean number of events per UTC day over the days that have any, and the
    detector's ``TRENDS_MIN_EVENTS`` (see ``mlengine.trends.suggest_bucket_s``).

    Raises:
        ValueError: no event times.
    """
    per_day = Counter(moment.date() for moment in event_times)
    if not per_day:
        raise ValueError("no event times to size trend buckets from")
    from django.conf import settings

    mean = statistics.fmean(per_day.values())
    return suggest_bucket_s(mean, min_events=settings.TRENDS_MIN_EVENTS)
