"""Fixed-window rate counters in Redis: the API's throttles and the login throttle.

A rate is ``"<count>/<period>"``: Django REST framework's rate strings (``1000/min``,
``10/s``, ``5000/hour``, ``100/day``; only the period's first letter counts, as in DRF)
with an optional multiple of the period (``10/15m``: ten per fifteen minutes).

A window is ``window_s`` seconds aligned to the Unix epoch. ``hit`` counts one request
in the current window with one atomic ``INCR`` (and an ``EXPIRE`` in the same
pipeline), so concurrent requests in any number of processes are each counted once:
no read-modify-write race, unlike DRF's ``SimpleRateThrottle``, which reads a list of
timestamps from the cache and writes it back (two requests at once both read ``n``
and both write ``n + 1``), and stores a list as long as the limit per caller.

The price of a fixed window is a burst at its edge: up to twice the limit within a
few seconds across two windows. What it gains is an exact answer for the headers of
draft-ietf-httpapi-ratelimit-headers: the limit, what is left in this window, and the
seconds until it resets.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Final, cast

from twiscope.redis import get_redis

KEY_PREFIX: Final = "twiscope:ratelimit"
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smhd])[a-z]*\s*$")
_PERIOD_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Rate:
    """``limit`` requests per ``window_s`` seconds."""

    limit: int
    window_s: int


@dataclass(frozen=True)
class Window:
    """One caller's count in the current window, as the headers report it.

    ``count``: requests counted in this window, this one included; ``remaining``:
    ``max(0, limit - count)``; ``reset_s``: whole seconds (at least 1) until the window
    ends; ``allowed``: ``count <= limit``.
    """

    limit: int
    count: int
    reset_s: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)

    @property
    def allowed(self) -> bool:
        return self.count <= self.limit


def parse_rate(text: str) -> Rate:
    """``"1000/min"`` → ``Rate(1000, 60)``; ``"10/15m"`` → ``Rate(10, 900)``.

    Raises:
        ValueError: not ``<count>/<n><s|m|h|d>…``, or a count or multiple of 0.
    """
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a rate such as 1000/min, 10/s or 10/15m")
    limit, multiple = int(match[1]), int(match[2] or 1)
    if limit < 1 or multiple < 1:
        raise ValueError(f"{text!r}: the count and the period must be at least 1")
    return Rate(limit=limit, window_s=multiple * _PERIOD_S[match[3]])


def _window(rate: Rate, now: float) -> tuple[int, int]:
    """(index of the window holding ``now``, whole seconds until it ends, at least 1)."""
    index = int(now // rate.window_s)
    return index, max(1, math.ceil((index + 1) * rate.window_s - now))


def _key(name: str, rate: Rate, index: int) -> str:
    return f"{KEY_PREFIX}:{name}:{rate.window_s}:{index}"


def hit(name: str, rate: Rate, *, now: float | None = None) -> Window:
    """Count one request against counter ``name`` (a scope and a caller) and return
    the window after it.

    Side effects: one Redis round trip (``INCR`` and ``EXPIRE`` in one pipeline); the
    key expires a second after its window ends.

    Raises:
        redis.RedisError: Redis is unreachable (the caller decides; the API's outage
            middleware answers 503).
    """
    now = time.time() if now is None else now
    index, reset_s = _window(rate, now)
    key = _key(name, rate, index)
    pipe = get_redis().pipeline()
    pipe.incr(key)
    pipe.expire(key, reset_s + 1)
    count, _ = pipe.execute()
    return Window(limit=rate.limit, count=int(count), reset_s=reset_s)


def peek(name: str, rate: Rate, *, now: float | None = None) -> Window:
    """The window of counter ``name`` without counting anything (one ``GET``)."""
    now = time.time() if now is None else now
    index, reset_s = _window(rate, now)
    raw = cast("bytes | None", get_redis().get(_key(name, rate, index)))
    return Window(limit=rate.limit, count=int(raw or 0), reset_s=reset_s)


def clear(name: str, rate: Rate, *, now: float | None = None) -> None:
    """Forget counter ``name``'s current window (a successful login clears its
    username's failures)."""
    now = time.time() if now is None else now
    index, _ = _window(rate, now)
    get_redis().delete(_key(name, rate, index))
