"""Rolling per-second counters in Redis (events per second on /api/stats/)."""

from __future__ import annotations

import pytest

from twiscope.redis import add_to_rate, get_redis, rate_total


@pytest.fixture(autouse=True)
def _clean_redis() -> None:
    get_redis().flushdb()


def test_a_rate_sums_the_last_seconds_only() -> None:
    add_to_rate("events:team:1", 100, now=1000.2)
    add_to_rate("events:team:1", 50, now=1059.9)
    add_to_rate("events:team:1", 7, now=940.0)  # 120 s before the end: outside

    assert rate_total(["events:team:1"], seconds=60, now=1059.5) == 150


def test_rates_of_several_names_add_up_and_others_are_ignored() -> None:
    add_to_rate("events:team:1", 10, now=2000)
    add_to_rate("events:team:2", 5, now=2000)
    add_to_rate("events:team:3", 99, now=2000)

    assert rate_total(["events:team:1", "events:team:2"], seconds=60, now=2000) == 15
    assert rate_total([], seconds=60, now=2000) == 0


def test_counters_expire_on_their_own() -> None:
    add_to_rate("events:team:1", 1, now=3000)

    assert 0 < get_redis().ttl("twiscope:rate:events:team:1:3000") <= 180
