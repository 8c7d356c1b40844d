"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""The real public data sets, beside the repo (``../shared/data``); never copied into it."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The path of ``../shared/data``.

    Skips the test when the folder is absent, except under CI (``CI=true``), where the
    data is always provided and its absence fails the test.
    """
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    if os.environ.get("CI") == "true":
        pytest.fail(f"real data sets missing at {SHARED_DATA} (required when CI=true)")
    pytest.skip(f"real data sets not found at {SHARED_DATA}; run beside ../shared/data")


@pytest.fixture
def clean_redis() -> None:
    """An empty test Redis database (broker queues, staged batches, counters)."""
    from twiscope.redis import get_redis

    get_redis().flushdb()
