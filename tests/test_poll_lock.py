"""The poll lock (``ingest.polling.poll_source``): one poll of a source at a time across
processes, with a token-checked Redis lock, so a poll that outlives the lock's expiry
never deletes the lock another process took since.

Real Redis; the poll itself (``_poll``) is replaced by a stand-in that does what the
test needs while the lock is held.
"""

from __future__ import annotations

import logging
import time
from unittest import mock

import pytest

from ingest import polling
from ingest.models import Source
from tests.factories import make_personas, make_source
from twiscope.redis import get_redis

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]


def lock_key(source: Source) -> str:
    return polling.POLL_LOCK_KEY.format(source_id=source.id)


def wait_until_expired(key: str, timeout_s: float = 10.0) -> None:
    """Wait for Redis to expire ``key`` (its TTL running out, not a delete)."""
    deadline = time.monotonic() + timeout_s
    while get_redis().exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire within {timeout_s} s"
        time.sleep(0.01)


def test_a_second_poll_of_a_source_being_polled_is_skipped() -> None:
    source = make_source(make_personas().team)
    meanwhile: list[polling.PollOutcome] = []

    def poll(_: Source) -> polling.PollOutcome:
        meanwhile.append(polling.poll_source(source))  # another process, at the same time
        return polling.PollOutcome(staged=3)

    with mock.patch.object(polling, "_poll", side_effect=poll):
        outcome = polling.poll_source(source)

    assert outcome == polling.PollOutcome(staged=3)
    assert meanwhile == [polling.PollOutcome(skipped=True)]
    assert not get_redis().exists(lock_key(source))  # released once the poll ended


def test_a_poll_that_outlives_its_lock_leaves_the_next_holders_lock_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_source(make_personas().team)
    monkeypatch.setattr(polling, "LOCK_TTL_S", 0.2)
    other = get_redis().lock(lock_key(source), timeout=60, blocking=False)
    taken: list[bool] = []

    def slow_poll(_: Source) -> polling.PollOutcome:
        wait_until_expired(lock_key(source))  # the poll outlives the lock's TTL...
        taken.append(other.acquire())  # ...and another process takes the source
        return polling.PollOutcome(staged=1)

    with (
        mock.patch.object(polling, "_poll", side_effect=slow_poll),
        caplog.at_level(logging.WARNING, logger="ingest.polling"),
    ):
        outcome = polling.poll_source(source)

    assert outcome == polling.PollOutcome(staged=1)  # the late release did not raise
    assert taken == [True]
    assert other.owned()  # the other holder's lock is still there, with its token
    assert polling.poll_source(source) == polling.PollOutcome(skipped=True)
    assert "sources.poll_lock_lost" in caplog.text
    other.release()
    assert not get_redis().exists(lock_key(source))
