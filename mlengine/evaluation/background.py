"""A replayable background from texts without times: ``evaluate background``.

TweetEval (Barbieri et al., Findings of EMNLP 2020; ``../shared/data/tweeteval``) holds
tweets without times or authors. ``write_tweeteval`` turns them into an archive that
``manage.py replay`` and ``evaluate alerts --background`` read (X API v2 JSON lines, one
bare tweet a line: ``id``, ``text``, ``author_id``, ``created_at``):

- texts: every non-blank line of every ``*_text.txt`` below the folder (files in path
  order), shuffled with the seed, so that no task's file makes a burst of its topic;
- times: a non-homogeneous Poisson process (drawn by thinning: Lewis & Shedler, "Simulation
  of nonhomogeneous Poisson processes by thinning", 1979) of rate
  ``per_day / 86400 × (1 + DAY_AMPLITUDE × cos(2π (hour − PEAK_HOUR_UTC) / 24))`` posts a
  second from ``start``: ``per_day`` a day on average (default ``DEFAULT_PER_DAY``, the
  airline archive's scale), with the day/night cycle of the airline archive's first
  hour-of-day harmonic (busiest at 20:00 UTC, about 4.7 times its quietest hour);
- ids: X snowflake ids of those times (the sequence number in the low bits), so the id
  tells the time as a real one does; ``author_id`` is the post's id (TweetEval names no
  author, so each post is its own, as a CrisisLexT26 post is).

The same texts, rate, seed and start give the same file, byte for byte.
"""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ingest.sources.replay.rows import SNOWFLAKE_EPOCH_MS

DEFAULT_PER_DAY = 1800.0
DEFAULT_START = "2015-02-17"
DAY_AMPLITUDE = 0.65
PEAK_HOUR_UTC = 20.0


class BackgroundError(ValueError):
    """The texts, the rate or the start cannot make a background; the message says why."""


def parse_start(value: str) -> datetime:
    """An ISO 8601 date or date-time as aware UTC (a naive one is taken as UTC).

    Raises:
        BackgroundError: not ISO 8601.
    """
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise BackgroundError(f"--start {value!r} is not an ISO 8601 date or time") from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def tweeteval_texts(root: Path) -> list[str]:
    """Every non-blank line of every ``*_text.txt`` below ``root``, files in path order.

    Raises:
        BackgroundError: ``root`` is not a folder or holds no ``*_text.txt``.
    """
    if not root.is_dir():
        raise BackgroundError(f"{root}: not a folder (expected TweetEval's <task>/*_text.txt)")
    files = sorted(root.rglob("*_text.txt"))
    if not files:
        raise BackgroundError(f"{root}: no *_text.txt below it (TweetEval's layout)")
    texts = []
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as handle:
            texts += [line.strip() for line in handle if line.strip()]
    return texts


def rate_per_s(moment: datetime, per_day: float) -> float:
    """Posts a second at ``moment`` (module docstring)."""
    hour = moment.hour + moment.minute / 60 + moment.second / 3600
    return (
        per_day / 86400 * (1 + DAY_AMPLITUDE * math.cos(2 * math.pi * (hour - PEAK_HOUR_UTC) / 24))
    )


def event_times(n: int, *, per_day: float, seed: int, start: datetime) -> list[datetime]:
    """``n`` increasing event times from ``start``, drawn by thinning (module docstring),
    at millisecond precision.

    Raises:
        BackgroundError: ``per_day`` not positive.
    """
    if per_day <= 0:
        raise BackgroundError(f"--per-day must be positive, not {per_day}")
    rng = random.Random(seed)
    peak = per_day / 86400 * (1 + DAY_AMPLITUDE)
    times: list[datetime] = []
    at = start
    while len(times) < n:
        at += timedelta(seconds=rng.expovariate(peak))
        if rng.random() * peak <= rate_per_s(at, per_day):
            times.append(at.replace(microsecond=at.microsecond // 1000 * 1000))
    return times


def snowflake_id(moment: datetime, sequence: int) -> int:
    """The X snowflake id of ``moment`` (ms) with ``sequence`` in its 22 low bits."""
    ms = int(moment.timestamp() * 1000) - SNOWFLAKE_EPOCH_MS
    return (ms << 22) | (sequence & 0x3FFFFF)


def write_tweeteval(
    root: Path, out: Path, *, per_day: float, seed: int, start: datetime
) -> dict[str, Any]:
    """Write ``root``'s TweetEval texts to ``out`` as a timed archive (module docstring);
    return ``{"posts", "first", "last", "per_day"}`` (ISO 8601 times).

    Side effects: creates or replaces ``out`` (and its folder).

    Raises:
        BackgroundError: no texts, a bad rate, or ``out`` cannot be written.
    """
    texts = tweeteval_texts(root)
    random.Random(seed).shuffle(texts)
    times = event_times(len(texts), per_day=per_day, seed=seed, start=start)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as handle:
            for n, (text, at) in enumerate(zip(texts, times, strict=True)):
                tweet_id = str(snowflake_id(at, n))
                created = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
                line = {"id": tweet_id, "text": text, "author_id": tweet_id, "created_at": created}
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise BackgroundError(f"cannot write {out}: {exc}") from exc
    return {
        "posts": len(texts),
        "first": times[0].isoformat(),
        "last": times[-1].isoformat(),
        "per_day": per_day,
    }
