"""One shared Redis client per process (connection-pooled, thread-safe)."""

from __future__ import annotations

from functools import cache
from typing import cast

import redis
from django.conf import settings


@cache
def get_redis() -> redis.Redis:
    """The Redis client for ``settings.REDIS_URL`` (raw bytes responses)."""
    return redis.Redis.from_url(settings.REDIS_URL, health_check_interval=30)


def incr_metric(name: str, amount: int = 1) -> None:
    """Add to a process-independent counter ``twiscope:metric:<name>`` (for /api/stats/)."""
    get_redis().incrby(f"twiscope:metric:{name}", amount)


def get_bytes(key: str) -> bytes | None:
    """``GET key`` (the sync client's stubs type it as possibly awaitable)."""
    return cast("bytes | None", get_redis().get(key))
