"""One shared Redis client per process (connection-pooled, thread-safe)."""

from __future__ import annotations

import time
from functools import cache
from typing import cast

import redis
from django.conf import settings


@cache
def get_redis() -> redis.Redis:
    """The Redis client for ``settings.REDIS_URL`` (raw bytes responses)."""
    return redis.Redis.from_url(settings.REDIS_URL, health_check_interval=30)


RATE_KEY = "twiscope:rate:{name}:{second}"
RATE_KEEP_S = 180


def add_to_rate(name: str, amount: int, *, now: float | None = None) -> None:
    """Add ``amount`` to the per-second rolling counter ``name`` for the current second.

    Each second has its own key, expiring after ``RATE_KEEP_S`` seconds, so any
    process can add and read without coordination.
    """
    second = int(time.time() if now is None else now)
    key = RATE_KEY.format(name=name, second=second)
    pipe = get_redis().pipeline()
    pipe.incrby(key, amount)
    pipe.expire(key, RATE_KEEP_S)
    pipe.execute()


def rate_total(names: list[str], *, seconds: int, now: float | None = None) -> int:
    """The sum of rolling counters ``names`` over the last ``seconds`` whole seconds."""
    if not names:
        return 0
    end = int(time.time() if now is None else now)
    keys = [
        RATE_KEY.format(name=name, second=second)
        for name in names
        for second in range(end - seconds + 1, end + 1)
    ]
    values = cast("list[bytes | None]", get_redis().mget(keys))
    return sum(int(v) for v in values if v is not None)
