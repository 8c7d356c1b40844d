"""The replay's staging through an outage (``ingest.replaying.OutageProofStager``): it
waits, stages again what the outage may have taken, and goes on from where it was.

The stage call here is a plain function that fails the way redis-py fails while Redis
restarts; the whole replay under a killed server is in ``tests/test_outage_platform.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import redis

from ingest.replaying import OutageProofStager


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_after_an_outage_the_last_seconds_are_staged_again_and_the_replay_goes_on() -> None:
    clock = Clock()
    staged: list[str] = []
    failures = iter([True, True])  # the next two tries meet a dead Redis

    def stage(batch: Sequence[str]) -> None:
        if batch == ["d"] and next(failures, False):
            raise redis.exceptions.ConnectionError("Connection refused")
        staged.extend(batch)

    waits: list[str] = []
    stager = OutageProofStager(
        stage,  # type: ignore[arg-type]
        resend_window_s=5.0,
        on_wait=lambda dependency, exc, delay: waits.append(dependency),
        sleep=lambda s: None,
        clock=clock,
    )
    for at, batch in [(0.0, "a"), (10.0, "b"), (11.0, "c"), (12.0, "d"), (13.0, "e")]:
        clock.now = at
        stager.send([batch])  # type: ignore[list-item]

    assert staged == ["a", "b", "c", "b", "c", "d", "e"]
    assert waits == ["redis", "redis"]
    assert (stager.outages, stager.resent_batches) == (1, 2)


def test_an_error_that_is_not_an_outage_is_raised_at_once() -> None:
    def stage(batch: Sequence[str]) -> None:
        raise ValueError("a bad batch")

    stager = OutageProofStager(stage, sleep=lambda s: None)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="a bad batch"):
        stager.send(["a"])  # type: ignore[list-item]


def test_an_outage_longer_than_the_limit_is_raised() -> None:
    def stage(batch: Sequence[str]) -> None:
        raise redis.exceptions.ConnectionError("Connection refused")

    stager = OutageProofStager(stage, give_up_after_s=0, sleep=lambda s: None)  # type: ignore[arg-type]

    with pytest.raises(redis.exceptions.ConnectionError):
        stager.send(["a"])  # type: ignore[list-item]
